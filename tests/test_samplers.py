"""The sampler family (samplers.py) and generate (sample_utils.py), each against an independent computation.

Two data sets with closed-form denoisers: a point mass at x0 (x_hat = x0 whatever z) and Gaussian data
N(mu, s^2) per pixel (E[x | z_t] = mu + alpha s^2/(alpha^2 s^2 + sigma^2) (z - alpha mu), and the
probability-flow ODE maps z_T to z_t = alpha_t mu + sqrt(alpha_t^2 s^2 + sigma_t^2) (z_T - alpha_T mu) /
sqrt(alpha_T^2 s^2 + sigma_T^2), the monotone map between the two Gaussian marginals). The expected
coefficients are derived here from the betas (products of one-step transitions) or by Gaussian
conditioning, never with samplers.py's own formulas.
"""
import math

import pytest
import torch

import samplers
import seeding
import toy_u
from diffusion import GaussianDiffusion, make_beta_schedule
from sample_utils import SamplerSpec, generate, nfe

FAMILY = ["ancestral", "ddim", "dpmpp_2m", "stochastic"]


class PointMass(GaussianDiffusion):
    """The exact denoiser of data concentrated at x0: v = (alpha z - x0)/sigma, so x_hat = x0."""

    def __init__(self, n, x0):
        super().__init__(None, make_beta_schedule("cosine", n))
        self.x0 = x0
        self.calls = 0

    def inference(self, z, t, extra_args):
        self.calls += 1
        alpha, sigma = self.get_alpha_sigma(z, t)
        return (alpha * z - self.x0) / sigma


class GaussianData(GaussianDiffusion):
    """The exact denoiser of data N(mu, s^2) per pixel, in float64."""

    def __init__(self, n, mu=0.3, s=0.5):
        super().__init__(None, make_beta_schedule("cosine", n))
        self.mu, self.s = mu, s

    def inference(self, z, t, extra_args):
        alpha, sigma = self.get_alpha_sigma(z, t)
        x_hat = self.mu + alpha * self.s ** 2 / (alpha ** 2 * self.s ** 2 + sigma ** 2) * (z - alpha * self.mu)
        return (alpha * z - x_hat) / sigma

    def flow(self, z_start, i):
        """The exact probability-flow ODE solution at index i from z_start at index N-1."""
        a, s = self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod
        spread = lambda j: (a[j] ** 2 * self.s ** 2 + s[j] ** 2).sqrt()
        return a[i] * self.mu + spread(i) * (z_start - a[-1] * self.mu) / spread(-1)


def cumulative(betas):
    """alphas_cumprod from the betas, one step after the other (Ho et al.'s definition)."""
    out, product = [], 1.0
    for beta in betas.tolist():
        product *= 1 - beta
        out.append(product)
    return torch.tensor(out, dtype=torch.float64)


def one_step(sampler, diffusion, z, t, s, noise, **options):
    """The state after the first step t -> s of `sampler`, with step 0's noise given."""
    states = []
    samplers.SAMPLERS[sampler](diffusion, z, [t, s], callback=lambda k, i, state, x_hat: states.append(state),
                               noise=lambda k, like: noise.expand_as(like), **options)
    return states[0]


def mean_and_scale(sampler, diffusion, z, t, s, **options):
    """(deterministic part, noise scale) of one step: the state with zero noise, and its change per unit noise."""
    zero = one_step(sampler, diffusion, z, t, s, torch.zeros(()), **options)
    return zero, one_step(sampler, diffusion, z, t, s, torch.ones(()), **options) - zero


def conditioned_posterior(alpha_s, sigma_s, alpha_t, sigma_t, x, z_t):
    """Mean and variance of z_s given (z_t, x) by Gaussian conditioning: z_s = alpha_s x + sigma_s e and
    z_t = (alpha_t/alpha_s) z_s + noise, so Cov(z_s, z_t | x) = (alpha_t/alpha_s) sigma_s^2."""
    cov = alpha_t / alpha_s * sigma_s ** 2
    return alpha_s * x + cov / sigma_t ** 2 * (z_t - alpha_t * x), sigma_s ** 2 - cov ** 2 / sigma_t ** 2


# -- the ancestral posterior and DDIM's eta ---------------------------------------------------------

