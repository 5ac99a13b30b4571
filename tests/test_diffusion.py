"""The diffusion math: v-parameterisation, time labels, grids, the plain losses and Algorithm 2 of Salimans & Ho.

The distillation tests use Gaussian data x ~ N(0, s^2 I), whose ideal denoiser is known in closed
form: E[x | z] = alpha s^2 / (alpha^2 s^2 + sigma^2) * z. A teacher built from it is exact, so the
two-step target of Algorithm 2 can be computed independently here and compared. The networks are plain
callables (z, label) -> v that read the aligned label (i+1)s - 1 back as a step index to know alpha, sigma.
"""
import pytest
import torch
from torch import nn

import original
import samplers
from diffusion import (Grid, alpha_sigma_tables, distillation_target, extract, grid_indices, make_beta_schedule,
                       model_grid, predict_eps_from_start, predict_eps_from_v, predict_start_from_v, predict_v,
                       q_sample, time_labels_of, two_teacher_steps)
from train_utils import Draws, distillation_loss, training_loss

BASE_STEPS = 16


def hand_alpha_sigma(n):
    """alpha_i = sqrt(prod_{k <= i} (1 - beta_k)), sigma_i = sqrt(1 - alpha_i^2), from the betas alone."""
    betas = make_beta_schedule("cosine", n).tolist()
    alphas, sigmas, product = [], [], 1.0
    for beta in betas:
        product *= 1 - beta
        alphas.append(product ** 0.5)
        sigmas.append((1 - product) ** 0.5)
    return betas, alphas, sigmas


def tables(n):
    _, alphas, sigmas = hand_alpha_sigma(n)
    return torch.tensor(alphas, dtype=torch.float64), torch.tensor(sigmas, dtype=torch.float64)


def ideal_coefficient(alpha, sigma, scale):
    """c with E[x | z] = c z at the level (alpha, sigma) for data N(0, scale^2)."""
    return alpha * scale ** 2 / (alpha ** 2 * scale ** 2 + sigma ** 2)


def rows(values, like):
    return values.reshape(-1, *([1] * (like.ndim - 1)))


class GaussianTeacher(nn.Module):
    """Predicts v of the ideal denoiser at the noise level of its (aligned, base-index) time label."""

    def __init__(self, scale, base_steps=BASE_STEPS):
        super().__init__()
        self.scale = scale
        self.alphas, self.sigmas = tables(base_steps)
        self.labels = []

    def forward(self, z, label):
        self.labels.append(label.clone())
        i = label.round().long()
        alpha, sigma = rows(self.alphas[i], z), rows(self.sigmas[i], z)
        x_hat = ideal_coefficient(alpha, sigma, self.scale) * z.double()
        return (alpha * z.double() - x_hat) / sigma


class LinearStudent(nn.Module):
    """Outputs v = (alpha_j z - k_j z) / sigma_j for a per-index coefficient k_j (the x it predicts), on the
    levels of a fresh cosine table of its own steps at time scale s."""

    def __init__(self, coefficients, steps, time_scale):
        super().__init__()
        self.k, self.time_scale = coefficients, time_scale
        self.alphas, self.sigmas = tables(steps)
        self.labels = []

    def forward(self, z, label):
        self.labels.append(label.clone())
        j = ((label + 1) / self.time_scale - 1).round().long()
        alpha, sigma = rows(self.alphas[j], z), rows(self.sigmas[j], z)
        return ((alpha * z.double() - rows(self.k[j], z) * z.double()) / sigma).float()


