"""Samplers of v-parameterised diffusion models over a grid of noise levels (after k-diffusion's sampling.py).

    sample_NAME(model, x, grid, extra_args=None, callback=None, progress=False, noise=None, prediction="v",
                **options)

- model(z, label, **extra_args): the network (or classifier-free guidance over it, guidance.py), whose output
  is eps, x or v as `prediction` says; x_hat = diffusion.predict_start(prediction, z, output, alpha, sigma).
- x: the starting noise; grid: a diffusion.Grid, the levels to visit noisiest first, ending at clean data,
  where every sampler returns x_hat (as the original's DDIM does at index 0). One network call per grid
  point and image (sample_utils.nfe counts them).
- callback(dict) after each step with x (the new state), i (the step number), sigma (the level stepped
  from) and denoised (x_hat there); progress: a tqdm bar.
- noise(i, like): the fresh standard normal noise of step i, shaped like the state (None: torch.randn_like);
  per_image_noise makes image r's noise a function of (seed, r, i) alone.
The state is kept in float64 between steps, as in the original; the result has x's dtype.

Adding a sampler is one function here and one row of SAMPLERS.

References
- Ho et al. 2020 (Eq. 6-7) and Kingma et al. 2021 (Sec. 3): the ancestral posterior between any two levels.
- Song et al., "Denoising Diffusion Implicit Models", 2021 (Eq. 12 and 16).
- Lu et al., "DPM-Solver++", 2022 (Algorithm 2, DPM-Solver++(2M)).
- Meng et al., "On Distillation of Guided Diffusion Models", CVPR 2023 (Sec. 3, N-step stochastic sampling).
"""
from typing import Callable, NamedTuple

import torch
from tqdm import tqdm

import seeding
from diffusion import (alpha_sigma_tables, ddim_sigma, ddim_step, forward_transition, half_log_snr,
                       make_beta_schedule, posterior, predict_eps_from_start, predict_start)


def denoise(model, z, grid, i, extra_args, prediction="v", clip_value=None):
    """x_hat at grid point i in float64 from the network's output (`prediction`: eps, x or v), clipped to
    +-clip_value if given."""
    alpha, sigma = grid.level(i, z)
    x_hat = predict_start(prediction, z, model(z.float(), grid.label(i, z), **extra_args).double(), alpha, sigma)
    return x_hat.clamp(-clip_value, clip_value) if clip_value else x_hat


def _steps(grid, progress):
    return tqdm(range(len(grid)), disable=not progress, desc="sampling", leave=False)


def _draw(noise, i, like):
    return torch.randn_like(like) if noise is None else noise(i, like)


def _report(callback, z, i, grid, x_hat):
    if callback is not None:
        callback({"x": z, "i": i, "sigma": grid.sigmas[i], "denoised": x_hat})


@torch.no_grad()
def sample_ancestral(model, x, grid, extra_args=None, callback=None, progress=False, noise=None, prediction="v",
                     clip=True):
    """Ancestral sampling (the original's `ddpm`): z_s ~ q(z_s | z_t, x = x_hat) between consecutive grid
    points, x_hat clipped to [-1, 1] when clip; the variance clipped at 1e-20 as the original's
    log-variance; no noise into clean data."""
    extra_args, z = extra_args or {}, x.double()
    for i in _steps(grid, progress):
        x_hat = denoise(model, z, grid, i, extra_args, prediction, 1.0 if clip else None)
        c_x, c_z, variance = posterior(*grid.level(i + 1, z), *grid.level(i, z))
        z = c_x * x_hat + c_z * z
        if i + 1 < len(grid):
            z = z + variance.clamp(min=1e-20).sqrt() * _draw(noise, i, z)
        _report(callback, z, i, grid, x_hat)
    return z.to(x.dtype)


