"""Compatibility with the original implementation (Hramchenko/diffusion_distiller), kept out of the core.

- Its SGD strategies (strategies.py of the original), reproduced: StrategyOneCycle is SGD with weight decay
  min(1e-5, 0.5 lr/10) and torch's OneCycleLR(max_lr=lr, total_steps=num_iters + 2) with its defaults
  (momentum cycled 0.95 -> 0.85 -> 0.95); StrategyCosineAnnel is SGD with weight decay min(1e-5, lr/10) and
  torch's CosineAnnealingWarmRestarts(T_0=100, T_mult=2, eta_min=0.01), whose stop test never fired before
  the loader's end. lr_schedules.py dispatches to them.
- Its sampling API: `GaussianDiffusion(net, betas, time_scale, sampler="ddpm" | "clipped").p_sample_loop`,
  a thin wrapper over samplers.py with the original's results (tests/reference/ddim_tiny_case.pt).
- The export back (export_checkpoint.py --for_original True): a file its sample.py samples exactly as this
  project samples ours, with its time labels i*s and its BGR channel order, by exact edits of the UNet's
  weights (`for_original`); the same edits the other way make its files RGB networks on this project's labels
  (`aligned_rgb`, for the diffusers export).
"""
import math

import torch

import samplers
from checkpoints import (OWN_COSINE_TABLE, checkpoint_channel_order, checkpoint_conditioning, checkpoint_prediction,
                         checkpoint_schedule, checkpoint_time_labels, clean_state_dict, load_weights)
from cli import UserError
from diffusion import alpha_sigma_tables, model_grid
from unet import UNet

SGD_STRATEGIES = ("StrategyOneCycle", "StrategyCosineAnnel")
ORIGINAL_CLIPPING_VALUE = 1.2  # its --clipping_value of --clipped_sampling True


# -- its SGD strategies ---------------------------------------------------------------------------

def sgd_weight_decay(strategy, lr):
    return min(1e-5, (0.5 if strategy == "StrategyOneCycle" else 1.0) * lr / 10)


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


# -- its sampling API -------------------------------------------------------------------------------

class GaussianDiffusion:
    """The original's diffusion object over `net` (v-prediction) with `betas`: the float64 tables under the
    original's names and p_sample_loop with its two samplers, "ddpm" (ancestral, x clipped to [-1, 1]) and
    "clipped" (DDIM with x and eps clipped at clip_value). time_labels: "aligned" ((i+1)s - 1, this
    project's) or "original" (i s, the original's)."""

    def __init__(self, net, betas, time_scale=1, sampler="ddpm", time_labels="aligned"):
        if sampler not in ("ddpm", "clipped"):
            raise ValueError(f"unknown sampler {sampler!r}; the original's samplers are 'ddpm' and 'clipped'")
        self.net, self.time_scale, self.sampler = net, time_scale, sampler
        self.num_timesteps = int(betas.shape[0])
        self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod = alpha_sigma_tables(betas)
        self.grid = model_grid(betas, time_scale, time_labels)

    @torch.no_grad()
    def p_sample_loop(self, x, extra_args=None, eta=0.0, clip_value=ORIGINAL_CLIPPING_VALUE, clip_denoised=True,
                      callback=None, progress=False, noise=None):
        """Sample from noise x through all N steps with this diffusion's sampler (samplers.sample_ancestral or
        samplers.sample_ddim); clip_denoised=False turns the clipping off. callback and noise as in samplers.py."""
        was_training = self.net.training
        self.net.eval()
        try:
            if self.sampler == "ddpm":
                return samplers.sample_ancestral(self.net, x, self.grid, extra_args, callback, progress, noise,
                                                 clip=clip_denoised)
            return samplers.sample_ddim(self.net, x, self.grid, extra_args, callback, progress, noise, eta=eta,
                                        clip_value=clip_value if clip_denoised else None)
        finally:
            self.net.train(was_training)


# -- the export back --------------------------------------------------------------------------------

def rotate_time_embedding(weight, inv_freq, offset):
    """W' with W' emb(t) = W emb(t + offset), emb(t) = [sin(t w_k) for k, cos(t w_k) for k] (unet.TimeEmbedding).

    By the angle-addition formulas sin(a + b) = sin a cos b + cos a sin b and
    cos(a + b) = cos a cos b - sin a sin b with b = offset * w_k, the columns of W acting on the k-th
    (sin, cos) pair become (W_sin cos b - W_cos sin b, W_sin sin b + W_cos cos b). Computed in float64.
    """
    half_dim = inv_freq.numel()
    angle = offset * inv_freq.double()
    cos, sin = angle.cos(), angle.sin()
    w = weight.double()
    w_sin, w_cos = w[:, :half_dim], w[:, half_dim:]
    return torch.cat([w_sin * cos - w_cos * sin, w_sin * sin + w_cos * cos], dim=1)


