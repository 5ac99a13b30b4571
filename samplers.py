"""Samplers of v-parameterised diffusion models: one family with one signature (after k-diffusion's sampling.py).

    sample_NAME(diffusion, x, steps, extra_args=None, callback=None, progress=False, noise=None, **options)

- diffusion: the denoiser. `diffusion.get_alpha_sigma(x, t)` gives float64 (alpha_t, sigma_t) and
  `diffusion.inference(z, t, extra_args)` the float64 v prediction, so x_hat = alpha z - sigma v_hat and
  eps_hat = sigma z + alpha v_hat (Salimans & Ho, Appendix D). A GaussianDiffusion is one.
- x: the starting noise; steps: the step indices to visit, high to low (all N-1 ... 0 of a model, or any
  subset: select_steps). After the last index the sampler goes to clean data, index -1 (alpha 1,
  sigma 0), and returns x_hat there, as the original's DDIM does at index 0. One network call per
  visited index and image: NFE = len(steps) for every sampler here.
- callback(step_number, index, state, x_hat) after each step (trajectory pictures); progress: a tqdm bar.
- noise(step_number, like): the fresh standard normal noise of that step, shaped like the state (None:
  torch.randn_like). per_image_noise(indices, seed) makes image i's noise depend only on (seed, i, step).
The state is kept in float64 between steps, as in the original; the result has x's dtype.

Adding a sampler is one function here and one entry in SAMPLERS.

References
- Ho et al., "Denoising Diffusion Probabilistic Models", 2020 (Eq. 6-7, the posterior q(x_{t-1} | x_t, x_0)).
- Kingma et al., "Variational Diffusion Models", 2021 (Sec. 3: q(z_t | z_s) and q(z_s | z_t, x) for any s < t).
- Song et al., "Denoising Diffusion Implicit Models", 2021 (Eq. 12, the generalised step; Eq. 16, sigma_eta).
- Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", 2022
  (Algorithm 2, DPM-Solver++(2M)).
- Meng et al., "On Distillation of Guided Diffusion Models", CVPR 2023 (Sec. 3, N-step stochastic sampling).
"""
import torch
from tqdm import tqdm

import seeding

CLEAN = -1  # the index of clean data: alpha 1, sigma 0
STEP_SCHEDULES = ("time", "logsnr")


# -- the denoiser and the schedule -----------------------------------------------------------

def alpha_sigma(diffusion, x, i):
    """(alpha_i, sigma_i) in float64, shaped [B, 1, ..., 1] against x; index -1 is clean data (1, 0)."""
    if i == CLEAN:
        one = torch.ones((x.shape[0],) + (1,) * (x.ndim - 1), dtype=torch.float64, device=x.device)
        return one, torch.zeros_like(one)
    return diffusion.get_alpha_sigma(x, _index(x, i))


def predict_x(diffusion, z, i, extra_args, clip_value=None):
    """x_hat = alpha z - sigma v_hat at index i (Salimans & Ho, Appendix D), clipped to +-clip_value if given."""
    alpha, sigma = alpha_sigma(diffusion, z, i)
    x_hat = alpha * z - sigma * diffusion.inference(z, _index(z, i), extra_args)
    return x_hat.clamp(-clip_value, clip_value) if clip_value else x_hat


def _index(x, i):
    return torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)


def posterior(alpha_s, sigma_s, alpha_t, sigma_t):
    """(c_x, c_z, variance) of q(z_s | z_t, x) = N(c_x x + c_z z_t, variance) for s < t (Kingma et al. 2021,
    Sec. 3): alpha_{t|s} = alpha_t/alpha_s, sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2,
    c_x = alpha_s sigma_{t|s}^2/sigma_t^2, c_z = alpha_{t|s} sigma_s^2/sigma_t^2,
    variance = sigma_{t|s}^2 sigma_s^2/sigma_t^2. For s = t-1 these are Ho et al.'s Eq. 7
    (posterior_mean_coef1, posterior_mean_coef2, posterior_variance); for s = -1 exactly (1, 0, 0)."""
    alpha_ts, variance_ts = forward_transition(alpha_s, sigma_s, alpha_t, sigma_t)
    return (alpha_s * variance_ts / sigma_t ** 2, alpha_ts * sigma_s ** 2 / sigma_t ** 2,
            variance_ts * sigma_s ** 2 / sigma_t ** 2)