@torch.no_grad()
def sample_ddim(model, x, grid, extra_args=None, callback=None, progress=False, noise=None, prediction="v",
                eta=0.0, clip_value=None):
    """DDIM (Song et al. Eq. 12, sigma_eta of Eq. 16 times eta in [0, 1]; SPEC "Samplers") with x_hat and
    eps_hat = (z - alpha x_hat)/sigma clipped at +-clip_value (the original's clipped sampler; None or 0:
    none). eta = 0 is deterministic; eta = 1 draws from the ancestral posterior."""
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must lie in [0, 1] (0: deterministic DDIM, 1: the ancestral posterior), got {eta}")
    extra_args, z = extra_args or {}, x.double()
    for i in _steps(grid, progress):
        (alpha_t, sigma_t), (alpha_s, sigma_s) = grid.level(i, z), grid.level(i + 1, z)
        x_hat = denoise(model, z, grid, i, extra_args, prediction, clip_value)
        eps_hat = predict_eps_from_start(z, x_hat, alpha_t, sigma_t)
        if clip_value:
            eps_hat = eps_hat.clamp(-clip_value, clip_value)
        if i + 1 == len(grid) or not eta:
            z = ddim_step(x_hat, eps_hat, alpha_s, sigma_s)
        else:
            z = ddim_step(x_hat, eps_hat, alpha_s, sigma_s, ddim_sigma(eta, alpha_s, sigma_s, alpha_t, sigma_t),
                          _draw(noise, i, z))
        _report(callback, z, i, grid, x_hat)
    return z.to(x.dtype)


@torch.no_grad()
def sample_dpmpp_2m(model, x, grid, extra_args=None, callback=None, progress=False, noise=None, prediction="v"):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): multistep second order in lambda = log(alpha/sigma) on
    the data prediction. With h = lambda_s - lambda_t and r = h_prev/h, D = (1 + 1/(2r)) x_hat - 1/(2r)
    x_hat_prev, z_s = (sigma_s/sigma_t) z - alpha_s (e^{-h} - 1) D. The first step is first order (a DDIM
    step); the last, into clean data (lambda = infinity), returns x_hat. Deterministic: `noise` is unused."""
    extra_args, z = extra_args or {}, x.double()
    x_prev = h_prev = None
    for i in _steps(grid, progress):
        x_hat = denoise(model, z, grid, i, extra_args, prediction)
        if i + 1 == len(grid):
            z = x_hat
        else:
            (alpha_t, sigma_t), (alpha_s, sigma_s) = grid.level(i, z), grid.level(i + 1, z)
            h = half_log_snr(alpha_s, sigma_s) - half_log_snr(alpha_t, sigma_t)
            d = x_hat if x_prev is None else x_hat + (x_hat - x_prev) * h / (2 * h_prev)
            z = (sigma_s / sigma_t) * z - alpha_s * torch.expm1(-h) * d
            h_prev = h
        x_prev = x_hat
        _report(callback, z, i, grid, x_hat)
    return z.to(x.dtype)


@torch.no_grad()
def sample_stochastic(model, x, grid, extra_args=None, callback=None, progress=False, noise=None, prediction="v"):
    """The N-step stochastic sampler of Meng et al. 2023 (Sec. 3): from point i a deterministic DDIM step of
    twice the length to point i+2, then back to point i+1 with the exact forward transition
    q(z_{i+1} | z_{i+2}) (Kingma et al. Sec. 3); the last step, into clean data, is deterministic."""
    extra_args, z = extra_args or {}, x.double()
    for i in _steps(grid, progress):
        x_hat = denoise(model, z, grid, i, extra_args, prediction)
        two = min(i + 2, len(grid))
        eps_hat = predict_eps_from_start(z, x_hat, *grid.level(i, z))
        z = ddim_step(x_hat, eps_hat, *grid.level(two, z))
        if two > i + 1:
            alpha_st, variance_st = forward_transition(*grid.level(two, z), *grid.level(i + 1, z))
            z = alpha_st * z + variance_st.sqrt() * _draw(noise, i, z)
        _report(callback, z, i, grid, x_hat)
    return z.to(x.dtype)


class Sampler(NamedTuple):
    function: Callable
    label: str  # the display name in tables and plots
    options: tuple = ()  # the keyword options it takes


SAMPLERS = {"ancestral": Sampler(sample_ancestral, "ancestral"),
            "ddim": Sampler(sample_ddim, "DDIM", ("eta", "clip_value")),
            "dpmpp_2m": Sampler(sample_dpmpp_2m, "DPM-Solver++(2M)"),
            "stochastic": Sampler(sample_stochastic, "stochastic")}
ALIASES = {"ddpm": "ancestral"}  # the original's name of its ancestral sampler
LABELS = {name: sampler.label for name, sampler in SAMPLERS.items()}


def sampler_name(name):
    """The SAMPLERS key of a name or alias; ValueError for an unknown one."""
    name = ALIASES.get(name, name)
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name}; choose one of {', '.join(list(SAMPLERS) + list(ALIASES))}")
    return name


def per_image_noise(indices, seed):
    """noise(i, like) for the images `indices`: row r is image indices[r]'s standard normal noise of sampling
    step i, a function of (seed, indices[r], i) only (seeding.image_randn(..., seed, "step", i)), drawn on
    like's device in one batched call."""
    indices = [int(i) for i in indices]

    def noise(i, like):
        return seeding.image_randn(indices, like.shape[1:], seed, "step", i, device=like.device).to(like.dtype)

    return noise


