#!/usr/bin/env python
"""Speed and memory of the project's real code paths for one configuration on one device.

    python bench/bench.py --module digits_u --device cpu --batch_size 128 --json bench/out/digits_cpu.json
    python bench/bench.py --module celeba_u --device cuda --batch_size 16 --amp bf16 --channels_last True \
        --compile True --baseline bench/out/celeba_fp32.json --json bench/out/celeba_bf16.json

Sections (--only, comma list; default all):
  matmul    the device's measured dense matmul rate (best of several square products, fp32 and the AMP dtype)
  flops     UNet forward and forward+backward FLOPs (FlopCounterMode, counted on the meta device, so
            attention is counted as its plain matmuls whatever kernel runs), the bare network's time for
            both and the achieved FLOP/s as a fraction of the measured matmul rate
  train     one optimizer step of train.py's loop (train_utils.train with train_utils.training_loss: draws, loss,
            backward, clipping, the guard, AdamW, EMA; channels_last, compile, grad_checkpoint, GradScaler as
            asked): the time of a run of --iters + --warmup steps less that of a run of --warmup steps, divided
            by --iters (set-up, the final checkpoint and the loader's start cancel out)
  distill   the same for distillate.py's loop (train_utils.distillation_loss: the teacher under inference
            mode, two forwards, and the student's step); ratio to train at the same batch
  noise     per-image noise (seeding.image_randn) against one batched randn_like of the same shape
  sampler   time per step of every sampler through sample_utils.generate (per-image noise included) over the
            bare network call at the same batch
  sampling  images/s of sampling at each stage (--stages, default N,8,4,1); stages too long to run within
            --max_sampling_s are extrapolated from the measured per-step time and marked as estimates
  memory    peak memory of train steps with and without --grad_checkpoint, each in a fresh subprocess
            (CUDA: torch.cuda.max_memory_allocated; CPU: the process's peak RSS, VmHWM, reset through
            /proc/self/clear_refs just before the steps, so 'the steps' part' = peak - RSS before them)
Batches are random tensors: an in-memory data set of --batch_size images, loaded in the main process.
"""
import argparse
import datetime
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import samplers  # noqa: E402
import seeding  # noqa: E402
from cli import UserError, str2bool  # noqa: E402
from diffusion import make_beta_schedule, model_grid  # noqa: E402
from runtime import RunContext  # noqa: E402
from sample_utils import SamplerSpec, generate  # noqa: E402
from train_flags import distill_argument_parser, train_argument_parser  # noqa: E402
from train_utils import Stage, distillation_loss, train, training_loss  # noqa: E402
from user_modules import extra_args_fn, load_user_module, make_user_model  # noqa: E402

