"""The math of v-parameterised Gaussian diffusion and of progressive distillation, as pure functions.

References
- Salimans & Ho, "Progressive Distillation for Fast Sampling of Diffusion Models", ICLR 2022
  (Algorithm 2; Appendix D for the v-parameterisation).
- Nichol & Dhariwal, "Improved Denoising Diffusion Probabilistic Models", 2021 (Eq. 17, cosine schedule).
- Ho et al., "Denoising Diffusion Probabilistic Models", 2020 (Eq. 4, q_sample; Eq. 6-7, the posterior).
- Kingma et al., "Variational Diffusion Models", 2021 (Sec. 3: q(z_t | z_s) and q(z_s | z_t, x) for any s < t).
- Song et al., "Denoising Diffusion Implicit Models", 2021 (Eq. 12, the generalised step; Eq. 16, sigma_eta).

Conventions (SPEC "Diffusion conventions"): a model of N steps has indices i = 0..N-1, index i the noise
level of continuous time (i+1)/N, index 0 the least noisy. z = alpha x + sigma eps with alpha^2 + sigma^2 = 1.
Every table is float64; `extract` indexes one and casts it for a batch.

A **grid** (`Grid`) is the list of noise levels a sampler visits, noisiest first, each with its (alpha, sigma)
and the float time label the network receives there, ending at clean data (alpha 1, sigma 0). `model_grid`
gives all N levels of a model; samplers.py and the losses take any grid.

`GaussianDiffusion`, the original's one-object sampling API, is reached from here but lives in original.py.
This module imports no training code and knows nothing of networks beyond "a function of (z, label)".
"""
import math
from dataclasses import dataclass

import torch

TIME_LABELS = ("aligned", "original")


# -- the schedule -------------------------------------------------------------------------------

SCHEDULES = ("cosine", "linear", "scaled_linear")  # and an explicit table of betas (check_betas)
PREDICTIONS = ("eps", "x", "v")  # what the network outputs