def test_posterior_of_consecutive_steps_is_ho_et_al_eq_7():
    betas = make_beta_schedule("cosine", 32)
    alphas_cumprod = cumulative(betas)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    coef1 = betas * prev.sqrt() / (1 - alphas_cumprod)  # on x_0
    coef2 = (1 - betas).sqrt() * (1 - prev) / (1 - alphas_cumprod)  # on x_t
    variance = betas * (1 - prev) / (1 - alphas_cumprod)
    c_x, c_z, var = samplers.posterior(prev.sqrt(), (1 - prev).sqrt(), alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt())
    assert torch.allclose(c_x, coef1, rtol=1e-9, atol=1e-12)
    assert torch.allclose(c_z, coef2, rtol=1e-9, atol=1e-12)
    assert torch.allclose(var, variance, rtol=1e-9, atol=1e-14)
    # The original's one-step API on the same formulas, and its clipped log-variance.
    diffusion = GaussianDiffusion(None, betas)
    x_0, x_t = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    for t in (0, 1, 17, 31):
        mean, var_t, log_var = diffusion.q_posterior(x_0, x_t, torch.full((2,), t))
        assert torch.allclose(mean, coef1[t] * x_0 + coef2[t] * x_t, atol=1e-12)
        assert torch.allclose(var_t, variance[t].expand(2, 1), atol=1e-14)
        assert torch.allclose(log_var, variance[t].clamp(min=1e-20).log().expand(2, 1), rtol=1e-9)


@pytest.mark.parametrize("t,s", [(20, 19), (20, 13), (5, 0), (3, -1)])
def test_ancestral_step_draws_from_the_gaussian_posterior(t, s):
    x0 = torch.tensor([-0.7, 0.1, 0.55], dtype=torch.float64).reshape(3, 1, 1, 1)
    diffusion = PointMass(24, x0)
    z_t = torch.tensor([1.3, -0.4, 0.2], dtype=torch.float64).reshape(3, 1, 1, 1)
    mean, scale = mean_and_scale("ancestral", diffusion, z_t, t, s)
    a, sig = diffusion.sqrt_alphas_cumprod, diffusion.sqrt_one_minus_alphas_cumprod
    alpha_s, sigma_s = (a[s], sig[s]) if s >= 0 else (torch.tensor(1.0).double(), torch.tensor(0.0).double())
    expected_mean, expected_var = conditioned_posterior(alpha_s, sigma_s, a[t], sig[t], x0, z_t)
    assert torch.allclose(mean, expected_mean, atol=1e-10)
    if s >= 0:
        assert torch.allclose(scale, expected_var.sqrt().expand_as(scale), atol=1e-10)
    else:  # into clean data: x_hat, no noise
        assert torch.equal(scale, torch.zeros_like(scale)) and torch.allclose(mean, x0, atol=1e-12)


@pytest.mark.parametrize("t,s", [(20, 19), (20, 13), (2, 0)])
def test_ddim_with_eta_one_is_the_ancestral_posterior_and_eta_scales_its_noise(t, s):
    x0 = torch.tensor([-0.7, 0.1, 0.55], dtype=torch.float64).reshape(3, 1, 1, 1)
    diffusion = PointMass(24, x0)
    z_t = torch.tensor([1.3, -0.4, 0.2], dtype=torch.float64).reshape(3, 1, 1, 1)
    a, sig = diffusion.sqrt_alphas_cumprod, diffusion.sqrt_one_minus_alphas_cumprod
    expected_mean, expected_var = conditioned_posterior(a[s], sig[s], a[t], sig[t], x0, z_t)
    mean, scale = mean_and_scale("ddim", diffusion, z_t, t, s, eta=1.0)
    assert torch.allclose(mean, expected_mean, atol=1e-10)
    assert torch.allclose(scale, expected_var.sqrt().expand_as(scale), atol=1e-10)
    for eta in (0.0, 0.5):
        mean, scale = mean_and_scale("ddim", diffusion, z_t, t, s, eta=eta)
        assert torch.allclose(scale, eta * expected_var.sqrt().expand_as(scale), atol=1e-10)
        # Given x, z_t = alpha_t x + sigma_t e; the step keeps the marginal: z_s = alpha_s x + c e + sigma_eta xi
        # with c^2 + sigma_eta^2 = sigma_s^2.
        e = (z_t - a[t] * x0) / sig[t]
        c = (mean - a[s] * x0) / e
        assert torch.allclose(c ** 2 + (eta ** 2) * expected_var, sig[s] ** 2 * torch.ones_like(c), atol=1e-10)


def test_ddim_refuses_eta_outside_the_unit_interval():
    diffusion = PointMass(8, torch.zeros(()))
    for eta in (-0.1, 1.5, 3.0):
        with pytest.raises(ValueError, match="eta"):
            samplers.sample_ddim(diffusion, torch.randn(2, 1, 2, 2), [7, 3], eta=eta)


