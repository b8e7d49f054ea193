#!/usr/bin/env bash
# The README's first-screen numbers: the default command `python sie.py` (toy preset, generated
# data) with seeds 0-3, each at OMP_NUM_THREADS=1 and =2: 8 runs, one after the other.
#   bash results/default_runs.sh
# Each run leaves its eval.json, log.jsonl, exact command and wall time (training + evaluation,
# seconds) in results/default/t<threads>-s<seed>/; eval.json is copied last, by a rename, and marks
# the run done: a rerun skips finished runs and resumes the others from runs/default/. A run that
# fails is named at the end and the script exits 1.
# The table: python results/make_figures.py --table default
set -euo pipefail
cd "$(dirname "$0")/.."
failed=()
for threads in 1 2; do
    for seed in 0 1 2 3; do
        name=t$threads-s$seed
        out=results/default/$name
        if [ -f "$out/eval.json" ] && python -c 'import json, sys; json.load(open(sys.argv[1]))' \
                "$out/eval.json" 2>/dev/null; then
            echo "done: $name"
            continue
        fi
        mkdir -p "$out" runs/default
        command="OMP_NUM_THREADS=$threads python sie.py --seed $seed --run-dir runs/default/$name"
        echo "run: $command"
        start=$(date +%s)
        if ! OMP_NUM_THREADS=$threads python sie.py --seed "$seed" --run-dir "runs/default/$name" \
                > "runs/default/$name.out" 2>&1; then
            echo "FAILED: $name (see runs/default/$name.out)"
            failed+=("$name")
            continue
        fi
        echo "{\"seconds\": $(( $(date +%s) - start ))}" > "$out/wall.json"
        echo "$command" > "$out/command.txt"
        cp "runs/default/$name/log.jsonl" "$out/log.jsonl"
        cp "runs/default/$name/eval.json" "$out/.eval.json.partial"
        mv "$out/.eval.json.partial" "$out/eval.json"
    done
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "default_runs.sh: failed: ${failed[*]}" >&2
    exit 1
fi
