"""v-parameterised Gaussian diffusion with the cosine schedule, and progressive distillation.

References
- Salimans & Ho, "Progressive Distillation for Fast Sampling of Diffusion Models", ICLR 2022
  (Algorithm 2; Appendix D for the v-parameterisation).
- Nichol & Dhariwal, "Improved Denoising Diffusion Probabilistic Models", 2021 (Eq. 17, cosine schedule).
- Ho et al., "Denoising Diffusion Probabilistic Models", 2020 (Eq. 6-7, the posterior q(x_{t-1}|x_t, x_0)).
- Song et al., "Denoising Diffusion Implicit Models", 2021 (Eq. 12 and 16, DDIM with eta).
The samplers themselves are samplers.py; p_sample_loop and the one-step methods are thin wrappers over them.

Conventions (SPEC "Diffusion conventions"): N discrete steps, index i = 0..N-1 is continuous time
(i+1)/N, index 0 the least noisy. Schedule tables are kept in float64; `_extract` indexes and casts them.
z = alpha x + sigma eps, v = alpha eps - sigma x (alpha^2 + sigma^2 = 1).

This module is the math only: it imports no training code.
"""
import math

import torch

import samplers

TIME_LABELS = ("aligned", "original")
SAMPLERS = ("ddpm", "clipped")
DISTILL_WEIGHTINGS = ("snr+1", "truncated_snr", "original")


