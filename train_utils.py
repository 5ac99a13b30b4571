"""The training of train.py and distillate.py: what one optimizer step computes, and the loop that repeats it.

One step, in the order `train` runs it:
  batch -> draws (`draw_step`: t, eps, dropped labels and w, from (seed, rank, step) alone) -> loss (one of the
  plain functions `training_loss`, `distillation_loss`, `imitation_loss`) -> backward -> clip -> guard against a
  non-finite loss -> optimizer step -> EMA -> log -> save.
The math is diffusion.py's; the checkpoint format checkpoints.py's; the data stream training_data.py's; the
learning rate lr_schedules.py's; the logs train_log.py's.

References
- Salimans & Ho 2022: the v-MSE training loss ("SNR+1" weighting, Sec. 4 and Appendix D), Algorithm 2 and its
  truncated-SNR weighting max(SNR, 1) on the x error.
- Ho & Salimans 2022, Algorithm 1: labels dropped to the null label with probability p_uncond.
- Meng et al. 2023, Sec. 3.1: stage one of guidance distillation, w ~ U[w_min, w_max] per image.
"""
import copy
import os
import signal
import time
from contextlib import contextmanager
from typing import Callable, NamedTuple

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import seeding
from checkpoints import FORMAT_VERSION, clean_state_dict, load_weights, save_checkpoint
from cli import UserError
from diffusion import (distillation_target, output_weight, predict_start, prediction_target, q_sample, training_target,
                       two_teacher_steps, x_error_weight)
from lr_schedules import LR_SCHEDULES, make_optimizer, optimizer_name, set_lr
from train_log import LossLog, preview, say, tensorboard
from training_data import make_loader

DISTILL_WEIGHTINGS = ("snr+1", "truncated_snr", "snr", "constant", "original")


# -- the randomness of one step ------------------------------------------------------------------

class Draws(NamedTuple):
    t: torch.Tensor  # step index per image, uniform over the trained model's indices (0 the least noisy)
    eps: torch.Tensor  # standard normal noise shaped like the images
    drop: torch.Tensor = None  # conditional models: which labels become the null label
    w: torch.Tensor = None  # models with a guidance-weight input: w ~ U[w_min, w_max] per image


def draw_step(seed, rank, step, images, n_levels, conditioning, eps_dtype=torch.float32):
    """Every random draw of one optimizer step, from a generator seeded by (seed, rank, step) alone (so a
    resumed run needs only the step), in this order: t over n_levels indices; for a conditional model the
    dropped labels (probability conditioning["cond_drop_prob"]); for a w-input model w; eps. Drawn on the
    CPU, returned on the images' device."""
    generator = seeding.generator(seed, "train-step", rank, step)
    batch = images.shape[0]
    t = torch.randint(0, n_levels, (batch,), generator=generator)
    drop = w = None
    if "null_label" in conditioning:
        drop = torch.rand(batch, generator=generator) < conditioning["cond_drop_prob"]
    if "guidance_range" in conditioning:
        w_min, w_max = conditioning["guidance_range"]
        w = w_min + (w_max - w_min) * torch.rand(batch, generator=generator)
    eps = torch.randn(images.shape, generator=generator, dtype=eps_dtype)
    return Draws(*(None if d is None else d.to(images.device) for d in (t, eps, drop, w)))


def conditioned(make_extra_args, images, labels, draws, conditioning):
    """The networks' keyword arguments for a batch: the user module's make_extra_args of the labels after the
    drop (Ho & Salimans Algorithm 1), and w where the model takes it."""
    if draws.drop is not None:
        labels = torch.where(draws.drop.cpu(), torch.full_like(labels, conditioning["null_label"]), labels)
    extra_args = dict(make_extra_args(images, labels, images.device))
    if draws.w is not None:
        extra_args["w"] = draws.w
    return extra_args


# -- the losses: per-sample values from the networks, a grid, the images and the draws --------------

def _at(grid, t):
    """Grid positions of step indices t (index i is position len(grid) - 1 - i)."""
    return len(grid) - 1 - t


def weighted_error(out, target, weighting, prediction, alpha, sigma):
    """Per-sample mean of x_error_weight |x_hat - x|^2, computed in the network's output space as
    (x_error_weight * output_weight) |out - target|^2 (diffusion.output_weight): the same objective whatever the
    network predicts; for a v network with "snr+1" the weight is 1, the plain MSE of v."""
    weight = (x_error_weight(weighting, alpha, sigma) * output_weight(prediction, alpha, sigma)).float()
    return (weight * (out.float() - target.float()) ** 2).flatten(1).mean(1)