# -- choosing the points of a model's grid ----------------------------------------------------------

STEP_SCHEDULES = ("time", "logsnr", "cosine")


def select_steps(grid, count, schedule="time"):
    """The `count` step indices (high to low) of a model's full grid of N points to visit (0: all of them).

    "time": index round((j+1) N/count) - 1 for j = count-1 ... 0 (every k-th, ending at k-1 when count divides N:
        the levels of a model of count steps);
    "logsnr": count levels uniform in log-SNR from index N-2 to index 0, each the nearest index not yet
        taken, the noisiest replaced by N-1, where the noise starts (the clamped last beta puts index N-1
        far below the rest, at log-SNR -19.9 against -13.0 for N-2 at N = 128: spacing from it would
        spend several calls on pure noise);
    "cosine": the levels of the cosine schedule's grid of count steps (Nichol & Dhariwal 2021, times
        count/count, ..., 1/count), each the index of nearest log-SNR not yet taken, the noisiest N-1: the
        cosine model's own spacing on any schedule, so the levels of count/2 are every other one of count
        while no two fall on one index (on DDPM's linear schedule of 1000 steps, up to 128: 4 steps visit 999,
        435, 260, 124 against time's 999, 749, 499, 249);
    a sequence of indices: those, sorted high to low (count 0 or their number).
    ValueError for indices or counts the model does not have.
    """
    n = len(grid)
    if not isinstance(schedule, str):
        chosen = sorted({int(i) for i in schedule}, reverse=True)
        if len(chosen) != len(schedule) or not chosen or chosen[0] >= n or chosen[-1] < 0:
            raise ValueError(f"step indices must be distinct, in 0..{n - 1}; got {list(schedule)}")
        if count not in (0, len(chosen)):
            raise ValueError(f"{len(chosen)} step indices given, but {count} steps asked for")
        return chosen
    if schedule not in STEP_SCHEDULES:
        raise ValueError(f"unknown step schedule {schedule!r}; choose one of {STEP_SCHEDULES} or give indices")
    if not 0 <= count <= n:
        raise ValueError(f"{count} steps asked for, but the model has {n}")
    if count in (0, n):
        return list(range(n - 1, -1, -1))
    if schedule == "time":
        return [(2 * (j + 1) * n + count) // (2 * count) - 1 for j in range(count - 1, -1, -1)]
    lam = 2 * half_log_snr(grid.alphas[:-1], grid.sigmas[:-1]).flip(0)  # by index i: decreasing in i
    if schedule == "logsnr":
        targets = torch.linspace(float(lam[n - 2]), float(lam[0]), count, dtype=torch.float64)[1:]
    else:
        alpha, sigma = alpha_sigma_tables(make_beta_schedule("cosine", count))  # index j: time (j + 1)/count
        targets = 2 * half_log_snr(alpha, sigma).flip(0)[1:]
    chosen, high = [n - 1], n - 2
    for j, target in enumerate(targets):
        low = count - 2 - j  # leave one index for each level still to place
        i = low + int((lam[low:high + 1] - target).abs().argmin())
        chosen.append(i)
        high = i - 1
    return chosen