def forward_transition(alpha_s, sigma_s, alpha_t, sigma_t):
    """(alpha_{t|s}, sigma_{t|s}^2) of q(z_t | z_s) = N(alpha_{t|s} z_s, sigma_{t|s}^2) for s < t
    (Kingma et al. 2021, Sec. 3): the noising from level s to level t that keeps every marginal."""
    alpha_ts = alpha_t / alpha_s
    return alpha_ts, sigma_t ** 2 - alpha_ts ** 2 * sigma_s ** 2


def ddim_sigma(eta, alpha_s, sigma_s, alpha_t, sigma_t):
    """sigma_eta = eta (sigma_s/sigma_t) sqrt(1 - alpha_t^2/alpha_s^2) (Song et al. Eq. 16 scaled by eta);
    eta = 1 gives the posterior's standard deviation, eta = 0 deterministic DDIM."""
    return eta * (sigma_s / sigma_t) * (1 - alpha_t ** 2 / alpha_s ** 2).sqrt()


def half_log_snr(alpha, sigma):
    """lambda = log(alpha/sigma), the time variable of DPM-Solver (Lu et al. 2022)."""
    return (alpha / sigma).log()


# -- steps ------------------------------------------------------------------------------------

def ancestral_step(diffusion, z, t, s, extra_args, draw, clip=True):
    """One ancestral step from index t to s < t: z_s ~ q(z_s | z_t, x = x_hat) with x_hat clipped to
    [-1, 1] when clip (the original's `ddpm`); the variance clipped at 1e-20 as the original's
    log-variance; no noise into clean data (s = -1). draw() gives standard normal noise like z.
    Returns (z_s, x_hat)."""
    x_hat = predict_x(diffusion, z, t, extra_args, clip_value=1.0 if clip else None)
    c_x, c_z, variance = posterior(*alpha_sigma(diffusion, z, s), *alpha_sigma(diffusion, z, t))
    mean = c_x * x_hat + c_z * z
    if s == CLEAN:
        return mean, x_hat
    return mean + variance.clamp(min=1e-20).sqrt() * draw(), x_hat


def ddim_step(diffusion, z, t, s, extra_args, draw=None, eta=0.0, clip_value=None):
    """One DDIM step from index t to s < t (Song et al. Eq. 12, SPEC "Samplers"): x_hat clipped to
    +-clip_value, eps_hat = (z - alpha_t x_hat)/sigma_t clipped to the same bound (None or 0: no
    clipping), z_s = alpha_s x_hat + sqrt(sigma_s^2 - sigma_eta^2) eps_hat + sigma_eta draw().
    Into clean data (s = -1) this is x_hat. eta outside [0, 1] is a ValueError. Returns (z_s, x_hat)."""
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must lie in [0, 1] (0: deterministic DDIM, 1: the ancestral posterior), got {eta}")
    alpha_t, sigma_t = alpha_sigma(diffusion, z, t)
    alpha_s, sigma_s = alpha_sigma(diffusion, z, s)
    x_hat = predict_x(diffusion, z, t, extra_args, clip_value)
    eps_hat = (z - alpha_t * x_hat) / sigma_t
    if clip_value:
        eps_hat = eps_hat.clamp(-clip_value, clip_value)
    if s == CLEAN:
        return x_hat, x_hat
    noise_scale = ddim_sigma(eta, alpha_s, sigma_s, alpha_t, sigma_t)
    z_s = alpha_s * x_hat + (sigma_s ** 2 - noise_scale ** 2).sqrt() * eps_hat
    if eta:
        z_s = z_s + noise_scale * draw()
    return z_s, x_hat


def _visits(steps, progress):
    """(step_number, index t, next index s) for each visited index; after the last one, clean data."""
    steps = [int(i) for i in steps]
    pairs = list(zip(steps, steps[1:] + [CLEAN]))
    bar = tqdm(pairs, disable=not progress, desc="sampling", leave=False)
    return ((k, t, s) for k, (t, s) in enumerate(bar))