def test_ddim_clips_x_and_eps_as_the_spec_says():
    x0 = torch.tensor([2.0, -0.5], dtype=torch.float64).reshape(2, 1, 1, 1)  # the first outside the bound
    diffusion = PointMass(8, x0)
    z = torch.tensor([0.4, 3.0], dtype=torch.float64).reshape(2, 1, 1, 1)
    a, sig = diffusion.sqrt_alphas_cumprod, diffusion.sqrt_one_minus_alphas_cumprod
    x_hat = x0.clamp(-1.2, 1.2)
    eps = ((z - a[6] * x_hat) / sig[6]).clamp(-1.2, 1.2)
    got = one_step("ddim", diffusion, z, 6, 2, torch.zeros(()), clip_value=1.2)
    assert torch.allclose(got, a[2] * x_hat + sig[2] * eps, atol=1e-12)


# -- the stochastic sampler -------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [[20, 15, 9, 4], [20, 15]])
def test_stochastic_sampler_renoises_with_the_forward_transition(steps):
    x0 = torch.tensor([-0.7, 0.1, 0.55], dtype=torch.float64).reshape(3, 1, 1, 1)
    betas = make_beta_schedule("cosine", 24)
    diffusion = PointMass(24, x0)
    alphas_cumprod = cumulative(betas)
    a, sig = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()
    t0, t1 = steps[0], steps[1]
    t2 = steps[2] if len(steps) > 2 else -1
    z = torch.tensor([1.3, -0.4, 0.2], dtype=torch.float64).reshape(3, 1, 1, 1)
    # A deterministic DDIM step t0 -> t2 (twice the length) with x_hat = x0, by Song et al. Eq. 12 ...
    eps = (z - a[t0] * x0) / sig[t0]
    z_two = a[t2] * x0 + sig[t2] * eps if t2 >= 0 else x0
    # ... then q(z_t1 | z_t2): the product of the one-step transitions t2+1 .. t1 (Ho et al. Eq. 2).
    keep = torch.prod(1 - betas[t2 + 1:t1 + 1])
    states, drawn = {}, []

    def noise(value):
        return lambda k, like: drawn.append(k) or torch.full_like(like, value)

    for value in (0.0, 1.0):
        samplers.sample_stochastic(diffusion, z, steps, noise=noise(value),
                                   callback=lambda k, i, state, x_hat: states.setdefault((value, k), state))
    assert torch.allclose(states[0.0, 0], keep.sqrt() * z_two, atol=1e-10)
    assert torch.allclose(states[1.0, 0] - states[0.0, 0], (1 - keep).sqrt() * torch.ones_like(z), atol=1e-10)
    # The last step is deterministic (no noise drawn): into clean data, x_hat.
    assert drawn == 2 * list(range(len(steps) - 1))
    assert torch.allclose(states[1.0, len(steps) - 1], x0, atol=1e-12)


def test_stochastic_sampler_keeps_the_marginals():
    """With exact denoising every visited state must have the marginal q(z_i | x0) = N(alpha_i x0, sigma_i^2)."""
    x0 = torch.tensor(0.4, dtype=torch.float64)
    diffusion = PointMass(32, x0)
    a, sig = diffusion.sqrt_alphas_cumprod, diffusion.sqrt_one_minus_alphas_cumprod
    n = 20000
    g = torch.Generator().manual_seed(0)
    z = a[31] * x0 + sig[31] * torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)
    steps = [31, 24, 16, 8, 3]
    states = []
    samplers.sample_stochastic(diffusion, z, steps, noise=lambda k, like: torch.randn(like.shape, generator=g, dtype=like.dtype),
                               callback=lambda k, i, state, x_hat: states.append(state))
    for state, i in zip(states[:-1], steps[1:]):
        assert abs(float(state.mean()) - float(a[i] * x0)) < 4 * float(sig[i]) / math.sqrt(n)
        assert abs(float(state.std()) / float(sig[i]) - 1) < 0.02


# -- DPM-Solver++(2M) and DDIM against the exact ODE solution ------------------------------------------