def make_beta_schedule(schedule, n_timestep, cosine_s=8e-3):
    """Float64 betas of the cosine schedule as the original builds it (Nichol & Dhariwal Eq. 17).

    f(u) = cos^2(((u + s)/(1 + s)) pi/2), alphas_cumprod_k = f(k/N)/f(0) for k = 0..N,
    beta_k = 1 - alphas_cumprod_k/alphas_cumprod_{k-1}, clamped at 0.999.
    """
    if schedule != "cosine":
        raise ValueError(f"unknown beta schedule {schedule!r}; the only schedule is 'cosine'")
    if n_timestep < 1:
        raise ValueError(f"n_timestep must be at least 1, got {n_timestep}")
    u = torch.arange(n_timestep + 1, dtype=torch.float64) / n_timestep
    f = torch.cos((u + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(max=0.999)


def _extract(table, t, x):
    """table[t] as float64 of shape [B, 1, ..., 1], broadcastable against x."""
    if table.device != t.device:
        table = table.to(t.device)
    out = table[t.long()]
    return out.reshape(t.shape[0], *([1] * (x.ndim - 1)))


class GaussianDiffusion:
    """v-parameterised diffusion over `net` (which maps (z, time label, **extra_args) to v).

    time_scale: how many base-model steps one step of this model spans.
    sampler: the sampler of p_sample_loop, the original's names: "ddpm" (ancestral, its default) or
        "clipped" (DDIM with x and eps clipping). samplers.SAMPLERS holds the whole family.
    time_labels: "aligned" feeds the network (i+1)*time_scale - 1, the base index of the same noise
        level; "original" feeds i*time_scale, as the original implementation did (SPEC "Time labels").
    """

    def __init__(self, net, betas, time_scale=1, sampler="ddpm", time_labels="aligned"):
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
        if time_labels not in TIME_LABELS:
            raise ValueError(f"unknown time_labels {time_labels!r}; choose one of {TIME_LABELS}")
        self.net_ = net
        self.time_scale = time_scale
        self.sampler = sampler
        self.time_labels = time_labels

        betas = betas.to(torch.float64)
        self.num_timesteps = int(betas.shape[0])
        alphas_cumprod = torch.cumprod(1 - betas, 0)
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        self.sqrt_alphas_cumprod = alphas_cumprod.sqrt()  # alpha_i
        self.sqrt_one_minus_alphas_cumprod = (1 - alphas_cumprod).sqrt()  # sigma_i

    # -- tables and the network -------------------------------------------------------------

    def get_alpha_sigma(self, x, t):
        """(alpha_t, sigma_t) in float64, shaped to broadcast against x."""
        return _extract(self.sqrt_alphas_cumprod, t, x), _extract(self.sqrt_one_minus_alphas_cumprod, t, x)

    def time_label(self, t):
        """The float label the network receives for step index t (SPEC "Time labels")."""
        t = t.to(torch.float32)
        if self.time_labels == "aligned":
            return (t + 1) * self.time_scale - 1
        return t * self.time_scale

    def inference(self, z, t, extra_args):
        """The network's v prediction at index t, in float64."""
        return self.net_(z.float(), self.time_label(t), **extra_args).double()

    @staticmethod
    def predict_start_from_v(z, v, alpha, sigma):
        """x = alpha z - sigma v (Salimans & Ho, Appendix D)."""
        return alpha * z - sigma * v

    @staticmethod
    def predict_v(x_0, eps, alpha, sigma):
        return alpha * eps - sigma * x_0

    def q_sample(self, x_0, t, noise):
        alpha, sigma = self.get_alpha_sigma(x_0, t)
        return alpha * x_0 + sigma * noise

    # -- training ---------------------------------------------------------------------------

    def p_loss(self, x_0, t, extra_args, noise=None, reduction="mean"):
        """MSE between predicted and true v ("SNR+1" weighting of the x error).

        reduction="none" returns one loss per sample (for per-noise-level logging).
        """
        if noise is None:
            noise = torch.randn_like(x_0)
        alpha, sigma = self.get_alpha_sigma(x_0, t)
        z = alpha * x_0 + sigma * noise
        v_pred = self.net_(z.float(), self.time_label(t), **extra_args).float()
        v = self.predict_v(x_0, noise, alpha, sigma).float()
        return _reduce((v_pred - v) ** 2, reduction)

    # -- sampling: the original's one-step methods and p_sample_loop, over samplers.py ----------
    # t holds one step index for the whole batch, as in sampling; index -1 is clean data.

    def q_posterior(self, x_0, x_t, t):
        """Mean, variance and log-variance (clipped at 1e-20) of q(x_{t-1} | x_t, x_0), Ho et al. Eq. 6-7."""
        i = int(t[0])
        c_x, c_z, variance = samplers.posterior(*samplers.alpha_sigma(self, x_t, i - 1),
                                                *samplers.alpha_sigma(self, x_t, i))
        return c_x * x_0 + c_z * x_t, variance, variance.clamp(min=1e-20).log()

    def p_mean_variance(self, x, t, extra_args, clip_denoised=True):
        x_recon = samplers.predict_x(self, x, int(t[0]), extra_args, clip_value=1.0 if clip_denoised else None)
        return self.q_posterior(x_recon, x, t)

    def p_sample_ddpm(self, x, t, extra_args, clip_denoised=True, **_):
        """One ancestral step (samplers.ancestral_step) with x clipped to [-1, 1]; no noise at index 0."""
        i = int(t[0])
        return samplers.ancestral_step(self, x, i, i - 1, extra_args, lambda: torch.randn_like(x), clip_denoised)[0]

    def p_sample_clipped(self, x, t, extra_args, eta=0.0, clip_denoised=True, clip_value=1.2):
        """One DDIM step (samplers.ddim_step) with x and eps clipped at clip_value."""
        i = int(t[0])
        return samplers.ddim_step(self, x, i, i - 1, extra_args, lambda: torch.randn_like(x), eta,
                                  clip_value if clip_denoised else None)[0]

    def p_sample(self, x, t, extra_args, eta=0.0, clip_denoised=True, clip_value=1.2):
        if self.sampler == "ddpm":
            return self.p_sample_ddpm(x, t, extra_args, clip_denoised=clip_denoised)
        return self.p_sample_clipped(x, t, extra_args, eta=eta, clip_denoised=clip_denoised, clip_value=clip_value)

    @torch.no_grad()
    def p_sample_loop(self, x, extra_args=None, eta=0.0, clip_value=1.2, clip_denoised=True,
                      callback=None, progress=False, noise=None):
        """Sample from noise x through all N steps, index N-1 down to 0, with this diffusion's sampler:
        samplers.sample_ancestral for "ddpm", samplers.sample_ddim (eta, clipping at clip_value) for
        "clipped"; clip_denoised=False turns the clipping off.

        callback(i, x_i) is called after each step with the new state (for trajectory pictures);
        noise(step_number, like) gives each step's noise (None: torch.randn_like). The state is kept
        in float64 between steps, as in the original; the result has x's dtype.
        """
        steps = range(self.num_timesteps - 1, -1, -1)
        on_step = None if callback is None else (lambda k, i, state, x_hat: callback(i, state))
        was_training = self.net_.training
        self.net_.eval()
        if self.sampler == "ddpm":
            out = samplers.sample_ancestral(self, x, steps, extra_args, on_step, progress, noise, clip=clip_denoised)
        else:
            out = samplers.sample_ddim(self, x, steps, extra_args, on_step, progress, noise, eta=eta,
                                       clip_value=clip_value if clip_denoised else None)
        self.net_.train(was_training)
        return out


class GaussianDiffusionDefault(GaussianDiffusion):
    """A GaussianDiffusion that can act as the teacher of progressive distillation."""

    def __init__(self, *args, weighting="snr+1", gamma=0.0, **kwargs):
        super().__init__(*args, **kwargs)
        if weighting not in DISTILL_WEIGHTINGS:
            raise ValueError(f"unknown distillation weighting {weighting!r}; choose one of {DISTILL_WEIGHTINGS}")
        if not math.isfinite(gamma):
            raise ValueError(f"gamma must be a finite number, got {gamma}")
        if gamma and weighting == "truncated_snr":
            raise ValueError("gamma weights the v error; the truncated_snr weighting has none (use gamma 0)")
        self.weighting = weighting
        self.gamma = gamma

    def _two_teacher_steps(self, x, t, extra_args, eps, clip):
        """Two deterministic DDIM steps of the teacher from z at index t+1 to t-1 (clip: the original's
        x clipping). Returns z, z_1 (the state at t) and x_2 (the x-prediction at t)."""
        t1 = t + 1
        alpha, sigma = self.get_alpha_sigma(x, t1)
        z = alpha * x + sigma * eps
        x_1 = self.predict_start_from_v(z, self.inference(z, t1, extra_args), alpha, sigma)
        x_1 = x_1.clamp(-1, 1) if clip else x_1
        alpha_1, sigma_1 = self.get_alpha_sigma(x, t)
        z_1 = alpha_1 * x_1 + (sigma_1 / sigma) * (z - alpha * x_1)
        x_2 = self.predict_start_from_v(z_1, self.inference(z_1, t, extra_args), alpha_1, sigma_1)
        return z, z_1, (x_2.clamp(-1, 1) if clip else x_2)

    @torch.inference_mode()
    def distill_target(self, x, t, extra_args, eps):
        """Algorithm 2 of Salimans & Ho: two deterministic DDIM teacher steps and the closed-form target.

        t holds even teacher indices 2j (student index j); the noise level is that of teacher index
        t+1. Returns (z, x_target) in float64: the x for which one student DDIM step from z lands
        exactly where the teacher's two steps land. No clipping, as in the official code.
        """
        z, z_1, x_2 = self._two_teacher_steps(x, t, extra_args, eps, clip=False)
        alpha, sigma = self.get_alpha_sigma(x, t + 1)
        alpha_1, sigma_1 = self.get_alpha_sigma(x, t)
        # Index t-1; index -1 is clean data (alpha 1, sigma 0), where z'' = x_2.
        alpha_2, sigma_2 = self.get_alpha_sigma(x, (t - 1).clamp(min=0))
        clean = (t == 0).reshape(alpha_2.shape)
        alpha_2 = torch.where(clean, torch.ones_like(alpha_2), alpha_2)
        sigma_2 = torch.where(clean, torch.zeros_like(sigma_2), sigma_2)
        z_2 = alpha_2 * x_2 + (sigma_2 / sigma_1) * (z_1 - alpha_1 * x_2)
        ratio = sigma_2 / sigma
        return z, (z_2 - ratio * z) / (alpha_2 - ratio * alpha)

    @torch.inference_mode()
    def original_distill_target(self, x, t, extra_args, eps):
        """The original implementation's target: the teacher's clipped second x-prediction."""
        z, _, x_2 = self._two_teacher_steps(x, t, extra_args, eps, clip=True)
        return z, x_2

    def distill_inputs(self, x, t, extra_args, eps, original=False):
        """(z, x_target) as ordinary tensors (the teacher itself runs under inference mode)."""
        target = self.original_distill_target if original else self.distill_target
        z, x_target = target(x, t, extra_args, eps)
        return z.clone(), x_target.clone()

    def distill_loss(self, student_diffusion, x, t, extra_args, eps=None, reduction="mean"):
        """Loss of the student (N/2 steps) against this teacher's two-step target at student index t//2.

        Weightings: "snr+1" - MSE in v space (x error weighted by 1/sigma^2 = SNR+1); "truncated_snr" -
            max(SNR, 1) times the x error (the "truncated SNR" weighting of Salimans & Ho); "original" -
            the original implementation's clipped target in v space. With gamma g (snr+1 and original)
            the v error is the original's mse(w v_student, w v_target) with w = (1 + alpha/sigma)^g,
            i.e. the squared error times w^2 = (1 + alpha/sigma)^(2g).
        """
        if eps is None:
            eps = torch.randn_like(x, dtype=torch.float64)
        z, x_target = self.distill_inputs(x.double(), t, extra_args, eps, original=self.weighting == "original")
        j = torch.div(t, 2, rounding_mode="floor")
        alpha_s, sigma_s = student_diffusion.get_alpha_sigma(x, j)
        v_student = student_diffusion.net_(z.float(), student_diffusion.time_label(j), **extra_args).float()
        if self.weighting == "truncated_snr":
            x_student = alpha_s.float() * z.float() - sigma_s.float() * v_student
            weight = (alpha_s ** 2 / sigma_s ** 2).clamp(min=1).float()
            return _reduce(weight * (x_student - x_target.float()) ** 2, reduction)
        v_target = ((alpha_s * z - x_target) / sigma_s).float()
        weight_squared = (1 + alpha_s / sigma_s).pow(2 * self.gamma).float() if self.gamma else 1.0
        return _reduce(weight_squared * (v_student - v_target) ** 2, reduction)


def _reduce(squared_error, reduction):
    per_sample = squared_error.flatten(1).mean(1)
    return per_sample if reduction == "none" else per_sample.mean()
