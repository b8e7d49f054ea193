#!/usr/bin/env bash
# The quick (CPU) reproduction study: one run per line below, one thread each.
#   bash results/quick_study.sh            # one lane: the runs one after the other
#   LANES=2 bash results/quick_study.sh    # two lanes walk the same list (two cores: two lanes)
# A lane takes a run by locking runs/study/<name>.lock (flock; the kernel frees it if the lane
# dies) and skips runs another lane holds. Rerunning skips the runs whose results/study/<name>/
# eval.json exists and reads as JSON, and resumes the others from their run directory
# (runs/study/<name>), so the study can span several sittings. A data set is generated when the
# first run that reads it starts, so a rerun of a finished study generates nothing. Each finished
# run leaves its log.jsonl, exact command and eval.json in results/study/<name>/ (eval.json last,
# by a rename: it marks the run done); checkpoints stay in runs/ (not committed). A run that
# fails is named at the end, and the script then exits 1.
# The tables: python results/make_figures.py --readme results/README.md (or python eval.py
# --table results/study/*).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
LANES=${LANES:-1}
case $LANES in
    *[!0-9]* | "" | 0*) echo "quick_study.sh: LANES=$LANES: not a whole number >= 1" >&2; exit 2 ;;
esac
mkdir -p runs/study
if [ "$LANES" -gt 1 ] && [ -z "${STUDY_LANE:-}" ]; then
    pids=()
    rm -f runs/study/lane*.failed
    for lane in $(seq "$LANES"); do
        STUDY_LANE=$lane bash "$0" > "runs/study/lane$lane.out" 2>&1 &
        pids+=($!)
        sleep 2                                # lanes start on different runs
    done
    echo "$LANES lanes running: tail -f runs/study/lane*.out"
    status=0
    for pid in "${pids[@]}"; do wait "$pid" || status=1; done
    if [ "$status" != 0 ]; then
        failed=$(cat runs/study/lane*.failed 2>/dev/null | tr '\n' ' ')
        echo "quick_study.sh: failed: ${failed:-a lane (see runs/study/lane*.out)}" >&2
    fi
    exit $status
fi
FAILED=runs/study/lane${STUDY_LANE:-}.failed       # this lane's failed runs, one name a line
: > "$FAILED"
failed() {   # failed NAME [WHY]: say so now, and name it again at the end
    echo "FAILED: $1 (${2:-see runs/study/$1.out})"
    echo "$1" >> "$FAILED"
}
finished() {   # finished FILE: the result file exists and is complete JSON
    [ -f "$1" ] && python -c 'import json, sys; json.load(open(sys.argv[1]))' "$1" 2>/dev/null
}
keep() {   # keep SRC DIR: copy SRC into DIR by a rename, so DIR never holds half a file
    local partial=$2/.$(basename "$1").partial
    cp "$1" "$partial" && mv "$partial" "$2/$(basename "$1")"
}