def training_loss(net, x, draws, extra_args, *, grid, prediction="v", weighting="snr+1"):
    """The base model's loss at z = alpha x + sigma eps of step t: the weighted x error (Salimans & Ho Sec. 4),
    by default the MSE of what the network predicts (v: "snr+1"; eps: "snr", Ho et al.'s L_simple)."""
    alpha, sigma = grid.level(_at(grid, draws.t), x)
    z = q_sample(x, draws.eps, alpha, sigma)
    out = net(z.float(), grid.label(_at(grid, draws.t), x), **extra_args)
    return weighted_error(out, training_target(prediction, x, draws.eps, alpha, sigma), weighting, prediction,
                          alpha, sigma)


def distillation_loss(student, x, draws, extra_args, *, teacher, teacher_grid, student_grid, weighting="snr+1",
                      gamma=0.0, teacher_prediction="v", prediction="v"):
    """Algorithm 2 of Salimans & Ho: student point j = draws.t has the level of teacher point 2j+1 (counted from
    the least noisy); the target comes from two DDIM steps of the teacher (diffusion.distillation_target,
    float64, no gradients), each network predicting as its `prediction` says (eps, x or v).

    weighting (of the x error): "snr+1" (the MSE of v), "truncated_snr" max(SNR, 1) (the paper's), "snr",
    "constant"; "original" - the original implementation's target, the teacher's second x prediction clipped to
    [-1, 1], with the "snr+1" weight. gamma g (snr+1 and original): the original's mse(w v_student, w v_target),
    w = (1 + alpha/sigma)^g.
    """
    x = x.double()
    t = _at(teacher_grid, 2 * draws.t + 1)  # teacher points 2j+1, 2j, 2j-1 are positions t, t+1, t+2 (clean at j 0)
    levels = [teacher_grid.level(t + k, x) for k in range(3)]
    z = q_sample(x, draws.eps.double(), *levels[0])

    def teacher_x(z_k, k):
        out = teacher(z_k.float(), teacher_grid.label(t + k, x), **extra_args).double()
        x_hat = predict_start(teacher_prediction, z_k, out, *levels[k])
        return x_hat.clamp(-1, 1) if weighting == "original" else x_hat

    with torch.inference_mode():
        z_2, x_2 = two_teacher_steps(teacher_x, z, levels)
        x_target = x_2 if weighting == "original" else distillation_target(z, z_2, levels)
    z, x_target = z.clone(), x_target.clone()  # ordinary tensors out of inference mode
    j = _at(student_grid, draws.t)
    alpha_s, sigma_s = student_grid.level(j, x)
    out = student(z.float(), student_grid.label(j, x), **extra_args)
    loss = weighted_error(out, prediction_target(prediction, z, x_target, alpha_s, sigma_s),
                          "snr+1" if weighting == "original" else weighting, prediction, alpha_s, sigma_s)
    return loss * (1 + alpha_s / sigma_s).pow(2 * gamma).float().flatten() if gamma else loss


def imitation_loss(student, x, draws, extra_args, *, teacher, grid, teacher_prediction="v", prediction="v",
                   weighting="snr+1"):
    """A student with the teacher's levels matches the teacher's prediction at z of step t, `weighting` on the x
    error (diffusion.x_error_weight; "snr+1", the MSE of v for v networks). Two uses: stage one of guidance distillation (Meng et al. Sec.
    3.1: teacher the guided v_w(z, c) of guidance.ClassifierFreeGuidance, reading y and w from extra_args, and a
    w-input student), and a change of parameterisation (an eps teacher, a v or x student from its weights)."""
    position = _at(grid, draws.t)
    alpha, sigma = grid.level(position, x)
    z = q_sample(x, draws.eps, alpha, sigma).float()
    label = grid.label(position, x)
    with torch.no_grad():
        target = teacher(z, label, **extra_args).float()
        if teacher_prediction != prediction:
            x_hat = predict_start(teacher_prediction, z.double(), target.double(), alpha, sigma)
            target = prediction_target(prediction, z.double(), x_hat, alpha, sigma)
    out = student(z, label, **extra_args)
    return weighted_error(out, target, weighting, prediction, alpha, sigma)


class Stage(NamedTuple):
    """What one run of the loop trains and where it goes."""
    model: torch.nn.Module  # the network trained (a student starts as its teacher)
    loss: Callable  # loss(net, images, draws, extra_args) -> per-sample losses (a function above, its keywords bound)
    n_levels: int  # draws.t is uniform over 0 .. n_levels - 1
    eps_dtype: torch.dtype  # of draws.eps (float64 where the loss computes in float64)
    conditioning: dict  # the model's record: null_label and cond_drop_prob, guidance_range
    make_extra_args: Callable  # the user module's make_extra_args(images, labels, device)
    grid: object  # the trained model's levels (diffusion.Grid), for the sample previews
    checkpoint_dir: str
    meta: dict  # the checkpoint's records besides the weights and the training state
    flip_channels: bool = False  # the data's channel order differs from the network's (RGB <-> BGR)