def test_dpmpp_2m_converges_at_second_order_and_ddim_at_first():
    diffusion = GaussianData(1024)
    z = torch.linspace(-2.5, 2.5, 7, dtype=torch.float64).reshape(7, 1, 1, 1)
    target = 255  # continuous time 1/4, visited by every time-uniform choice below
    exact = diffusion.flow(z, target)
    nfes = [8, 16, 32, 64]
    errors = {}
    for name in ("ddim", "dpmpp_2m"):
        errors[name] = []
        for m in nfes:
            steps = samplers.select_steps(diffusion, m, "time")
            states = {}
            samplers.SAMPLERS[name](diffusion, z, steps, callback=lambda k, i, state, x_hat: states.setdefault(k, state))
            errors[name].append(float((states[steps.index(target) - 1] - exact).abs().max()))
    log_nfe = torch.tensor(nfes, dtype=torch.float64).log()
    slope = lambda e: -float(torch.linalg.lstsq(torch.stack([log_nfe, torch.ones_like(log_nfe)], 1),
                                                 torch.tensor(e, dtype=torch.float64).log()[:, None]).solution[0])
    assert 1.7 < slope(errors["dpmpp_2m"]) < 2.3, errors
    assert 0.9 < slope(errors["ddim"]) < 1.1, errors
    assert all(d < e for d, e in zip(errors["dpmpp_2m"], errors["ddim"])), errors


