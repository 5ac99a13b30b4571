"""Classifier-free guidance and guidance distillation: the math (it imports no training code).

References
- Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022 (Eq. 6, the guided prediction
  (1 + w) eps(z, c) - w eps(z); Algorithm 1, training with labels dropped to the null label).
- Meng et al., "On Distillation of Guided Diffusion Models", CVPR 2023 (Sec. 3.1: stage one trains a
  student that takes w as an input to match the guided teacher at w ~ U[w_min, w_max]; stage two is
  progressive distillation with w given to teacher and student alike).

CFG on v. At fixed z, x_hat = alpha z - sigma v_hat and eps_hat = sigma z + alpha v_hat are affine in v_hat,
and the weights (1 + w) and -w sum to 1, so guiding v, eps or x_hat is one and the same:
    v_w = (1 + w) v(z, c) - w v(z, null);  w = 0 is plain conditional sampling.

A guided network has the signature of the network it wraps, forward(z, t, y=None, w=None), so every
sampler takes it as it takes any network; a model with a w-input (a guidance-distilled student) has the
same signature. calls_per_step gives the network calls per image and step (NFE bookkeeping): 2 for CFG
(both halves in one batched call), 1 for a network that takes w itself.
"""
import torch
from torch import nn


def guided_v(v_cond, v_uncond, w):
    """(1 + w) v_cond - w v_uncond (Ho & Salimans Eq. 6, written in v); w a number or one per image."""
    w = torch.as_tensor(w, dtype=v_cond.dtype, device=v_cond.device)
    if w.ndim:
        w = w.reshape(-1, *([1] * (v_cond.ndim - 1)))
    return (1 + w) * v_cond - w * v_uncond


class ClassifierFreeGuidance(nn.Module):
    """The guided v of a class-conditional network: net(z, t, y=label) and net(z, t, y=null_label) in one
    batched call, combined by guided_v. forward(z, t, y=None, w=None): y None is the null label (then both
    halves are unconditional), w None is 0; both are one value for the batch or one per image. The
    combination runs in at least float32 (under AMP the network's half-precision output would be
    extrapolated by 1 + 2w otherwise)."""

    def __init__(self, net, null_label):
        super().__init__()
        self.net = net
        self.null_label = null_label

    def forward(self, x, t, y=None, w=None):
        batch = x.shape[0]
        null = torch.full((batch,), self.null_label, dtype=torch.long, device=x.device)
        y = null if y is None else torch.as_tensor(y, device=x.device).long().expand(batch)
        t = torch.as_tensor(t, device=x.device).expand(batch)
        v = self.net(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, null]))
        v_cond, v_uncond = v.to(torch.promote_types(v.dtype, torch.float32)).chunk(2)  # no bf16/fp16 extrapolation
        return guided_v(v_cond, v_uncond, 0.0 if w is None else w)


def calls_per_step(net):
    """Network calls per image and sampling step: 2 under classifier-free guidance, else 1."""
    return 2 if isinstance(net, ClassifierFreeGuidance) else 1


def drop_labels(labels, p, null_label):
    """Each label replaced by null_label with probability p (Ho & Salimans Algorithm 1, p_uncond); the
    draws come from torch's global generator on the labels' device."""
    drop = torch.rand(labels.shape, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def sample_guidance_weights(n, w_min, w_max, device="cpu"):
    """n guidance weights w ~ U[w_min, w_max] (Meng et al. Sec. 3.1), from torch's global generator."""
    return w_min + (w_max - w_min) * torch.rand(n, device=device)


def guidance_distill_loss(teacher_diffusion, student_diffusion, x, t, extra_args, noise=None):
    """Per-sample loss of stage one of guidance distillation (Meng et al. Sec. 3.1).

    z = alpha_t x + sigma_t eps at the step indices t; the target is the teacher's guided v_w(z, c), the
    teacher's diffusion running over a ClassifierFreeGuidance network that reads y and w from extra_args;
    the student (same steps and time scale) receives the same z, y and w. The loss is the mean squared v
    error, i.e. Meng et al.'s x error with the weight SNR + 1 (the base model's training loss, SPEC
    "Diffusion conventions"). The teacher runs without gradients.
    """
    if noise is None:
        noise = torch.randn_like(x)
    alpha, sigma = teacher_diffusion.get_alpha_sigma(x, t)
    z = (alpha * x + sigma * noise).float()
    with torch.no_grad():
        v_target = teacher_diffusion.inference(z, t, extra_args).float()
    v_student = student_diffusion.net_(z, student_diffusion.time_label(t), **extra_args).float()
    return ((v_student - v_target) ** 2).flatten(1).mean(1)