def _noise(noise, k, like):
    """A zero-argument draw of step k's standard normal noise."""
    return lambda: torch.randn_like(like) if noise is None else noise(k, like)


# -- the family -------------------------------------------------------------------------------

@torch.no_grad()
def sample_ancestral(diffusion, x, steps, extra_args=None, callback=None, progress=False, noise=None, clip=True):
    """Ancestral sampling (the original's `ddpm`): z_s ~ q(z_s | z_t, x_hat) between consecutive visited
    indices (Ho et al. Eq. 6-7; Kingma et al. 2021 Sec. 3 for any s < t), x_hat clipped to [-1, 1] when
    clip, no noise on the last step."""
    extra_args = extra_args or {}
    z = x.double()
    for k, t, s in _visits(steps, progress):
        z, x_hat = ancestral_step(diffusion, z, t, s, extra_args, _noise(noise, k, z), clip)
        if callback is not None:
            callback(k, t, z, x_hat)
    return z.to(x.dtype)


@torch.no_grad()
def sample_ddim(diffusion, x, steps, extra_args=None, callback=None, progress=False, noise=None, eta=0.0,
                clip_value=None):
    """DDIM (Song et al. Eq. 12 with sigma_eta of Eq. 16 times eta in [0, 1]) with optional x_hat and
    eps_hat clipping at +-clip_value (the original's clipped sampler; None or 0: none). eta = 0 is
    deterministic; eta = 1 draws from the ancestral posterior."""
    extra_args = extra_args or {}
    z = x.double()
    for k, t, s in _visits(steps, progress):
        z, x_hat = ddim_step(diffusion, z, t, s, extra_args, _noise(noise, k, z), eta, clip_value)
        if callback is not None:
            callback(k, t, z, x_hat)
    return z.to(x.dtype)


