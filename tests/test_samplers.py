"""The sampler family (samplers.py) and generate (sample_utils.py), each against an independent computation.

Two data sets with closed-form denoisers, written as plain models (z, label) -> v that read the label as the
step index (labels (i+1)s - 1 at time scale s; i here, s = 1) to know alpha and sigma: a point mass at x0
(x_hat = x0 whatever z) and Gaussian data N(mu, s^2) per pixel (E[x | z_t] = mu + alpha s^2/(alpha^2 s^2 +
sigma^2) (z - alpha mu), and the probability-flow ODE maps z_T to z_t = alpha_t mu + sqrt(alpha_t^2 s^2 +
sigma_t^2) (z_T - alpha_T mu) / sqrt(alpha_T^2 s^2 + sigma_T^2), the monotone map between the two Gaussian
marginals). The expected coefficients are derived here from the betas (products of one-step transitions) or
by Gaussian conditioning, never with samplers.py's own formulas.

The samplers hand the network its input in float32 (as the original does); starting states here are float32
values, so the first network call sees the state exactly, and later expected values read the network's v the
way the v-parameterisation defines x_hat = alpha z - sigma v.
"""
import math

import pytest
import torch

import samplers
import seeding
import toy_u
from diffusion import Grid, alpha_sigma_tables, grid_indices, make_beta_schedule, model_grid, posterior
from guidance import ClassifierFreeGuidance
from sample_utils import SamplerSpec, generate, nfe

FAMILY = ["ancestral", "ddim", "dpmpp_2m", "stochastic"]


def exact(values):
    """float64 values that float32 holds exactly (the network sees them unrounded)."""
    return torch.tensor(values, dtype=torch.float32).double()


class TableModel:
    """A closed-form model on the tables alpha[label], sigma[label] (time scale 1: the label is the index)."""

    def __init__(self, n=None, alphas=None, sigmas=None):
        if n is not None:
            alphas, sigmas = alpha_sigma_tables(make_beta_schedule("cosine", n))
        self.alphas, self.sigmas = alphas, sigmas
        self.n = len(alphas)
        self.grid = model_grid(make_beta_schedule("cosine", n)) if n is not None else None
        self.calls = 0

    def level(self, label, like):
        i = label.round().long()
        shape = (-1,) + (1,) * (like.ndim - 1)
        return self.alphas[i].reshape(shape), self.sigmas[i].reshape(shape)

    def x_hat(self, z, label):
        raise NotImplementedError

    def __call__(self, z, label):
        self.calls += 1
        z = z.double()
        alpha, sigma = self.level(label, z)
        return (alpha * z - self.x_hat(z, alpha, sigma)) / sigma

    def x_of(self, z, i):
        """What a sampler reads from this network at index i: alpha z - sigma v (v of the float32 input)."""
        label = torch.full((z.shape[0],), float(i))
        alpha, sigma = self.level(label, z)
        return alpha * z - sigma * self(z.float(), label)

    def on(self, indices):
        """The grid of these step indices (high to low), then clean data."""
        return self.grid.take(grid_indices(self.n, indices))


class PointMass(TableModel):
    """The exact denoiser of data concentrated at x0: v = (alpha z - x0)/sigma, so x_hat = x0."""

    def __init__(self, n, x0, **tables):
        super().__init__(n, **tables)
        self.x0 = x0

    def x_hat(self, z, alpha, sigma):
        return self.x0 + 0 * z


class GaussianData(TableModel):
    """The exact denoiser of data N(mu, s^2) per pixel, in float64."""

    def __init__(self, n, mu=0.3, s=0.5):
        super().__init__(n)
        self.mu, self.s = mu, s

    def posterior_mean(self, z, alpha, sigma):
        return self.mu + alpha * self.s ** 2 / (alpha ** 2 * self.s ** 2 + sigma ** 2) * (z - alpha * self.mu)

    x_hat = posterior_mean

    def flow(self, z_start, i):
        """The exact probability-flow ODE solution at index i (None: clean data) from z_start at index N-1."""
        a, s = self.alphas, self.sigmas
        spread = lambda alpha, sigma: (alpha ** 2 * self.s ** 2 + sigma ** 2).sqrt()
        alpha, sigma = (a[i], s[i]) if i is not None else (torch.tensor(1.0).double(), torch.tensor(0.0).double())
        return alpha * self.mu + spread(alpha, sigma) * (z_start - a[-1] * self.mu) / spread(a[-1], s[-1])