take() {   # take NAME: lock NAME for this lane on fd 9 (false if another lane holds it)
    exec 9>"runs/study/$1.lock"
    flock -n 9 || { exec 9>&-; echo "busy: $1 (another lane)"; return 1; }
}
declare -A DATA=()   # data set folder -> python data.py make-3diebench flags (generated on demand)
dataset() {   # dataset DIR ARGS...: what `python data.py make-3diebench DIR ARGS` generates
    DATA[$1]="$*"
}
need_data() {   # need_data SCRIPT FLAGS...: generate the data set the run reads, once across lanes
    local script=$1 root=""
    shift
    while [ $# -gt 0 ]; do
        [ "$1" = --data-root ] && root=${2:-}
        shift
    done
    if [ -z "$root" ] && [ "$script" != ser.py ]; then root=data/3diebench-toy; fi
    if [ -z "$root" ] || [ -z "${DATA[$root]:-}" ] || [ -d "$root" ]; then return 0; fi
    # shellcheck disable=SC2086  # the flags are words
    ( flock 8; [ -d "$root" ] || python data.py make-3diebench ${DATA[$root]} ) \
        8>runs/study/data.lock
}
run() {   # run NAME SCRIPT FLAGS...: train + evaluate into runs/study/NAME, keep the small files
    local name=$1; shift
    local out=results/study/$name
    if finished "$out/eval.json"; then echo "done: $name"; return; fi
    take "$name" || return 0
    if ! finished "$out/eval.json"; then                 # (a lane may have finished it meanwhile)
        if ! need_data "$@"; then
            failed "$name" "its data set could not be made"; exec 9>&-; return
        fi
        echo "run:  $name: python $* --run-dir runs/study/$name"
        if python "$@" --run-dir "runs/study/$name" > "runs/study/$name.out" 2>&1; then
            mkdir -p "$out"
            keep "runs/study/$name/log.jsonl" "$out"
            echo "OMP_NUM_THREADS=$OMP_NUM_THREADS python $* --run-dir runs/study/$name" \
                > "$out/command.txt"
            keep "runs/study/$name/eval.json" "$out"
        else
            failed "$name"
        fi
    fi
    exec 9>&-
}
# probe NAME-s<seed> TAG EVAL_FLAGS...: eval.py on that run's final checkpoint -> NAME-TAG-s<seed>
# (only once the run has finished: another lane may still be training it)
probe() {
    local name=$1 tag=$2; shift 2
    local result=${name%-s*}-$tag-s${name##*-s}
    local out=results/study/$result
    if finished "$out/eval.json" || ! finished "results/study/$name/eval.json"; then return; fi
    take "$result" || return 0
    if ! finished "$out/eval.json"; then
        if ! need_data eval.py "$@"; then
            failed "$result" "its data set could not be made"; exec 9>&-; return
        fi
        # --out: the run's own eval.json stays
        local cmd="python eval.py runs/study/$name $* --out runs/study/$name/$tag"
        echo "run:  $result: $cmd"
        if $cmd > "runs/study/$result.out" 2>&1; then
            mkdir -p "$out"
            echo "OMP_NUM_THREADS=$OMP_NUM_THREADS $cmd" > "$out/command.txt"
            keep "runs/study/$name/$tag/eval.json" "$out"
        else
            failed "$result"
        fi
    fi
    exec 9>&-
}
embeddings() {   # embeddings NAME-s<seed>: the probes on z_inv / z_equi -> NAME-z-s<seed>
    probe "$1" z --features embeddings --protocol classify rotation
}
ood() {   # ood NAME-s<seed>: rotation probe and retrieval on the OOD angles -> NAME-ood-s<seed>
    probe "$1" ood --data-root data/3diebench-toy-ood --protocol rotation retrieval
}
drift() {   # drift NAME FLAGS...: results/predictor_drift.py, sie.py FLAGS -> results/study/NAME
    local name=$1; shift
    if [ -f "results/study/$name/command.txt" ]; then echo "done: $name"; return; fi
    take "$name" || return 0
    if ! need_data sie.py "$@"; then
        failed "$name" "its data set could not be made"; exec 9>&-; return
    fi
    echo "run:  $name: python results/predictor_drift.py runs/study/$name results/study/$name -- $*"
    python results/predictor_drift.py "runs/study/$name" "results/study/$name" -- "$@" \
        > "runs/study/$name.out" 2>&1 || failed "$name"
    exec 9>&-
}
report() {   # the end of a lane: name the failed runs, exit 1 if any
    if [ -s "$FAILED" ]; then
        echo "quick_study.sh: failed: $(tr '\n' ' ' < "$FAILED")(output: runs/study/<name>.out)" >&2
        exit 1
    fi
}
TOY="--classes 10 --objects-per-class 20 --size 32 --zoom 2 --paint axes"   # data.py's toy set
# shellcheck disable=SC2086
dataset data/3diebench-toy $TOY
# shellcheck disable=SC2086
dataset data/3diebench-toy-ood $TOY --ood           # the same objects at angles |a| > pi/2

# ---------------------------------------------------------------- the runs
# The SIE runs start from PyTorch's init of the hypernetwork, as the official code and as the
# toy preset did before it started W(g) from 0: --hypernet-gain official (their command.txt is the
# command as run then, without it).
# Question 1, SIE vs EquiMod-SimCLR on the painted toy set (the toy preset: 700 steps of batch 32),
# then one factor at a time. Seeds 0 and 1 for every setting.
for s in 0 1; do
    run sie-toy-s$s            sie.py --seed $s --hypernet-gain official
    embeddings sie-toy-s$s
    run equimod-toy-s$s        baselines.py --method equimod-simclr --seed $s
done
# the variance/covariance trade-off: coefficients as a sensitivity study (SIE only)
for s in 0 1; do
    run sie-std25-s$s          sie.py --seed $s --hypernet-gain official --std-coeff 25
    run sie-cov0.1-s$s         sie.py --seed $s --hypernet-gain official --cov-coeff 0.1
    run sie-alpha2-s$s         sie.py --seed $s --hypernet-gain official --equi-factor 2
done
# the predictor's init: H from N(0, G^2 / d), so |W(g) z| = G |z| at the start (PyTorch's default,
# the official code's, gives 1.6 |z| at d = 32); G = 1 first, then 1.6 (the default's gain, drawn
# from a normal), 0.5 and 0 (W(g) = 0 at the start); the toy preset's 4 seeds, as in the ablations
for gain in 1 1.6 0.5 0; do
    for s in 0 1 2 3; do
        run sie-gain$gain-s$s      sie.py --seed $s --hypernet-gain $gain
    done
done
for s in 0 1 2 3; do
    embeddings sie-gain1-s$s
done
# G = 1 and G = 0 for longer: does SIE then pass EquiMod at 1,400 or 2,800 steps?
for s in 0 1; do
    run sie-gain1-1400steps-s$s    sie.py --seed $s --hypernet-gain 1 --epochs 280
    run sie-gain1-2800steps-s$s    sie.py --seed $s --hypernet-gain 1 --epochs 560
    embeddings sie-gain1-2800steps-s$s
    run sie-gain0-1400steps-s$s    sie.py --seed $s --hypernet-gain 0 --epochs 280
    run sie-gain0-2800steps-s$s    sie.py --seed $s --hypernet-gain 0 --epochs 560
done
# how far H moves from its init: the default on a plateau seed (0) and a seed that leaves it (1),
# and G = 0.5 (results/predictor_drift.py; each run trained again, in 100-step pieces)
drift sie-toy-drift-s0         --seed 0 --hypernet-gain official
drift sie-toy-drift-s1         --seed 1 --hypernet-gain official
drift sie-gain0.5-drift-s0     --seed 0 --hypernet-gain 0.5
# steps: twice as long, both methods
for s in 0 1; do
    run sie-1400steps-s$s      sie.py --seed $s --hypernet-gain official --epochs 280
    run equimod-1400steps-s$s  baselines.py --method equimod-simclr --seed $s --epochs 280
done
# global batch: 64 instead of 32 at the same 700 steps (160 training objects: 3 steps per epoch)
for s in 0 1; do
    run sie-batch64-s$s        sie.py --seed $s --hypernet-gain official --batch-size 64 \
        --epochs 234
    run equimod-batch64-s$s    baselines.py --method equimod-simclr --seed $s --batch-size 64 \
        --epochs 234
done
# objects per class: 100 instead of 20 (1,000 objects; 800 training objects = 25 steps per epoch)
dataset data/3diebench-1k --classes 10 --objects-per-class 100 --size 32 --zoom 2 --paint axes
for s in 0 1; do
    run sie-1k-s$s             sie.py --seed $s --hypernet-gain official \
        --data-root data/3diebench-1k --epochs 28
    run equimod-1k-s$s         baselines.py --method equimod-simclr --seed $s \
        --data-root data/3diebench-1k --epochs 28
done

# The claim rows at the toy preset (700 steps): the other methods, more seeds, the ablations.
for s in 0 1; do
    run vicreg-toy-s$s         baselines.py --method vicreg --seed $s
    run simclr-toy-s$s         baselines.py --method simclr --seed $s
    ood vicreg-toy-s$s
    ood simclr-toy-s$s
done
for s in 2 3; do
    run sie-toy-s$s            sie.py --seed $s --hypernet-gain official
    embeddings sie-toy-s$s
    ood sie-toy-s$s
    run equimod-toy-s$s        baselines.py --method equimod-simclr --seed $s
    ood equimod-toy-s$s
done
# The ablations, with the 4 seeds of the toy preset: SIE leaves its plateau for some seeds only,
# and the paired comparisons need the seeds that do
for s in 0 1 2 3; do
    run sie-nopredvar-s$s      sie.py --seed $s --hypernet-gain official --no-pred-var
    run sie-mlppred-s$s        sie.py --seed $s --predictor mlp
    embeddings sie-mlppred-s$s
    run sie-rotcolor-s$s       sie.py --seed $s --hypernet-gain official --rot-color
done
# Question 1, more factors: projector widths half the batch (16 vs 32), the palette (real-look) set
for s in 0 1; do
    run sie-mlp16-s$s          sie.py --seed $s --hypernet-gain official --mlp 16-16-16
    run equimod-mlp16-s$s      baselines.py --method equimod-simclr --seed $s --mlp 16-16-16
done
dataset data/3diebench-palette --classes 10 --objects-per-class 20 --size 32 --zoom 2 \
    --paint palette
for s in 0 1; do
    run sie-palette-s$s        sie.py --seed $s --hypernet-gain official \
        --data-root data/3diebench-palette
    run equimod-palette-s$s    baselines.py --method equimod-simclr --seed $s \
        --data-root data/3diebench-palette
done
# SER (MoCo-v3 base, toy preset on data/imagefolder-toy): vanilla, the lambda = 0 control and SER
# (lambda = 1 at block 2), 3 seeds, with the robustness protocol; then each frozen ViT on the
# 3DIEBench toy set, the paper's out-of-distribution test (classification, rotation, colour).
# The per-block sweep over L = 2, 4, 6 is results/ser-toy (results/README.md, "SER").
for s in 0 1 2; do
    for c in vanilla lam0 L2; do
        case $c in
            vanilla) flags="--ser off" ;;
            lam0)    flags="--ser-lambda 0" ;;
            L2)      flags="" ;;
        esac
        run ser-moco-$c-s$s    ser.py --base moco --seed $s $flags \
            --eval-protocols linear,knn,equivariance,robustness
        probe ser-moco-$c-s$s 3diebench --data-root data/3diebench-toy \
            --protocol classify rotation color
    done
