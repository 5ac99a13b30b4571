#!/usr/bin/env bash
# The class-conditional digits chain from scratch, with the commands that made the shipped checkpoints:
# a base model trained for classifier-free guidance (128 steps, labels dropped 10% of the time) -> stage one
# of guidance distillation (a w-input model, w in [0, 4], 128 steps) -> 7 halvings (64 ... 1 steps) -> slim
# float16 copies in checkpoints/digits_cond/ -> the per-w evaluation table and plot. The shipped chain ran
# with OMP_NUM_THREADS=1 (one core; training_time.md gives each stage's minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-digits_cond_run}          # full checkpoints (with training state) go to checkpoints/$RUN
OUT=${OUT:-checkpoints/digits_cond}  # slim copies and the evaluation go here

$PY train.py --module digits_cond_u --name "$RUN" --dname original --num_timesteps 128 --num_iters 5000 \
  --batch_size 128 --lr 3e-4 --ema_decay 0.999 --cond_drop_prob 0.1 --num_workers 0 --log_interval 5 \
  --device cpu --seed 0
$PY distillate.py --module digits_cond_u --name "$RUN" --dname guided --guidance_distill True --w_min 0 --w_max 4 \
  --guidance_num_iters 2000 --num_stages 7 --base_checkpoint "checkpoints/$RUN/original/checkpoint.pt" \
  --num_iters 800 --batch_size 128 --lr 1e-4 --scheduler linear --ema_decay 0 --num_workers 0 --log_interval 5 \
  --device cpu --seed 0
$PY bench/training_time.py --run "checkpoints/$RUN" --out "$OUT/training_time.md" \
  --machine "${MACHINE:-$(nproc)-core CPU, OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}}"
for stage in original guided_w guided_0 guided_1 guided_2 guided_3 guided_4 guided_5 guided_6; do
  $PY export_checkpoint.py "checkpoints/$RUN/$stage/checkpoint.pt" "$OUT/$stage" --half True
done
$PY evaluate.py --module digits_cond_u --checkpoints "$OUT"/original/checkpoint.pt "$OUT"/guided_*/checkpoint.pt \
  --guidance 0,0.5,1,2,4 --nfe 2,4,8,16,32 --num_images 1000 --chunk_size 1000 --seed 0 --device cpu \
  --out "$OUT/evaluation"
