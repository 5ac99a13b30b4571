"""The losses the training scripts optimise, built from their arguments (shared with bench/).

- `make_training_loss`: the base model's v-MSE at uniform step indices (train.py);
- `make_distillation_loss`: Algorithm 2 of Salimans & Ho between a teacher and its student (distillate.py);
- `make_guidance_distillation_loss`: stage one of Meng et al. 2023, a w-input student matching its
  teacher's classifier-free guidance (distillate.py --guidance_distill True).
Each returns loss_fn(images, labels) -> (per-sample losses, per-sample noise level in [0, 1)), the
interface of `train_utils.Trainer`. Batches arrive in the data's channel order (the user module's
CHANNEL_ORDER) and enter every network in the network's own recorded order (flipped where they differ).
Conditioning follows the model's record (script_utils.checkpoint_conditioning; SPEC "Conditioning and
classifier-free guidance"): labels dropped to the null label with probability cond_drop_prob, and for a
w-input model w ~ U[guidance_range] per image, given to teacher and student alike.
"""
import torch

from diffusion import GaussianDiffusion
from guidance import ClassifierFreeGuidance, drop_labels, guidance_distill_loss, sample_guidance_weights
from script_utils import DIFFUSIONS, data_channel_order, extra_args_fn, make_diffusion, to_channel_order


def conditioned_extra_args(module, record):
    """extra_args(images, labels, device) of the user module's make_extra_args for a model with the
    conditioning `record`: labels replaced by the null label with probability cond_drop_prob (Ho & Salimans
    2022, Algorithm 1) and, for a w-input model, "w" ~ U[w_min, w_max] per image (Meng et al. 2023). The draws
    come from torch's global generator, which the training loop seeds for each step."""
    extra_args = extra_args_fn(module)
    null_label = record.get("null_label")
    guidance_range = record.get("guidance_range")

    def make(images, labels, device):
        if null_label is not None:
            labels = drop_labels(torch.as_tensor(labels), record["cond_drop_prob"], null_label)
        extra = dict(extra_args(images, labels, device))
        if guidance_range is not None:
            extra["w"] = sample_guidance_weights(images.shape[0], *guidance_range, device=device)
        return extra

    return make


def prepare_teacher(args, ctx, teacher):
    """The teacher on the device without gradients, in eval mode and channels_last as asked; compiled with
    --compile."""
    teacher.to(ctx.device).eval().requires_grad_(False)
    if args.channels_last:
        teacher.to(memory_format=torch.channels_last)
    return torch.compile(teacher) if args.compile else teacher


def make_training_loss(args, ctx, module, net, n, channel_order=None, time_labels="aligned", record=None):
    """loss_fn(images, labels) -> (per-sample v-MSE at uniform step indices, their noise levels).
    channel_order: the network's channel order (None: the data's); record: its conditioning (None: none)."""
    diffusion = make_diffusion(net, n, 1, DIFFUSIONS[args.diffusion], ctx.device, time_labels=time_labels)
    extra_args = conditioned_extra_args(module, record or {})
    data_order = data_channel_order(module)
    net_order = channel_order or data_order

    def loss_fn(images, labels):
        images = to_channel_order(images, data_order, net_order)
        t = torch.randint(0, n, (images.shape[0],), device=ctx.device)
        losses = diffusion.p_loss(images, t, extra_args(images, labels, ctx.device), reduction="none")
        return losses, t / n

    return loss_fn


def make_distillation_loss(args, ctx, module, teacher, student_net, n, time_scale, teacher_time_labels,
                           channel_order=None, record=None):
    """loss_fn(images, labels) -> (per-sample losses, noise levels) of a teacher with n steps at time_scale
    and its student; the teacher runs under inference mode and --amp autocast (compiled with --compile).
    channel_order: the teacher's channel order, which its student keeps (None: the data's); record: the
    teacher's conditioning, which its student keeps (None: none; a w-input pair gets one w per image)."""
    teacher_diffusion = make_diffusion(prepare_teacher(args, ctx, teacher), n, time_scale,
                                       DIFFUSIONS[args.diffusion], ctx.device, time_labels=teacher_time_labels,
                                       weighting=args.weighting, gamma=args.gamma)
    student_diffusion = make_diffusion(student_net, n // 2, 2 * time_scale, GaussianDiffusion, ctx.device)
    extra_args = conditioned_extra_args(module, record or {})
    data_order = data_channel_order(module)
    net_order = channel_order or data_order

    def loss_fn(images, labels):
        images = to_channel_order(images, data_order, net_order)  # one batch for teacher and student alike
        t = 2 * torch.randint(0, n // 2, (images.shape[0],), device=ctx.device)
        losses = teacher_diffusion.distill_loss(student_diffusion, images, t, extra_args(images, labels, ctx.device),
                                                reduction="none")
        return losses, t / n

    return loss_fn


def make_guidance_distillation_loss(args, ctx, module, teacher, student_net, n, time_scale, time_labels,
                                    channel_order, record):
    """loss_fn(images, labels) -> (per-sample losses, noise levels) of stage one of guidance distillation
    (guidance.guidance_distill_loss): the w-input student (n steps at time_scale, like its teacher) matches
    the teacher's classifier-free guidance at uniform step indices. record: the student's conditioning (the
    teacher's, plus guidance_range); labels from the data, dropped at the teacher's cond_drop_prob."""
    guided_teacher = ClassifierFreeGuidance(prepare_teacher(args, ctx, teacher), record["null_label"])
    teacher_diffusion = make_diffusion(guided_teacher, n, time_scale, GaussianDiffusion, ctx.device,
                                       time_labels=time_labels)
    student_diffusion = make_diffusion(student_net, n, time_scale, GaussianDiffusion, ctx.device,
                                       time_labels=time_labels)
    extra_args = conditioned_extra_args(module, record)
    data_order = data_channel_order(module)

    def loss_fn(images, labels):
        images = to_channel_order(images, data_order, channel_order)
        t = torch.randint(0, n, (images.shape[0],), device=ctx.device)
        losses = guidance_distill_loss(teacher_diffusion, student_diffusion, images, t,
                                       extra_args(images, labels, ctx.device))
        return losses, t / n

    return loss_fn
