#!/usr/bin/env bash
# The quick (CPU) reproduction study: one run per line below, one thread each, one after the other.
# Rerunning this script skips the runs whose results/study/<name>/eval.json exists and resumes the
# others from their run directory (runs/study/<name>), so the study can span several sittings.
# Each finished run leaves its eval.json, log.jsonl and exact command in results/study/<name>/;
# checkpoints stay in runs/ (not committed). The tables: python eval.py --table results/study/*
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

run() {   # run NAME SCRIPT FLAGS...: train + evaluate into runs/study/NAME, keep the small files
    local name=$1; shift
    local out=results/study/$name
    if [ -f "$out/eval.json" ]; then echo "done: $name"; return; fi
    echo "run:  $name: python $* --run-dir runs/study/$name"
    python "$@" --run-dir "runs/study/$name" > "runs/study/$name.out" 2>&1 || {
        echo "FAILED: $name (see runs/study/$name.out)"; return; }
    mkdir -p "$out"
    cp "runs/study/$name/eval.json" "runs/study/$name/log.jsonl" "$out/"
    echo "OMP_NUM_THREADS=$OMP_NUM_THREADS python $* --run-dir runs/study/$name" > "$out/command.txt"
}
embeddings() {   # embeddings NAME-s<seed>: the same probes on z_inv / z_equi -> NAME-z-s<seed>
    local name=$1
    local out=results/study/${name%-s*}-z-s${name##*-s}
    if [ -f "$out/eval.json" ] || [ ! -f "results/study/$name/eval.json" ]; then return; fi
    local cmd="python eval.py runs/study/$name --features embeddings --protocol classify rotation"
    cmd="$cmd --out runs/study/$name/embeddings"   # the run's own eval.json stays
    echo "run:  $name embeddings: $cmd"
    $cmd > "runs/study/$name.embeddings.out" 2>&1 || {
        echo "FAILED: $name embeddings (see runs/study/$name.embeddings.out)"; return; }
    mkdir -p "$out"
    cp "runs/study/$name/embeddings/eval.json" "$out/"
    echo "OMP_NUM_THREADS=$OMP_NUM_THREADS $cmd" > "$out/command.txt"
}
mkdir -p runs/study

# Question 1, SIE vs EquiMod-SimCLR on the painted toy set (the toy preset: 700 steps of batch 32),
# then one factor at a time. Seeds 0 and 1 for every setting.
for s in 0 1; do
    run sie-toy-s$s            sie.py --seed $s
    embeddings sie-toy-s$s
    run equimod-toy-s$s        baselines.py --method equimod-simclr --seed $s
done
# the variance/covariance trade-off: coefficients as a sensitivity study (SIE only)
for s in 0 1; do
    run sie-std25-s$s          sie.py --seed $s --std-coeff 25
    run sie-cov0.1-s$s         sie.py --seed $s --cov-coeff 0.1
    run sie-alpha2-s$s         sie.py --seed $s --equi-factor 2
done
# steps: twice as long, both methods
for s in 0 1; do
    run sie-1400steps-s$s      sie.py --seed $s --epochs 280
    run equimod-1400steps-s$s  baselines.py --method equimod-simclr --seed $s --epochs 280
done
# global batch: 64 instead of 32 at the same 700 steps (160 training objects: 3 steps per epoch)
for s in 0 1; do
    run sie-batch64-s$s        sie.py --seed $s --batch-size 64 --epochs 234
    run equimod-batch64-s$s    baselines.py --method equimod-simclr --seed $s --batch-size 64 --epochs 234
done
# objects per class: 100 instead of 20 (1,000 objects; 800 training objects = 25 steps per epoch)
if [ ! -d data/3diebench-1k ]; then
    python data.py make-3diebench data/3diebench-1k --classes 10 --objects-per-class 100 --size 32 \
        --zoom 2 --paint axes
fi
for s in 0 1; do
    run sie-1k-s$s             sie.py --seed $s --data-root data/3diebench-1k --epochs 28
    run equimod-1k-s$s         baselines.py --method equimod-simclr --seed $s \
        --data-root data/3diebench-1k --epochs 28
done