SECTIONS = ("matmul", "flops", "train", "distill", "noise", "sampler", "sampling", "memory")
MEMORY_TAG = "BENCH_MEMORY_RESULT "
# Goals of the issue "Speed and scale" that these numbers check.
CPU_GOALS = {"fwd_bwd_of_matmul": 0.85, "distill_over_train": 1.70, "sampler_overhead": 0.03, "noise_over_randn": 3.0}
GPU_GOALS = {"train_of_matmul": 0.40, "speedup_over_baseline": 3.0, "grad_checkpoint_peak": 0.5,
             "distill_over_train": 1.75}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--module", default="digits_u", help="user module, e.g. digits_u or celeba_u")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--batch_size", type=int, default=0, help="images per step (0: 128 for 8x8 models, 1 on CPU / 16 on CUDA otherwise)")
    p.add_argument("--resolution", type=int, default=0, help="override the model's H = W (0: the module's image_size)")
    p.add_argument("--amp", default="no", choices=["no", "bf16", "fp16"], help="autocast dtype for the network")
    p.add_argument("--channels_last", type=str2bool, default=False)
    p.add_argument("--compile", type=str2bool, default=False, help="torch.compile the network (slow to compile on CPU)")
    p.add_argument("--iters", type=int, default=10, help="timed repetitions of each measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed repetitions first (compilation happens here)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of sections: {','.join(SECTIONS)}")
    p.add_argument("--json", default="", help="write the machine, config and all numbers here")
    p.add_argument("--num_timesteps", type=int, default=0, help="base model steps N (0: the module's BASE_NUM_STEPS or 1024)")
    p.add_argument("--matmul_sizes", default="", help="square matmul sizes (default 1024,2048 on CPU, 4096,8192 on CUDA)")
    p.add_argument("--matmul_reps", type=int, default=5, help="matmul timings; the best one counts")
    p.add_argument("--sampler_steps", type=int, default=16, help="sampling steps per timed generate call in 'sampler'")
    p.add_argument("--sampler_reps", type=int, default=0, help="timed (network, sampler) pairs in 'sampler' (0: --iters)")
    p.add_argument("--stages", default="", help="sampling steps of each stage for 'sampling' (default N,8,4,1)")
    p.add_argument("--sampling_sampler", default="ddpm", choices=["ddpm", "clipped"], help="sampler of 'sampling'")
    p.add_argument("--max_sampling_s", type=float, default=30.0, help="longer stages are extrapolated, not run")
    p.add_argument("--memory_iters", type=int, default=3, help="train steps per setting in 'memory'")
    p.add_argument("--step_reps", type=int, default=1, help="pairs of loop runs whose difference times 'train' and 'distill'")
    p.add_argument("--baseline", default="", help="JSON of an earlier run (e.g. fp32 eager) to report speed-ups against")
    p.add_argument("--_memory_child", type=str2bool, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- small helpers ---------------------------------------------------------------------------

class Bench:
    """The configuration of one run: device, module, model shape, AMP and its timing helpers."""

    def __init__(self, args):
        self.args = args
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        self.module = load_user_module(args.module)
        probe = make_user_model(self.module)
        _, c, h, w = probe.image_size
        if args.resolution:
            h = w = args.resolution
        self.shape = [c, h, w]
        self.n_params = sum(p.numel() for p in probe.parameters())
        del probe
        self.n = args.num_timesteps or int(getattr(self.module, "BASE_NUM_STEPS", 1024))
        self.ctx = RunContext(args)  # chooses the device, sets TF32/cudnn.benchmark on CUDA as the scripts do
        self.device = self.ctx.device
        self.cuda = self.device.type == "cuda"
        if args.batch_size <= 0:
            args.batch_size = 128 if h * w <= 64 else (16 if self.cuda else 1)
        self.batch = args.batch_size
        self._flops = {}
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self._bare = None
        if args.compile and not self.cuda and args._memory_child is None:
            warnings.warn("--compile True on CPU: compilation takes minutes here; raise --warmup so it stays untimed")

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def images(self, batch=None):
        x = torch.rand([batch or self.batch] + self.shape, device=self.device) * 2 - 1
        return x.contiguous(memory_format=self.memory_format)

    def timed(self, fn, iters=None, warmup=None):
        """Median, min and mean seconds of fn() over `iters` runs after `warmup` untimed ones."""
        iters = self.args.iters if iters is None else iters
        warmup = self.args.warmup if warmup is None else warmup
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(max(1, iters)):
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return {"median_s": statistics.median(times), "min_s": min(times), "mean_s": statistics.fmean(times),
                "n": len(times)}

    def bare_model(self):
        """(model in eval mode without gradients, the callable: compiled where asked), built once."""
        if self._bare is None:
            model = make_user_model(self.module).to(self.device, memory_format=self.memory_format)
            model.eval().requires_grad_(False)
            self._bare = (model, torch.compile(model) if self.args.compile else model)
        return self._bare

    def compute_dtype(self):
        return {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.args.amp]

    def script_args(self, script, grad_checkpoint=False):
        """The argument namespace of train.py / distillate.py for this configuration (their own defaults)."""
        a = self.args
        argv = ["--module", a.module, "--name", "bench", "--dname", "bench", "--device", str(self.device),
                "--batch_size", str(self.batch), "--amp", a.amp, "--channels_last", str(a.channels_last),
                "--compile", str(a.compile), "--grad_checkpoint", str(grad_checkpoint), "--num_iters", "1000000",
                "--num_workers", "0", "--log_images", "0", "--log_every", "1000000", "--ckpt_interval", "1e9"]
        if script == "distill":
            return distill_argument_parser("").parse_args(argv + ["--base_checkpoint", "unused.pt"])
        return train_argument_parser("").parse_args(argv + ["--num_timesteps", str(self.n)])


def make_stage(b, script, grad_checkpoint=False):
    """(args, Stage) of train.py (a base model of b.n steps) or distillate.py (its student), built as the scripts
    build them, writing into a temporary folder."""
    args = b.script_args(script, grad_checkpoint)
    directory = tempfile.mkdtemp(prefix="bench-")
    grid = model_grid(make_beta_schedule("cosine", b.n))
    extra_args = extra_args_fn(b.module)
    if script == "train":
        return args, Stage(make_user_model(b.module), functools.partial(training_loss, grid=grid), b.n, torch.float32,
                           {}, extra_args, grid, directory, {})
    teacher = make_user_model(b.module).to(b.device, memory_format=b.memory_format).eval().requires_grad_(False)
    student = make_user_model(b.module)
    student.load_state_dict(teacher.state_dict())
    student_grid = model_grid(make_beta_schedule("cosine", b.n // 2), 2)
    loss = functools.partial(distillation_loss, teacher=torch.compile(teacher) if args.compile else teacher,
                             teacher_grid=grid, student_grid=student_grid)
    return args, Stage(student, loss, b.n // 2, torch.float64, {}, extra_args, student_grid, directory, {})


def loop_time(b, script, steps, grad_checkpoint=False):
    """Seconds of train_utils.train over `steps` optimizer steps of a fresh stage (set-up included)."""
    args, stage = make_stage(b, script, grad_checkpoint)
    args.num_iters = steps
    dataset = [(image, 0) for image in b.images().cpu().contiguous()]
    b.sync()
    start = time.perf_counter()
    train(args, b.ctx, stage, dataset)
    b.sync()
    return time.perf_counter() - start


def step_time(b, script):
    """Seconds per optimizer step of the script's loop: (time of warmup + iters steps - time of warmup steps) / iters,
    the median of --step_reps such differences."""
    warmup, iters = max(1, b.args.warmup), max(1, b.args.iters)
    times = [(loop_time(b, script, warmup + iters) - loop_time(b, script, warmup)) / iters
             for _ in range(b.args.step_reps)]
    return {"median_s": statistics.median(times), "min_s": min(times), "n": len(times), "steps_per_run": iters}


def peak_cuda(b, reset=False):
    if not b.cuda:
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats(b.device)
        return None
    return torch.cuda.max_memory_allocated(b.device)


# -- sections --------------------------------------------------------------------------------

def bench_matmul(b, results):
    """Best-of-N rate of a square matmul, in fp32 (as the device runs it: TF32 where allowed) and the AMP dtype."""
    sizes = [int(s) for s in (b.args.matmul_sizes or ("4096,8192" if b.cuda else "1024,2048")).split(",")]
    dtypes = [torch.float32] + ([b.compute_dtype()] if b.args.amp != "no" else [])
    out = {"tf32_allowed": bool(torch.backends.cuda.matmul.allow_tf32) if b.cuda else None}
    for dtype in dtypes:
        name = str(dtype).replace("torch.", "")
        rows = {}
        for n in sizes:
            x = torch.randn(n, n, device=b.device, dtype=dtype)
            y = torch.randn(n, n, device=b.device, dtype=dtype)
            reps = 10 if b.cuda else 1  # products per timing (GPU launches are asynchronous)

            def run():
                for _ in range(reps):
                    torch.mm(x, y)

            t = b.timed(run, iters=b.args.matmul_reps, warmup=1)
            rows[str(n)] = 2 * n ** 3 * reps / t["min_s"]
            print(f"  matmul {name} {n}x{n}: {rows[str(n)] / 1e9:,.1f} GFLOP/s (best of {t['n']})")
            del x, y
        out[name] = {"by_size_flops": rows, "best_flops": max(rows.values())}
    results["matmul"] = out


def matmul_rate(b, results, dtype=None):
    if "matmul" not in results:
        bench_matmul(b, results)
    name = str(dtype or b.compute_dtype()).replace("torch.", "")
    return results["matmul"][name]["best_flops"]


def count_flops(b, batch):
    """(forward, forward+backward) FLOPs of the network at `batch`, counted on the meta device."""
    if batch not in b._flops:
        b._flops[batch] = _count_flops(b, batch)
    return b._flops[batch]


def _count_flops(b, batch):
    return network_flops(make_user_model(b.module), [batch] + b.shape)


def network_flops(model, x_shape):
    """(forward, forward+backward) FLOPs of `model` on inputs of x_shape [B, C, H, W], counted on the meta device
    (the model is moved there: no weights, no data)."""
    model = model.to("meta").train()
    x = torch.empty(x_shape, device="meta")
    t = torch.zeros(x_shape[0], device="meta")
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            model(x, t)
    fwd = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        model(x, t).float().square().mean().backward()
    return fwd, counter.get_total_flops()


def bench_flops(b, results):
    fwd, fwd_bwd = count_flops(b, b.batch)
    rate = matmul_rate(b, results)
    model, net = b.bare_model()
    x = b.images()
    label = torch.full((b.batch,), b.n / 2, device=b.device)

    def forward():
        with torch.no_grad(), b.ctx.autocast():
            net(x, label)

    train_model = make_user_model(b.module).to(b.device, memory_format=b.memory_format).train()
    train_net = torch.compile(train_model) if b.args.compile else train_model

    def forward_backward():
        train_model.zero_grad(set_to_none=True)
        with b.ctx.autocast():
            out = train_net(x, label)
        out.float().square().mean().backward()

    t_fwd = b.timed(forward)
    t_fb = b.timed(forward_backward)
    del train_model, train_net
    out = {"forward_flops": fwd, "forward_backward_flops": fwd_bwd, "params": b.n_params,
           "reference_matmul_flops": rate, "forward": t_fwd, "forward_backward": t_fb,
           "forward_achieved_flops": fwd / t_fwd["median_s"], "forward_backward_achieved_flops": fwd_bwd / t_fb["median_s"]}
    out["forward_of_matmul"] = out["forward_achieved_flops"] / rate
    out["forward_backward_of_matmul"] = out["forward_backward_achieved_flops"] / rate
    results["flops"] = out
    print(f"  {b.n_params / 1e6:.2f} M parameters; per batch of {b.batch}: forward {fwd / 1e9:,.2f} GFLOP, "
          f"forward+backward {fwd_bwd / 1e9:,.2f} GFLOP")
    print(f"  forward (no grad)   {t_fwd['median_s'] * 1e3:9.2f} ms  {out['forward_achieved_flops'] / 1e9:,.1f} GFLOP/s "
          f"= {out['forward_of_matmul']:.1%} of the matmul rate")
    print(f"  forward+backward    {t_fb['median_s'] * 1e3:9.2f} ms  {out['forward_backward_achieved_flops'] / 1e9:,.1f} GFLOP/s "
          f"= {out['forward_backward_of_matmul']:.1%} of the matmul rate ({rate / 1e9:,.1f} GFLOP/s)")


def bench_train(b, results):
    peak_cuda(b, reset=True)
    t = step_time(b, "train")
    peak = peak_cuda(b)
    out = {"iteration": t, "images_per_s": b.batch / t["median_s"], "train_py_iteration_s": t["median_s"],
           "peak_allocated_bytes": peak}
    fwd_bwd = count_flops(b, b.batch)[1]
    out["achieved_flops"] = fwd_bwd / t["median_s"]
    out["of_matmul"] = out["achieved_flops"] / matmul_rate(b, results)
    results["train"] = out
    print(f"  train.py's loop (loss, backward, clip, AdamW, EMA): {t['median_s'] * 1e3:9.2f} ms/step, "
          f"{out['images_per_s']:,.1f} images/s, {out['achieved_flops'] / 1e9:,.1f} GFLOP/s "
          f"= {out['of_matmul']:.1%} of the matmul rate")
    if peak:
        print(f"  peak allocated {peak / 2 ** 30:.2f} GiB")


def bench_distill(b, results):
    peak_cuda(b, reset=True)
    t = step_time(b, "distill")
    peak = peak_cuda(b)
    out = {"iteration": t, "images_per_s": b.batch / t["median_s"], "peak_allocated_bytes": peak}
    fwd, fwd_bwd = count_flops(b, b.batch)
    out["achieved_flops"] = (2 * fwd + fwd_bwd) / t["median_s"]
    if "train" in results:
        out["over_train"] = t["median_s"] / results["train"]["iteration"]["median_s"]
        out["floor_over_train"] = (2 * fwd + fwd_bwd) / fwd_bwd
    results["distill"] = out
    print(f"  distillate.py's loop (teacher's two steps, student's loss, backward, clip, AdamW): "
          f"{t['median_s'] * 1e3:9.2f} ms/step, {out['images_per_s']:,.1f} images/s")
    if "over_train" in out:
        print(f"  distillation / training step time: {out['over_train']:.3f} (FLOP floor {out['floor_over_train']:.3f}; "
              "training includes its EMA update, distillation has none)")
    if peak:
        print(f"  peak allocated {peak / 2 ** 30:.2f} GiB")


def bench_noise(b, results):
    """Per-image noise (seeding.image_randn, what the samplers draw each step) against one batched randn_like of
    the same shape on the bench's device: at the model's shape, 16x16 and 256x256 (3 channels), batch --batch_size
    for the model's shape and as many images as hold 2^20 values otherwise."""
    out = {}
    shapes = {"model": b.shape, "16x16": [3, 16, 16], "256x256": [3, 256, 256]}
    for name, shape in shapes.items():
        batch = b.batch if name == "model" else max(1, (1 << 20) // (shape[0] * shape[1] * shape[2]))
        like = torch.empty([batch] + shape, device=b.device)
        indices = range(batch)
        batched = b.timed(lambda: torch.randn_like(like))["median_s"]
        per_image = b.timed(lambda: seeding.image_randn(indices, shape, 0, "step", 1, device=b.device))["median_s"]
        out[name] = {"shape": shape, "batch": batch, "randn_like_s": batched, "image_randn_s": per_image,
                     "ratio": per_image / batched}
        print(f"  {name:8s} {batch:5d} x {'x'.join(map(str, shape)):11s} image_randn {per_image * 1e3:8.3f} ms, "
              f"randn_like {batched * 1e3:8.3f} ms: {per_image / batched:.2f}x")
    results["noise"] = out


def bench_sampler(b, results):
    """Each sampler through sample_utils.generate (per-image start and step noise, as sample.py and evaluate.py
    draw them) over K steps against K bare network calls at the same batch, alternating, median of
    --sampler_reps pairs: the samplers' own work as a fraction of the network's."""
    model, net = b.bare_model()
    k = b.args.sampler_steps
    x = torch.randn([b.batch] + b.shape, device=b.device).contiguous(memory_format=b.memory_format)
    label = torch.full((b.batch,), float(b.n - 1), device=b.device)
    extra = extra_args_fn(b.module)(None, None, b.device)

    def bare():
        with torch.no_grad(), b.ctx.autocast():
            for _ in range(k):
                net(x, label, **extra)

    out = {"steps": k}
    grid = model_grid(make_beta_schedule("cosine", k))
    for name in samplers.SAMPLERS:
        spec = SamplerSpec(name, {"clip_value": 1.2} if name == "ddim" else {})

        def loop():
            with b.ctx.autocast():
                generate(net, grid, spec, range(b.batch), b.shape, 0, extra, b.device, chunk_size=b.batch,
                         channels_last=b.args.channels_last)

        for _ in range(b.args.warmup):
            bare()
            loop()
        t_bare, t_loop = [], []
        for _ in range(max(1, b.args.sampler_reps or b.args.iters)):
            t_bare.append(b.timed(bare, iters=1, warmup=0)["median_s"])
            t_loop.append(b.timed(loop, iters=1, warmup=0)["median_s"])
        net_s, step_s = statistics.median(t_bare) / k, statistics.median(t_loop) / k
        out[name] = {"network_s_per_step": net_s, "sampler_s_per_step": step_s, "overhead": step_s / net_s - 1}
        print(f"  {name:10s} {step_s * 1e3:9.3f} ms/step vs bare network {net_s * 1e3:9.3f} ms: "
              f"overhead {out[name]['overhead']:+.2%}")
    results["sampler"] = out


def bench_sampling(b, results):
    model, net = b.bare_model()
    stages = [int(s) for s in (b.args.stages or f"{b.n},8,4,1").split(",")]
    x = torch.randn([b.batch] + b.shape, device=b.device).contiguous(memory_format=b.memory_format)
    extra = extra_args_fn(b.module)(None, None, b.device)
    per_step = None
    out = {"sampler": b.args.sampling_sampler, "batch": b.batch, "stages": {}}
    for n in sorted(stages):  # shortest first: their per-step time predicts the long ones
        grid = model_grid(make_beta_schedule("cosine", n), max(1, b.n // n))
        function = samplers.SAMPLERS[samplers.sampler_name(b.args.sampling_sampler)].function

        def loop():
            with b.ctx.autocast():
                function(net, x, grid, extra)

        estimate = per_step * n if per_step is not None else None
        # As many timed runs (after one warm-up) as fit in --max_sampling_s, at most --iters; none: extrapolate.
        reps = b.args.iters if estimate is None else min(b.args.iters, int(b.args.max_sampling_s / estimate) - 1)
        if reps >= 1:
            t = b.timed(loop, iters=reps, warmup=b.args.warmup if estimate is None else 1)
            seconds, measured = t["median_s"], True
            per_step = seconds / n
        else:
            seconds, measured, reps = estimate, False, 0
        out["stages"][str(n)] = {"seconds_per_batch": seconds, "images_per_s": b.batch / seconds, "measured": measured,
                                 "timed_runs": reps}
    for n in stages:
        row = out["stages"][str(n)]
        print(f"  {n:5d} steps: {row['images_per_s']:12,.2f} images/s ({row['seconds_per_batch']:.4g} s per batch of "
              f"{b.batch}){'' if row['measured'] else '  [estimated from the per-step time]'}")
    results["sampling"] = out


def rss_bytes(field):
    """VmRSS (now) or VmHWM (peak) of this process from /proc/self/status, in bytes (None if unreadable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss():
    """Reset this process's peak RSS to its current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    now, peak = rss_bytes("VmRSS"), rss_bytes("VmHWM")
    return now is not None and peak is not None and peak <= now * 1.05 + (16 << 20)


def memory_child(b):
    """In a fresh process: peak memory of train.py's loop over --memory_iters steps with the given grad_checkpoint
    setting, against the memory before the loop (the model built, no optimizer state yet)."""
    gc = b.args._memory_child
    args, stage = make_stage(b, "train", grad_checkpoint=gc)
    args.num_iters = b.args.memory_iters
    stage.model.to(b.device, memory_format=b.memory_format)
    dataset = [(image, 0) for image in b.images().cpu().contiguous()]
    b.sync()
    if b.cuda:
        torch.cuda.reset_peak_memory_stats(b.device)
        base = torch.cuda.memory_allocated(b.device)
        what = "torch.cuda.max_memory_allocated"
    else:
        reset = reset_peak_rss()
        base = rss_bytes("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        what = ("peak RSS (VmHWM, reset before the loop)" if reset else
                "peak RSS (ru_maxrss; could not reset it, so the loop's part is a lower bound)")
    start = time.perf_counter()
    train(args, b.ctx, stage, dataset)
    b.sync()
    seconds = (time.perf_counter() - start) / b.args.memory_iters
    if b.cuda:
        peak = torch.cuda.max_memory_allocated(b.device)
    else:
        peak = rss_bytes("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(MEMORY_TAG + json.dumps({"grad_checkpoint": gc, "peak_bytes": peak, "before_steps_bytes": base,
                                   "step_bytes": peak - base, "measure": what, "s_per_step": seconds}))


def bench_memory(b, results):
    a = b.args
    out = {}
    for gc in (False, True):
        cmd = [sys.executable, os.path.abspath(__file__), "--module", a.module, "--device", str(b.device),
               "--batch_size", str(b.batch), "--amp", a.amp, "--channels_last", str(a.channels_last),
               "--compile", str(a.compile), "--threads", str(a.threads), "--resolution", str(b.shape[1]),
               "--num_timesteps", str(b.n), "--memory_iters", str(a.memory_iters), "--_memory_child", str(gc)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.getcwd())
        lines = [line for line in proc.stdout.splitlines() if line.startswith(MEMORY_TAG)]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"memory subprocess (grad_checkpoint={gc}) failed ({proc.returncode}):\n"
                               f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        row = json.loads(lines[-1][len(MEMORY_TAG):])
        out["with_grad_checkpoint" if gc else "without_grad_checkpoint"] = row
        print(f"  grad_checkpoint {str(gc):5s}: peak {row['peak_bytes'] / 2 ** 20:10,.1f} MiB, of which the loop "
              f"{row['step_bytes'] / 2 ** 20:10,.1f} MiB ({row['measure']}); {row['s_per_step'] * 1e3:.1f} ms/step")
    off, on = out["without_grad_checkpoint"], out["with_grad_checkpoint"]
    out["peak_ratio"] = on["peak_bytes"] / off["peak_bytes"]
    out["step_ratio"] = on["step_bytes"] / max(1, off["step_bytes"])
    out["time_ratio"] = on["s_per_step"] / off["s_per_step"]
    print(f"  with / without: peak {out['peak_ratio']:.3f}, the loop's own memory {out['step_ratio']:.3f}, "
          f"time per step {out['time_ratio']:.2f} (from {a.memory_iters} steps, first included)")
    results["memory"] = out


# -- report ----------------------------------------------------------------------------------

def machine_info(b):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(b.device) if b.cuda else None,
            "cuda": torch.version.cuda if b.cuda else None}
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def write_json(path, report):
    """The report as JSON at path (its folder made where missing)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {path}")


def goal_checks(b, results, baseline):
    """(name, value, threshold, passed) for the goals of the issue that this run's numbers speak to."""
    checks = []

    def add(name, value, limit, at_least):
        checks.append({"goal": name, "value": value, "threshold": limit,
                       "passed": value >= limit if at_least else value <= limit})

    if not b.cuda:
        if "flops" in results:
            add(f"UNet forward+backward / {str(b.compute_dtype())[6:]} matmul rate >= 0.85", results["flops"]["forward_backward_of_matmul"],
                CPU_GOALS["fwd_bwd_of_matmul"], True)
        if "over_train" in results.get("distill", {}):
            add("distillation / training iteration <= 1.70", results["distill"]["over_train"], CPU_GOALS["distill_over_train"], False)
        for sampler in samplers.SAMPLERS:
            if sampler in results.get("sampler", {}):
                add(f"{sampler} sampler overhead through generate <= 3%", results["sampler"][sampler]["overhead"],
                    CPU_GOALS["sampler_overhead"], False)
        for name, row in results.get("noise", {}).items():
            if isinstance(row, dict) and name != "model":  # the goal's shapes; beside them the section's wall time
                add(f"per-image noise / randn_like at {name} <= 3", row["ratio"], CPU_GOALS["noise_over_randn"], False)
    else:
        if "of_matmul" in results.get("train", {}):
            add(f"training step / {str(b.compute_dtype())[6:]} matmul rate >= 0.40", results["train"]["of_matmul"],
                GPU_GOALS["train_of_matmul"], True)
        if baseline and "train" in results and "train" in baseline.get("results", {}):
            add("training images/s / baseline >= 3", results["train"]["images_per_s"] / baseline["results"]["train"]["images_per_s"],
                GPU_GOALS["speedup_over_baseline"], True)
        if "memory" in results:
            add("peak memory with / without grad_checkpoint <= 0.5", results["memory"]["peak_ratio"],
                GPU_GOALS["grad_checkpoint_peak"], False)
        if "over_train" in results.get("distill", {}):
            add("distillation / training iteration <= 1.75", results["distill"]["over_train"], GPU_GOALS["distill_over_train"], False)
    return checks


def compare(results, baseline):
    """Speed-ups of this run over a baseline run's JSON (same batch expected)."""
    base = baseline.get("results", {})
    rows = {}
    for section in ("train", "distill"):
        if section in results and section in base:
            rows[f"{section}_images_per_s"] = results[section]["images_per_s"] / base[section]["images_per_s"]
    for n, row in results.get("sampling", {}).get("stages", {}).items():
        other = base.get("sampling", {}).get("stages", {}).get(n)
        if other:
            rows[f"sampling_{n}_steps_images_per_s"] = row["images_per_s"] / other["images_per_s"]
    return rows


def main(argv=None):
    args = parse_args(argv)
    try:
        b = Bench(args)
    except UserError as e:
        sys.exit(f"error: {e}")
    if args._memory_child is not None:
        return memory_child(b)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        sys.exit(f"error: unknown section(s) {', '.join(unknown)}; choose from {','.join(SECTIONS)}")
    baseline = None
    if args.baseline:
        with open(args.baseline) as f:
            baseline = json.load(f)
    machine = machine_info(b)
    config = {"module": args.module, "device": str(b.device), "image_shape": b.shape, "batch_size": b.batch,
              "amp": args.amp, "channels_last": args.channels_last, "compile": args.compile, "num_timesteps": b.n,
              "iters": args.iters, "warmup": args.warmup, "threads": torch.get_num_threads(), "params": b.n_params}
    print(f"bench: {args.module} {'x'.join(map(str, b.shape))}, batch {b.batch}, on {machine['gpu'] or machine['cpu']} "
          f"({machine['torch_threads']} threads), torch {machine['torch']}, amp {args.amp}, channels_last "
          f"{args.channels_last}, compile {args.compile}; median of {args.iters} after {args.warmup} warm-up")
    results = {}
    functions = {"matmul": bench_matmul, "flops": bench_flops, "train": bench_train, "distill": bench_distill,
                 "noise": bench_noise, "sampler": bench_sampler, "sampling": bench_sampling, "memory": bench_memory}
    for section in SECTIONS:
        if section in only:
            print(f"[{section}]")
            start = time.perf_counter()
            functions[section](b, results)
            results[section]["section_wall_s"] = time.perf_counter() - start
    checks = goal_checks(b, results, baseline)
    speedups = compare(results, baseline) if baseline else {}
    if speedups:
        print(f"[speed-up over {args.baseline}]")
        for key, value in speedups.items():
            print(f"  {key}: {value:.2f}x")
    if checks:
        print("[goals]")
        for c in checks:
            print(f"  {'PASS' if c['passed'] else 'FAIL'}  {c['goal']}: {c['value']:.4g}")
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine, "config": config, "command": [os.path.relpath(__file__, ROOT)] + sys.argv[1:],
              "results": results, "goals": checks, "speedups": speedups, "baseline": args.baseline or None}
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