def cumulative(betas):
    """alphas_cumprod from the betas, one step after the other (Ho et al.'s definition)."""
    out, product = [], 1.0
    for beta in betas.tolist():
        product *= 1 - beta
        out.append(product)
    return torch.tensor(out, dtype=torch.float64)


def one_step(sampler, model, z, t, s, noise, **options):
    """The state after the first step t -> s (s = -1: clean data) of `sampler`, with step 0's noise given."""
    states = []
    samplers.SAMPLERS[sampler].function(model, z, model.on([t] if s < 0 else [t, s]),
                                        callback=lambda d: states.append(d["x"]),
                                        noise=lambda i, like: noise.expand_as(like), **options)
    return states[0]


def mean_and_scale(sampler, model, z, t, s, **options):
    """(deterministic part, noise scale) of one step: the state with zero noise, and its change per unit noise."""
    zero = one_step(sampler, model, z, t, s, torch.zeros(()), **options)
    return zero, one_step(sampler, model, z, t, s, torch.ones(()), **options) - zero


def conditioned_posterior(alpha_s, sigma_s, alpha_t, sigma_t, x, z_t):
    """Mean and variance of z_s given (z_t, x) by Gaussian conditioning: z_s = alpha_s x + sigma_s e and
    z_t = (alpha_t/alpha_s) z_s + noise, so Cov(z_s, z_t | x) = (alpha_t/alpha_s) sigma_s^2."""
    cov = alpha_t / alpha_s * sigma_s ** 2
    return alpha_s * x + cov / sigma_t ** 2 * (z_t - alpha_t * x), sigma_s ** 2 - cov ** 2 / sigma_t ** 2


X0 = exact([-0.7, 0.1, 0.55]).reshape(3, 1, 1, 1)
Z_T = exact([1.3, -0.4, 0.2]).reshape(3, 1, 1, 1)


# -- the ancestral posterior and DDIM's eta ---------------------------------------------------------

