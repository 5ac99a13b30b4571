#!/usr/bin/env bash
# One prepared check for a machine with an NVIDIA GPU (H100/H200), about 9 minutes in all:
#   tiny      train.py -> distillate.py -> sample.py on CUDA with --amp bf16 --channels_last True
#             --compile True (digits_u, 16 steps; the non-finite guard in the fused optimizer), exit codes and
#             the checkpoints/samples checked; evaluate.py on the shipped digits chain on CUDA (200 images)
#   stream    sample.py writing 20,000 images in shards on CUDA (bench/sample_memory.py: peak host memory
#             against 2,000, and a killed run resumed to the same file)
#   fid       the FID InceptionV3's images/s on the GPU (bench/inception_rate.py), and evaluate.py --samples
#             with Inception features from a weights file (random weights, 2,000 images of 64x64 against 2,000)
#   fp32      bench/bench.py, CelebA configuration (celeba_u, 256x256), fp32 eager: the baseline, with the
#             per-image noise against randn_like on the GPU and every sampler through generate
#   compile   the same with bf16 autocast + channels_last + torch.compile, against the baseline
#   memory    peak memory of CelebA train steps with and without --grad_checkpoint (bf16, channels_last)
#   torchrun  train.py under torchrun on the GPU(s); with one GPU also 2 processes on the CPU (gloo)
# Usage, from anywhere:  bash bench/gpu_check.sh   (exit status 0 when every step that ran passed)
# Everything lands in $OUT (default bench/out): gpu_check.log and three bench_celeba_*.json.
# Settings: PY (python to use), STEPS (default "tiny stream fid fp32 compile memory torchrun"), BATCH (CelebA
# batch, default 16), BUDGET (seconds for all steps, default 540; a step that would start with under 20 s
# left is skipped, every step also has its own timeout), BENCH_EXTRA (more bench.py flags, appended).
# Dry run of this script's logic without a GPU (tiny, slow): DEVICE=cpu COMPILE=False BATCH=1 FID_BATCH=4 FID_IMAGES=40
#   BENCH_EXTRA="--resolution 32 --iters 1 --warmup 1" bash bench/gpu_check.sh
# Python: $PY if set; else .venv/bin/python if it sees CUDA; else python3 if it has torch with CUDA and the
# other requirements (lmdb, needed only for LMDB data sets, may be missing: a stub is put on the path,
# or wheels in .whl/ are installed); else `make .venv/.installed` (pip must reach a package registry).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STEPS=${STEPS:-tiny stream fid fp32 compile memory torchrun}
DEVICE=${DEVICE:-cuda}
COMPILE=${COMPILE:-True}
read -r -a EXTRA <<<"${BENCH_EXTRA:-}"
BATCH=${BATCH:-16}
FID_BATCH=${FID_BATCH:-200}  # images per timed batch of the FID InceptionV3
FID_IMAGES=${FID_IMAGES:-2000}  # images of each set of the fid step
BUDGET=${BUDGET:-540}
START=$SECONDS
RESULTS=()
export PYTHONUNBUFFERED=1
rm -f "$OUT"/bench_celeba_*.json "$OUT/gpu_check.log"  # no stale baseline or results from an earlier run

step() {  # step NAME TIMEOUT_S COMMAND... : run with a timeout, log it, record the outcome
    local name=$1 limit=$2 left t0 rc
    shift 2
    left=$((BUDGET - (SECONDS - START)))
    if ((left < 20)); then
        echo "=== [$((SECONDS - START))s] SKIP $name: the budget of ${BUDGET}s is spent"
        RESULTS+=("$name: skipped (budget)")
        return 1
    fi
    ((limit > left)) && limit=$left
    echo "=== [$((SECONDS - START))s] $name (timeout ${limit}s): $*"
    t0=$SECONDS
    timeout -k 10 "$limit" "$@"
    rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0))s"
    if ((rc == 0)); then RESULTS+=("$name: ok ($((SECONDS - t0))s)"); else RESULTS+=("$name: FAILED (exit $rc$( ((rc == 124)) && echo ', timeout'))"); fi
    return $rc
}
wants() { [[ " $STEPS " == *" $1 "* ]]; }