done
# Question 1, steps again: 4 x the toy preset (2,800 steps), both methods
for s in 0 1; do
    run sie-2800steps-s$s      sie.py --seed $s --hypernet-gain official --epochs 560
    embeddings sie-2800steps-s$s
    run equimod-2800steps-s$s  baselines.py --method equimod-simclr --seed $s --epochs 560
done
# Real meshes: Debian's sweethome3d-furniture (results/README.md, "Real 3-D models"), 352
# models in 11 classes, rendered like the toy set (32 px, zoom 2) with the models' own
# materials, then painted by face normal (--paint axes) instead: the real shapes with the toy
# set's pose cue. 281 training objects = 9 steps per epoch: 78 epochs = 702 steps, the toy
# preset's budget; 312 = 4 x that.
if [ -d data/sh3d-meshes ]; then
    dataset data/3diebench-sh3d32 --meshes data/sh3d-meshes --size 32 --zoom 2
    dataset data/3diebench-sh3d32-axes --meshes data/sh3d-meshes --size 32 --zoom 2 --paint axes
    for s in 0 1; do
        run equimod-sh3d32-s$s     baselines.py --method equimod-simclr --seed $s \
            --data-root data/3diebench-sh3d32 --epochs 78
        run sie-sh3d32-s$s         sie.py --seed $s --hypernet-gain official \
            --data-root data/3diebench-sh3d32 --epochs 78
        run equimod-sh3d32axes-s$s baselines.py --method equimod-simclr --seed $s \
            --data-root data/3diebench-sh3d32-axes --epochs 78
        run sie-sh3d32axes-s$s     sie.py --seed $s --hypernet-gain official \
            --data-root data/3diebench-sh3d32-axes --epochs 78
    done
    for s in 0 1; do
        run equimod-sh3d32-2808steps-s$s   baselines.py --method equimod-simclr --seed $s \
            --data-root data/3diebench-sh3d32 --epochs 312
    done