@torch.no_grad()
def sample_dpmpp_2m(diffusion, x, steps, extra_args=None, callback=None, progress=False, noise=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): multistep second order in lambda = log(alpha/sigma)
    on the data prediction x_hat. With h = lambda_s - lambda_t and r = h_prev/h,
    D = (1 + 1/(2r)) x_hat_t - 1/(2r) x_hat_prev, z_s = (sigma_s/sigma_t) z - alpha_s (e^{-h} - 1) D.
    The first step is first order (D = x_hat_t, a DDIM step); the last, into clean data (sigma = 0,
    lambda = infinity), returns x_hat. Deterministic: `noise` is never used."""
    extra_args = extra_args or {}
    z = x.double()
    x_prev = h_prev = None
    for k, t, s in _visits(steps, progress):
        x_hat = predict_x(diffusion, z, t, extra_args)
        if s == CLEAN:
            z = x_hat
        else:
            alpha_t, sigma_t = alpha_sigma(diffusion, z, t)
            alpha_s, sigma_s = alpha_sigma(diffusion, z, s)
            h = half_log_snr(alpha_s, sigma_s) - half_log_snr(alpha_t, sigma_t)
            d = x_hat if x_prev is None else x_hat + (x_hat - x_prev) * h / (2 * h_prev)
            z = (sigma_s / sigma_t) * z - alpha_s * torch.expm1(-h) * d
            h_prev = h
        x_prev = x_hat
        if callback is not None:
            callback(k, t, z, x_hat)
    return z.to(x.dtype)


@torch.no_grad()
def sample_stochastic(diffusion, x, steps, extra_args=None, callback=None, progress=False, noise=None):
    """The N-step stochastic sampler of Meng et al. 2023 (Sec. 3): from visited index v_k a deterministic
    DDIM step of twice the length to v_{k+2}, then one step back to v_{k+1}, re-noised with the exact
    forward transition q(z_{v_{k+1}} | z_{v_{k+2}}) (Kingma et al. 2021 Sec. 3); v_M = -1 is clean
    data, and the last step, from v_{M-1}, is deterministic (returns x_hat). One network call per
    visited index."""
    extra_args = extra_args or {}
    steps = [int(i) for i in steps]
    z = x.double()
    for k, t, s in _visits(steps, progress):
        if s == CLEAN:
            z, x_hat = ddim_step(diffusion, z, t, CLEAN, extra_args)
        else:
            two = steps[k + 2] if k + 2 < len(steps) else CLEAN
            z_two, x_hat = ddim_step(diffusion, z, t, two, extra_args)
            alpha_st, variance_st = forward_transition(*alpha_sigma(diffusion, z, two), *alpha_sigma(diffusion, z, s))
            z = alpha_st * z_two + variance_st.sqrt() * _noise(noise, k, z)()
        if callback is not None:
            callback(k, t, z, x_hat)
    return z.to(x.dtype)


SAMPLERS = {"ancestral": sample_ancestral, "ddim": sample_ddim, "dpmpp_2m": sample_dpmpp_2m,
            "stochastic": sample_stochastic}


def nfe(steps):
    """Network calls per image of any sampler in SAMPLERS: one per visited index."""
    return len(steps)


# -- noise and step selection -------------------------------------------------------------------

def per_image_noise(indices, seed):
    """noise(step_number, like) for the images `indices`: row r is image indices[r]'s standard normal
    noise of that sampling step, a function of (seed, indices[r], step_number) only
    (seeding.image_randn(..., seed, "step", k)), so no picture changes with batch, chunk or process count."""
    indices = [int(i) for i in indices]

    def noise(k, like):
        return seeding.image_randn(indices, like.shape[1:], seed, "step", k).to(device=like.device, dtype=like.dtype)

    return noise


def select_steps(diffusion_or_num_timesteps, nfe, schedule="time"):
    """The step indices to visit, high to low, for `nfe` network calls (0: every step).

    schedule "time": time-uniform, index round((j+1) N/nfe) - 1 for j = nfe-1 ... 0 - every k-th index
        ending at k-1 when nfe divides N (the noise levels of a model of nfe steps);
    "logsnr": uniform in log-SNR from the noisiest index to index 0, each level the nearest distinct index;
    a sequence of indices: those, in any order (nfe 0 or their number).
    Raises ValueError for indices or counts the model does not have.
    """
    diffusion = diffusion_or_num_timesteps
    n = diffusion if isinstance(diffusion, int) else diffusion.num_timesteps
    if not isinstance(schedule, str):
        chosen = sorted({int(i) for i in schedule}, reverse=True)
        if len(chosen) != len(schedule) or not chosen or chosen[0] >= n or chosen[-1] < 0:
            raise ValueError(f"step indices must be distinct, in 0..{n - 1}; got {list(schedule)}")
        if nfe not in (0, len(chosen)):
            raise ValueError(f"{len(chosen)} step indices given, but {nfe} network calls asked for")
        return chosen
    if schedule not in STEP_SCHEDULES:
        raise ValueError(f"unknown step schedule {schedule!r}; choose one of {STEP_SCHEDULES} or give indices")
    if not 0 <= nfe <= n:
        raise ValueError(f"{nfe} network calls asked for, but the model has {n} steps")
    if nfe in (0, n):
        return list(range(n - 1, -1, -1))
    if schedule == "time":
        return [(2 * (j + 1) * n + nfe) // (2 * nfe) - 1 for j in range(nfe - 1, -1, -1)]
    if isinstance(diffusion, int):
        raise ValueError("log-SNR step selection needs the diffusion (its schedule), not only its step count")
    return _logsnr_steps(diffusion, nfe)


def _logsnr_steps(diffusion, nfe):
    alphas = diffusion.sqrt_alphas_cumprod.double().cpu()
    lam = 2 * half_log_snr(alphas, diffusion.sqrt_one_minus_alphas_cumprod.double().cpu())  # decreasing in i
    targets = torch.linspace(float(lam[-1]), float(lam[0]), nfe, dtype=torch.float64)
    chosen, high = [], len(lam) - 1
    for j, target in enumerate(targets):
        low = nfe - 1 - j  # leave one index for each level still to place
        i = low + int((lam[low:high + 1] - target).abs().argmin())
        chosen.append(i)
        high = i - 1
    return chosen