# -- the loop ----------------------------------------------------------------------------------

def train(args, ctx, stage, dataset, resume=None):
    """Optimise stage.model for args.num_iters steps (from a resumed checkpoint's step: resume = (ckpt, path)).
    Returns "done", or "stopped" by a signal or --stop_at after saving a checkpoint."""
    model = stage.model
    if args.grad_checkpoint:
        if not hasattr(model, "grad_checkpoint"):
            raise UserError("--grad_checkpoint True needs a model with a grad_checkpoint attribute (the UNet has one)")
        model.grad_checkpoint = True
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model.to(ctx.device, memory_format=memory_format).train()
    optimizer = make_optimizer(model.parameters(), args.scheduler, args.lr, args.weight_decay)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.amp_dtype == torch.float16)
    net = torch.compile(model) if args.compile else model
    if ctx.distributed:  # broadcasts rank 0's weights to every rank
        net = DistributedDataParallel(net, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    ema = EMA(model, args.ema_decay) if args.ema_decay > 0 else None  # after the broadcast: equal on all ranks
    step, bad_steps = restore(resume, model, ema, optimizer, scaler, args, ctx) if resume else (0, 0)
    if step >= args.num_iters or (args.stop_at and step >= args.stop_at):
        done = step >= args.num_iters
        say(ctx, f"Nothing to do: the checkpoint is at step {step}, " + (
            f"of --num_iters {args.num_iters}." if done else
            f"at or past --stop_at {args.stop_at}; raise --stop_at, or leave it out to finish the run."))
        return "done" if done else "stopped"

    def save():
        bad_steps = int(bad_run)
        if ctx.is_main:
            state = dict(stage.meta, G=clean_state_dict((ema.model if ema else model).state_dict()),
                         format_version=FORMAT_VERSION, step=step, bad_steps=bad_steps, args=dict(vars(args)))
            if step >= args.num_iters and args.keep_training_state == "until_done":
                state["training_state"] = "dropped"  # finished: the weights are all the next stage needs
            else:
                state.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict())
                if ema is not None:
                    state["model"] = clean_state_dict(model.state_dict())
            path = save_checkpoint(state, stage.checkpoint_dir, step=step, keep=args.keep_last)
            say(ctx, f"Saved {path} at step {step}.", bar=True)

    batches = iter(make_loader(dataset, args, ctx.rank, ctx.world_size, step, ctx.device, stage.flip_channels))
    writer = tensorboard(stage.checkpoint_dir, step) if ctx.is_main else None
    log, params = LossLog(ctx.device), list(model.parameters())
    bad_run = torch.tensor(bad_steps, device=ctx.device)  # consecutive skipped updates, counted on the device
    guard_every = min(args.log_every, args.max_bad_steps)  # steps between the host's looks at the guard
    stopping = False
    last_preview = last_save = time.monotonic()
    with stop_signals() as signals, tqdm(total=args.num_iters, initial=step, disable=not ctx.is_main,
                                         dynamic_ncols=True) as bar:
        while step < args.num_iters:
            waited = time.perf_counter()
            images, labels = next(batches)
            images = images.to(ctx.device, non_blocking=True)
            data_s = time.perf_counter() - waited  # time spent waiting for the data
            if args.channels_last and images.ndim == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            draws = draw_step(args.seed, ctx.rank, step, images, stage.n_levels, stage.conditioning, stage.eps_dtype)
            extra_args = conditioned(stage.make_extra_args, images, labels, draws, stage.conditioning)
            torch.manual_seed(seeding.derive_seed(args.seed, "network", ctx.rank, step))  # the network's own (dropout)
            lr = set_lr(optimizer, step, args)
            with ctx.autocast():
                losses = stage.loss(net, images, draws, extra_args)
            loss = losses.float().mean()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
            # The guard: no update from a non-finite loss or gradient on any rank. On the device, without waiting
            # for the host: the fused optimizer skips its step where found_inf is set, the EMA moves by 0. fp16's
            # scaler skips overflowing gradients of a finite loss itself (and lowers its scale); it decides on the host.
            finite = ctx.all_true(torch.isfinite(loss.detach()) & (torch.isfinite(grad_norm) | scaler.is_enabled()))
            if scaler.is_enabled():
                if not bool(finite):
                    optimizer.zero_grad(set_to_none=True)  # scaler.step then finds nothing to apply
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.found_inf = (~finite).float()
                optimizer.step()
            if ema is not None:
                ema.update(model, step, weight=finite)
            bad_run = torch.where(finite, 0, bad_run + 1)
            log.add(loss.detach(), grad_norm.detach(), losses.detach(), draws.t.float() / stage.n_levels, finite, data_s)
            step += 1
            bar.update(1)

            if step % guard_every == 0 or step == args.num_iters:  # the host looks at the guard (one sync)
                bad_steps, skipped = int(bad_run), log.take_skipped()
                if skipped:
                    say(ctx, f"Step {step - 1}: non-finite loss or gradient, {skipped} update{'s' if skipped > 1 else ''} "
                             f"skipped since the last check ({bad_steps} in a row).", bar=True)
                if bad_steps >= args.max_bad_steps:
                    raise UserError(f"{bad_steps} non-finite losses in a row at step {step - 1}: training diverged; lower "
                                    f"--lr or check the data; the last good checkpoint is "
                                    f"{os.path.join(stage.checkpoint_dir, 'checkpoint.pt')}")
                if ctx.distributed:  # a stop signal on any rank stops every rank at the same step
                    stopping = ctx.all_max([float(signals.received)])[0]
            if not ctx.distributed:
                stopping = signals.received
            if step % args.log_every == 0 or step == args.num_iters:
                log.write(writer, step, lr, bad_steps, bar, ctx.world_size)
            if writer is not None and args.log_images and (time.monotonic() - last_preview >= 60 * args.log_interval
                                                           or step == args.num_iters):
                preview(writer, ema.model if ema else model, stage, args, ctx, step)
                last_preview = time.monotonic()
            stop = bool(stopping) or step == args.stop_at
            periodic = args.save_every > 0 and step % args.save_every == 0
            if stop or periodic or time.monotonic() - last_save >= 60 * args.ckpt_interval or step == args.num_iters:
                save()
                last_save = time.monotonic()
            if stop and step < args.num_iters:
                say(ctx, f"Stopped at step {step}; resume with --checkpoint_to_continue "
                         f"{os.path.join(stage.checkpoint_dir, 'checkpoint.pt')}", bar=True)
                break
    if writer is not None:
        writer.close()
    return "done" if step >= args.num_iters else "stopped"


