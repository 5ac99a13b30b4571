"""The losses the training scripts optimise, built from their arguments (shared with bench/).

- `make_training_loss`: the base model's v-MSE at uniform step indices (train.py);
- `make_distillation_loss`: Algorithm 2 of Salimans & Ho between a teacher and its student (distillate.py).
Each returns loss_fn(images, labels) -> (per-sample losses, per-sample noise level in [0, 1)), the
interface of `train_utils.Trainer`. Batches arrive in the data's channel order (the user module's
CHANNEL_ORDER) and enter every network in the network's own recorded order (flipped where they differ).
"""
import torch

from diffusion import GaussianDiffusion
from script_utils import DIFFUSIONS, data_channel_order, extra_args_fn, make_diffusion, to_channel_order


def make_training_loss(args, ctx, module, net, n, channel_order=None, time_labels="aligned"):
    """loss_fn(images, labels) -> (per-sample v-MSE at uniform step indices, their noise levels).
    channel_order: the network's channel order (None: the data's)."""
    diffusion = make_diffusion(net, n, 1, DIFFUSIONS[args.diffusion], ctx.device, time_labels=time_labels)
    extra_args = extra_args_fn(module)
    data_order = data_channel_order(module)
    net_order = channel_order or data_order

    def loss_fn(images, labels):
        images = to_channel_order(images, data_order, net_order)
        t = torch.randint(0, n, (images.shape[0],), device=ctx.device)
        losses = diffusion.p_loss(images, t, extra_args(images, labels, ctx.device), reduction="none")
        return losses, t / n

    return loss_fn


def make_distillation_loss(args, ctx, module, teacher, student_net, n, time_scale, teacher_time_labels,
                           channel_order=None):
    """loss_fn(images, labels) -> (per-sample losses, noise levels) of a teacher with n steps at time_scale
    and its student; the teacher runs under inference mode and --amp autocast (compiled with --compile).
    channel_order: the teacher's channel order, which its student keeps (None: the data's)."""
    teacher.to(ctx.device).eval().requires_grad_(False)
    if args.channels_last:
        teacher.to(memory_format=torch.channels_last)
    teacher_diffusion = make_diffusion(torch.compile(teacher) if args.compile else teacher, n, time_scale,
                                       DIFFUSIONS[args.diffusion], ctx.device, time_labels=teacher_time_labels,
                                       weighting=args.weighting, gamma=args.gamma)
    student_diffusion = make_diffusion(student_net, n // 2, 2 * time_scale, GaussianDiffusion, ctx.device)
    extra_args = extra_args_fn(module)
    data_order = data_channel_order(module)
    net_order = channel_order or data_order

    def loss_fn(images, labels):
        images = to_channel_order(images, data_order, net_order)  # one batch for teacher and student alike
        t = 2 * torch.randint(0, n // 2, (images.shape[0],), device=ctx.device)
        losses = teacher_diffusion.distill_loss(student_diffusion, images, t, extra_args(images, labels, ctx.device),
                                                reduction="none")
        return losses, t / n

    return loss_fn
