"""The losses the training scripts optimise, built from their arguments (shared with bench/).

- `make_training_loss`: the base model's v-MSE at uniform step indices (train.py);
- `make_distillation_loss`: Algorithm 2 of Salimans & Ho between a teacher and its student (distillate.py).
Each returns loss_fn(images, labels) -> (per-sample losses, per-sample noise level in [0, 1)), the
interface of `train_utils.Trainer`.
"""
import torch

from diffusion import GaussianDiffusion
from script_utils import DIFFUSIONS, extra_args_fn, make_diffusion


def make_training_loss(args, ctx, module, net, n):
    """loss_fn(images, labels) -> (per-sample v-MSE at uniform step indices, their noise levels)."""
    diffusion = make_diffusion(net, n, 1, DIFFUSIONS[args.diffusion], ctx.device)
    extra_args = extra_args_fn(module)

    def loss_fn(images, labels):
        t = torch.randint(0, n, (images.shape[0],), device=ctx.device)
        losses = diffusion.p_loss(images, t, extra_args(images, labels, ctx.device), reduction="none")
        return losses, t / n

    return loss_fn


def make_distillation_loss(args, ctx, module, teacher, student_net, n, time_scale, teacher_time_labels):
    """loss_fn(images, labels) -> (per-sample losses, noise levels) of a teacher with n steps at time_scale
    and its student; the teacher runs under inference mode and --amp autocast (compiled with --compile)."""
    teacher.to(ctx.device).eval().requires_grad_(False)
    if args.channels_last:
        teacher.to(memory_format=torch.channels_last)
    teacher_diffusion = make_diffusion(torch.compile(teacher) if args.compile else teacher, n, time_scale,
                                       DIFFUSIONS[args.diffusion], ctx.device, time_labels=teacher_time_labels,
                                       weighting=args.weighting, gamma=args.gamma)
    student_diffusion = make_diffusion(student_net, n // 2, 2 * time_scale, GaussianDiffusion, ctx.device)
    extra_args = extra_args_fn(module)

    def loss_fn(images, labels):
        t = 2 * torch.randint(0, n // 2, (images.shape[0],), device=ctx.device)
        losses = teacher_diffusion.distill_loss(student_diffusion, images, t, extra_args(images, labels, ctx.device),
                                                reduction="none")
        return losses, t / n

    return loss_fn
