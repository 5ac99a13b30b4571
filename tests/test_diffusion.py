"""The diffusion math: v-parameterisation, time labels, samplers and Algorithm 2 of Salimans & Ho.

The distillation tests use Gaussian data x ~ N(0, s^2 I), whose ideal denoiser is known in closed
form: E[x | z] = alpha s^2 / (alpha^2 s^2 + sigma^2) * z. A teacher built from it is exact, so the
two-step target of Algorithm 2 can be computed independently here and compared.
"""
import pytest
import torch
from torch import nn

from diffusion import GaussianDiffusion, GaussianDiffusionDefault, make_beta_schedule

BASE_STEPS = 16
BASE = GaussianDiffusion(None, make_beta_schedule("cosine", BASE_STEPS))


def ideal_coefficient(base_index, scale):
    """c with E[x | z] = c z at base index `base_index` for data N(0, scale^2)."""
    alpha = BASE.sqrt_alphas_cumprod[base_index]
    sigma = BASE.sqrt_one_minus_alphas_cumprod[base_index]
    return alpha * scale ** 2 / (alpha ** 2 * scale ** 2 + sigma ** 2)


class GaussianTeacher(nn.Module):
    """Predicts v of the ideal denoiser at the noise level of its (aligned, base-index) time label."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale
        self.labels = []

    def forward(self, z, label):
        self.labels.append(label.clone())
        i = label.round().long()
        alpha = BASE.sqrt_alphas_cumprod[i].reshape(-1, 1, 1, 1)
        sigma = BASE.sqrt_one_minus_alphas_cumprod[i].reshape(-1, 1, 1, 1)
        x_hat = ideal_coefficient(i, self.scale).reshape(-1, 1, 1, 1) * z.double()
        return ((alpha * z - x_hat) / sigma).float()


class LinearStudent(nn.Module):
    """Outputs v = (alpha_j z - k_j z) / sigma_j for a per-index coefficient k_j (the x it predicts)."""

    def __init__(self, coefficients, student_diffusion):
        super().__init__()
        self.k = coefficients
        self.student = student_diffusion
        self.labels = []

    def forward(self, z, label):
        self.labels.append(label.clone())
        s = self.student.time_scale
        j = ((label + 1) / s - 1).round().long()
        alpha, sigma = self.student.get_alpha_sigma(z, j)
        return ((alpha * z.double() - self.k[j].reshape(-1, 1, 1, 1) * z.double()) / sigma).float()


def two_step_target_coefficients(teacher, scale):
    """k_j with x_target = k_j z: two DDIM steps of the ideal teacher, then Algorithm 2's closed form."""
    a, s = teacher.sqrt_alphas_cumprod, teacher.sqrt_one_minus_alphas_cumprod

    def teacher_x_coefficient(i):
        """x = c z as the teacher reads its network's v with its own table at index i (the 0.999 cap
        makes the last index of a coarser schedule differ slightly from the base level of its label)."""
        b = (i + 1) * teacher.time_scale - 1  # the teacher's aligned label: a base index
        alpha_b, sigma_b = BASE.sqrt_alphas_cumprod[b], BASE.sqrt_one_minus_alphas_cumprod[b]
        return a[i] - s[i] * (alpha_b - ideal_coefficient(b, scale)) / sigma_b

    ks = []
    for j in range(teacher.num_timesteps // 2):
        t = 2 * j
        c1 = teacher_x_coefficient(t + 1)
        z1 = a[t] * c1 + s[t] / s[t + 1] * (1 - a[t + 1] * c1)
        c0 = teacher_x_coefficient(t)
        a2, s2 = (a[t - 1], s[t - 1]) if t > 0 else (1.0, 0.0)
        z2 = a2 * c0 * z1 + s2 / s[t] * (z1 - a[t] * c0 * z1)
        r = s2 / s[t + 1]
        ks.append((z2 - r) / (a2 - r * a[t + 1]))
    return torch.tensor(ks, dtype=torch.float64)


def one_step_coefficients(student, scale):
    base_index = lambda j: (j + 1) * student.time_scale - 1
    return torch.stack([ideal_coefficient(base_index(j), scale) for j in range(student.num_timesteps)])


def distill_setup(scale, teacher_steps, teacher_time_scale, weighting="snr+1"):
    teacher_net = GaussianTeacher(scale)
    teacher = GaussianDiffusionDefault(teacher_net, make_beta_schedule("cosine", teacher_steps),
                                       time_scale=teacher_time_scale, weighting=weighting)
    student = GaussianDiffusion(None, make_beta_schedule("cosine", teacher_steps // 2), time_scale=2 * teacher_time_scale)
    torch.manual_seed(0)
    n_j = teacher_steps // 2
    x = scale * torch.randn(64 * n_j, 3, 4, 4)
    t = 2 * torch.arange(n_j).repeat(64)
    return teacher, student, x, t


def student_loss(teacher, student, x, t, coefficients):
    student.net_ = LinearStudent(coefficients, student)
    return teacher.distill_loss(student, x, t, {}, reduction="none")


@pytest.mark.parametrize("scale", [0.5, 3.0])  # 3.0: teacher x-predictions leave [-1, 1]
@pytest.mark.parametrize("teacher_steps,teacher_time_scale", [(16, 1), (8, 2)])
def test_two_step_student_has_zero_loss(scale, teacher_steps, teacher_time_scale):
    teacher, student, x, t = distill_setup(scale, teacher_steps, teacher_time_scale)
    paper = student_loss(teacher, student, x, t, two_step_target_coefficients(teacher, scale))
    one_step = student_loss(teacher, student, x, t, one_step_coefficients(student, scale))
    assert paper.max() < 1e-8
    assert one_step.mean() > 1e-3
    assert one_step.mean() > 1e5 * paper.mean()


@pytest.mark.parametrize("weighting", ["truncated_snr"])
def test_other_weighting_also_vanishes_at_the_target(weighting):
    teacher, student, x, t = distill_setup(3.0, 16, 1, weighting)
    paper = student_loss(teacher, student, x, t, two_step_target_coefficients(teacher, 3.0))
    one_step = student_loss(teacher, student, x, t, one_step_coefficients(student, 3.0))
    assert paper.max() < 1e-8 and one_step.mean() > 1e-3


@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_original_target_differs_from_algorithm_2(scale):
    teacher, student, x, t = distill_setup(scale, 16, 1, weighting="original")
    loss = student_loss(teacher, student, x, t, two_step_target_coefficients(teacher, scale))
    assert loss.mean() > 1e-3


def test_zero_index_target_is_the_second_x_prediction():
    teacher, student, x, t = distill_setup(0.5, 16, 1)
    k = two_step_target_coefficients(teacher, 0.5)
    a, s = teacher.sqrt_alphas_cumprod, teacher.sqrt_one_minus_alphas_cumprod
    c1, c0 = ideal_coefficient(1, 0.5), ideal_coefficient(0, 0.5)
    x2 = c0 * (a[0] * c1 + s[0] / s[1] * (1 - a[1] * c1))
    assert torch.isclose(k[0], x2, rtol=1e-12)
    z, target = teacher.distill_target(x[:4].double(), torch.zeros(4, dtype=torch.long), {}, torch.randn(4, 3, 4, 4, dtype=torch.float64))
    assert torch.allclose(target, x2 * z, atol=1e-10)


def test_new_student_gets_aligned_labels_while_an_original_teacher_keeps_its_own():
    teacher_net = GaussianTeacher(0.5)
    teacher = GaussianDiffusionDefault(teacher_net, make_beta_schedule("cosine", 8), time_scale=2, time_labels="original")
    student = GaussianDiffusion(None, make_beta_schedule("cosine", 4), time_scale=4)
    student.net_ = LinearStudent(torch.zeros(4, dtype=torch.float64), student)
    t = torch.tensor([0, 2, 4, 6])
    teacher.distill_loss(student, torch.randn(4, 3, 2, 2), t, {})
    assert student.net_.labels[0].tolist() == [3.0, 7.0, 11.0, 15.0]  # (j + 1) * 4 - 1
    assert teacher_net.labels[0].tolist() == [2.0, 6.0, 10.0, 14.0]  # original: (t + 1) * 2
    assert teacher_net.labels[1].tolist() == [0.0, 4.0, 8.0, 12.0]


def test_time_labels_agree_at_scale_one_and_differ_after_halvings():
    t = torch.arange(8)
    aligned = GaussianDiffusion(None, make_beta_schedule("cosine", 8), time_scale=1)
    original = GaussianDiffusion(None, make_beta_schedule("cosine", 8), time_scale=1, time_labels="original")
    assert torch.equal(aligned.time_label(t), original.time_label(t))
    aligned.time_scale = original.time_scale = 128
    assert torch.equal(aligned.time_label(t) - original.time_label(t), torch.full((8,), 127.0))


def test_v_parameterisation_identities():
    diffusion = GaussianDiffusion(None, make_beta_schedule("cosine", 32))
    x, eps = torch.randn(32, 2, 3, 3, dtype=torch.float64), torch.randn(32, 2, 3, 3, dtype=torch.float64)
    t = torch.arange(32)
    alpha, sigma = diffusion.get_alpha_sigma(x, t)
    z = diffusion.q_sample(x, t, eps)
    v = diffusion.predict_v(x, eps, alpha, sigma)
    assert torch.allclose(diffusion.predict_start_from_v(z, v, alpha, sigma), x, atol=1e-10)
    assert torch.allclose(sigma * z + alpha * v, eps, atol=1e-10)


def hand_alpha_sigma(n):
    """alpha_i = sqrt(prod_{k <= i} (1 - beta_k)), sigma_i = sqrt(1 - alpha_i^2), from the betas alone."""
    betas = make_beta_schedule("cosine", n).tolist()
    alphas, sigmas, product = [], [], 1.0
    for beta in betas:
        product *= 1 - beta
        alphas.append(product ** 0.5)
        sigmas.append((1 - product) ** 0.5)
    return betas, alphas, sigmas


def test_p_loss_is_zero_for_the_true_v_and_the_mean_square_of_v_for_a_zero_network():
    _, a, s = hand_alpha_sigma(16)
    diffusion = GaussianDiffusion(None, make_beta_schedule("cosine", 16))
    x, eps, t = torch.randn(8, 1, 2, 2), torch.randn(8, 1, 2, 2), torch.arange(0, 16, 2)
    true_v = torch.stack([a[i] * eps[b] - s[i] * x[b] for b, i in enumerate(t.tolist())])  # alpha eps - sigma x
    diffusion.net_ = lambda z, label: true_v
    assert diffusion.p_loss(x, t, {}, noise=eps) < 1e-12
    diffusion.net_ = lambda z, label: torch.zeros_like(z)
    per_sample = diffusion.p_loss(x, t, {}, noise=eps, reduction="none")
    assert torch.allclose(per_sample, (true_v ** 2).flatten(1).mean(1), rtol=1e-6)
    assert diffusion.p_loss(x, t, {}, noise=eps).item() == pytest.approx((true_v ** 2).mean().item(), rel=1e-6)


class ZeroNet(nn.Module):
    def forward(self, z, label):
        return torch.zeros_like(z)


def test_ddpm_step_with_a_zero_network_by_hand():
    """v = 0 predicts x = alpha_i z (clipped to [-1, 1]); the ancestral step draws from the posterior
    q(x_{i-1} | x_i, x) of Ho et al. Eq. 7 (coefficients from the betas), and at index 0 adds no noise."""
    betas, a, s = hand_alpha_sigma(8)
    diffusion = GaussianDiffusion(ZeroNet(), make_beta_schedule("cosine", 8))
    z = 1.5 * torch.randn(4, 1, 3, 3, dtype=torch.float64)
    for i in (5, 1):
        x_hat = (a[i] * z).clamp(-1, 1)
        bar, bar_prev = a[i] ** 2, a[i - 1] ** 2
        mean = betas[i] * bar_prev ** 0.5 / (1 - bar) * x_hat + (1 - bar_prev) * (1 - betas[i]) ** 0.5 / (1 - bar) * z
        variance = betas[i] * (1 - bar_prev) / (1 - bar)
        torch.manual_seed(3)
        noise = torch.randn_like(z)
        torch.manual_seed(3)
        step = diffusion.p_sample_ddpm(z, torch.full((4,), i), {})
        assert torch.allclose(step, mean + variance ** 0.5 * noise, rtol=1e-9, atol=1e-12)
    assert torch.equal(diffusion.p_sample_ddpm(z, torch.zeros(4, dtype=torch.long), {}), (a[0] * z).clamp(-1, 1))


def test_clipped_ddim_loop_with_a_zero_network_by_hand_and_eta_adds_noise():
    """eta = 0: z_{i-1} = alpha_{i-1} x + sigma_{i-1} eps with x = clip(alpha_i z) and eps = clip((z - alpha_i x)
    / sigma_i) at +-1.2 (Song et al. Eq. 12); index 0 returns x. eta = 1 adds noise: another result."""
    _, a, s = hand_alpha_sigma(8)
    diffusion = GaussianDiffusion(ZeroNet(), make_beta_schedule("cosine", 8), sampler="clipped")
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
