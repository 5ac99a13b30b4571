"""The training loop shared by train.py and distillate.py.

One loop: data from a resumable, per-rank sharded sampler; the learning rate a pure function of the
step; every step's randomness seeded from (seed, rank, step), so resuming needs only the step; AMP,
gradient clipping, a guard against non-finite losses, EMA with warm-up, DistributedDataParallel,
TensorBoard logging (loss by noise-level quartile, sample grids with their trajectory), crash-safe
checkpoints on a step or minute interval, and a graceful stop on SIGINT/SIGTERM.
"""
import copy
import math
import os
import random
import signal
import time
from typing import NamedTuple

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import seeding
from cli import (ArgumentParser, UserError, decay, finite_float, nonnegative_float, nonnegative_int,
                 positive_float, positive_int, str2bool, unit_interval, worker_count)
from diffusion import DISTILL_WEIGHTINGS
from runtime import AMP_DTYPES
from sample_utils import trajectory_grid
from script_utils import (DIFFUSIONS, FORMAT_VERSION, add_common_arguments, clean_state_dict,
                          load_weights, save_checkpoint)

# --scheduler values -> learning-rate schedule. This project's four schedules run with AdamW; the
# original's strategy names keep the optimizer and schedule each had (strategies.py of the original):
#   StrategyConstantLR   AdamW at a constant rate (= constant)
#   StrategyLinearLR     AdamW with torch's LinearLR from 1 to 0 over the run (= linear)
#   StrategyOneCycle     SGD, weight decay min(1e-5, 0.5 lr/10), torch's OneCycleLR(max_lr=lr,
#                        total_steps=num_iters + 2) with its defaults: momentum cycled 0.95 -> 0.85 -> 0.95
#   StrategyCosineAnnel  SGD, weight decay min(1e-5, lr/10), torch's CosineAnnealingWarmRestarts(T_0=100,
#                        T_mult=2, eta_min=0.01); its stop test never fired before the loader's end
# Its AdamW had torch's default weight decay 0.01; here AdamW takes --weight_decay.
LR_SCHEDULES = {"constant": "constant", "linear": "linear", "cosine": "cosine", "onecycle": "onecycle",
                "StrategyConstantLR": "constant", "StrategyLinearLR": "linear",
                "StrategyOneCycle": "torch_one_cycle", "StrategyCosineAnnel": "torch_cosine_restarts"}


def make_optimizer(params, scheduler, lr, weight_decay):
    """The optimizer of --scheduler: the original's SGD strategies with their weight decay, else AdamW."""
    if scheduler == "StrategyOneCycle":
        return torch.optim.SGD(params, lr=lr, weight_decay=min(1e-5, 0.5 * lr / 10))
    if scheduler == "StrategyCosineAnnel":
        return torch.optim.SGD(params, lr=lr, weight_decay=min(1e-5, lr / 10))
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def optimizer_name(scheduler):
    return "SGD" if scheduler in ("StrategyOneCycle", "StrategyCosineAnnel") else "AdamW"


