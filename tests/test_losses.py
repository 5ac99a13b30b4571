"""The losses of train_utils against hand computations: every expected value here is computed in this file
from the schedule tables and the networks' outputs, without diffusion.py's formulas.

- Algorithm 2 of Salimans & Ho: two deterministic DDIM steps of the teacher, then the closed-form x for
  which one student step lands on the same point (checked by hand and by that defining property); a
  student that outputs the v of that target has zero loss;
- the truncated-SNR weighting max(SNR, 1) on the x error;
- the original implementation's loss: its clipped second x-prediction as target, and its --gamma
  weight inside the MSE, F.mse_loss(w * v_student, w * v_target) with w = (1 + alpha/sigma)^gamma;
- the base model's v-MSE;
- bf16/fp16 autocast against float32.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffusion import make_beta_schedule, model_grid
from train_utils import Draws, distillation_loss, training_loss
from unet import UNet

TEACHER_STEPS = 16
SCALE = 3.0  # the data's scale: x-predictions leave [-1, 1], so the original's clipping acts
BATCH = 6


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


class FixedV(nn.Module):
    """A student that outputs a given v whatever its input (and records its inputs)."""

    def __init__(self, v):
        super().__init__()
        self.v, self.inputs = v, []

    def forward(self, z, label):
        self.inputs.append((z.clone(), label.clone()))
        return self.v.float()


def v_of(net, z, label):
    """The network's v in float64 for float64 z, as the loss feeds it (float32 in, float64 out)."""
    return net(z.float(), torch.full((z.shape[0],), float(label))).double()


def setup():
    teacher_net, student_net = TanhNet(0.7, 0.3), TanhNet(0.4, -0.2)
    g = torch.Generator().manual_seed(0)
    x = (SCALE * torch.randn(BATCH, 2, 3, 3, generator=g)).double()
    eps = torch.randn(BATCH, 2, 3, 3, generator=g, dtype=torch.float64)
    return teacher_net, student_net, x, eps


