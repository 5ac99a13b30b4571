"""The optimizer and the learning rate as a pure function of the step (nanoGPT's get_lr).

--scheduler values: this project's four schedules, with AdamW, and the original's strategy names, which keep
the optimizer and schedule each had (original.py reproduces its SGD schedules):
  StrategyConstantLR   AdamW at a constant rate (= constant)
  StrategyLinearLR     AdamW with torch's LinearLR from 1 to 0 over the run (= linear)
  StrategyOneCycle     SGD and torch's OneCycleLR (original.one_cycle)
  StrategyCosineAnnel  SGD and torch's CosineAnnealingWarmRestarts (original.cosine_restarts)
The original's AdamW had torch's default weight decay 0.01; here AdamW takes --weight_decay.
"""
import math

import torch

import original
from cli import UserError

LR_SCHEDULES = {"constant": "constant", "linear": "linear", "cosine": "cosine", "onecycle": "onecycle",
                "StrategyConstantLR": "constant", "StrategyLinearLR": "linear",
                "StrategyOneCycle": "torch_one_cycle", "StrategyCosineAnnel": "torch_cosine_restarts"}


def make_optimizer(params, scheduler, lr, weight_decay):
    """The optimizer of --scheduler: the original's SGD strategies with their weight decay, else AdamW. Both fused
    (one kernel per step; on the CPU the same numbers as the for-each implementation), which also lets the loop
    skip an update on the device: a fused step does nothing where optimizer.found_inf is non-zero (the contract
    torch.amp.GradScaler uses)."""
    if scheduler in original.SGD_STRATEGIES:
        return torch.optim.SGD(params, lr=lr, weight_decay=original.sgd_weight_decay(scheduler, lr), fused=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def optimizer_name(scheduler):
    return "SGD" if scheduler in original.SGD_STRATEGIES else "AdamW"


def get_lr(step, base_lr, total_steps, scheduler="constant", warmup=0):
    """Learning rate for optimizer step `step` (0-based) of a run of total_steps: linear warm-up, then
    the schedule of --scheduler.

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
        return original.one_cycle(step, base_lr, total_steps + 2)[0]
    if schedule == "torch_cosine_restarts":
        return original.cosine_restarts(step, base_lr)
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


def set_lr(optimizer, step, args):
    """Give every parameter group the learning rate of `step` (and StrategyOneCycle's cycled momentum)."""
    lr = get_lr(step, args.lr, args.num_iters, args.scheduler, args.warmup)
    for group in optimizer.param_groups:
        group["lr"] = lr
        if args.scheduler == "StrategyOneCycle":  # OneCycleLR cycles SGD's momentum too
            group["momentum"] = original.one_cycle(step, args.lr, args.num_iters + 2)[1]
    return lr


def check_training_arguments(args):
    """Refuse flag combinations that cannot mean what they say (one line each)."""
    if optimizer_name(args.scheduler) == "SGD":
        for flag, value in (("--warmup", args.warmup), ("--weight_decay", args.weight_decay)):
            if value:
                nearest = "onecycle" if args.scheduler == "StrategyOneCycle" else "cosine"
                raise UserError(f"--scheduler {args.scheduler} is the original's SGD schedule, which fixes its own "
                                f"learning-rate curve and weight decay: {flag} must be 0 "
                                f"(or use --scheduler {nearest}, with AdamW)")