main() {

# -- Python -------------------------------------------------------------------------------------
NEEDS="import torch, torchvision, numpy, PIL, tqdm, tensorboard; assert '$DEVICE' == 'cpu' or torch.cuda.is_available()"
if [[ -z "${PY:-}" ]]; then
    if [[ -x .venv/bin/python ]] && .venv/bin/python -c "$NEEDS" 2>/dev/null; then PY=$ROOT/.venv/bin/python
    elif python3 -c "$NEEDS" 2>/dev/null; then PY=$(command -v python3)
    else
        echo "=== no Python with torch+CUDA found: make .venv/.installed (pip fetches wheels)"
        timeout 600 make .venv/.installed PYTHON="$(command -v python3.11 || command -v python3)" && PY=$ROOT/.venv/bin/python
    fi
fi
if [[ -z "${PY:-}" ]] || ! "$PY" -c "$NEEDS"; then echo "=== FAILED: no usable Python with torch and CUDA"; return 1; fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
if ! "$PY" -c "import lmdb" 2>/dev/null; then
    if compgen -G ".whl/lmdb-*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site .whl/lmdb-*.whl
        export PYTHONPATH=$PYTHONPATH:/tmp/gpu_check_site
    else
        mkdir -p /tmp/gpu_check_stub
        cat >/tmp/gpu_check_stub/lmdb.py <<'EOF'
"""Stand-in written by bench/gpu_check.sh: the lmdb package is not installed here. Only LMDB data sets need it."""
class Error(Exception): pass
class MapFullError(Error): pass
def open(*args, **kwargs):
    raise Error("the lmdb package is not installed on this machine (bench/gpu_check.sh stub)")
EOF
        export PYTHONPATH=$PYTHONPATH:/tmp/gpu_check_stub
        echo "=== note: lmdb is missing; a stub is on the path (no LMDB data set is read here)"
    fi
fi
if ! "$PY" -c "import pytorch_fid" 2>/dev/null && compgen -G ".whl/pytorch_fid-*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site .whl/pytorch_fid-*.whl
    export PYTHONPATH=$PYTHONPATH:/tmp/gpu_check_site  # the FID network's blocks (pure Python; scipy not needed)
fi
echo "=== $(date -u +%FT%TZ) gpu_check in $ROOT, python $PY, OUT $OUT, steps: $STEPS"
timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv
"$PY" -c "import torch, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
W=$(mktemp -d /tmp/gpu_check.XXXXXX)  # scratch folder of the tiny runs (checkpoints, pictures)

# -- tiny: the scripts on CUDA with every speed flag ----------------------------------------------
if wants tiny; then
    cd "$W"
    FAST=(--module digits_u --device $DEVICE --amp bf16 --channels_last True --compile "$COMPILE" --num_workers 0 --seed 0)
    step tiny_train 180 "$PY" "$ROOT/train.py" "${FAST[@]}" --name gc --dname base --num_timesteps 16 \
        --num_iters 30 --batch_size 64 --ema_decay 0.99 --log_every 10 &&
    step tiny_distill 150 "$PY" "$ROOT/distillate.py" "${FAST[@]}" --name gc --dname student \
        --base_checkpoint checkpoints/gc/base/checkpoint.pt --num_iters 20 --batch_size 64 --log_every 10 &&
    step tiny_sample 120 "$PY" "$ROOT/sample.py" --module digits_u --device $DEVICE --amp bf16 --channels_last True \
        --compile "$COMPILE" --checkpoint checkpoints/gc/student/checkpoint.pt --batch_size 64 --clipped_sampling True \
        --out_file samples.png --out_npz samples.npz --float_samples True &&
    step tiny_verify 60 "$PY" -c "
import numpy as np, torch
base = torch.load('checkpoints/gc/base/checkpoint.pt', weights_only=True)
student = torch.load('checkpoints/gc/student/checkpoint.pt', weights_only=True)
assert (base['step'], base['n_timesteps'], student['step'], student['n_timesteps'], student['time_scale']) == (30, 16, 20, 8, 2), 'steps'
for ck in (base, student):
    assert all(torch.isfinite(v).all() for v in ck['G'].values() if v.is_floating_point()), 'non-finite weights'
    assert not any(k.startswith(('module.', '_orig_mod.')) for k in ck['G']), 'prefixed keys'
s = np.load('samples.npz')['samples']
assert s.shape == (64, 1, 8, 8) and np.isfinite(s).all() and s.min() >= -1 and s.max() <= 1 and s.std() > 0.01, (s.shape, s.std())
print('tiny run verified: checkpoints load (weights_only), steps and stages right, 64 finite samples in [-1, 1]')
"
    cd "$ROOT"
    step tiny_evaluate 180 "$PY" evaluate.py --module digits_u --checkpoints checkpoints/digits/original/checkpoint.pt \
        checkpoints/digits/base_4/checkpoint.pt checkpoints/digits/base_5/checkpoint.pt --nfe 4,8 --samplers ddim,ancestral \
        --distilled_samplers ddim --num_images 200 --chunk_size 200 --device $DEVICE --out "$OUT/gpu_evaluate"
fi

# -- stream: sample.py at scale ---------------------------------------------------------------------
if wants stream; then
    step sample_stream 150 "$PY" bench/sample_memory.py --counts 2000,20000 --repeats 1 --device $DEVICE --chunk_size 1000 \
        --json "$OUT/sample_memory_$DEVICE.json"
fi

# -- fid: the FID InceptionV3 on the GPU, and evaluate.py --samples through it ----------------------
if wants fid; then
    step fid_rate 90 "$PY" bench/inception_rate.py --device $DEVICE --batch_size "$FID_BATCH" --iters 5 --json "$OUT/inception_rate_$DEVICE.json" &&
    step fid_sets 60 "$PY" -c "
import numpy as np, torch, fid
torch.save(fid.random_inception_weights(seed=0), '$W/inception.pth')
rng = np.random.default_rng(0)
for name in ('real', 'fake'):
    np.savez('$W/' + name + '.npz', arr_0=rng.integers(0, 256, ($FID_IMAGES, 64, 64, 3), dtype=np.uint8))
" &&
    step fid_evaluate 120 "$PY" evaluate.py --module celeba_u --samples "$W/fake.npz" --reference "$W/real.npz" \
        --features inception --inception_weights "$W/inception.pth" --chunk_size 500 --device $DEVICE --out "$OUT/gpu_fid"
fi

# -- the CelebA benchmarks ------------------------------------------------------------------------
BENCH=(--module celeba_u --device "$DEVICE" --batch_size "$BATCH" --iters 10 --warmup 3 --sampler_steps 8 --sampler_reps 5
       --max_sampling_s 15)
BASE_JSON=$OUT/bench_celeba_fp32_eager.json
if wants fp32; then
    step bench_fp32_eager 150 "$PY" bench/bench.py "${BENCH[@]}" --amp no \
        --only matmul,flops,train,distill,noise,sampler,sampling --json "$BASE_JSON" "${EXTRA[@]}"
fi
if wants compile; then
    step bench_bf16_compile 300 "$PY" bench/bench.py "${BENCH[@]}" --amp bf16 --channels_last True --compile "$COMPILE" \
        --only matmul,train,distill,sampler,sampling --json "$OUT/bench_celeba_bf16_cl_compile.json" \
        $([[ -f "$BASE_JSON" ]] && echo --baseline "$BASE_JSON") "${EXTRA[@]}"
fi
if wants memory; then
    step bench_memory 120 "$PY" bench/bench.py "${BENCH[@]}" --amp bf16 --channels_last True --only memory \
        --json "$OUT/bench_celeba_memory.json" "${EXTRA[@]}"
fi

# -- torchrun -------------------------------------------------------------------------------------
if wants torchrun; then
    cd "$W"
    step torchrun_cuda 90 "$PY" -m torch.distributed.run --standalone --nproc_per_node "$((NGPU > 0 ? NGPU : 1))" "$ROOT/train.py" \
        --module digits_u --device $DEVICE --amp bf16 --channels_last True --name ddp --dname cuda --num_timesteps 16 \
        --num_iters 6 --batch_size 32 --num_workers 0 &&
        step torchrun_cuda_verify 30 "$PY" -c "import torch; assert torch.load('checkpoints/ddp/cuda/checkpoint.pt', weights_only=True)['step'] == 6; print('ok')"
    if ((NGPU < 2)); then
        step torchrun_2proc_cpu 90 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 "$ROOT/train.py" \
            --module digits_u --device cpu --name ddp --dname gloo --num_timesteps 16 --num_iters 6 --batch_size 32 \
            --num_workers 0 &&
            step torchrun_2proc_verify 30 "$PY" -c "import torch; assert torch.load('checkpoints/ddp/gloo/checkpoint.pt', weights_only=True)['step'] == 6; print('ok')"
    fi
    cd "$ROOT"
fi

rm -rf "$W"
echo "=== summary after $((SECONDS - START))s (results in $OUT):"
printf '  %s\n' "${RESULTS[@]}"
for f in "$OUT"/bench_celeba_*.json; do
    [[ -f "$f" ]] && "$PY" -c "
import json, sys
r = json.load(open(sys.argv[1]))
print('  ' + sys.argv[1].rsplit('/', 1)[-1] + ':')
for g in r['goals']:
    print('    %s  %s: %.4g' % ('PASS' if g['passed'] else 'FAIL', g['goal'], g['value']))
for k, v in r.get('speedups', {}).items():
    print('    %s: %.2fx' % (k, v))
" "$f"
done
[[ " ${RESULTS[*]} " != *FAILED* ]]
}

main 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
