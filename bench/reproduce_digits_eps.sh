#!/usr/bin/env bash
# A "user's own" teacher distilled to one step: DDPM's setting (linear schedule 1e-4 ... 0.02, 1000 steps,
# eps-prediction) trained by train.py on the digits -> a change of prediction to v at its 1000 steps -> 9
# halvings on the nested trailing grids (512 -> 256, 128, ..., 1 steps); the alternative student (x-prediction)
# for 4 halvings (256 ... 32 steps) -> slim float16 copies in checkpoints/digits_eps/ -> the evaluation.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-digits_eps_run}          # full checkpoints (with training state) go to checkpoints/$RUN
OUT=${OUT:-checkpoints/digits_eps}  # slim copies and the evaluation go here
DISTIL=(--module digits_u --name "$RUN" --base_checkpoint "checkpoints/$RUN/original/checkpoint.pt" --num_iters 800
        --prediction_num_iters 800 --batch_size 128 --lr 1e-4 --scheduler linear --ema_decay 0 --num_workers 0
        --log_interval 5 --device cpu --seed 0)

$PY train.py --module digits_u --name "$RUN" --dname original --schedule linear --prediction eps \
  --num_timesteps 1000 --num_iters 5000 --batch_size 128 --lr 3e-4 --ema_decay 0.999 --num_workers 0 \
  --log_interval 5 --device cpu --seed 0
$PY distillate.py "${DISTIL[@]}" --dname base --prediction v --num_stages 9
$PY distillate.py "${DISTIL[@]}" --dname x --prediction x --num_stages 4
$PY bench/training_time.py --run "checkpoints/$RUN" --out "$OUT/training_time.md" \
  --machine "${MACHINE:-$(nproc)-core CPU, OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}}"
for stage in original base_v base_0 base_1 base_2 base_3 base_4 base_5 base_6 base_7 base_8 x_x x_0 x_1 x_2 x_3; do
  $PY export_checkpoint.py "checkpoints/$RUN/$stage/checkpoint.pt" "$OUT/$stage" --half True
done
$PY evaluate.py --module digits_u --checkpoints "$OUT"/original/checkpoint.pt "$OUT"/base_[0-9]*/checkpoint.pt \
  --nfe 1,2,4,8,16,32 --num_images 1000 --chunk_size 1000 --seed 0 --device cpu --samplers ddim,dpmpp_2m \
  --distilled_samplers ddim --out "$OUT/evaluation"
$PY evaluate.py --module digits_u --checkpoints "$OUT"/original/checkpoint.pt "$OUT"/x_*/checkpoint.pt \
  --nfe 1,2,4,8,16,32 --num_images 1000 --chunk_size 1000 --seed 0 --device cpu --samplers ddim \
  --out "$OUT/evaluation_x"
