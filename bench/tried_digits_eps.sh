#!/usr/bin/env bash
# What was tried on the eps teacher: the v chain of bench/reproduce_digits_eps.sh on the trailing levels (DDIM's
# 'trailing' spacing: the first halving samples every 1000/128-th level of the v copy, 4 steps visit 999, 749, 499,
# 249) instead of the cosine schedule's (999, 435, 260, 124), from the same v copy, evaluated like the shipped chain.
# Run after bench/reproduce_digits_eps.sh (it needs checkpoints/$RUN/base_v). About an hour on 2 CPU cores (the
# stages' minutes: checkpoints/digits_eps/training_time.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-digits_eps_run}
OUT=${OUT:-checkpoints/digits_eps}

$PY distillate.py --module digits_u --name "$RUN" --dname trailing --num_stages 7 --halving_grid trailing \
  --base_checkpoint "checkpoints/$RUN/base_v/checkpoint.pt" --num_iters 1600 --teacher_steps 128 --batch_size 128 \
  --lr 1e-4 --scheduler linear --ema_decay 0 --num_workers 0 --log_interval 5 --device cpu --seed 0
for k in 0 1 2 3 4 5 6; do  # slim float16 copies, as the shipped students are evaluated
  $PY export_checkpoint.py "checkpoints/$RUN/trailing_$k/checkpoint.pt" "checkpoints/$RUN/half/trailing_$k" --half True
done
$PY evaluate.py --module digits_u --checkpoints "$OUT/original/checkpoint.pt" "checkpoints/$RUN"/half/trailing_*/checkpoint.pt \
  --nfe 1,2,4,8,16,32 --num_images 1000 --chunk_size 1000 --seed 0 --device cpu --samplers ddim,dpmpp_2m \
  --distilled_samplers ddim --out "$OUT/tried_trailing"
# where each 4-step student departs from its 8-step teacher: this chain's, the shipped chain's, the cosine/v chain's
$PY bench/student_steps.py --module digits_u --threads 2 --num_images 200 --out "$OUT/student_steps.md" --pairs \
  "$OUT/base_3/checkpoint.pt:$OUT/base_4/checkpoint.pt" \
  "checkpoints/$RUN/half/trailing_3/checkpoint.pt:checkpoints/$RUN/half/trailing_4/checkpoint.pt" \
  checkpoints/digits/base_3/checkpoint.pt:checkpoints/digits/base_4/checkpoint.pt