def test_posterior_of_consecutive_steps_is_ho_et_al_eq_7():
    betas = make_beta_schedule("cosine", 32)
    alphas_cumprod = cumulative(betas)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    coef1 = betas * prev.sqrt() / (1 - alphas_cumprod)  # on x_0
    coef2 = (1 - betas).sqrt() * (1 - prev) / (1 - alphas_cumprod)  # on x_t
    variance = betas * (1 - prev) / (1 - alphas_cumprod)
    c_x, c_z, var = posterior(prev.sqrt(), (1 - prev).sqrt(), alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt())
    assert torch.allclose(c_x, coef1, rtol=1e-9, atol=1e-12)
    assert torch.allclose(c_z, coef2, rtol=1e-9, atol=1e-12)
    assert torch.allclose(var, variance, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("t,s", [(20, 19), (20, 13), (5, 0), (3, -1)])
def test_ancestral_step_draws_from_the_gaussian_posterior(t, s):
    model = PointMass(24, X0)
    mean, scale = mean_and_scale("ancestral", model, Z_T, t, s)
    a, sig = model.alphas, model.sigmas
    alpha_s, sigma_s = (a[s], sig[s]) if s >= 0 else (torch.tensor(1.0).double(), torch.tensor(0.0).double())
    expected_mean, expected_var = conditioned_posterior(alpha_s, sigma_s, a[t], sig[t], X0, Z_T)
    assert torch.allclose(mean, expected_mean, atol=1e-10)
    if s >= 0:
        assert torch.allclose(scale, expected_var.sqrt().expand_as(scale), atol=1e-10)
    else:  # into clean data: x_hat, no noise
        assert torch.equal(scale, torch.zeros_like(scale)) and torch.allclose(mean, X0, atol=1e-12)


@pytest.mark.parametrize("t,s", [(20, 19), (20, 13), (2, 0)])
def test_ddim_with_eta_one_is_the_ancestral_posterior_and_eta_scales_its_noise(t, s):
    model = PointMass(24, X0)
    a, sig = model.alphas, model.sigmas
    expected_mean, expected_var = conditioned_posterior(a[s], sig[s], a[t], sig[t], X0, Z_T)
    mean, scale = mean_and_scale("ddim", model, Z_T, t, s, eta=1.0)
    assert torch.allclose(mean, expected_mean, atol=1e-10)
    assert torch.allclose(scale, expected_var.sqrt().expand_as(scale), atol=1e-10)
    for eta in (0.0, 0.5):
        mean, scale = mean_and_scale("ddim", model, Z_T, t, s, eta=eta)
        assert torch.allclose(scale, eta * expected_var.sqrt().expand_as(scale), atol=1e-10)
        # Given x, z_t = alpha_t x + sigma_t e; the step keeps the marginal: z_s = alpha_s x + c e + sigma_eta xi
        # with c^2 + sigma_eta^2 = sigma_s^2.
        e = (Z_T - a[t] * X0) / sig[t]
        c = (mean - a[s] * X0) / e
        assert torch.allclose(c ** 2 + (eta ** 2) * expected_var, sig[s] ** 2 * torch.ones_like(c), atol=1e-10)


def test_ddim_refuses_eta_outside_the_unit_interval():
    model = PointMass(8, torch.zeros(()))
    for eta in (-0.1, 1.5, 3.0):
        with pytest.raises(ValueError, match="eta"):
            samplers.sample_ddim(model, torch.randn(2, 1, 2, 2), model.on([7, 3]), eta=eta)


def test_ddim_clips_x_and_eps_as_the_spec_says():
    x0 = exact([2.0, -0.5]).reshape(2, 1, 1, 1)  # the first outside the bound
    model = PointMass(8, x0)
    z = exact([0.4, 3.0]).reshape(2, 1, 1, 1)
    a, sig = model.alphas, model.sigmas
    x_hat = x0.clamp(-1.2, 1.2)
    eps = ((z - a[6] * x_hat) / sig[6]).clamp(-1.2, 1.2)
    got = one_step("ddim", model, z, 6, 2, torch.zeros(()), clip_value=1.2)
    assert torch.allclose(got, a[2] * x_hat + sig[2] * eps, atol=1e-12)


# -- the stochastic sampler -------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [[20, 15, 9, 4], [20, 15]])
def test_stochastic_sampler_renoises_with_the_forward_transition(steps):
    betas = make_beta_schedule("cosine", 24)
    model = PointMass(24, X0)
    alphas_cumprod = cumulative(betas)
    a, sig = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()
    t0, t1 = steps[0], steps[1]
    t2 = steps[2] if len(steps) > 2 else -1
    # A deterministic DDIM step t0 -> t2 (twice the length) with x_hat = x0, by Song et al. Eq. 12 ...
    eps = (Z_T - a[t0] * X0) / sig[t0]
    z_two = a[t2] * X0 + sig[t2] * eps if t2 >= 0 else X0
    # ... then q(z_t1 | z_t2): the product of the one-step transitions t2+1 .. t1 (Ho et al. Eq. 2).
    keep = torch.prod(1 - betas[t2 + 1:t1 + 1])
    states, drawn = {}, []

    def noise(value):
        return lambda i, like: drawn.append(i) or torch.full_like(like, value)

    for value in (0.0, 1.0):
        samplers.sample_stochastic(model, Z_T, model.on(steps), noise=noise(value),
                                   callback=lambda d: states.setdefault((value, d["i"]), d))
    assert torch.allclose(states[0.0, 0]["x"], keep.sqrt() * z_two, atol=1e-10)
    assert torch.allclose(states[1.0, 0]["x"] - states[0.0, 0]["x"], (1 - keep).sqrt() * torch.ones_like(Z_T),
                          atol=1e-10)
    # The last step is deterministic (no noise drawn): into clean data, x_hat.
    assert drawn == 2 * list(range(len(steps) - 1))
    last = states[1.0, len(steps) - 1]
    assert torch.equal(last["x"], last["denoised"])
    assert torch.allclose(last["x"], X0, atol=1e-7)  # x0 up to the float32 rounding of the network's input


def test_stochastic_sampler_keeps_the_marginals():
    """With exact denoising every visited state must have the marginal q(z_i | x0) = N(alpha_i x0, sigma_i^2)."""
    x0 = torch.tensor(0.4, dtype=torch.float64)
    model = PointMass(32, x0)
    a, sig = model.alphas, model.sigmas
    n = 20000
    g = torch.Generator().manual_seed(0)
    z = a[31] * x0 + sig[31] * torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)
    steps = [31, 24, 16, 8, 3]
    states = []
    samplers.sample_stochastic(model, z, model.on(steps),
                               noise=lambda i, like: torch.randn(like.shape, generator=g, dtype=like.dtype),
                               callback=lambda d: states.append(d["x"]))
    for state, i in zip(states[:-1], steps[1:]):
        assert abs(float(state.mean()) - float(a[i] * x0)) < 4 * float(sig[i]) / math.sqrt(n)
        assert abs(float(state.std()) / float(sig[i]) - 1) < 0.02