def distill(student, teacher, x, j, eps, weighting="snr+1", gamma=0.0, teacher_time_scale=1, time_labels="aligned"):
    """Per-sample losses of distillation_loss at student indices j (an int for the batch, or one per image)."""
    teacher_grid = model_grid(make_beta_schedule("cosine", TEACHER_STEPS), teacher_time_scale, time_labels)
    student_grid = model_grid(make_beta_schedule("cosine", TEACHER_STEPS // 2), 2 * teacher_time_scale)
    t = torch.full((x.shape[0],), j) if isinstance(j, int) else j
    return distillation_loss(student, x, Draws(t, eps), {}, teacher=teacher, teacher_grid=teacher_grid,
                             student_grid=student_grid, weighting=weighting, gamma=gamma)


def teacher_label(i, time_scale, time_labels):
    return i * time_scale if time_labels == "original" else (i + 1) * time_scale - 1


def by_hand(teacher_net, x, eps, t, clip, time_scale=1, time_labels="aligned"):
    """z at teacher index t+1, the two DDIM steps of the teacher to index t-1, and Algorithm 2's target:
    returns z, x_1, z_1, x_2, z_2 and x_tilde (step index t = 2j of the student's j)."""
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


def v_for_target(z, target, j):
    """The v whose x prediction at student index j is `target`: x = alpha z - sigma v."""
    a, s = tables(TEACHER_STEPS // 2)
    return (a[j] * z - target) / s[j]


def rounding_bound(v):
    """Per-sample bound on the loss of a student equal to the target up to float32 rounding: both sides are
    rounded to float32 (each within half an ulp, 2^-24 |v|), so they differ by at most 2^-23 |v| per element."""
    return ((2 ** -23 * v.abs()) ** 2).flatten(1).mean(1)


def assert_zero_loss_student(teacher_net, x, eps, j, target, hand_z, **options):
    v = v_for_target(hand_z, target, j)
    student = FixedV(v)
    losses = distill(student, teacher_net, x, j, eps, **options)
    [(z_seen, label_seen)] = student.inputs
    assert torch.allclose(z_seen, hand_z.float(), rtol=0, atol=1e-6)  # z at teacher index 2j+1
    assert torch.equal(label_seen, torch.full((BATCH,), float(2 * j + 1)))  # the student's aligned label (j+1)2-1
    assert losses.shape == (BATCH,) and (losses <= rounding_bound(v)).all()


@pytest.mark.parametrize("j", range(TEACHER_STEPS // 2))
def test_algorithm_2_target_by_hand_and_by_its_defining_property(j):
    teacher_net, _, x, eps = setup()
    t = 2 * j
    hand_z, _, _, x_2, z_2, x_tilde = by_hand(teacher_net, x, eps, t, clip=False)
    # One DDIM step of the student (N/2 steps; index j has the noise level of teacher index 2j + 1) from z
    # with x = x_tilde lands on the teacher's z''. The last index of each schedule is capped (beta 0.999),
    # so there the student's table differs from the teacher's: the check stops before it.
    if 0 < j < TEACHER_STEPS // 2 - 1:
        a, s = tables(TEACHER_STEPS // 2)
        landed = a[j - 1] * x_tilde + s[j - 1] / s[j] * (hand_z - a[j] * x_tilde)
        assert torch.allclose(landed, z_2, rtol=1e-9, atol=1e-9)
    if j == 0:  # into clean data the target is the second x prediction
        assert torch.allclose(x_tilde, x_2, rtol=1e-12, atol=1e-12)
    else:
        assert not torch.allclose(x_tilde, x_2, atol=1e-3)
    # the student whose x prediction is x_tilde has zero loss; one predicting x_2 (for j > 0) does not
    assert_zero_loss_student(teacher_net, x, eps, j, x_tilde, hand_z)
    if j > 0:
        wrong = distill(FixedV(v_for_target(hand_z, x_2, j)), teacher_net, x, j, eps)
        assert (wrong > 1e-4).all()


@pytest.mark.parametrize("teacher_time_scale,time_labels", [(1, "aligned"), (2, "original")])
def test_original_target_is_the_teachers_clipped_second_x_prediction(teacher_time_scale, time_labels):
    teacher_net, _, x, eps = setup()
    for j in range(TEACHER_STEPS // 2):
        hand_z, _, _, x_2, _, _ = by_hand(teacher_net, x, eps, 2 * j, clip=True, time_scale=teacher_time_scale,
                                          time_labels=time_labels)
        assert x_2.abs().max() <= 1
        v = v_for_target(hand_z, x_2, j)
        student = FixedV(v)
        losses = distill(student, teacher_net, x, j, eps, weighting="original", teacher_time_scale=teacher_time_scale,
                         time_labels=time_labels)
        [(z_seen, label_seen)] = student.inputs
        assert torch.allclose(z_seen, hand_z.float(), rtol=0, atol=1e-6)
        assert torch.equal(label_seen, torch.full((BATCH,), float((j + 1) * 2 * teacher_time_scale - 1)))
        assert (losses <= rounding_bound(v)).all(), j
    # The clipping acts in this set-up: unclipped, the first x-prediction leaves [-1, 1].
    assert by_hand(teacher_net, x, eps, 2, clip=False)[1].abs().max() > 1.5


def student_x_and_v(student_net, z, j):
    a, s = tables(TEACHER_STEPS // 2)
    v = student_v(student_net, z, j)
    return a[j] * z - s[j] * v, v


@pytest.mark.parametrize("j", range(TEACHER_STEPS // 2))
def test_truncated_snr_weight_on_the_x_error(j):
    """Loss = max(alpha_j^2 / sigma_j^2, 1) * mean((x_student - x_tilde)^2), alpha and sigma of student index j."""
    teacher_net, student_net, x, eps = setup()
    losses = distill(student_net, teacher_net, x, j, eps, weighting="truncated_snr")
    z, _, _, _, _, x_tilde = by_hand(teacher_net, x, eps, 2 * j, clip=False)
    x_student, _ = student_x_and_v(student_net, z, j)
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
    teacher_net, student_net, x, eps = setup()
    j = torch.arange(TEACHER_STEPS // 2).repeat(2)[:BATCH]
    loss = distill(student_net, teacher_net, x, j, eps, weighting=weighting, gamma=gamma).mean()
    a, s = tables(TEACHER_STEPS // 2)
    w_v, w_v_2 = [], []
    for b in range(BATCH):
        jb = int(j[b])
        z, _, _, x_2, _, x_tilde = by_hand(teacher_net, x[b:b + 1], eps[b:b + 1], 2 * jb,
                                           clip=weighting == "original")
        target = x_2 if weighting == "original" else x_tilde
        eps_2 = (z - a[jb] * target) / s[jb]
        v_2 = a[jb] * eps_2 - s[jb] * target
        w = (1 + a[jb] / s[jb]) ** gamma
        w_v.append(w * student_v(student_net, z, jb))
        w_v_2.append(w * v_2)
    expected = F.mse_loss(torch.cat(w_v), torch.cat(w_v_2))
    assert loss.item() == pytest.approx(expected.item(), rel=2e-5)


def test_gamma_1_multiplies_the_squared_v_error_by_w_squared():
    """At one student index the gamma-1 loss is the unweighted one times w^2 = (1 + alpha/sigma)^2 (w = 5.8 at
    index 0 here: a weight of w alone would be off by that factor)."""
    teacher_net, student_net, x, eps = setup()
    losses = {gamma: distill(student_net, teacher_net, x, 0, eps, gamma=gamma) for gamma in (0.0, 1.0)}
    a, s = tables(TEACHER_STEPS // 2)
    assert (1 + a[0] / s[0]) > 5
    assert torch.allclose(losses[1.0], losses[0.0] * (1 + a[0] / s[0]) ** 2, rtol=1e-5)


def test_training_loss_is_the_v_error_by_hand():
    net = TanhNet(0.5, 0.1)
    grid = model_grid(make_beta_schedule("cosine", TEACHER_STEPS))
    g = torch.Generator().manual_seed(1)
    x, noise = torch.randn(5, 2, 3, 3, generator=g), torch.randn(5, 2, 3, 3, generator=g)
    t = torch.tensor([0, 3, 7, 12, 15])
    losses = training_loss(net, x, Draws(t, noise), {}, grid=grid)
    assert torch.equal(net.labels[0], t.float())  # at time scale 1 the label is the step index
    a, s = tables(TEACHER_STEPS)
    assert losses.shape == (5,)
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
    teacher, student, base = small_unet(0), small_unet(1), small_unet(2)
    teacher_grid = model_grid(make_beta_schedule("cosine", TEACHER_STEPS))
    student_grid = model_grid(make_beta_schedule("cosine", TEACHER_STEPS // 2), 2)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 3, 8, 8, generator=g).clamp(-1, 1)
    eps = torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64)
    j = torch.arange(TEACHER_STEPS // 2)

    def losses():
        with torch.no_grad():
            return (distillation_loss(student, x, Draws(j, eps), {}, teacher=teacher, teacher_grid=teacher_grid,
                                      student_grid=student_grid),
                    training_loss(base, x, Draws(2 * j, eps.float()), {}, grid=teacher_grid))

    exact = losses()
    with torch.autocast("cpu", dtype=dtype):
        mixed = losses()
    for e, m in zip(exact, mixed):
        assert m.dtype == torch.float32 and torch.isfinite(m).all()
        assert ((m - e).abs() <= AMP_TOLERANCE[dtype] * e).all()
        assert not torch.equal(m, e)  # the network did run in lower precision
