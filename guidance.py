"""Classifier-free guidance: the guided prediction and its count of network calls (no training code).

References
- Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022 (Eq. 6, the guided prediction
  (1 + w) eps(z, c) - w eps(z); Algorithm 1, training with labels dropped to the null label).
- Meng et al., "On Distillation of Guided Diffusion Models", CVPR 2023 (Sec. 3.1: stage one trains a
  student that takes w as an input to match the guided teacher at w ~ U[w_min, w_max]; stage two is
  progressive distillation with w given to teacher and student alike).

CFG on the network's output. At fixed z, x_hat = alpha z - sigma v_hat and eps_hat = sigma z + alpha v_hat are
affine in v_hat (and in eps_hat, x_hat likewise), and the weights (1 + w) and -w sum to 1, so guiding v, eps or
x_hat is one and the same, whatever the network predicts:
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
    halves are unconditional), w None is 0; both are one value for the batch or one per image. At w = 0 (a
    number) the guided v is the conditional one, and one call is made. The combination runs in at least
    float32 (under AMP the network's half-precision output would be extrapolated by 1 + 2w otherwise)."""

    def __init__(self, net, null_label):
        super().__init__()
        self.net = net
        self.null_label = null_label

    def forward(self, x, t, y=None, w=None):
        batch = x.shape[0]
        null = torch.full((batch,), self.null_label, dtype=torch.long, device=x.device)
        y = null if y is None else torch.as_tensor(y, device=x.device).long().expand(batch)
        if cfg_calls(w) == 1:
            return self.net(x, t, y=y)
        t = torch.as_tensor(t, device=x.device).expand(batch)
        v = self.net(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, null]))
        v_cond, v_uncond = v.to(torch.promote_types(v.dtype, torch.float32)).chunk(2)  # no bf16/fp16 extrapolation
        return guided_v(v_cond, v_uncond, w)


def cfg_calls(w):
    """Network calls per image and step of classifier-free guidance at w: 1 at w None or the number 0 (the
    conditional call alone), else 2 (a tensor of weights counts as guided)."""
    return 1 if w is None or (not torch.is_tensor(w) and float(w) == 0.0) else 2


def calls_per_step(net, w=None):
    """Network calls per image and sampling step of `net` at guidance weight w: cfg_calls(w) under
    classifier-free guidance, 1 for any other network (one that takes w itself included)."""
    return cfg_calls(w) if isinstance(net, ClassifierFreeGuidance) else 1