# -- DPM-Solver++(2M) and DDIM against the exact ODE solution ------------------------------------------

def test_dpmpp_2m_converges_at_second_order_and_ddim_at_first():
    model = GaussianData(1024)
    z = torch.linspace(-2.5, 2.5, 7, dtype=torch.float64).reshape(7, 1, 1, 1)
    target = 255  # continuous time 1/4, visited by every time-uniform choice below
    expected = model.flow(z, target)
    nfes = [8, 16, 32, 64]
    errors = {}
    for name in ("ddim", "dpmpp_2m"):
        errors[name] = []
        for m in nfes:
            steps = samplers.select_steps(model.grid, m, "time")
            states = {}
            samplers.SAMPLERS[name].function(model, z, model.on(steps),
                                             callback=lambda d: states.setdefault(d["i"], d["x"]))
            errors[name].append(float((states[steps.index(target) - 1] - expected).abs().max()))
    log_nfe = torch.tensor(nfes, dtype=torch.float64).log()
    slope = lambda e: -float(torch.linalg.lstsq(torch.stack([log_nfe, torch.ones_like(log_nfe)], 1),
                                                 torch.tensor(e, dtype=torch.float64).log()[:, None]).solution[0])
    assert 1.7 < slope(errors["dpmpp_2m"]) < 2.3, errors
    assert 0.9 < slope(errors["ddim"]) < 1.1, errors
    assert all(d < e for d, e in zip(errors["dpmpp_2m"], errors["ddim"])), errors


def test_dpmpp_2m_first_step_is_a_ddim_step():
    model = GaussianData(64)
    z = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(1)).double()
    a, sig = model.alphas, model.sigmas
    x_hat = model.mu + a[63] * model.s ** 2 / (a[63] ** 2 * model.s ** 2 + sig[63] ** 2) * (z - a[63] * model.mu)
    ddim = a[40] * x_hat + sig[40] * (z - a[63] * x_hat) / sig[63]
    assert torch.allclose(one_step("dpmpp_2m", model, z, 63, 40, torch.zeros(())), ddim, atol=1e-12)