def two_step_target_coefficients(teacher_steps, teacher_time_scale, scale):
    """k_j with x_target = k_j z: two DDIM steps of the ideal teacher, then Algorithm 2's closed form."""
    a, s = tables(teacher_steps)
    base_a, base_s = tables(BASE_STEPS)

    def teacher_x_coefficient(i):
        """x = c z as the teacher reads its network's v with its own table at index i (the 0.999 cap
        makes the last index of a coarser schedule differ slightly from the base level of its label)."""
        b = (i + 1) * teacher_time_scale - 1  # the teacher's aligned label: a base index
        alpha_b, sigma_b = base_a[b], base_s[b]
        return a[i] - s[i] * (alpha_b - ideal_coefficient(alpha_b, sigma_b, scale)) / sigma_b

    ks = []
    for j in range(teacher_steps // 2):
        t = 2 * j
        c1 = teacher_x_coefficient(t + 1)
        z1 = a[t] * c1 + s[t] / s[t + 1] * (1 - a[t + 1] * c1)
        c0 = teacher_x_coefficient(t)
        a2, s2 = (a[t - 1], s[t - 1]) if t > 0 else (1.0, 0.0)
        z2 = a2 * c0 * z1 + s2 / s[t] * (z1 - a[t] * c0 * z1)
        r = s2 / s[t + 1]
        ks.append((z2 - r) / (a2 - r * a[t + 1]))
    return torch.tensor(ks, dtype=torch.float64)


def one_step_coefficients(student_steps, student_time_scale, scale):
    base_a, base_s = tables(BASE_STEPS)
    b = [(j + 1) * student_time_scale - 1 for j in range(student_steps)]
    return ideal_coefficient(base_a[b], base_s[b], scale)


class Setup:
    def __init__(self, scale, teacher_steps, teacher_time_scale, teacher_labels="aligned"):
        self.scale, self.teacher_steps, self.teacher_time_scale = scale, teacher_steps, teacher_time_scale
        self.teacher = GaussianTeacher(scale)
        self.teacher_grid = model_grid(make_beta_schedule("cosine", teacher_steps), teacher_time_scale, teacher_labels)
        self.student_steps, self.student_time_scale = teacher_steps // 2, 2 * teacher_time_scale
        self.student_grid = model_grid(make_beta_schedule("cosine", self.student_steps), self.student_time_scale)
        g = torch.Generator().manual_seed(0)
        self.x = scale * torch.randn(64 * self.student_steps, 3, 4, 4, generator=g)
        self.draws = Draws(torch.arange(self.student_steps).repeat(64),
                           torch.randn(self.x.shape, generator=g, dtype=torch.float64))

    def student(self, coefficients):
        return LinearStudent(coefficients, self.student_steps, self.student_time_scale)

    def loss(self, student, weighting="snr+1", gamma=0.0):
        return distillation_loss(student, self.x, self.draws, {}, teacher=self.teacher, teacher_grid=self.teacher_grid,
                                 student_grid=self.student_grid, weighting=weighting, gamma=gamma)

    def paper_and_one_step_losses(self, weighting="snr+1"):
        paper = self.loss(self.student(two_step_target_coefficients(self.teacher_steps, self.teacher_time_scale,
                                                                    self.scale)), weighting)
        one_step = self.loss(self.student(one_step_coefficients(self.student_steps, self.student_time_scale,
                                                                self.scale)), weighting)
        return paper, one_step


@pytest.mark.parametrize("scale", [0.5, 3.0])  # 3.0: teacher x-predictions leave [-1, 1]
@pytest.mark.parametrize("teacher_steps,teacher_time_scale", [(16, 1), (8, 2)])
def test_two_step_student_has_zero_loss(scale, teacher_steps, teacher_time_scale):
    paper, one_step = Setup(scale, teacher_steps, teacher_time_scale).paper_and_one_step_losses()
    assert paper.shape == (64 * teacher_steps // 2,)
    assert paper.max() < 1e-8
    assert one_step.mean() > 1e-3
    assert one_step.mean() > 1e5 * paper.mean()


def test_truncated_snr_weighting_also_vanishes_at_the_target():
    paper, one_step = Setup(3.0, 16, 1).paper_and_one_step_losses("truncated_snr")
    assert paper.max() < 1e-8 and one_step.mean() > 1e-3


@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_original_target_differs_from_algorithm_2(scale):
    setup = Setup(scale, 16, 1)
    loss = setup.loss(setup.student(two_step_target_coefficients(16, 1, scale)), weighting="original")
    assert loss.mean() > 1e-3


def test_zero_index_target_is_the_second_x_prediction():
    k = two_step_target_coefficients(16, 1, 0.5)
    _, a, s = hand_alpha_sigma(16)
    c1, c0 = ideal_coefficient(a[1], s[1], 0.5), ideal_coefficient(a[0], s[0], 0.5)
    x2 = c0 * (a[0] * c1 + s[0] / s[1] * (1 - a[1] * c1))
    assert abs(float(k[0]) - x2) < 1e-12 * abs(x2)
    # diffusion.py's two steps from teacher index 1 through 0 into clean data, with the ideal teacher
    teacher = GaussianTeacher(0.5)
    grid = model_grid(make_beta_schedule("cosine", 16))
    z = torch.randn(4, 3, 4, 4).double()  # float32 values: the teacher sees them exactly
    levels = [grid.level(14 + k, z) for k in range(3)]  # positions of indices 1, 0 and clean data

    def teacher_x(z_k, k):
        return predict_start_from_v(z_k, teacher(z_k.float(), grid.label(14 + k, z_k)), *levels[k])

    z_2, x_2 = two_teacher_steps(teacher_x, z, levels)
    assert torch.allclose(x_2, x2 * z, atol=1e-7)  # up to the float32 input of the second call
    assert torch.equal(z_2, x_2)  # into clean data the second DDIM step is its x prediction
    assert torch.equal(distillation_target(z, z_2, levels), z_2)


def test_distillation_target_is_the_x_whose_one_ddim_step_lands_on_the_two_step_point():
    """Algorithm 2's defining property, for levels t, t-1, t-2 of a cosine table and arbitrary z, z''."""
    grid = model_grid(make_beta_schedule("cosine", 32))
    g = torch.Generator().manual_seed(3)
    z, z_2 = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64), torch.randn(5, 2, 3, 3, generator=g,
                                                                                 dtype=torch.float64)
    for position in (0, 7, 20):
        levels = [grid.level(position + k, z) for k in range(3)]
        (alpha_t, sigma_t), _, (alpha_2, sigma_2) = levels
        x = distillation_target(z, z_2, levels)
        assert torch.allclose(alpha_2 * x + sigma_2 * (z - alpha_t * x) / sigma_t, z_2, atol=1e-10)


def test_new_student_gets_aligned_labels_while_an_original_teacher_keeps_its_own():
    teacher = GaussianTeacher(0.5)
    teacher_grid = model_grid(make_beta_schedule("cosine", 8), 2, "original")
    student_grid = model_grid(make_beta_schedule("cosine", 4), 4)
    student = LinearStudent(torch.zeros(4, dtype=torch.float64), 4, 4)
    draws = Draws(torch.tensor([0, 1, 2, 3]), torch.randn(4, 3, 2, 2, dtype=torch.float64))
    distillation_loss(student, torch.randn(4, 3, 2, 2), draws, {}, teacher=teacher, teacher_grid=teacher_grid,
                      student_grid=student_grid)
    assert student.labels[0].tolist() == [3.0, 7.0, 11.0, 15.0]  # (j + 1) * 4 - 1
    assert teacher.labels[0].tolist() == [2.0, 6.0, 10.0, 14.0]  # original, at teacher index 2j+1: (2j + 1) * 2
    assert teacher.labels[1].tolist() == [0.0, 4.0, 8.0, 12.0]  # and at 2j


@pytest.mark.parametrize("time_scale", [1, 2, 4, 8, 16])
def test_aligned_labels_name_the_base_index_of_the_same_noise_level(time_scale):
    """A model of N/s steps on its own cosine table: the aligned label (i+1)s - 1 of each level is the base
    index with that level (all but the noisiest, where each table's cap acts); the original label i s is a
    less noisy base level for s > 1 (it lags by s - 1 steps), the same one at s = 1."""
    n = 64
    base_alpha, base_sigma = tables(n)
    aligned = model_grid(make_beta_schedule("cosine", n // time_scale), time_scale, "aligned")
    lagging = model_grid(make_beta_schedule("cosine", n // time_scale), time_scale, "original")
    assert torch.equal(aligned.alphas, lagging.alphas) and torch.equal(aligned.sigmas, lagging.sigmas)
    for grid in (aligned, lagging):
        assert torch.equal(grid.labels, grid.labels.round()) and grid.labels.min() >= 0 and grid.labels.max() < n
    b = aligned.labels.long()
    assert (base_sigma[b][1:] - aligned.sigmas[1:-1]).abs().max() < 1e-12
    assert (base_alpha[b][1:] - aligned.alphas[1:-1]).abs().max() < 1e-12
    lag = base_sigma[lagging.labels.long()][1:] - aligned.sigmas[1:-1]
    if time_scale == 1:
        assert torch.equal(aligned.labels, lagging.labels)
    else:
        assert bool((lag < -1e-6).all())


def test_v_parameterisation_identities():
    alpha_table, sigma_table = alpha_sigma_tables(make_beta_schedule("cosine", 32))
    x, eps = torch.randn(32, 2, 3, 3, dtype=torch.float64), torch.randn(32, 2, 3, 3, dtype=torch.float64)
    t = torch.arange(32)
    alpha, sigma = extract(alpha_table, t, x), extract(sigma_table, t, x)
    assert alpha.shape == (32, 1, 1, 1) and alpha.dtype == torch.float64
    assert torch.allclose(alpha ** 2 + sigma ** 2, torch.ones_like(alpha), atol=1e-12)
    z = q_sample(x, eps, alpha, sigma)
    v = predict_v(x, eps, alpha, sigma)
    assert torch.allclose(predict_start_from_v(z, v, alpha, sigma), x, atol=1e-10)
    assert torch.allclose(predict_eps_from_v(z, v, alpha, sigma), eps, atol=1e-10)
    assert torch.allclose(predict_eps_from_start(z, x, alpha, sigma), eps, atol=1e-10)
    assert torch.equal(extract(alpha_table, 5, x.float()), alpha_table[5].expand(32, 1, 1, 1))


def test_training_loss_is_zero_for_the_true_v_and_the_mean_square_of_v_for_a_zero_network():
    _, a, s = hand_alpha_sigma(16)
    grid = model_grid(make_beta_schedule("cosine", 16))
    x, eps, t = torch.randn(8, 1, 2, 2), torch.randn(8, 1, 2, 2), torch.arange(0, 16, 2)
    true_v = torch.stack([a[i] * eps[b] - s[i] * x[b] for b, i in enumerate(t.tolist())])  # alpha eps - sigma x
    z_by_hand = torch.stack([a[i] * x[b] + s[i] * eps[b] for b, i in enumerate(t.tolist())])
    seen = []

    def true_net(z, label):
        seen.append((z, label))
        return true_v

    assert training_loss(true_net, x, Draws(t, eps), {}, grid=grid).max() < 1e-12
    z, label = seen[0]
    assert torch.allclose(z, z_by_hand, atol=1e-6) and label.tolist() == t.float().tolist()
    per_sample = training_loss(lambda z, label: torch.zeros_like(z), x, Draws(t, eps), {}, grid=grid)
    assert per_sample.shape == (8,)
    assert torch.allclose(per_sample, (true_v ** 2).flatten(1).mean(1), rtol=1e-6)


# -- grids ------------------------------------------------------------------------------------------

def grid_of_indices(n, indices):
    """A Grid of these step indices in the order given, then clean data."""
    alpha, sigma = alpha_sigma_tables(make_beta_schedule("cosine", n))
    indices = torch.tensor(indices)
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    return Grid(torch.cat([alpha[indices], one]), torch.cat([sigma[indices], zero]), time_labels_of(indices, 1))


def test_a_grid_whose_noise_levels_do_not_strictly_decrease_is_a_value_error():
    good = grid_of_indices(16, [15, 11, 6, 2])
    assert len(good) == 4 and good.labels.tolist() == [15.0, 11.0, 6.0, 2.0]
    for indices in ([2, 6, 11, 15], [15, 6, 11, 2], [15, 11, 11, 2]):
        with pytest.raises(ValueError, match="decrease"):
            grid_of_indices(16, indices)
    full = model_grid(make_beta_schedule("cosine", 16))
    for positions in ([3, 1], [4, 4]):
        with pytest.raises(ValueError):
            full.take(positions)
    with pytest.raises(ValueError, match="clean"):
        Grid(good.alphas[:-1], good.sigmas[:-1], good.labels[:-1])
    with pytest.raises(ValueError):
        Grid(good.alphas, good.sigmas, good.labels[:2])


def test_model_grid_positions_run_from_index_n_minus_1_to_0():
    n = 12
    alpha, sigma = tables(n)
    full = model_grid(make_beta_schedule("cosine", n))
    assert len(full) == n and float(full.alphas[-1]) == 1.0 and float(full.sigmas[-1]) == 0.0
    for i in (0, 5, 11):
        (p,) = grid_indices(n, [i])
        a, s = full.level(p, torch.zeros(2, 1, 3, 3))
        assert a.shape == (2, 1, 1, 1) and abs(float(a[0]) - float(alpha[i])) < 1e-12
        assert abs(float(s[1]) - float(sigma[i])) < 1e-12
        assert full.label(p, torch.zeros(2, 1)).tolist() == [float(i)] * 2


@pytest.mark.parametrize("scale", [0.5, 3.0])
@pytest.mark.parametrize("n", [4, 16, 128, 1024])
def test_student_levels_are_every_other_teacher_level_and_the_noisiest_miss_is_bounded(n, scale):
    """A student's levels come from a fresh cosine table of N/2 steps (checkpoints.checkpoint_grid): they are
    the teacher's levels at indices 2j+1 (to 1e-12, labels identical), except at the noisiest, where the two
    tables' 0.999 caps differ. There the ideal student (its x prediction the Algorithm 2 target x~, which
    distillation trains it to) steps from the teacher's z at its own level (alpha_S, sigma_S) instead of the
    teacher's (alpha_T, sigma_T) and misses the teacher's two-step point z'' by exactly
        sigma_2 [(z - alpha_S x~)/sigma_S - (z - alpha_T x~)/sigma_T],
    at most sigma_2 (|z| |1/sigma_S - 1/sigma_T| + |x~| |alpha_S/sigma_S - alpha_T/sigma_T|); for Gaussian data
    x~ = k z with k from the closed form, so the miss is sigma_2 z ((1 - alpha_S k)/sigma_S - (1 - alpha_T k)/sigma_T).
    Everywhere else the student's step lands on z''."""
    teacher_grid = model_grid(make_beta_schedule("cosine", n), 1)
    student_grid = model_grid(make_beta_schedule("cosine", n // 2), 2)
    every_other = teacher_grid.take(range(0, n, 2))  # teacher indices 2j+1, noisiest first
    assert torch.equal(student_grid.labels, every_other.labels)
    assert (student_grid.alphas[1:] - every_other.alphas[1:]).abs().max() < 1e-12
    assert (student_grid.sigmas[1:] - every_other.sigmas[1:]).abs().max() < 1e-12
    alpha_T, sigma_T = every_other.alphas[0], every_other.sigmas[0]
    alpha_S, sigma_S = student_grid.alphas[0], student_grid.sigmas[0]
    assert alpha_S > 1.5 * alpha_T  # the noisiest levels differ (the cap), by far more than rounding

    teacher = GaussianTeacher(scale, base_steps=n)
    z = (3 * torch.randn(6, 1, 2, 2, generator=torch.Generator().manual_seed(n))).double()
    misses = []
    for p in range(n // 2):
        levels = [teacher_grid.level(2 * p + k, z) for k in range(3)]

        def teacher_x(z_k, k):
            return predict_start_from_v(z_k, teacher(z_k.float(), teacher_grid.label(2 * p + k, z_k)), *levels[k])

        def target(z_j):
            return distillation_target(z_j, two_teacher_steps(teacher_x, z_j, levels)[0], levels)

        z_2 = two_teacher_steps(teacher_x, z, levels)[0]
        alpha_j, sigma_j = student_grid.level(p, z)
        ideal_student = lambda z_j, label: (alpha_j * z_j.double() - target(z_j.double())) / sigma_j
        states = []
        samplers.sample_ddim(ideal_student, z, student_grid.take([p, p + 1] if p + 1 < n // 2 else [p]),
                             callback=lambda d: states.append(d["x"]))
        misses.append(states[0] - z_2)
    for p, miss in enumerate(misses[1:], 1):
        assert miss.abs().max() < 1e-12, (p, float(miss.abs().max()))

    k = two_step_target_coefficients_on(n, scale)
    sigma_2 = teacher_grid.sigmas[2]
    exact_miss = sigma_2 * z * ((1 - alpha_S * k) / sigma_S - (1 - alpha_T * k) / sigma_T)
    bound = sigma_2 * (z.abs() * (1 / sigma_S - 1 / sigma_T).abs()
                       + (k * z).abs() * (alpha_S / sigma_S - alpha_T / sigma_T).abs())
    assert torch.allclose(misses[0], exact_miss, rtol=1e-6, atol=1e-14), (misses[0], exact_miss)
    assert bool((misses[0].abs() <= bound * (1 + 1e-9)).all())
    assert misses[0].abs().max() > 1e-3 * bound.max()  # a real miss, not rounding


def two_step_target_coefficients_on(n, scale):
    """k with x~ = k z at the noisiest teacher index N-1 of an exact teacher on its own table (labels = indices):
    two DDIM steps N-1 -> N-2 -> N-3 (N = 2: into clean data), then Algorithm 2's closed form."""
    a, s = tables(n)
    a = torch.cat([a, torch.ones(1, dtype=torch.float64)])  # index -1 is clean data
    s = torch.cat([s, torch.zeros(1, dtype=torch.float64)])
    t, t1, t2 = n - 1, n - 2, n - 3
    c0, c1 = ideal_coefficient(a[t], s[t], scale), ideal_coefficient(a[t1], s[t1], scale)
    z1 = a[t1] * c0 + s[t1] / s[t] * (1 - a[t] * c0)
    z2 = (a[t2] * c1 + s[t2] / s[t1] * (1 - a[t1] * c1)) * z1
    r = s[t2] / s[t]
    return (z2 - r) / (a[t2] - r * a[t])


# -- one step of the original's samplers with a zero network ---------------------------------------

class ZeroNet(nn.Module):
    def forward(self, z, label):
        return torch.zeros_like(z)


def test_ancestral_step_with_a_zero_network_by_hand():
    """v = 0 predicts x = alpha_i z (clipped to [-1, 1]); the ancestral step draws from the posterior
    q(x_{i-1} | x_i, x) of Ho et al. Eq. 7 (coefficients from the betas), and at index 0 adds no noise."""
    betas, a, s = hand_alpha_sigma(8)
    full = model_grid(make_beta_schedule("cosine", 8))
    z = 1.5 * torch.randn(4, 1, 3, 3, dtype=torch.float64)
    noise = torch.randn_like(z)
    for i in (5, 1):
        x_hat = (a[i] * z).clamp(-1, 1)
        bar, bar_prev = a[i] ** 2, a[i - 1] ** 2
        mean = betas[i] * bar_prev ** 0.5 / (1 - bar) * x_hat + (1 - bar_prev) * (1 - betas[i]) ** 0.5 / (1 - bar) * z
        variance = betas[i] * (1 - bar_prev) / (1 - bar)
        states = []
        samplers.sample_ancestral(ZeroNet(), z, full.take(grid_indices(8, [i, i - 1])), noise=lambda k, like: noise,
                                  callback=lambda d: states.append(d["x"]))
        assert torch.allclose(states[0], mean + variance ** 0.5 * noise, rtol=1e-9, atol=1e-12)
    last = samplers.sample_ancestral(ZeroNet(), z, full.take(grid_indices(8, [0])), noise=lambda k, like: noise)
    assert torch.allclose(last, (a[0] * z).clamp(-1, 1), rtol=1e-15, atol=0)


def test_clipped_ddim_loop_with_a_zero_network_by_hand_and_eta_adds_noise():
    """eta = 0: z_{i-1} = alpha_{i-1} x + sigma_{i-1} eps with x = clip(alpha_i z) and eps = clip((z - alpha_i x)
    / sigma_i) at +-1.2 (Song et al. Eq. 12); index 0 returns x. eta = 1 adds noise: another result."""
    _, a, s = hand_alpha_sigma(8)
    diffusion = original.GaussianDiffusion(ZeroNet(), make_beta_schedule("cosine", 8), sampler="clipped")
    noise = 2 * torch.randn(2, 1, 3, 3)
    z = noise.double()
    for i in reversed(range(8)):
        x_hat = (a[i] * z).clamp(-1.2, 1.2)
        eps = ((z - a[i] * x_hat) / s[i]).clamp(-1.2, 1.2)
        z = x_hat if i == 0 else a[i - 1] * x_hat + s[i - 1] * eps
    deterministic = diffusion.p_sample_loop(noise, eta=0.0)
    assert torch.allclose(deterministic.double(), z, atol=1e-6)
    torch.manual_seed(0)
    assert not torch.allclose(diffusion.p_sample_loop(noise, eta=1.0), deterministic, atol=1e-3)