def make_beta_schedule(schedule, n_timestep, beta_start=1e-4, beta_end=0.02, cosine_s=8e-3):
    """Float64 betas of a named schedule.

    cosine (as the original builds it; Nichol & Dhariwal Eq. 17): f(u) = cos^2(((u + s)/(1 + s)) pi/2),
      alphas_cumprod_k = f(k/N)/f(0) for k = 0..N, beta_k = 1 - alphas_cumprod_k/alphas_cumprod_{k-1},
      clamped at 0.999;
    linear (Ho et al. Sec. 4: 1e-4 to 0.02 over 1000 steps): N values evenly spaced from beta_start to beta_end;
    scaled_linear: linear in sqrt(beta), from sqrt(beta_start) to sqrt(beta_end), squared.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown beta schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if n_timestep < 1:
        raise ValueError(f"n_timestep must be at least 1, got {n_timestep}")
    if schedule == "cosine":
        u = torch.arange(n_timestep + 1, dtype=torch.float64) / n_timestep
        f = torch.cos((u + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        alphas_cumprod = f / f[0]
        return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(max=0.999)
    if not 0 < beta_start < beta_end < 1:
        raise ValueError(f"the {schedule} schedule needs 0 < beta_start < beta_end < 1, got beta_start {beta_start:g} "
                         f"and beta_end {beta_end:g}")
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, n_timestep, dtype=torch.float64)
    return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n_timestep, dtype=torch.float64) ** 2


def check_betas(betas):
    """An explicit beta table as float64: one dimension, every value in (0, 1) (ValueError otherwise)."""
    betas = torch.as_tensor(betas, dtype=torch.float64)
    if betas.ndim != 1 or betas.numel() < 1:
        raise ValueError(f"a beta table is a list of numbers, one per step; got shape {list(betas.shape)}")
    if not bool(((betas > 0) & (betas < 1)).all()):
        bad = betas[~((betas > 0) & (betas < 1))][0]
        raise ValueError(f"every beta must lie in (0, 1); the table holds {float(bad):g}")
    return betas


def rescale_zero_terminal_snr(betas):
    """Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1: shift and
    scale sqrt(alphas_cumprod) so that its last value is exactly 0 (zero SNR at the noisiest step) and its first
    is unchanged; the last beta becomes 1. Only for models trained on it (a v or x network: eps cannot be
    turned into x where alpha = 0)."""
    root = torch.cumprod(1 - betas.to(torch.float64), 0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    alphas_cumprod = root ** 2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1 - alphas


def alpha_sigma_tables(betas):
    """(alpha_i, sigma_i) = (sqrt(alphas_cumprod_i), sqrt(1 - alphas_cumprod_i)), alphas_cumprod the
    cumulative product of 1 - beta (Ho et al. Eq. 4), in float64."""
    alphas_cumprod = torch.cumprod(1 - betas.to(torch.float64), 0)
    return alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()


def extract(table, index, like):
    """table[index] as float64 of shape [B, 1, ..., 1] on like's device, broadcastable against `like`.
    index: one integer for the whole batch, or a tensor of B integers."""
    table = table.to(device=like.device, dtype=torch.float64)
    if isinstance(index, int):
        index = torch.full((like.shape[0],), index, dtype=torch.long, device=like.device)
    return table[index.to(like.device).long()].reshape(-1, *([1] * (like.ndim - 1)))


def time_labels_of(indices, time_scale, convention="aligned"):
    """The float labels the network of a model at `time_scale` receives at its step indices (SPEC "Time
    labels"): "aligned" (i + 1) s - 1, the base index of the same noise level; "original" i s, as the
    original implementation fed them. Both are i at s = 1."""
    if convention not in TIME_LABELS:
        raise ValueError(f"unknown time_labels {convention!r}; choose one of {TIME_LABELS}")
    indices = torch.as_tensor(indices, dtype=torch.float64)
    return (indices + 1) * time_scale - 1 if convention == "aligned" else indices * time_scale


# -- the v-parameterisation (Salimans & Ho, Appendix D) -------------------------------------------

def q_sample(x, eps, alpha, sigma):
    """z = alpha x + sigma eps (Ho et al. Eq. 4)."""
    return alpha * x + sigma * eps


def predict_v(x, eps, alpha, sigma):
    """v = alpha eps - sigma x, the training target of a v-model."""
    return alpha * eps - sigma * x


def predict_start_from_v(z, v, alpha, sigma):
    """x = alpha z - sigma v."""
    return alpha * z - sigma * v


def predict_eps_from_v(z, v, alpha, sigma):
    """eps = sigma z + alpha v."""
    return sigma * z + alpha * v


def predict_eps_from_start(z, x, alpha, sigma):
    """eps = (z - alpha x) / sigma (undefined at clean data, sigma = 0)."""
    return (z - alpha * x) / sigma


# -- the three parameterisations: eps, x or v (Salimans & Ho Sec. 4 and Appendix D) -----------------

def predict_start(prediction, z, out, alpha, sigma):
    """x_hat from the network's output at z: v -> alpha z - sigma v; eps -> (z - sigma eps)/alpha (Ho et al.
    Eq. 15; alpha = 0 has no x); x -> the output itself."""
    if prediction == "v":
        return predict_start_from_v(z, out, alpha, sigma)
    if prediction == "eps":
        return (z - sigma * out) / alpha
    return out


def prediction_target(prediction, z, x, alpha, sigma):
    """What a network of this parameterisation should output at z for the clean image x: eps = (z - alpha x)/sigma,
    x itself, or v = (alpha z - x)/sigma (= alpha eps - sigma x)."""
    if prediction == "eps":
        return predict_eps_from_start(z, x, alpha, sigma)
    if prediction == "v":
        return (alpha * z - x) / sigma
    return x


def training_target(prediction, x, eps, alpha, sigma):
    """The same target from the clean image and the noise that made z = alpha x + sigma eps: eps, x or
    v = alpha eps - sigma x."""
    return {"eps": eps, "x": x, "v": predict_v(x, eps, alpha, sigma)}[prediction]


def output_weight(prediction, alpha, sigma):
    """c with |x_hat - x|^2 = c |out - target|^2 at one level: sigma^2 for v, (sigma/alpha)^2 for eps, 1 for x
    (x_hat is affine in the output with slope -sigma, -sigma/alpha, 1)."""
    if prediction == "v":
        return sigma ** 2
    if prediction == "eps":
        return (sigma / alpha) ** 2
    return torch.ones_like(sigma)


X_ERROR_WEIGHTINGS = ("snr+1", "snr", "truncated_snr", "constant")


def output_mse_weighting(prediction):
    """The weighting under which the weighted x error is the plain MSE of the output (output_weight times it is
    1): snr for eps (Ho et al.'s L_simple), constant for x, snr+1 for v."""
    return {"eps": "snr", "x": "constant", "v": "snr+1"}[prediction]


def x_error_weight(weighting, alpha, sigma):
    """The weight of |x_hat - x|^2 at a level (Salimans & Ho Sec. 4), SNR = alpha^2/sigma^2: "snr+1" (the MSE
    of v), "snr" (the MSE of eps, Ho et al.'s L_simple), "truncated_snr" max(SNR, 1), "constant" (the MSE of x)."""
    snr = (alpha / sigma) ** 2
    return {"snr+1": snr + 1, "snr": snr, "truncated_snr": snr.clamp(min=1), "constant": torch.ones_like(snr)}[weighting]


# -- transitions between two levels s < t -------------------------------------------------------

def forward_transition(alpha_s, sigma_s, alpha_t, sigma_t):
    """(alpha_{t|s}, sigma_{t|s}^2) of q(z_t | z_s) = N(alpha_{t|s} z_s, sigma_{t|s}^2) (Kingma et al. Sec. 3)."""
    alpha_ts = alpha_t / alpha_s
    return alpha_ts, sigma_t ** 2 - alpha_ts ** 2 * sigma_s ** 2


def posterior(alpha_s, sigma_s, alpha_t, sigma_t):
    """(c_x, c_z, variance) of q(z_s | z_t, x) = N(c_x x + c_z z_t, variance) (Kingma et al. Sec. 3):
    c_x = alpha_s sigma_{t|s}^2/sigma_t^2, c_z = alpha_{t|s} sigma_s^2/sigma_t^2, variance =
    sigma_{t|s}^2 sigma_s^2/sigma_t^2. For s = t-1 these are Ho et al.'s Eq. 7; into clean data (1, 0)."""
    alpha_ts, variance_ts = forward_transition(alpha_s, sigma_s, alpha_t, sigma_t)
    return (alpha_s * variance_ts / sigma_t ** 2, alpha_ts * sigma_s ** 2 / sigma_t ** 2,
            variance_ts * sigma_s ** 2 / sigma_t ** 2)


def ddim_sigma(eta, alpha_s, sigma_s, alpha_t, sigma_t):
    """sigma_eta = eta (sigma_s/sigma_t) sqrt(1 - alpha_t^2/alpha_s^2) (Song et al. Eq. 16 times eta): eta = 1
    is the posterior's standard deviation, eta = 0 deterministic DDIM."""
    return eta * (sigma_s / sigma_t) * (1 - alpha_t ** 2 / alpha_s ** 2).sqrt()


def ddim_step(x_hat, eps_hat, alpha_s, sigma_s, noise_scale=0.0, noise=None):
    """z_s = alpha_s x_hat + sqrt(sigma_s^2 - sigma_eta^2) eps_hat + sigma_eta noise (Song et al. Eq. 12),
    sigma_eta = noise_scale (ddim_sigma). Into clean data (alpha 1, sigma 0) this is x_hat."""
    if noise is None:
        return alpha_s * x_hat + sigma_s * eps_hat
    return alpha_s * x_hat + (sigma_s ** 2 - noise_scale ** 2).sqrt() * eps_hat + noise_scale * noise


def half_log_snr(alpha, sigma):
    """lambda = log(alpha/sigma), the time variable of DPM-Solver (Lu et al. 2022)."""
    return (alpha / sigma).log()


# -- Algorithm 2 of Salimans & Ho ----------------------------------------------------------------

def two_teacher_steps(teacher_x, z, levels):
    """The two deterministic DDIM steps of the teacher in Algorithm 2: teacher_x(z, k) is its x prediction at
    its level k in {0, 1}; levels = ((alpha_t, sigma_t), (alpha_1, sigma_1), (alpha_2, sigma_2)) are the
    teacher's levels t, t-1, t-2 (the last may be clean data, alpha 1, sigma 0). z' = DDIM(z, t -> t-1),
    z'' = DDIM(z', t-1 -> t-2). Returns (z'', the second x prediction)."""
    (alpha_t, sigma_t), (alpha_1, sigma_1), (alpha_2, sigma_2) = levels
    x_1 = teacher_x(z, 0)
    z_1 = ddim_step(x_1, predict_eps_from_start(z, x_1, alpha_t, sigma_t), alpha_1, sigma_1)
    x_2 = teacher_x(z_1, 1)
    return ddim_step(x_2, predict_eps_from_start(z_1, x_2, alpha_1, sigma_1), alpha_2, sigma_2), x_2


def distillation_target(z, z_2, levels):
    """Algorithm 2's target x~ = (z'' - (sigma_2/sigma_t) z)/(alpha_2 - (sigma_2/sigma_t) alpha_t): the x for
    which one DDIM step of the student from z at level t lands exactly on the teacher's z'' at level t-2
    (levels as in two_teacher_steps). Into clean data (sigma_2 = 0) it is z'', the second x prediction."""
    (alpha_t, sigma_t), _, (alpha_2, sigma_2) = levels
    ratio = sigma_2 / sigma_t
    return (z_2 - ratio * z) / (alpha_2 - ratio * alpha_t)


# -- grids ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Grid:
    """The noise levels a sampler visits, noisiest first, ending at clean data.

    alphas, sigmas: float64 [K + 1], the last entry clean data (1, 0); labels: float64 [K], the time label
    the network receives at each of the K levels it is called at. sigma decreases strictly along the grid.
    """
    alphas: torch.Tensor
    sigmas: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        k = self.labels.shape[0]
        if k < 1 or self.alphas.shape != (k + 1,) or self.sigmas.shape != (k + 1,):
            raise ValueError(f"a grid has K >= 1 labels and K + 1 levels; got {k} labels, {tuple(self.alphas.shape)} "
                             f"alphas and {tuple(self.sigmas.shape)} sigmas")
        if float(self.alphas[-1]) != 1.0 or float(self.sigmas[-1]) != 0.0:
            raise ValueError("a grid ends at clean data (alpha 1, sigma 0)")
        if not bool((self.sigmas[1:] < self.sigmas[:-1]).all()):
            raise ValueError(f"the noise levels of a grid must decrease strictly, noisiest first; got sigma "
                             f"{[round(float(s), 6) for s in self.sigmas]}")

    def __len__(self):
        """The number of levels the network is called at (NFE of one image without guidance)."""
        return self.labels.shape[0]

    def level(self, k, like):
        """(alpha_k, sigma_k) of point k (k = len(self) is clean data), shaped to broadcast against `like`."""
        return extract(self.alphas, k, like), extract(self.sigmas, k, like)

    def label(self, k, like):
        """The float32 time label of point k, one per row of `like`."""
        return extract(self.labels, k, like).reshape(-1).float()

    def take(self, points):
        """The grid of the given points (increasing positions in this grid), ending at clean data."""
        points = torch.as_tensor(list(points), dtype=torch.long)
        ends = torch.cat([points, torch.tensor([len(self)])])
        return Grid(self.alphas[ends], self.sigmas[ends], self.labels[points])


def model_grid(betas, time_scale=1, time_labels="aligned"):
    """All N levels of a model with `betas`, index N-1 down to 0, and the labels of its time scale."""
    alpha, sigma = alpha_sigma_tables(betas)
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    indices = torch.arange(betas.shape[0] - 1, -1, -1)
    return Grid(torch.cat([alpha[indices], one]), torch.cat([sigma[indices], zero]),
                time_labels_of(indices, time_scale, time_labels))


def grid_indices(grid_size, indices):
    """Positions in a model's full grid of N points of its step indices (position N-1-i for index i)."""
    return [grid_size - 1 - int(i) for i in indices]


def __getattr__(name):
    """`from diffusion import GaussianDiffusion` keeps working: the original's one-object API lives in
    original.py, out of this module's way, and is loaded only when asked for."""
    if name == "GaussianDiffusion":
        from original import GaussianDiffusion
        return GaussianDiffusion
    raise AttributeError(f"module 'diffusion' has no attribute {name!r}")
