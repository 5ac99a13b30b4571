"""The distillation losses against hand computations: every expected value here is computed in this file
from the schedule tables and the networks' outputs, without diffusion.py's formulas.

- Algorithm 2 of Salimans & Ho: two deterministic DDIM steps of the teacher, then the closed-form x for
  which one student step lands on the same point (checked by hand and by that defining property);
- the truncated-SNR weighting max(SNR, 1) on the x error;
- the original implementation's loss: its clipped second x-prediction as target, and its --gamma
  weight inside the MSE, F.mse_loss(w * v_student, w * v_target) with w = (1 + alpha/sigma)^gamma;
- bf16/fp16 autocast against float32.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffusion import GaussianDiffusion, GaussianDiffusionDefault, make_beta_schedule
from unet import UNet

TEACHER_STEPS = 16
SCALE = 3.0  # the data's scale: x-predictions leave [-1, 1], so the original's clipping acts


def tables(n):
    """(alpha, sigma) of the cosine schedule with n steps as float64 lists, index -1 (clean data) appended
    last so that alpha[-1] = 1, sigma[-1] = 0."""
    alphas_cumprod = torch.cumprod(1 - make_beta_schedule("cosine", n), 0)
    return alphas_cumprod.sqrt().tolist() + [1.0], (1 - alphas_cumprod).sqrt().tolist() + [0.0]


class TanhNet(nn.Module):
    """A fixed smooth network v(z, label) that depends on its time label (and records the labels)."""

    def __init__(self, gain, shift):
        super().__init__()
        self.gain, self.shift = gain, shift
        self.labels = []

    def forward(self, z, label):
        self.labels.append(label.clone())
        return 1.5 * torch.tanh(self.gain * z + self.shift * label.reshape(-1, *([1] * (z.ndim - 1))) / 16)


def v_of(net, z, label):
    """The network's v in float64 for float64 z, as the diffusion feeds it (float32 in, float64 out)."""
    return net(z.float(), torch.full((z.shape[0],), float(label))).double()


def setup(weighting="snr+1", gamma=0.0, teacher_time_scale=1, time_labels="aligned"):
    teacher_net, student_net = TanhNet(0.7, 0.3), TanhNet(0.4, -0.2)
    teacher = GaussianDiffusionDefault(teacher_net, make_beta_schedule("cosine", TEACHER_STEPS),
                                       time_scale=teacher_time_scale, time_labels=time_labels,
                                       weighting=weighting, gamma=gamma)
    student = GaussianDiffusion(student_net, make_beta_schedule("cosine", TEACHER_STEPS // 2),
                                time_scale=2 * teacher_time_scale)
    g = torch.Generator().manual_seed(0)
    x = (SCALE * torch.randn(6, 2, 3, 3, generator=g)).double()
    eps = torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)
    return teacher, student, x, eps


def teacher_label(i, time_scale, time_labels):
    return i * time_scale if time_labels == "original" else (i + 1) * time_scale - 1


def by_hand(teacher_net, x, eps, t, clip, time_scale=1, time_labels="aligned"):
    """z at teacher index t+1, the two DDIM steps of the teacher to index t-1, and Algorithm 2's target:
    returns z, x_1, z_1, x_2, z_2 and x_tilde (one sample, step index t)."""
    a, s = tables(TEACHER_STEPS)
    z = a[t + 1] * x + s[t + 1] * eps
    x_1 = a[t + 1] * z - s[t + 1] * v_of(teacher_net, z, teacher_label(t + 1, time_scale, time_labels))
    if clip:
        x_1 = x_1.clamp(-1, 1)
    z_1 = a[t] * x_1 + s[t] / s[t + 1] * (z - a[t + 1] * x_1)
    x_2 = a[t] * z_1 - s[t] * v_of(teacher_net, z_1, teacher_label(t, time_scale, time_labels))
    if clip:
        x_2 = x_2.clamp(-1, 1)
    z_2 = a[t - 1] * x_2 + s[t - 1] / s[t] * (z_1 - a[t] * x_2)  # a[-1] = 1, s[-1] = 0: z_2 = x_2 at t = 0
    ratio = s[t - 1] / s[t + 1]
    x_tilde = (z_2 - ratio * z) / (a[t - 1] - ratio * a[t + 1])
    return z, x_1, z_1, x_2, z_2, x_tilde


def student_v(student_net, z, j, student_time_scale=2):
    return v_of(student_net, z, (j + 1) * student_time_scale - 1)  # the student's aligned label