else
    echo "skipped: the real-mesh runs (no data/sh3d-meshes; results/README.md, 'Real 3-D" \
        "models', steps 1-3)"
fi
# SER on the other two bases (DINO, Barlow Twins): vanilla vs SER (the base's lambda and tau)
for base in dino bt; do
    for s in 0 1 2; do
        run ser-$base-vanilla-s$s  ser.py --base $base --seed $s --ser off \
            --eval-protocols linear,knn,equivariance
        run ser-$base-L2-s$s       ser.py --base $base --seed $s \
            --eval-protocols linear,knn,equivariance
    done
done
# Question 1, resolution: the toy set rendered at 48 px (2.25 x the pixels), both methods
dataset data/3diebench-toy48 --classes 10 --objects-per-class 20 --size 48 --zoom 2 --paint axes
for s in 0 1; do
    run sie-48px-s$s           sie.py --seed $s --hypernet-gain official \
        --data-root data/3diebench-toy48 --resolution 48
    run equimod-48px-s$s       baselines.py --method equimod-simclr --seed $s \
        --data-root data/3diebench-toy48 --resolution 48
done
# SER against the add-ons it is compared with (MoCo-v3 base, toy preset, 3 seeds), all with the
# current ser.py (the official schedules: lr warm-up from 0), so the ser-moco-* runs above, which
# predate that fix, are rerun here as addons-ser and addons-vanilla: vanilla and SER (L = 2), the
# add-ons at the last block (the published baselines) and decoupled at block 2 (AugSelf,
# EquiMod), E-SSL (2 views + 4 rotated crops), and the 2+4 views with SER and without it.
for s in 0 1 2; do
    for c in vanilla ser augself augself-L2 equimod equimod-L2 essl ser-local4 vanilla-local4; do
        case $c in
            vanilla)        flags="--ser off" ;;
            ser)            flags="" ;;
            augself)        flags="--equiv-objective augself" ;;
            augself-L2)     flags="--equiv-objective augself --ser-layer 2" ;;
            equimod)        flags="--equiv-objective equimod" ;;
            equimod-L2)     flags="--equiv-objective equimod --ser-layer 2" ;;
            essl)           flags="--equiv-objective essl" ;;
            ser-local4)     flags="--local-crops 4" ;;
            vanilla-local4) flags="--ser off --local-crops 4" ;;
        esac
        # shellcheck disable=SC2086  # the flags are words
        run addons-$c-s$s      ser.py --base moco --seed $s $flags \
            --eval-protocols linear,knn,equivariance,robustness
    done
done
report