def colour_permutation(in_channel, fold):
    """Folded channel k of the BGR network is folded channel perm[k] of the RGB one: image channel c holds
    folded channels c*f*f ... c*f*f + f*f - 1 (unet.spatial_fold), so the groups are reversed as a whole."""
    return torch.arange(in_channel * fold * fold).reshape(in_channel, fold * fold).flip(0).reshape(-1)


def for_original(ckpt, model, source):
    """The three-key checkpoint (G, n_timesteps, time_scale) that the original's sample.py samples as this
    project samples `ckpt`: labels i*s instead of (i+1)*s - 1, BGR instead of RGB. Only 3-channel UNets of
    unet.py: the original's UNet has 3 output channels whatever its in_channel.

    - time labels: step i of a model with time scale s gets (i+1)*s - 1 = i*s + d here, d = s - 1. The time
      embedding of t + d is that of t with each (sin, cos) pair rotated by the angle d*w_k, so the first
      Linear layer after the embedding (`time.1`) becomes W' = W R(d w), and W' emb(t) = W emb(t + d);
    - colours: RGB -> BGR reverses the image channels at the input of the first convolution (`down.0`) and
      at the output (weight and bias) of the last one (`out.2`); with a spatial fold f each image channel
      is a group of f*f folded channels, and whole groups change places.
    """
    levels, prediction = ckpt.get("noise_levels", OWN_COSINE_TABLE), checkpoint_prediction(ckpt)
    if levels != OWN_COSINE_TABLE or prediction != "v" or checkpoint_schedule(ckpt)[0] != "cosine":
        raise UserError(f"{source} predicts {prediction} on the {checkpoint_schedule(ckpt)[0]} schedule's levels; "
                        "the original's sample.py samples v-prediction on its own cosine table only")
    if not isinstance(model, UNet):
        raise UserError(f"--for_original True converts the UNet of unet.py (the original's layout); "
                        f"this user module's make_model() returns a {type(model).__name__}")
    if model.in_channel != 3:
        raise UserError(f"--for_original True needs a 3-channel UNet: the original's UNet always outputs 3 channels, "
                        f"this one has {model.in_channel}")
    if checkpoint_conditioning(ckpt):
        raise UserError(f"{source} is a conditional model ({', '.join(sorted(checkpoint_conditioning(ckpt)))}); "
                        "the original's UNet has no class or guidance input, so it cannot load it")
    load_weights(model, ckpt["G"], source)  # the weights fit this UNet
    time_scale = ckpt["time_scale"]
    offset = time_scale - 1 if checkpoint_time_labels(ckpt) == "aligned" else 0
    flip = checkpoint_channel_order(ckpt) == "RGB"
    if not offset and not flip:
        raise UserError(f"{source} needs no conversion: the original's sample.py already gives it the time labels "
                        "and channel order it expects (it loads the file as it is)")
    return {"G": _edited(ckpt["G"], model, offset, flip), "n_timesteps": ckpt["n_timesteps"], "time_scale": time_scale}


def aligned_rgb(ckpt, model, source):
    """The checkpoint with the edits of for_original the other way: a network that takes this project's labels
    (i+1)*s - 1 where it took the original's i*s (the embedding rotated by -(s - 1)) and makes RGB images where it
    made BGR (3 channels; one grey channel is never flipped). For the UNet of unet.py."""
    if not isinstance(model, UNet):
        raise UserError(f"{source} takes the original's time labels or makes BGR images, which only the UNet of "
                        f"unet.py can be edited out of; this user module's make_model() returns a {type(model).__name__}")
    load_weights(model, ckpt["G"], source)
    offset = -(ckpt["time_scale"] - 1) if checkpoint_time_labels(ckpt) == "original" else 0
    flip = checkpoint_channel_order(ckpt) == "BGR" and model.in_channel == 3
    return dict(ckpt, G=_edited(ckpt["G"], model, offset, flip), time_labels="aligned", channel_order="RGB")


def _edited(state_dict, model, offset, flip):
    """The UNet's weights with labels shifted by `offset` (W' emb(t) = W emb(t + offset)) and, with flip, the
    image channels reversed at the first convolution's input and the last one's output; the time embedding's
    frequencies are the computed ones."""
    G = clean_state_dict(state_dict)
    # the frequencies this project computes (a float16 file's copy may be rounded), which the original reads from the file
    frequencies = model.time[0].inv_freq.detach().cpu()
    edited = {"time.0.inv_freq": frequencies}
    if offset:
        edited["time.1.weight"] = rotate_time_embedding(G["time.1.weight"], frequencies, offset)
    if flip:
        perm = colour_permutation(model.in_channel, model.fold)
        edited["down.0.weight"] = G["down.0.weight"][:, perm]
        edited["out.2.weight"] = G["out.2.weight"][perm]
        edited["out.2.bias"] = G["out.2.bias"][perm]
    # edited tensors are stored in at least float32, so a float16 source is not rounded a second time
    G.update({k: v.to(torch.promote_types(G[k].dtype, torch.float32)) for k, v in edited.items()})
    return G