def restore(resume, model, ema, optimizer, scaler, args, ctx):
    """Load a checkpoint to continue: the full training state where it has one (returns its step and
    bad-step count), else its weights only (step 0: a file of the original, say)."""
    ckpt, source = resume
    if ckpt.get("training_state") == "dropped" and int(ckpt.get("step", 0)) < args.num_iters:
        raise UserError(f"{source} finished at step {ckpt['step']} and was saved without its optimizer state "
                        "(--keep_training_state until_done): it cannot continue to --num_iters "
                        f"{args.num_iters}; start a new run from it instead")
    saved = ckpt.get("args", {}).get("scheduler")
    if "optimizer" in ckpt and saved in LR_SCHEDULES and optimizer_name(saved) != optimizer_name(args.scheduler):
        raise UserError(f"{source} was trained with {optimizer_name(saved)} (--scheduler {saved}), but --scheduler "
                        f"{args.scheduler} uses {optimizer_name(args.scheduler)}; continue it with a scheduler of "
                        "the same optimizer")
    load_weights(model, ckpt.get("model", ckpt["G"]), source)
    if ema is not None:
        load_weights(ema.model, ckpt["G"], source)
    step = bad_steps = 0
    if "optimizer" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        step, bad_steps = int(ckpt.get("step", 0)), int(ckpt.get("bad_steps", 0))
    elif ckpt.get("training_state") == "dropped":  # a finished run: nothing is left to do (checked above)
        step = int(ckpt["step"])
    say(ctx, f"Continuing from {source} at step {step}.")
    return step, bad_steps


class EMA:
    """Exponential moving average of a model's weights, with warm-up: the decay at step s is
    min(decay, (1 + s) / (10 + s)), so short runs are not dominated by the initial weights."""

    def __init__(self, model, decay):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model, step, weight=None):
        """One step towards the model's weights; weight (a bool tensor on the device): False leaves the average as
        it is (a skipped update), without the host looking at it."""
        decay = min(self.decay, (1 + step) / (10 + step))
        rate = 1 - decay if weight is None else weight.to(torch.float32) * (1 - decay)
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], rate)
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)


@contextmanager
def stop_signals():
    """SIGINT and SIGTERM ask the loop to stop after the step (with a checkpoint); a second SIGINT interrupts."""
    class Signals:
        received = False

    def handler(signum, frame):
        if Signals.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        Signals.received = True

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield Signals
    finally:
        for s, handler_before in previous.items():
            signal.signal(s, handler_before)
