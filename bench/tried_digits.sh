#!/usr/bin/env bash
# What was tried on the digits: the halvings of bench/reproduce_digits.sh with the paper's truncated-SNR
# weighting (--weighting truncated_snr) instead of the v-space MSE, from the same base model, evaluated
# like the shipped chain (DDIM rows). Run after bench/reproduce_digits.sh (it needs checkpoints/$RUN/original).
# About 30 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-digits_run}
OUT=${OUT:-checkpoints/digits}

$PY distillate.py --module digits_u --name "$RUN" --dname truncated_snr --num_stages 7 --weighting truncated_snr \
  --base_checkpoint "checkpoints/$RUN/original/checkpoint.pt" --num_iters 800 --batch_size 128 --lr 1e-4 \
  --scheduler linear --ema_decay 0 --num_workers 0 --log_interval 5 --device cpu --seed 0
$PY evaluate.py --module digits_u --checkpoints "checkpoints/$RUN/original/checkpoint.pt" \
  "checkpoints/$RUN"/truncated_snr_*/checkpoint.pt --samplers ddim --nfe 4 --distilled_samplers ddim \
  --num_images 1000 --chunk_size 1000 --seed 0 --device cpu --out "$OUT/tried_truncated_snr"