@pytest.mark.parametrize("j", range(1, TEACHER_STEPS // 2))
def test_algorithm_2_target_by_hand_and_by_its_defining_property(j):
    teacher, _, x, eps = setup()
    t = 2 * j
    z, target = teacher.distill_target(x, torch.full((6,), t), {}, eps)
    hand_z, _, _, _, z_2, x_tilde = by_hand(teacher.net_, x, eps, t, clip=False)
    assert torch.allclose(z, hand_z, rtol=0, atol=1e-12)
    assert torch.allclose(target, x_tilde, rtol=1e-9, atol=1e-9)
    # One DDIM step of the student (N/2 steps; index j has the noise level of teacher index 2j + 1) from z
    # with x = x_tilde lands on the teacher's z''. The last index of each schedule is capped (beta 0.999),
    # so there the student's table differs from the teacher's: the check stops before it.
    if j < TEACHER_STEPS // 2 - 1:
        a, s = tables(TEACHER_STEPS // 2)
        landed = a[j - 1] * x_tilde + s[j - 1] / s[j] * (z - a[j] * x_tilde)
        assert torch.allclose(landed, z_2, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(target, by_hand(teacher.net_, x, eps, t, clip=False)[3], atol=1e-3)  # not x_2


def test_algorithm_2_target_at_j_0_is_the_second_x_prediction():
    teacher, _, x, eps = setup()
    _, target = teacher.distill_target(x, torch.zeros(6, dtype=torch.long), {}, eps)
    assert torch.allclose(target, by_hand(teacher.net_, x, eps, 0, clip=False)[3], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("teacher_time_scale,time_labels", [(1, "aligned"), (2, "original")])
def test_original_target_is_the_teachers_clipped_second_x_prediction(teacher_time_scale, time_labels):
    teacher, _, x, eps = setup("original", teacher_time_scale=teacher_time_scale, time_labels=time_labels)
    for t in range(0, TEACHER_STEPS, 2):
        z, target = teacher.original_distill_target(x, torch.full((6,), t), {}, eps)
        hand_z, x_1, _, x_2, _, _ = by_hand(teacher.net_, x, eps, t, clip=True, time_scale=teacher_time_scale,
                                             time_labels=time_labels)
        assert torch.allclose(z, hand_z, rtol=0, atol=1e-12)
        assert torch.allclose(target, x_2, rtol=1e-9, atol=1e-9), t
        assert target.abs().max() <= 1
    # The clipping acts in this set-up: unclipped, the first x-prediction leaves [-1, 1].
    assert by_hand(teacher.net_, x, eps, 2, clip=False)[1].abs().max() > 1.5


def student_x_and_v(student, z, j):
    a, s = tables(TEACHER_STEPS // 2)
    v = student_v(student.net_, z, j, student.time_scale)
    return a[j] * z - s[j] * v, v


@pytest.mark.parametrize("j", range(TEACHER_STEPS // 2))
def test_truncated_snr_weight_on_the_x_error(j):
    """Loss = max(alpha_j^2 / sigma_j^2, 1) * mean((x_student - x_tilde)^2), alpha and sigma of student index j."""
    teacher, student, x, eps = setup("truncated_snr")
    t = 2 * j
    losses = teacher.distill_loss(student, x.float(), torch.full((6,), t), {}, eps=eps, reduction="none")
    z, _, _, _, _, x_tilde = by_hand(teacher.net_, x.float().double(), eps, t, clip=False)
    x_student, _ = student_x_and_v(student, z, j)
    a, s = tables(TEACHER_STEPS // 2)
    snr = a[j] ** 2 / s[j] ** 2
    expected = max(snr, 1.0) * ((x_student - x_tilde) ** 2).flatten(1).mean(1)
    assert torch.allclose(losses.double(), expected, rtol=2e-5, atol=1e-7)


def test_truncated_snr_covers_both_sides_of_snr_1():
    """The per-index tests above see the max(SNR, 1) act: some student indices have SNR < 1, some > 1."""
    a, s = tables(TEACHER_STEPS // 2)
    snr = [a[j] ** 2 / s[j] ** 2 for j in range(TEACHER_STEPS // 2)]
    assert min(snr) < 0.5 and max(snr) > 10


@pytest.mark.parametrize("weighting", ["snr+1", "original"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0])
def test_gamma_is_the_original_weight_inside_the_mse(weighting, gamma):
    """The original's loss, written as it wrote it: eps_2 = (z - alpha_s x_2)/sigma_s,
    v_2 = alpha_s eps_2 - sigma_s x_2, w = (1 + alpha_s/sigma_s)^gamma, F.mse_loss(w v, w v_2) over the batch."""
    teacher, student, x, eps = setup(weighting, gamma)
    t = torch.arange(0, TEACHER_STEPS, 2).repeat(2)[:6]
    x32 = x.float()
    loss = teacher.distill_loss(student, x32, t, {}, eps=eps)
    a, s = tables(TEACHER_STEPS // 2)
    w_v, w_v_2 = [], []
    for b in range(6):
        ti, j = int(t[b]), int(t[b]) // 2
        z, _, _, x_2, _, x_tilde = by_hand(teacher.net_, x32[b:b + 1].double(), eps[b:b + 1], ti,
                                           clip=weighting == "original")
        target = x_2 if weighting == "original" else x_tilde
        eps_2 = (z - a[j] * target) / s[j]
        v_2 = a[j] * eps_2 - s[j] * target
        w = (1 + a[j] / s[j]) ** gamma
        w_v.append(w * student_v(student.net_, z, j))
        w_v_2.append(w * v_2)
    expected = F.mse_loss(torch.cat(w_v), torch.cat(w_v_2))
    assert loss.item() == pytest.approx(expected.item(), rel=2e-5)


def test_gamma_1_multiplies_the_squared_v_error_by_w_squared():
    """At one student index the gamma-1 loss is the unweighted one times w^2 = (1 + alpha/sigma)^2 (w = 5.8 at
    index 0 here: a weight of w alone would be off by that factor)."""
    losses = {}
    for gamma in (0.0, 1.0):
        teacher, student, x, eps = setup("snr+1", gamma)
        losses[gamma] = teacher.distill_loss(student, x.float(), torch.zeros(6, dtype=torch.long), {}, eps=eps,
                                             reduction="none")
    a, s = tables(TEACHER_STEPS // 2)
    assert torch.allclose(losses[1.0], losses[0.0] * (1 + a[0] / s[0]) ** 2, rtol=1e-5)


def test_gamma_is_refused_with_the_truncated_snr_weighting():
    with pytest.raises(ValueError, match="gamma"):
        setup("truncated_snr", gamma=1.0)
    with pytest.raises(ValueError, match="finite"):
        setup("snr+1", gamma=float("nan"))


def test_training_loss_is_the_v_error_by_hand():
    net = TanhNet(0.5, 0.1)
    diffusion = GaussianDiffusion(net, make_beta_schedule("cosine", TEACHER_STEPS))
    g = torch.Generator().manual_seed(1)
    x, noise = torch.randn(5, 2, 3, 3, generator=g), torch.randn(5, 2, 3, 3, generator=g)
    t = torch.tensor([0, 3, 7, 12, 15])
    losses = diffusion.p_loss(x, t, {}, noise=noise, reduction="none")
    a, s = tables(TEACHER_STEPS)
    for b, i in enumerate(t.tolist()):
        z = a[i] * x[b:b + 1].double() + s[i] * noise[b:b + 1].double()
        v = a[i] * noise[b:b + 1].double() - s[i] * x[b:b + 1].double()  # v = alpha eps - sigma x
        expected = ((v_of(net, z, i) - v) ** 2).mean()
        assert losses[b].item() == pytest.approx(expected.item(), rel=1e-5)


# -- mixed precision ---------------------------------------------------------------------------

def small_unet(seed):
    """A small UNet with PyTorch's default initialisation everywhere (the UNet starts its output layers
    near zero, which would make every loss here independent of the network)."""
    torch.manual_seed(seed)
    net = UNet(in_channel=3, channel=16, channel_multiplier=[1, 2], n_res_blocks=1, attn_strides=[4],
               attn_heads=1, use_affine_time=True, dropout=0.0).eval()
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.reset_parameters()
    return net


# bf16 keeps 8 significant bits (relative rounding 2^-9, 0.2%), fp16 11 bits (2^-12, 0.02%). Stated
# tolerances, relative to the float32 loss, per sample: 2% (bf16) and 0.3% (fp16), about ten roundings
# through the small UNet (measured: at most 0.5% and 0.03%).
AMP_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 3e-3}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_losses_match_float32(dtype):
    teacher = GaussianDiffusionDefault(small_unet(0), make_beta_schedule("cosine", TEACHER_STEPS))
    student = GaussianDiffusion(small_unet(1), make_beta_schedule("cosine", TEACHER_STEPS // 2), time_scale=2)
    base = GaussianDiffusion(small_unet(2), make_beta_schedule("cosine", TEACHER_STEPS))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 3, 8, 8, generator=g).clamp(-1, 1)
    eps = torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.arange(0, TEACHER_STEPS, 2)

    def losses():
        with torch.no_grad():
            return (teacher.distill_loss(student, x, t, {}, eps=eps, reduction="none"),
                    base.p_loss(x, t, {}, noise=eps.float(), reduction="none"))

    exact = losses()
    with torch.autocast("cpu", dtype=dtype):
        mixed = losses()
    for e, m in zip(exact, mixed):
        assert m.dtype == torch.float32 and torch.isfinite(m).all()
        assert ((m - e).abs() <= AMP_TOLERANCE[dtype] * e).all()
        assert not torch.equal(m, e)  # the network did run in lower precision
