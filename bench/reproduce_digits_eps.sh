#!/usr/bin/env bash
# A "user's own" teacher distilled to one step: DDPM's setting (linear schedule 1e-4 ... 0.02, 1000 steps,
# eps-prediction) trained by train.py on the digits -> its float16 copy, the teacher of every stage and the reference
# of the evaluation -> a change of prediction to v at its 1000 steps (3,200 steps, the x error weighted as the
# teacher's own eps MSE) -> 7 halvings, the first from the v copy's DDIM on 128 of its levels, those of the cosine
# schedule's 128 steps (--halving_grid cosine, the default; 64 -> 32, ..., 1 steps; 1,600 steps each); the
# alternative student (x-prediction) for 4 halvings (64 ... 8 steps) on the trailing 128 levels (DDIM's 'trailing'
# spacing; compare it with the v chain on the same levels, bench/tried_digits_eps.sh) -> two shorter v copies (800
# steps, weighted as the MSE of v and of eps) -> slim float16 copies in checkpoints/digits_eps/ -> the evaluation
# and the change-of-prediction table.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-digits_eps_run}          # full checkpoints (with training state) go to checkpoints/$RUN
OUT=${OUT:-checkpoints/digits_eps}  # slim copies and the evaluation go here
DISTIL=(--module digits_u --name "$RUN" --base_checkpoint "$OUT/original/checkpoint.pt" --num_iters 1600
        --prediction_num_iters 3200 --prediction_weighting snr --teacher_steps 128 --batch_size 128 --lr 1e-4 --scheduler linear --ema_decay 0
        --num_workers 0 --log_interval 5 --device cpu --seed 0)

$PY train.py --module digits_u --name "$RUN" --dname original --schedule linear --prediction eps \
  --num_timesteps 1000 --num_iters 5000 --batch_size 128 --lr 3e-4 --ema_decay 0.999 --num_workers 0 \
  --log_interval 5 --device cpu --seed 0
$PY export_checkpoint.py "checkpoints/$RUN/original/checkpoint.pt" "$OUT/original" --half True
# the v and x chains are independent: one core each
OMP_NUM_THREADS=1 $PY distillate.py "${DISTIL[@]}" --dname base --prediction v --num_stages 7 &
OMP_NUM_THREADS=1 $PY distillate.py "${DISTIL[@]}" --dname x --prediction x --num_stages 4 --halving_grid trailing &
wait
# two shorter v copies for the change-of-prediction table: 800 steps, weighted as the MSE of v and of eps
for weighting in snr+1 snr; do
  $PY distillate.py "${DISTIL[@]}" --dname "v_800_$weighting" --prediction v --num_stages 0 --prediction_num_iters 800 \
    --prediction_weighting "$weighting"
done
$PY bench/training_time.py --run "checkpoints/$RUN" --out "$OUT/training_time.md" \
  --machine "${MACHINE:-$(nproc)-core CPU, the v and x chains side by side, one thread each}"
for stage in base_v base_0 base_1 base_2 base_3 base_4 base_5 base_6 x_x x_0 x_1 x_2 x_3; do
  $PY export_checkpoint.py "checkpoints/$RUN/$stage/checkpoint.pt" "$OUT/$stage" --half True
done
for copy in v_800_snr+1 v_800_snr; do
  $PY export_checkpoint.py "checkpoints/$RUN/$copy/checkpoint.pt" "$OUT/copies/$copy" --half True
done
$PY evaluate.py --module digits_u --checkpoints "$OUT"/original/checkpoint.pt "$OUT"/base_[0-9]*/checkpoint.pt \
  --nfe 1,2,4,8,16,32 --num_images 1000 --chunk_size 1000 --seed 0 --device cpu --samplers ddim,dpmpp_2m \
  --distilled_samplers ddim --out "$OUT/evaluation"
$PY evaluate.py --module digits_u --checkpoints "$OUT"/original/checkpoint.pt "$OUT"/x_*/checkpoint.pt \
  --nfe 1,2,4,8,16,32 --num_images 1000 --chunk_size 1000 --seed 0 --device cpu --samplers ddim \
  --out "$OUT/evaluation_x"
$PY bench/prediction_change.py --module digits_u --teacher "$OUT/original/checkpoint.pt" --checkpoints \
  "$OUT/copies/v_800_snr+1/checkpoint.pt" "$OUT/copies/v_800_snr/checkpoint.pt" "$OUT/base_v/checkpoint.pt" \
  --ranges 0:400 --num_images 100 --out "$OUT/prediction_change.md"