def test_dpmpp_2m_is_algorithm_2_of_lu_et_al():
    """Three steps with very unequal lengths (r far from 1), followed line by line from Algorithm 2."""
    model = GaussianData(64)
    z = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(2)).double()
    t = [63, 50, 10, 2]
    a, sig = model.alphas, model.sigmas
    lam = lambda i: math.log(float(a[i] / sig[i]))
    x_theta = model.x_of  # the network's data prediction, E[x | z_i] of its float32 input
    h = {i: lam(t[i]) - lam(t[i - 1]) for i in range(1, 4)}
    x = [z]
    x.append(sig[t[1]] / sig[t[0]] * x[0] - a[t[1]] * (math.exp(-h[1]) - 1) * x_theta(x[0], t[0]))
    for i in (2, 3):
        r = h[i - 1] / h[i]
        d = (1 + 1 / (2 * r)) * x_theta(x[i - 1], t[i - 1]) - 1 / (2 * r) * x_theta(x[i - 2], t[i - 2])
        x.append(sig[t[i]] / sig[t[i - 1]] * x[i - 1] - a[t[i]] * (math.exp(-h[i]) - 1) * d)
    states = []
    out = samplers.sample_dpmpp_2m(model, z, model.on(t), callback=lambda d: states.append(d["x"]))
    for state, expected in zip(states, x[1:]):
        assert torch.allclose(state, expected, atol=1e-12)
    assert torch.allclose(out, x_theta(x[3], t[3]), atol=1e-12)  # the last step, into clean data: x_hat
    # x_theta reads the true posterior mean up to the float32 rounding of the state
    assert torch.allclose(x_theta(x[3], t[3]), model.posterior_mean(x[3], a[2], sig[2]), atol=1e-6)


# -- the whole family ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILY)
def test_one_network_call_per_visited_index_and_x_hat_at_the_end(name):
    model = PointMass(16, torch.tensor(0.3, dtype=torch.float64))
    steps = [15, 11, 6, 2]
    reports = []
    out = samplers.SAMPLERS[name].function(model, torch.randn(2, 1, 2, 2), model.on(steps),
                                           callback=lambda d: reports.append(d))
    assert model.calls == len(steps)
    assert [d["i"] for d in reports] == [0, 1, 2, 3]
    assert [float(d["sigma"]) for d in reports] == [float(model.sigmas[i]) for i in steps]  # the level stepped from
    last = reports[-1]
    assert torch.equal(last["x"], last["denoised"])
    assert out.dtype == torch.float32 and torch.equal(out, last["denoised"].float())


class CountingNet(torch.nn.Module):
    """A class-conditional network that counts the images it is run on."""

    def __init__(self):
        super().__init__()
        self.images = 0

    def forward(self, z, t, y=None):
        self.images += z.shape[0]
        return torch.tanh(z + y.reshape(-1, 1, 1, 1).float() / 4)


@pytest.mark.parametrize("w,calls", [(None, 1), (0.0, 1), (2.0, 2), (torch.tensor([0.0, 1.5, 3.0]), 2)])
def test_nfe_counts_the_network_calls_the_samplers_make(w, calls):
    """sample_utils.nfe against the images the network is actually run on, per image and grid point."""
    net = CountingNet()
    guided = ClassifierFreeGuidance(net, null_label=9)
    grid = model_grid(make_beta_schedule("cosine", 12)).take([0, 4, 7, 11])
    batch = 3
    samplers.sample_ddim(guided, torch.randn(batch, 1, 2, 2), grid, {"y": torch.tensor([0, 1, 2]), "w": w})
    assert net.images == batch * len(grid) * calls
    assert nfe(grid, guided, w) == net.images // batch


def test_select_steps():
    full = lambda n: model_grid(make_beta_schedule("cosine", n))
    assert samplers.select_steps(full(128), 8, "time") == [127, 111, 95, 79, 63, 47, 31, 15]
    assert samplers.select_steps(full(10), 3, "time") == [9, 6, 2]  # round((j+1) 10/3) - 1
    assert samplers.select_steps(full(10), 7, "time") == [9, 8, 6, 5, 3, 2, 0]
    assert samplers.select_steps(full(6), 0, "time") == samplers.select_steps(full(6), 6, "logsnr") == [5, 4, 3, 2, 1, 0]
    assert samplers.select_steps(full(16), 0, [0, 7, 3]) == [7, 3, 0]
    for bad in ((16, 3, [1, 2]), (16, 0, [3, 3]), (16, 0, [16]), (16, 0, [-1]), (16, 17, "time"), (16, 2, "karras")):
        with pytest.raises(ValueError):
            samplers.select_steps(full(bad[0]), *bad[1:])


