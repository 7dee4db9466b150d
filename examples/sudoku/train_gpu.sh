#!/usr/bin/env bash
# One command for an accelerator: a bigger Sudoku model (hidden 256, 8 layers, ~7M parameters) trained from scratch
# with batch 256 under bfloat16 autocast, on a curriculum that ends on minimal puzzles with at most 26 givens.
#
#     examples/sudoku/train_gpu.sh                      # -> runs/sudoku-gpu (checkpoint + train_state.pt + log.jsonl)
#     examples/sudoku/train_gpu.sh runs/other --steps 3000 --max-minutes 5     # later flags override these
#     examples/sudoku/train_gpu.sh /tmp/smoke --device cpu --hidden 32 --layers 2 --batch 4 --steps 3 \
#         --pool 20,20,20,8 --eval-size 4 --solve-eval 0 --eval-every 2 --save-every 2      # CPU smoke, seconds
#
# Under 10 minutes: data about a minute on 16 cores (pools 20k easy, 60k medium, 60k hard, 40k minimal), training
# stops after --max-minutes 7 whatever step it reached (then exports), evaluation included. The step rate on a GPU
# has not been measured yet (examples/sudoku/RUNS.md): if the run stops early, the cosine schedule was not finished,
# and --steps should be lowered to what the log's steps_per_s x 420 s allows.
# Then: python bench/bench_sudoku.py --model runs/sudoku-gpu --backends cuda --difficulties medium,hard,minimal
set -euo pipefail
out=runs/sudoku-gpu
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then out="$1"; shift; fi
exec python "$(dirname "$0")/train.py" --out "$out" --device cuda --bf16 --hidden 256 --layers 8 --batch 256 \
    --steps 4000 --lr 1e-3 --warmup 200 --decay-steps 4000 --pool 20000,60000,60000,40000 \
    --mix 0.5,0.4,0.1,0:0.05,0.3,0.3,0.35 --eval-size 128 --eval-every 500 --save-every 500 --solve-eval 64 \
    --max-minutes 7 --no-progress "$@"
