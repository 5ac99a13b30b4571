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
import signal
import time
from typing import NamedTuple

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import seeding
from cli import ArgumentParser, UserError, positive_int, str2bool
from diffusion import DISTILL_WEIGHTINGS
from runtime import AMP_DTYPES
from sample_utils import trajectory_grid
from script_utils import (DIFFUSIONS, FORMAT_VERSION, add_common_arguments, clean_state_dict,
                          load_weights, save_checkpoint)

# --scheduler values; the original's strategy names map onto the same pure functions.
LR_SCHEDULES = {"constant": "constant", "linear": "linear", "cosine": "cosine", "onecycle": "onecycle",
                "StrategyConstantLR": "constant", "StrategyLinearLR": "linear",
                "StrategyCosineAnnel": "cosine", "StrategyOneCycle": "onecycle"}


def get_lr(step, base_lr, total_steps, schedule="constant", warmup=0):
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then the schedule.

    linear: decays to 0 at total_steps (the paper's per-stage schedule); cosine: half a cosine to 0;
    onecycle: up from base_lr/25 over the first 30%, then a cosine down to 0.
    """
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if schedule == "constant":
        return base_lr
    if schedule == "linear":
        return base_lr * (1 - progress)
    if schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "onecycle":
        if progress < 0.3:
            return base_lr * (0.04 + 0.96 * progress / 0.3)
        return base_lr * 0.5 * (1 + math.cos(math.pi * (progress - 0.3) / 0.7))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


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
    """Endless shuffled indices: epoch e is a permutation seeded by (seed, e), rank r takes every
    world_size-th index of it, and the first `start` indices of this rank are skipped (resume)."""

    def __init__(self, n, seed, rank=0, world_size=1, start=0):
        self.n, self.seed, self.rank, self.world_size, self.start = n, seed, rank, world_size, start

    def __iter__(self):
        skip, epoch = self.start, 0
        while True:
            generator = seeding.generator(self.seed, "epoch", epoch)
            shard = torch.randperm(self.n, generator=generator)[self.rank::self.world_size]
            if skip < len(shard):
                yield from shard[skip:].tolist()
            skip = max(0, skip - len(shard))
            epoch += 1


def add_training_arguments(parser, *, lr, scheduler, num_iters, ema_decay):
    """Flags shared by train.py and distillate.py (the original's names and meanings, with fixes)."""
    add = parser.add_argument
    add("--name", required=True, help="experiment name; output goes to ./checkpoints/<name>/<dname>/")
    add("--dname", required=True, help="run name within the experiment; output goes to ./checkpoints/<name>/<dname>/")
    add("--checkpoint_to_continue", default="", help="checkpoint to resume from (model, EMA, optimizer and step)")
    add("--num_iters", type=positive_int, default=num_iters, help="total optimizer steps of the run")
    add("--batch_size", type=positive_int, default=1, help="images per optimizer step per process")
    add("--lr", type=float, default=lr, help="peak learning rate")
    add("--scheduler", default=scheduler, choices=sorted(LR_SCHEDULES), help="learning-rate schedule over the run")
    add("--warmup", type=int, default=0, help="linear learning-rate warm-up steps")
    add("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    add("--grad_clip", type=float, default=1.0, help="clip the gradient norm to this value (0: no clipping)")
    add("--ema_decay", type=float, default=ema_decay, help="EMA decay of the weights saved as G (0: no EMA)")
    add("--log_interval", type=float, default=15, help="minutes between sample grids in TensorBoard (fractions allowed)")
    add("--log_every", type=positive_int, default=50, help="steps between scalar logs (loss, lr, grad norm, ...)")
    add("--log_images", type=positive_int, default=4, help="images in the TensorBoard sample grid")
    add("--ckpt_interval", type=float, default=30, help="minutes between checkpoints (fractions allowed)")
    add("--save_every", type=int, default=0, help="also save every N steps (0: by minutes only)")
    add("--keep_last", type=int, default=0, help="keep this many step-numbered checkpoints beside checkpoint.pt")
    add("--stop_at", type=int, default=0, help="stop with a checkpoint at this step, the schedule still planned for --num_iters (0: off)")
    add("--max_bad_steps", type=positive_int, default=20, help="stop after this many non-finite losses in a row")
    add("--num_workers", type=int, default=-1, help="data loader workers (-1: 2 per image in the batch, at most 8)")
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
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
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
            dataset, batch_size=args.batch_size, sampler=sampler, num_workers=workers, drop_last=True,
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
        backward, clipping, the non-finite guard, AdamW and EMA."""
        args, ctx = self.args, self.ctx
        params = list(self.model.parameters()) if params is None else params
        lr = get_lr(self.step, args.lr, args.num_iters, LR_SCHEDULES[args.scheduler], args.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
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
        return SummaryWriter(os.path.join(self.checkpoint_dir, "tensorboard"))

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
    add_training_arguments(parser, lr=5e-5, scheduler="StrategyConstantLR", num_iters=100000, ema_decay=0.9999)
    return parser


def distill_argument_parser(description):
    parser = ArgumentParser(description=description)
    add_common_arguments(parser)
    parser.add_argument("--base_checkpoint", required=True, help="the teacher's checkpoint")
    parser.add_argument("--diffusion", default="GaussianDiffusionDefault", choices=["GaussianDiffusionDefault"],
                        help="the teacher's diffusion class (the original's flag; only this one distils)")
    parser.add_argument("--weighting", default="snr+1", choices=DISTILL_WEIGHTINGS,
                        help="snr+1: MSE on v; truncated_snr: max(SNR,1) on x (the paper's); "
                             "original: the original implementation's clipped one-x target (not Algorithm 2)")
    parser.add_argument("--gamma", type=float, default=0.0, help="extra weight (1 + alpha/sigma)^gamma on the v error")
    parser.add_argument("--num_stages", type=positive_int, default=1, help="halvings to run, each into <dname>_k")
    add_training_arguments(parser, lr=0.3 * 5e-5, scheduler="StrategyLinearLR", num_iters=5000, ema_decay=0.0)
    return parser