@pytest.mark.parametrize("n,m", [(128, 8), (1024, 16), (64, 4)])
def test_time_uniform_steps_are_the_levels_of_a_model_of_nfe_steps(n, m):
    """With m dividing N, the time-uniform indices of N have the noise levels of a model of m steps (the cosine
    tables nest: f at k/m is f at (kN/m)/N), all but the noisiest, where each table's 0.999 cap acts."""
    full = model_grid(make_beta_schedule("cosine", n))
    chosen = full.take(grid_indices(n, samplers.select_steps(full, m, "time")))
    small = model_grid(make_beta_schedule("cosine", m))
    assert (chosen.sigmas[1:] - small.sigmas[1:]).abs().max() < 1e-12
    assert (chosen.alphas[1:] - small.alphas[1:]).abs().max() < 1e-12
    assert chosen.alphas[0] < small.alphas[0]  # N's capped last level is the noisier


@pytest.mark.parametrize("n", [16, 128, 1024])
def test_logsnr_steps_start_at_the_noise_and_end_at_index_0(n):
    full = model_grid(make_beta_schedule("cosine", n))
    for m in list(range(1, 13)) + [n // 2, n - 1]:
        steps = samplers.select_steps(full, m, "logsnr")
        assert len(steps) == m and len(set(steps)) == m, (m, steps)
        assert steps == sorted(steps, reverse=True) and steps[0] == n - 1 and 0 <= steps[-1]
        if m >= 2:
            assert steps[-1] == 0, (m, steps)
        full.take(grid_indices(n, steps))  # a valid grid


GAUSSIAN_CASES = [(0.0, 1.0), (0.3, 0.5), (-0.5, 0.1), (0.8, 0.05), (0.0, 2.0), (0.5, 0.02)]  # (mu, s)


@pytest.mark.parametrize("n", [128, 1024])
def test_logsnr_schedule_is_no_worse_than_time_uniform_on_the_exact_gaussian_flow(n):
    """DPM-Solver++(2M) at 8 calls from z at index N-1: the error at clean data against the exact flow
    solution, with the log-SNR schedule at most the time-uniform schedule's, for several Gaussian data."""
    z = torch.linspace(-3, 3, 13).double().reshape(13, 1, 1, 1)
    errors = {}
    for mu, s in GAUSSIAN_CASES:
        model = GaussianData(n, mu, s)
        expected = model.flow(z, None)
        errors[mu, s] = {schedule: float((samplers.sample_dpmpp_2m(
            model, z, model.on(samplers.select_steps(model.grid, 8, schedule))) - expected).abs().max())
            for schedule in ("time", "logsnr")}
    worse = {case: e for case, e in errors.items() if e["logsnr"] > e["time"]}
    assert not worse, errors


def random_grids(seed, count):
    """Valid grids of every kind: subsets of a model's levels (its capped noisiest one among them) and
    variance-preserving levels at random sigmas in (0, 1], the first at times pure noise (alpha 0)."""
    g = torch.Generator().manual_seed(seed)
    full = model_grid(make_beta_schedule("cosine", 1024))
    for k in range(count):
        size = int(torch.randint(1, 12, (), generator=g))
        if k % 2 == 0:
            rest = torch.randperm(1023, generator=g)[:size - 1] + 1
            yield full.take(sorted([0] + rest.tolist()))
        else:
            sigmas = torch.rand(size, generator=g, dtype=torch.float64).sort(descending=True).values
            if k % 4 == 1:
                sigmas[0] = 1.0
            sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])
            labels = torch.rand(size, generator=g, dtype=torch.float64) * 1000
            yield Grid((1 - sigmas ** 2).sqrt(), sigmas, labels)