def test_dpmpp_2m_first_step_is_a_ddim_step():
    diffusion = GaussianData(64)
    z = torch.randn(3, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a, sig = diffusion.sqrt_alphas_cumprod, diffusion.sqrt_one_minus_alphas_cumprod
    x_hat = diffusion.mu + a[63] * diffusion.s ** 2 / (a[63] ** 2 * diffusion.s ** 2 + sig[63] ** 2) * (z - a[63] * diffusion.mu)
    ddim = a[40] * x_hat + sig[40] * (z - a[63] * x_hat) / sig[63]
    assert torch.allclose(one_step("dpmpp_2m", diffusion, z, 63, 40, torch.zeros(())), ddim, atol=1e-12)


def test_dpmpp_2m_is_algorithm_2_of_lu_et_al():
    """Three steps with very unequal lengths (r far from 1), followed line by line from Algorithm 2."""
    diffusion = GaussianData(64)
    z = torch.randn(3, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t = [63, 50, 10, 2]
    a, sig = diffusion.sqrt_alphas_cumprod, diffusion.sqrt_one_minus_alphas_cumprod
    lam = lambda i: math.log(float(a[i] / sig[i]))
    mu, var = diffusion.mu, diffusion.s ** 2
    x_theta = lambda x, i: mu + a[i] * var / (a[i] ** 2 * var + sig[i] ** 2) * (x - a[i] * mu)  # E[x | z_i]
    h = {i: lam(t[i]) - lam(t[i - 1]) for i in range(1, 4)}
    x = [z]
    x.append(sig[t[1]] / sig[t[0]] * x[0] - a[t[1]] * (math.exp(-h[1]) - 1) * x_theta(x[0], t[0]))
    for i in (2, 3):
        r = h[i - 1] / h[i]
        d = (1 + 1 / (2 * r)) * x_theta(x[i - 1], t[i - 1]) - 1 / (2 * r) * x_theta(x[i - 2], t[i - 2])
        x.append(sig[t[i]] / sig[t[i - 1]] * x[i - 1] - a[t[i]] * (math.exp(-h[i]) - 1) * d)
    states = []
    out = samplers.sample_dpmpp_2m(diffusion, z, t, callback=lambda k, i, state, x_hat: states.append(state))
    for state, expected in zip(states, x[1:]):
        assert torch.allclose(state, expected, atol=1e-12)
    assert torch.allclose(out, x_theta(x[3], t[3]), atol=1e-12)  # the last step, into clean data: x_hat


# -- the whole family ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILY)
def test_one_network_call_per_visited_index_and_x_hat_at_the_end(name):
    diffusion = PointMass(16, torch.tensor(0.3, dtype=torch.float64))
    steps = [15, 11, 6, 2]
    last = {}
    out = samplers.SAMPLERS[name](diffusion, torch.randn(2, 1, 2, 2), steps,
                                  callback=lambda k, i, state, x_hat: last.update(k=k, i=i, x_hat=x_hat, state=state))
    assert diffusion.calls == len(steps) == samplers.nfe(steps)
    assert nfe(SamplerSpec(name, {}, steps=4), diffusion) == 4
    assert (last["k"], last["i"]) == (3, 2) and torch.equal(last["state"], last["x_hat"])
    assert out.dtype == torch.float32 and torch.equal(out, last["x_hat"].float())


def test_select_steps():
    assert samplers.select_steps(128, 8, "time") == [127, 111, 95, 79, 63, 47, 31, 15]
    assert samplers.select_steps(10, 3, "time") == [9, 6, 2]  # round((j+1) 10/3) - 1
    assert samplers.select_steps(10, 7, "time") == [9, 8, 6, 5, 3, 2, 0]
    assert samplers.select_steps(6, 0, "time") == samplers.select_steps(6, 6, "logsnr") == [5, 4, 3, 2, 1, 0]
    assert samplers.select_steps(16, 0, [0, 7, 3]) == [7, 3, 0]
    for bad in ((16, 3, [1, 2]), (16, 0, [3, 3]), (16, 0, [16]), (16, 17, "time"), (16, 2, "karras")):
        with pytest.raises(ValueError):
            samplers.select_steps(*bad)


def test_logsnr_steps_are_the_indices_nearest_to_uniform_log_snr():
    diffusion = GaussianDiffusion(None, make_beta_schedule("cosine", 200))
    a, s = diffusion.sqrt_alphas_cumprod, diffusion.sqrt_one_minus_alphas_cumprod
    log_snr = (a ** 2 / s ** 2).log()
    for m in (3, 5, 6):
        targets = torch.linspace(float(log_snr[-1]), float(log_snr[0]), m, dtype=torch.float64)
        nearest = [int((log_snr - target).abs().argmin()) for target in targets]
        assert len(set(nearest)) == m  # no two levels share an index here
        assert samplers.select_steps(diffusion, m, "logsnr") == nearest
    steps = samplers.select_steps(GaussianDiffusion(None, make_beta_schedule("cosine", 1024)), 8, "logsnr")
    assert len(set(steps)) == 8 and steps == sorted(steps, reverse=True) and steps[0] == 1023 and steps[-1] == 0


def test_step_noise_is_drawn_per_image_and_step():
    noise = samplers.per_image_noise([3, 5], seed=7)
    like = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    for k in (0, 1, 9):
        drawn = noise(k, like)
        assert drawn.dtype == torch.float64 and drawn.shape == like.shape
        for row, i in enumerate([3, 5]):
            assert torch.equal(drawn[row].float(), seeding.image_randn([i], [1, 4, 4], 7, "step", k)[0])
    assert (noise(0, like) - noise(1, like)).abs().min() > 0  # fresh noise at every step


# -- per-image noise: the same picture at any batch and chunk size -----------------------------------

SPECS = {"ancestral": SamplerSpec("ancestral", {}, steps=8), "ddim_eta_0.5": SamplerSpec("ddim", {"eta": 0.5}, steps=8),
         "stochastic": SamplerSpec("stochastic", {}, steps=8), "dpmpp_2m": SamplerSpec("dpmpp_2m", {}, steps=8)}


@pytest.mark.parametrize("label", list(SPECS))
def test_image_i_depends_only_on_seed_and_i(label):
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(toy_u.make_model(), make_beta_schedule("cosine", 16))
    spec = SPECS[label]
    run = lambda indices, chunk, seed=7: generate(diffusion, spec, indices, [2, 1, 1], seed, chunk_size=chunk)
    full = run(range(6), 6)
    assert full.shape == (6, 2, 1, 1) and full.dtype == torch.float32
    close = lambda a, b: (a - b).abs().max() < 1e-6
    for chunk in (1, 3):
        assert close(run(range(6), chunk), full)
    for batch in (1, 2, 3):
        assert close(run(range(batch), 256), full[:batch])
    assert close(run([4, 1], 1), full[[4, 1]])  # any subset, any order
    assert (run(range(6), 6, seed=8) - full).abs().max() > 1e-2


class Conditional(torch.nn.Module):
    """v depends on a per-image label y and a shared scale w, as a class-conditional network's would."""

    def forward(self, z, label, y, w):
        return w * torch.tanh(z + y.reshape(-1, 1, 1, 1).float() + label.reshape(-1, 1, 1, 1) / 8)


def test_per_image_extra_args_follow_their_images_through_the_chunks():
    diffusion = GaussianDiffusion(Conditional(), make_beta_schedule("cosine", 8))
    y, spec = torch.tensor([0, 3, 1, 2, 5]), SamplerSpec("ancestral", {})
    full = generate(diffusion, spec, range(5), [1, 2, 2], 3, extra_args={"y": y, "w": 0.5}, chunk_size=5)
    chunked = generate(diffusion, spec, range(5), [1, 2, 2], 3, extra_args={"y": y, "w": 0.5}, chunk_size=2)
    assert (chunked - full).abs().max() < 1e-6
    alone = generate(diffusion, spec, [3], [1, 2, 2], 3, extra_args={"y": y[3:4], "w": 0.5})
    assert (alone[0] - full[3]).abs().max() < 1e-6
    other = generate(diffusion, spec, [3], [1, 2, 2], 3, extra_args={"y": y[4:5], "w": 0.5})
    assert (other[0] - full[3]).abs().max() > 1e-3  # the label matters
