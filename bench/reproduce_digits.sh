#!/usr/bin/env bash
# The whole digits chain from scratch, with the commands that made the shipped checkpoints:
# base model (128 steps) -> 7 halvings (64, 32, 16, 8, 4, 2, 1 steps) -> slim float16 copies in
# checkpoints/digits/ -> the evaluation table and plot (the command of `make evaluate`). About 45 minutes on
# 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-digits_run}            # full checkpoints (with training state) go to checkpoints/$RUN
OUT=${OUT:-checkpoints/digits}    # slim copies and the evaluation go here

$PY train.py --module digits_u --name "$RUN" --dname original --num_timesteps 128 --num_iters 5000 \
  --batch_size 128 --lr 3e-4 --ema_decay 0.999 --num_workers 0 --log_interval 5 --device cpu --seed 0
$PY distillate.py --module digits_u --name "$RUN" --dname base --num_stages 7 \
  --base_checkpoint "checkpoints/$RUN/original/checkpoint.pt" --num_iters 800 --batch_size 128 --lr 1e-4 \
  --scheduler linear --ema_decay 0 --num_workers 0 --log_interval 5 --device cpu --seed 0
for stage in original base_0 base_1 base_2 base_3 base_4 base_5 base_6; do
  $PY export_checkpoint.py "checkpoints/$RUN/$stage/checkpoint.pt" "$OUT/$stage" --half True
done
$PY evaluate.py --module digits_u --checkpoints "$OUT"/original/checkpoint.pt "$OUT"/base_*/checkpoint.pt \
  --num_images 1000 --chunk_size 1000 --seed 0 --device cpu --out "$OUT/evaluation"