FAMILY_OPTIONS = [("ancestral", {}), ("ancestral", {"clip": False}), ("ddim", {}), ("ddim", {"eta": 0.5}),
                  ("ddim", {"eta": 1.0}), ("ddim", {"eta": 1.0, "clip_value": 1.2}), ("dpmpp_2m", {}),
                  ("stochastic", {})]


def test_every_sampler_returns_finite_output_for_any_valid_grid():
    net = lambda z, label: 1.5 * torch.tanh(z + label.reshape(-1, 1, 1, 1) / 256)
    g = torch.Generator().manual_seed(1)
    for grid in random_grids(0, 40):
        # a point mass whose v = (alpha z - x0)/sigma grows without bound as the levels approach clean data
        point = PointMass(None, 0.5, alphas=grid.alphas[:-1], sigmas=grid.sigmas[:-1])
        indexed = Grid(grid.alphas, grid.sigmas, torch.arange(len(grid), dtype=torch.float64))
        x = 3 * torch.randn(4, 1, 2, 2, generator=g)
        for name, options in FAMILY_OPTIONS:
            for model, on in ((net, grid), (point, indexed)):
                states = []
                out = samplers.SAMPLERS[name].function(model, x, on, callback=lambda d: states.append(d["x"]),
                                                       **options)
                assert out.dtype == x.dtype and bool(torch.isfinite(out).all()), (name, options, grid)
                assert all(bool(torch.isfinite(s).all()) for s in states), (name, options, grid)


def test_step_noise_is_drawn_per_image_and_step():
    noise = samplers.per_image_noise([3, 5], seed=7)
    like = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    for i in (0, 1, 9):
        drawn = noise(i, like)
        assert drawn.dtype == torch.float64 and drawn.shape == like.shape
        for row, image in enumerate([3, 5]):
            assert torch.equal(drawn[row].float(), seeding.image_randn([image], [1, 4, 4], 7, "step", i)[0])
    assert (noise(0, like) - noise(1, like)).abs().min() > 0  # fresh noise at every step


# -- per-image noise: the same picture at any batch and chunk size -----------------------------------

SPECS = {"ancestral": SamplerSpec("ancestral", {}, steps=8), "ddim_eta_0.5": SamplerSpec("ddim", {"eta": 0.5}, steps=8),
         "stochastic": SamplerSpec("stochastic", {}, steps=8), "dpmpp_2m": SamplerSpec("dpmpp_2m", {}, steps=8)}


def grid_of(n, spec):
    full = model_grid(make_beta_schedule("cosine", n))
    return full.take(grid_indices(n, samplers.select_steps(full, spec.steps, spec.schedule)))


@pytest.mark.parametrize("label", list(SPECS))
def test_image_i_depends_only_on_seed_and_i(label):
    torch.manual_seed(0)
    model, spec = toy_u.make_model(), SPECS[label]
    grid = grid_of(16, spec)
    run = lambda indices, chunk, seed=7: generate(model, grid, spec, indices, [2, 1, 1], seed, chunk_size=chunk)
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
    model, spec = Conditional(), SamplerSpec("ancestral", {})
    grid = grid_of(8, spec)
    y = torch.tensor([0, 3, 1, 2, 5])
    full = generate(model, grid, spec, range(5), [1, 2, 2], 3, extra_args={"y": y, "w": 0.5}, chunk_size=5)
    chunked = generate(model, grid, spec, range(5), [1, 2, 2], 3, extra_args={"y": y, "w": 0.5}, chunk_size=2)
    assert (chunked - full).abs().max() < 1e-6
    alone = generate(model, grid, spec, [3], [1, 2, 2], 3, extra_args={"y": y[3:4], "w": 0.5})
    assert (alone[0] - full[3]).abs().max() < 1e-6
    other = generate(model, grid, spec, [3], [1, 2, 2], 3, extra_args={"y": y[4:5], "w": 0.5})
    assert (other[0] - full[3]).abs().max() > 1e-3  # the label matters