def _annealing_cos(start, end, pct):
    """Cosine from start (pct 0) to end (pct 1), written as torch's OneCycleLR writes it."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def one_cycle(step, max_lr, total_steps):
    """(learning rate, SGD momentum) of torch.optim.lr_scheduler.OneCycleLR(max_lr, total_steps) with its
    defaults (pct_start 0.3, cosine annealing, momentum 0.95 -> 0.85 -> 0.95, div_factor 25,
    final_div_factor 1e4) after `step` scheduler steps, i.e. for optimizer step `step` (0-based)."""
    initial_lr = max_lr / 25.0
    min_lr = initial_lr / 1e4
    warm_end = float(0.3 * total_steps) - 1
    if step <= warm_end:
        pct = step / warm_end
        return _annealing_cos(initial_lr, max_lr, pct), _annealing_cos(0.95, 0.85, pct)
    pct = (step - warm_end) / (total_steps - 1 - warm_end)
    return _annealing_cos(max_lr, min_lr, pct), _annealing_cos(0.85, 0.95, pct)


def cosine_restarts(step, base_lr, t_0=100, t_mult=2, eta_min=0.01):
    """torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(T_0, T_mult, eta_min) for optimizer step
    `step` (0-based): a cosine from base_lr towards eta_min over T_i steps, T_i = T_0, 2 T_0, 4 T_0, ..."""
    t_cur, t_i = step, t_0
    while t_cur >= t_i:
        t_cur, t_i = t_cur - t_i, t_i * t_mult
    return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * t_cur / t_i)) / 2


def get_lr(step, base_lr, total_steps, scheduler="constant", warmup=0):
    """Learning rate for optimizer step `step` (0-based) of a run of total_steps: linear warm-up, then
    the schedule of --scheduler (LR_SCHEDULES).

    linear: decays to 0 at total_steps (the paper's per-stage schedule); cosine: half a cosine to 0;
    onecycle: up from base_lr/25 over the first 30%, then a cosine down to 0; the original's
    StrategyOneCycle and StrategyCosineAnnel: torch's schedulers as it built them (no warm-up).
    """
    schedule = LR_SCHEDULES.get(scheduler)
    if schedule is None:
        raise ValueError(f"unknown learning-rate schedule {scheduler!r}")
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "torch_one_cycle":
        return one_cycle(step, base_lr, total_steps + 2)[0]
    if schedule == "torch_cosine_restarts":
        return cosine_restarts(step, base_lr)
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if schedule == "constant":
        return base_lr
    if schedule == "linear":
        return base_lr * (1 - progress)
    if schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * progress))
    if progress < 0.3:  # onecycle
        return base_lr * (0.04 + 0.96 * progress / 0.3)
    return base_lr * 0.5 * (1 + math.cos(math.pi * (progress - 0.3) / 0.7))


def check_training_arguments(args):
    """Refuse flag combinations that cannot mean what they say (one line each)."""
    if optimizer_name(args.scheduler) == "SGD":
        for flag, value in (("--warmup", args.warmup), ("--weight_decay", args.weight_decay)):
            if value:
                nearest = "onecycle" if args.scheduler == "StrategyOneCycle" else "cosine"
                raise UserError(f"--scheduler {args.scheduler} is the original's SGD schedule, which fixes its own "
                                f"learning-rate curve and weight decay: {flag} must be 0 "
                                f"(or use --scheduler {nearest}, with AdamW)")


class StepResult(NamedTuple):
    lr: float
    loss: float
    grad_norm: float
    losses: torch.Tensor  # per sample
    levels: torch.Tensor  # per-sample noise level in [0, 1)
    skipped: bool  # non-finite loss or gradient: no update
    stop: bool  # a stop signal reached this (or any) rank


class EMA:
    """Exponential moving average of a model's weights, with warm-up.

    The decay at step s is min(decay, (1 + s) / (10 + s)), so short runs are not dominated by the
    initial weights.
    """

    def __init__(self, model, decay):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model, step):
        decay = min(self.decay, (1 + step) / (10 + step))
        ema_params = list(self.model.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1 - decay)
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)


class InfiniteShardSampler(torch.utils.data.Sampler):
    """Endless shuffled keys (index, sample seed) for a SeededDataset: epoch e is a permutation of the
    indices seeded by (seed, e), rank r takes every world_size-th index of it, and the first `start`
    keys of this rank are skipped (resume). The sample seed is derive_seed(seed, "sample", e, index):
    an image's random augmentation depends on (seed, epoch, index) alone, not on the worker that
    loads it, the number of workers or ranks, or where the run was resumed."""

    def __init__(self, n, seed, rank=0, world_size=1, start=0):
        self.n, self.seed, self.rank, self.world_size, self.start = n, seed, rank, world_size, start

    def __iter__(self):
        skip, epoch = self.start, 0
        while True:
            generator = seeding.generator(self.seed, "epoch", epoch)
            shard = torch.randperm(self.n, generator=generator)[self.rank::self.world_size]
            for index in shard[skip:].tolist():
                yield index, seeding.derive_seed(self.seed, "sample", epoch, index)
            skip = max(0, skip - len(shard))
            epoch += 1


class SeededDataset(torch.utils.data.Dataset):
    """`dataset` indexed by keys (index, sample seed): item `index` made with torch's CPU random
    generator, Python's `random` and NumPy's global generator all seeded by the sample seed, and the
    caller's generator states restored afterwards. Random augmentations that draw from any of them
    (LMDBImageDataset's flips, torchvision's transforms, a user's own NumPy or `random` code) thus repeat
    exactly with the key, in a DataLoader worker or in the main process."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, sample_seed = key
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            random.seed(sample_seed)
            np.random.seed([sample_seed & 0xFFFFFFFF, sample_seed >> 32 & 0xFFFFFFFF])  # NumPy takes 32-bit words
            with torch.random.fork_rng(devices=[], device_type="cpu"):
                torch.default_generator.manual_seed(sample_seed)  # the CPU's alone: a GPU's generator is not touched
                return self.dataset[index]
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def add_training_arguments(parser, *, lr, scheduler, num_iters, ema_decay, dname_help, continue_help, ema_help):
    """Flags shared by train.py and distillate.py (the original's names and meanings, with fixes)."""
    add = parser.add_argument
    add("--name", required=True, help="experiment name; output goes to ./checkpoints/<name>/<dname>/")
    add("--dname", required=True, help=dname_help)
    add("--checkpoint_to_continue", default="", help=continue_help)
    add("--num_iters", type=positive_int, default=num_iters,
        help="optimizer steps of the run (the original counted images)")
    add("--batch_size", type=positive_int, default=1, help="images per optimizer step per process")
    add("--lr", type=positive_float, default=lr,
        help="learning rate: the peak of the schedule (StrategyCosineAnnel: its start)")
    add("--scheduler", default=scheduler, choices=list(LR_SCHEDULES),
        help="learning-rate schedule over --num_iters steps, with AdamW: constant; linear (to 0); cosine (half a "
             "cosine to 0); onecycle (up from lr/25 over 30%%, a cosine to 0). The original's names: "
             "StrategyConstantLR (= constant), StrategyLinearLR (= linear), and its SGD strategies, reproduced: "
             "StrategyOneCycle (torch's OneCycleLR), StrategyCosineAnnel (torch's CosineAnnealingWarmRestarts, "
             "T_0=100, T_mult=2, eta_min=0.01)")
    add("--warmup", type=nonnegative_int, default=0, help="linear learning-rate warm-up steps (AdamW schedules)")
    add("--weight_decay", type=nonnegative_float, default=0.0,
        help="AdamW's decoupled weight decay (the original's AdamW had torch's default, 0.01; its SGD strategies fix "
             "their own)")
    add("--grad_clip", type=nonnegative_float, default=1.0, help="clip the gradient norm to this value (0: no clipping)")
    add("--ema_decay", type=decay, default=ema_decay, help=ema_help)
    add("--log_interval", type=positive_float, default=15,
        help="minutes between sample grids in TensorBoard (fractions allowed)")
    add("--log_every", type=positive_int, default=50, help="steps between scalar logs (loss, lr, grad norm, ...)")
    add("--log_images", type=positive_int, default=4, help="images in the TensorBoard sample grid")
    add("--ckpt_interval", type=positive_float, default=30, help="minutes between checkpoints (fractions allowed)")
    add("--save_every", type=nonnegative_int, default=0, help="also save every N steps (0: by minutes only)")
    add("--keep_last", type=nonnegative_int, default=0,
        help="keep this many step-numbered checkpoints beside checkpoint.pt (0: none)")
    add("--stop_at", type=nonnegative_int, default=0,
        help="stop with a checkpoint at this step, the schedule still planned for --num_iters (0: off)")
    add("--max_bad_steps", type=positive_int, default=20, help="stop after this many non-finite losses in a row")
    add("--num_workers", type=worker_count, default=-1,
        help="data loader workers (-1: 2 per image in the batch, at most 8)")
    add("--amp", default="no", choices=sorted(AMP_DTYPES), help="mixed precision for the network (schedule math stays float64)")
    add("--channels_last", type=str2bool, default=True,
        help="channels_last memory format: faster convolutions on GPUs and CPUs (90%% vs 83%% of the matmul rate on 2 cores)")
    add("--compile", type=str2bool, default=False, help="torch.compile the trained network")
    add("--grad_checkpoint", type=str2bool, default=False, help="recompute activations in the backward pass (less memory)")


class Trainer:
    """Optimises `model` on a per-sample loss; owns the optimizer, EMA, checkpoints and logs.

    `self.net` is the module to call in the loss (DDP-wrapped and/or compiled as asked);
    `self.sampling_model` the weights saved as G (the EMA where one is kept).
    """

    def __init__(self, args, ctx, model, checkpoint_dir, checkpoint_meta):
        self.args, self.ctx, self.model = args, ctx, model
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_meta = checkpoint_meta
        if args.grad_checkpoint:
            if not hasattr(model, "grad_checkpoint"):
                raise UserError("--grad_checkpoint True needs a model with a grad_checkpoint attribute (the UNet has one)")
            model.grad_checkpoint = True
        memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        model.to(ctx.device, memory_format=memory_format).train()
        self.optimizer = make_optimizer(model.parameters(), args.scheduler, args.lr, args.weight_decay)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.amp_dtype == torch.float16)
        self.step = 0
        self.bad_steps = 0
        net = torch.compile(model) if args.compile else model
        if ctx.distributed:  # broadcasts rank 0's weights to every rank
            net = DistributedDataParallel(net, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        self.net = net
        self.ema = EMA(model, args.ema_decay) if args.ema_decay > 0 else None  # after the broadcast: equal on all ranks
        self._stop_signal = None

    @property
    def sampling_model(self):
        return self.ema.model if self.ema is not None else self.model

    # -- checkpoints -------------------------------------------------------------------------

    def restore(self, ckpt, source):
        """Continue from a checkpoint: full training state if it has one, else its weights only."""
        saved = ckpt.get("args", {}).get("scheduler")
        if ("optimizer" in ckpt and saved in LR_SCHEDULES
                and optimizer_name(saved) != optimizer_name(self.args.scheduler)):
            raise UserError(f"{source} was trained with {optimizer_name(saved)} (--scheduler {saved}), but --scheduler "
                            f"{self.args.scheduler} uses {optimizer_name(self.args.scheduler)}; continue it with "
                            f"a scheduler of the same optimizer")
        load_weights(self.model, ckpt.get("model", ckpt["G"]), source)
        if self.ema is not None:
            load_weights(self.ema.model, ckpt["G"], source)
        if "optimizer" in ckpt:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
            self.step = int(ckpt.get("step", 0))
            self.bad_steps = int(ckpt.get("bad_steps", 0))
        self._print(f"Continuing from {source} at step {self.step}.")

    def state_dict(self):
        state = dict(self.checkpoint_meta)
        state.update(G=clean_state_dict(self.sampling_model.state_dict()), format_version=FORMAT_VERSION,
                     step=self.step, bad_steps=self.bad_steps, args=dict(vars(self.args)),
                     optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict())
        if self.ema is not None:
            state["model"] = clean_state_dict(self.model.state_dict())
        return state

    def save(self):
        if self.ctx.is_main:
            path = save_checkpoint(self.state_dict(), self.checkpoint_dir, step=self.step, keep=self.args.keep_last)
            self._print(f"Saved {path} at step {self.step}.", bar=True)

    # -- the loop ----------------------------------------------------------------------------

    def make_loader(self, dataset):
        args, ctx = self.args, self.ctx
        workers = min(2 * args.batch_size, 8) if args.num_workers < 0 else args.num_workers
        sampler = InfiniteShardSampler(len(dataset), args.seed, ctx.rank, ctx.world_size,
                                       start=self.step * args.batch_size)
        return torch.utils.data.DataLoader(
            SeededDataset(dataset), batch_size=args.batch_size, sampler=sampler, num_workers=workers, drop_last=True,
            pin_memory=ctx.device.type == "cuda", persistent_workers=workers > 0,
            generator=seeding.generator(args.seed, "loader", ctx.rank))

    def fit(self, dataset, loss_fn, sample_diffusion, bgr=False):
        """Run optimizer steps until args.num_iters.

        loss_fn(images, labels) -> (per-sample losses, per-sample noise level in [0, 1));
        sample_diffusion: the diffusion over `sampling_model` drawn for the TensorBoard grids
        (bgr=True: its images are BGR and are flipped for display).
        Returns "done" or "stopped" (by a signal or --stop_at, after saving a checkpoint).
        """
        args, ctx = self.args, self.ctx
        if self.step >= args.num_iters:
            self._print(f"Nothing to do: the checkpoint is at step {self.step} of --num_iters {args.num_iters}.")
            return "done"
        if args.stop_at and self.step >= args.stop_at:
            self._print(f"Nothing to do: the checkpoint is at step {self.step}, at or past --stop_at {args.stop_at}; "
                        "raise --stop_at, or leave it out to finish the run.")
            return "stopped"
        writer = self._tensorboard()
        loader = iter(self.make_loader(dataset))
        window = Window()
        bar = tqdm(total=args.num_iters, initial=self.step, disable=not ctx.is_main, dynamic_ncols=True)
        self._bar = bar
        last_log = last_ckpt = time.monotonic()
        params = list(self.model.parameters())
        self._install_signal_handlers()
        try:
            while self.step < args.num_iters:
                torch.manual_seed(seeding.derive_seed(args.seed, "train-step", ctx.rank, self.step))
                images, labels = next(loader)
                images = images.to(ctx.device, non_blocking=True)
                if args.channels_last and images.ndim == 4:
                    images = images.contiguous(memory_format=torch.channels_last)
                result = self.train_step(images, labels, loss_fn, params)
                if not result.skipped:
                    window.add(result)
                self.step += 1
                bar.update(1)
                now = time.monotonic()
                if self.step % args.log_every == 0 or self.step == args.num_iters:
                    self._log_scalars(writer, window, result.lr)
                if ctx.is_main and (now - last_log >= 60 * args.log_interval or self.step == args.num_iters):
                    self._log_samples(writer, sample_diffusion, bgr)
                    last_log = time.monotonic()
                periodic = args.save_every > 0 and self.step % args.save_every == 0
                stop = result.stop or self.step == args.stop_at
                if stop or periodic or now - last_ckpt >= 60 * args.ckpt_interval or self.step == args.num_iters:
                    self.save()
                    last_ckpt = time.monotonic()
                if stop and self.step < args.num_iters:
                    self._print(f"Stopped at step {self.step}; resume with --checkpoint_to_continue "
                                f"{os.path.join(self.checkpoint_dir, 'checkpoint.pt')}", bar=True)
                    return "stopped"
            return "done"
        finally:
            self._restore_signal_handlers()
            bar.close()
            if writer is not None:
                writer.close()

    def train_step(self, images, labels, loss_fn, params=None):
        """One optimizer step at self.step (without advancing it): learning rate, forward under autocast,
        backward, clipping, the non-finite guard, the optimizer (AdamW, or the original's SGD) and EMA."""
        args, ctx = self.args, self.ctx
        params = list(self.model.parameters()) if params is None else params
        lr = get_lr(self.step, args.lr, args.num_iters, args.scheduler, args.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if args.scheduler == "StrategyOneCycle":  # OneCycleLR cycles SGD's momentum too
                group["momentum"] = one_cycle(self.step, args.lr, args.num_iters + 2)[1]
        with ctx.autocast():
            losses, levels = loss_fn(images, labels)
        loss = losses.float().mean()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
        loss_value, grad_value = torch.stack([loss.detach(), grad_norm.float()]).tolist()  # one device sync
        grad_ok = math.isfinite(grad_value) or self.scaler.is_enabled()  # fp16 overflow: the scaler skips
        bad, stop = ctx.all_max([float(not (math.isfinite(loss_value) and grad_ok)), float(self._stop_signal is not None)])
        if bad:
            self._skip_step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema is not None:
                self.ema.update(self.model, self.step)
            self.bad_steps = 0
        return StepResult(lr, loss_value, grad_value, losses.detach(), levels, bool(bad), bool(stop))

    def _skip_step(self):
        """A non-finite loss or gradient: drop the update, count it, stop after too many in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():
            self.scaler.update()
        self.bad_steps += 1
        self._print(f"Step {self.step}: non-finite loss or gradient, update skipped ({self.bad_steps} in a row).", bar=True)
        if self.bad_steps >= self.args.max_bad_steps:
            last = os.path.join(self.checkpoint_dir, "checkpoint.pt")
            raise UserError(f"{self.bad_steps} non-finite losses in a row at step {self.step}: training diverged; "
                            f"lower --lr or check the data; the last good checkpoint is {last}")

    # -- logging -----------------------------------------------------------------------------

    def _tensorboard(self):
        if not self.ctx.is_main:
            return None
        from torch.utils.tensorboard import SummaryWriter
        # On resume, events logged after the checkpoint's step (by the run that was cut short) are dropped.
        return SummaryWriter(os.path.join(self.checkpoint_dir, "tensorboard"), purge_step=self.step or None)

    def _log_scalars(self, writer, window, lr):
        stats = window.pop()
        if writer is None or stats is None:
            return
        for key, value in stats.items():
            writer.add_scalar(key, value, self.step)
        writer.add_scalar("lr", lr, self.step)
        writer.add_scalar("skipped_steps_in_a_row", self.bad_steps, self.step)
        self._bar.set_postfix(loss=f"{stats['loss']:.4g}", img_s=f"{stats['images_per_sec'] * self.ctx.world_size:.1f}")

    def _log_samples(self, writer, diffusion, bgr):
        shape = [self.args.log_images] + list(self.model.image_size[1:])
        noise = seeding.image_randn(range(shape[0]), shape[1:], self.args.seed, "start").to(self.ctx.device)
        writer.add_image("samples", trajectory_grid(diffusion, noise, bgr=bgr), self.step)
        writer.flush()

    def _print(self, message, bar=False):
        if self.ctx.is_main:
            (tqdm.write if bar else print)(message)

    # -- signals -----------------------------------------------------------------------------

    def _install_signal_handlers(self):
        def handler(signum, frame):
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = signum

        self._previous_handlers = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def _restore_signal_handlers(self):
        for s, previous in self._previous_handlers.items():
            signal.signal(s, previous)


class Window:
    """Running sums of the logged quantities between two scalar logs."""

    def __init__(self):
        self.pop()

    def add(self, result):
        losses, levels = result.losses, result.levels
        self.n += 1
        self.loss += result.loss
        self.grad_norm += result.grad_norm
        self.images += losses.shape[0]
        quartile = (levels.to(losses.device).float() * 4).long().clamp(0, 3)
        self.q_sum = self.q_sum.to(losses.device).index_add_(0, quartile, losses.float())
        self.q_count = self.q_count.to(losses.device).index_add_(0, quartile, torch.ones_like(losses, dtype=torch.float32))

    def pop(self):
        stats = None
        if getattr(self, "n", 0):
            elapsed = time.monotonic() - self.start
            stats = {"loss": self.loss / self.n, "grad_norm": self.grad_norm / self.n,
                     "images_per_sec": self.images / max(elapsed, 1e-9)}
            for q, (total, count) in enumerate(zip(self.q_sum.tolist(), self.q_count.tolist())):
                if count > 0:
                    stats[f"loss_by_noise_level/q{q}"] = total / count
        self.n, self.loss, self.grad_norm, self.images = 0, 0.0, 0.0, 0
        self.q_sum, self.q_count = torch.zeros(4), torch.zeros(4)
        self.start = time.monotonic()
        return stats


# -- the training scripts' command lines (shared with bench/) ------------------------------------

def train_argument_parser(description):
    parser = ArgumentParser(description=description)
    add_common_arguments(parser)
    parser.add_argument("--num_timesteps", type=positive_int, default=1024, help="diffusion steps N of the base model")
    parser.add_argument("--diffusion", default="GaussianDiffusion", choices=sorted(DIFFUSIONS), help="diffusion class")
    add_training_arguments(
        parser, lr=5e-5, scheduler="StrategyConstantLR", num_iters=100000, ema_decay=0.9999,
        dname_help="run name within the experiment; output goes to ./checkpoints/<name>/<dname>/",
        continue_help="checkpoint to continue: a file of train.py resumes exactly (model, EMA, optimizer, step); "
                      "a file of the original (weights only) starts at step 0 from its weights, keeping its "
                      "time-label convention and channel order",
        ema_help="EMA decay of the weights saved as G (0: no EMA, the raw weights are G)")
    parser.add_argument("--cond_drop_prob", type=unit_interval, default=None,
                        help="conditional modules (NUM_CLASSES) only: probability that a label is replaced by the null "
                             "label, for classifier-free guidance (unset: 0.1)")
    return parser


def distill_argument_parser(description):
    parser = ArgumentParser(description=description)
    add_common_arguments(parser)
    parser.add_argument("--base_checkpoint", required=True, help="the teacher's checkpoint (of the first stage)")
    parser.add_argument("--diffusion", default="GaussianDiffusionDefault", choices=["GaussianDiffusionDefault"],
                        help="the teacher's diffusion class (the original's flag; only this one distils)")
    parser.add_argument("--weighting", default="snr+1", choices=DISTILL_WEIGHTINGS,
                        help="snr+1: MSE on v; truncated_snr: max(SNR, 1) on x (the paper's); "
                             "original: the original implementation's clipped one-x target (not Algorithm 2)")
    parser.add_argument("--gamma", type=finite_float, default=0.0,
                        help="the original's weight w = (1 + alpha/sigma)^gamma: the loss is "
                             "mse(w v_student, w v_target) (snr+1 and original weightings; 0: none)")
    parser.add_argument("--num_stages", type=positive_int, default=1,
                        help="halvings to run: 1 writes <dname>, K > 1 writes <dname>_0 ... <dname>_(K-1)")
    add_training_arguments(
        parser, lr=0.3 * 5e-5, scheduler="StrategyLinearLR", num_iters=5000, ema_decay=0.0,
        dname_help="stage name: output goes to ./checkpoints/<name>/<dname>/ (<dname>_k with --num_stages); "
                   "a stage already there is continued if unfinished and skipped if finished",
        continue_help="checkpoint of the first stage's student to continue (model, optimizer, step); "
                      "by default a stage continues its own <dname> checkpoint when there is one",
        ema_help="EMA decay of the student's weights saved as G (0: no EMA, the raw weights are G and the next "
                 "teacher, as in the paper)")
    parser.add_argument("--guidance_distill", type=str2bool, default=False,
                        help="guidance distillation of a class-conditional teacher: stage one (a w-input student, "
                             "<dname>_w), then --num_stages halvings (<dname>_0 ...)")
    parser.add_argument("--w_min", type=nonnegative_float, default=None,
                        help="with --guidance_distill True: the smallest guidance weight the student learns (unset: 0)")
    parser.add_argument("--w_max", type=nonnegative_float, default=None,
                        help="with --guidance_distill True: the largest guidance weight the student learns (unset: 4)")
    parser.add_argument("--guidance_num_iters", type=positive_int, default=None,
                        help="with --guidance_distill True: optimizer steps of stage one (unset: --num_iters)")
    return parser
