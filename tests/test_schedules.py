"""Any teacher: the schedules against their closed forms, the eps/x/v conversions, Algorithm 2 for each
parameterisation on Gaussian data (whose ideal denoiser is known), the nested trailing grids of a 1000-step
model, and a 1000-step linear eps teacher distilled to one step through the scripts."""
import math
import os

import numpy as np
import pytest
import torch

import samplers
from checkpoints import checkpoint_grid
from diffusion import (PREDICTIONS, X_ERROR_WEIGHTINGS, alpha_sigma_tables, check_betas, distillation_target,
                       grid_indices, make_beta_schedule, model_grid, output_mse_weighting, output_weight, predict_start,
                       prediction_target, rescale_zero_terminal_snr, training_target, two_teacher_steps, x_error_weight)
from train_utils import Draws, distillation_loss, imitation_loss, training_loss

FAST = ["--num_workers", "0", "--device", "cpu", "--log_images", "0"]


# -- schedules ----------------------------------------------------------------------------------

def test_linear_schedule_is_ddpms():
    betas = make_beta_schedule("linear", 1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert float(betas[0]) == 1e-4 and abs(float(betas[-1]) - 0.02) < 1e-17
    for k in (1, 499, 500, 998):
        assert abs(float(betas[k]) - (1e-4 + k * (0.02 - 1e-4) / 999)) < 1e-17
    product = 1.0
    for beta in betas.tolist():
        product *= 1 - beta
    alpha_last = float(alpha_sigma_tables(betas)[0][-1])
    assert abs(alpha_last - math.sqrt(product)) < 1e-15
    assert 0.0063 < alpha_last < 0.0064  # the 157x amplification of eps errors at the last step: 1/alpha


def test_scaled_linear_schedule_is_linear_in_the_root_of_beta():
    betas = make_beta_schedule("scaled_linear", 1000, 0.00085, 0.012)
    root = betas.sqrt()
    assert abs(float(root[0]) - math.sqrt(0.00085)) < 1e-15 and abs(float(root[-1]) - math.sqrt(0.012)) < 1e-15
    steps = root[1:] - root[:-1]
    assert (steps - (math.sqrt(0.012) - math.sqrt(0.00085)) / 999).abs().max() < 1e-15
    assert (betas[1:] > betas[:-1]).all()  # not linear in beta: the differences grow
    assert float(betas[500] - betas[499]) > 1.5 * float(betas[1] - betas[0])


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_zero_terminal_snr_rescaling_is_lin_et_al_algorithm_1(schedule):
    betas = make_beta_schedule(schedule, 1000)
    rescaled = rescale_zero_terminal_snr(betas)
    product, roots = 1.0, []
    for beta in betas.tolist():  # sqrt(alphas_cumprod) by hand
        product *= 1 - beta
        roots.append(math.sqrt(product))
    first, last = roots[0], roots[-1]
    expected = [(r - last) * first / (first - last) for r in roots]
    got = alpha_sigma_tables(rescaled)[0]
    assert float(got[-1]) == 0.0 and float(rescaled[-1]) == 1.0  # zero SNR at the last step
    assert abs(float(got[0]) - first) < 1e-15  # the first level unchanged
    assert max(abs(g - e) for g, e in zip(got.tolist(), expected)) < 1e-12
    assert ((rescaled[:-1] > 0) & (rescaled[:-1] < 1)).all()


def test_bad_schedules_are_value_errors():
    with pytest.raises(ValueError, match="unknown beta schedule"):
        make_beta_schedule("quadratic", 10)
    for start, end in ((0.02, 0.01), (0.01, 0.01), (0.0, 0.02), (1e-4, 1.0)):
        with pytest.raises(ValueError, match="beta_start"):
            make_beta_schedule("linear", 10, start, end)
    for table in ([0.1, 1.5], [0.0, 0.1], [-0.1, 0.2], [[0.1, 0.2]], [], [0.1, float("nan")]):
        with pytest.raises(ValueError):
            check_betas(torch.tensor(table, dtype=torch.float64))
    assert check_betas([0.1, 0.2]).dtype == torch.float64


# -- the three parameterisations ------------------------------------------------------------------

def random_levels(generator, shape):
    alpha = torch.rand(shape[0], 1, 1, 1, generator=generator, dtype=torch.float64) * 0.98 + 0.01
    return alpha, (1 - alpha ** 2).sqrt()


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_conversions_between_eps_x_and_v_agree(prediction):
    g = torch.Generator().manual_seed(3)
    x, eps = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64), torch.randn(5, 2, 3, 3, generator=g,
                                                                                      dtype=torch.float64)
    alpha, sigma = random_levels(g, x.shape)
    z = alpha * x + sigma * eps
    target = prediction_target(prediction, z, x, alpha, sigma)
    assert torch.allclose(target, training_target(prediction, x, eps, alpha, sigma), atol=1e-12)
    assert torch.allclose(predict_start(prediction, z, target, alpha, sigma), x, atol=1e-12)
    # each target against the definitions eps, x and v = alpha eps - sigma x
    assert torch.allclose(target, {"eps": eps, "x": x, "v": alpha * eps - sigma * x}[prediction], atol=1e-12)
    # |x_hat - x|^2 = output_weight |out - target|^2 for any output
    out = target + torch.randn(x.shape, generator=g, dtype=torch.float64)
    x_error = (predict_start(prediction, z, out, alpha, sigma) - x) ** 2
    assert torch.allclose(x_error, output_weight(prediction, alpha, sigma) * (out - target) ** 2, rtol=1e-9)


def test_each_weighting_is_the_mse_of_its_own_output():
    """snr+1 is the MSE of v, snr the MSE of eps, constant the MSE of x (the weight times output_weight is 1);
    truncated_snr is max(SNR, 1)."""
    g = torch.Generator().manual_seed(4)
    alpha, sigma = random_levels(g, (200,))
    for weighting, prediction in (("snr+1", "v"), ("snr", "eps"), ("constant", "x")):
        product = x_error_weight(weighting, alpha, sigma) * output_weight(prediction, alpha, sigma)
        assert (product - 1).abs().max() < 1e-12, weighting
    snr = alpha ** 2 / sigma ** 2
    assert torch.allclose(x_error_weight("truncated_snr", alpha, sigma), torch.maximum(snr, torch.ones_like(snr)),
                          rtol=1e-12)
    assert set(X_ERROR_WEIGHTINGS) == {"snr+1", "snr", "truncated_snr", "constant"}


# -- Algorithm 2 for every parameterisation, on Gaussian data -----------------------------------------

SCALE = 0.6  # data x ~ N(0, SCALE^2)


def ideal_x(z, alpha, sigma):
    return alpha * SCALE ** 2 / (alpha ** 2 * SCALE ** 2 + sigma ** 2) * z


class GaussianNetwork(torch.nn.Module):
    """The exact network of a `prediction` on a base table: reads its level from the label (a base index)."""

    def __init__(self, betas, prediction, target_x=None):
        super().__init__()
        self.alphas, self.sigmas = alpha_sigma_tables(betas)
        self.prediction, self.target_x = prediction, target_x or ideal_x

    def forward(self, z, label):
        i = label.round().long()
        alpha, sigma = self.alphas[i].reshape(-1, 1, 1, 1), self.sigmas[i].reshape(-1, 1, 1, 1)
        z = z.double()
        return prediction_target(self.prediction, z, self.target_x(z, alpha, sigma), alpha, sigma)


def trailing(n, points):
    """Base indices of the trailing grid of `points` of n steps, noisiest first: round((j+1) n/points) - 1
    (halves rounded up), from exact rationals."""
    return [int(math.floor((j + 1) * n / points + 0.5)) - 1 for j in range(points - 1, -1, -1)]


@pytest.mark.parametrize("n", [1000, 1024])
def test_halving_a_trailing_grid_gives_the_trailing_grid_of_half_the_size(n):
    full = model_grid(make_beta_schedule("linear", n))
    points = 1 << (n.bit_length() - 1)
    while points >= 2:
        chosen = samplers.select_steps(full, points, "time")
        assert chosen == trailing(n, points)
        assert chosen[0::2] == trailing(n, points // 2) == samplers.select_steps(full, points // 2, "time")
        points //= 2
    assert trailing(n, 1) == [n - 1]


def cosine_alphas_cumprod(t, s=0.008):
    """Nichol & Dhariwal's alpha-bar(t) = f(t)/f(0), f(t) = cos^2((t + s)/(1 + s) pi/2), in closed form."""
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return f(t) / f(0)


def test_cosine_spacing_takes_the_nearest_log_snr_of_the_cosine_levels_and_nests():
    """On DDPM's linear schedule (alpha-bar as the product of 1 - beta, beta from 1e-4 to 0.02 in closed form): the
    P points of --halving_grid cosine are N-1 and, at times j/P, the index whose log-SNR is nearest the cosine
    schedule's; every other point of P is the grid of P/2, down to one step, while no two cosine levels fall on one
    index (P <= 128 of 1000; at 512 the noisiest levels crowd and move to free indices); on a cosine model of
    1024 steps the spacing is the trailing one."""
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    log_snr, product = [], 1.0
    for beta in betas:
        product *= 1 - beta
        log_snr.append(math.log(product / (1 - product)))
    full = model_grid(make_beta_schedule("linear", 1000))
    for points in (2, 4, 8, 16):
        expected = [999] + [min(range(1000), key=lambda i: abs(log_snr[i] - math.log(a / (1 - a))))
                            for a in (cosine_alphas_cumprod(j / points) for j in range(points - 1, 0, -1))]
        assert samplers.select_steps(full, points, "cosine") == expected, points
    assert samplers.select_steps(full, 4, "cosine") == [999, 435, 260, 124]  # as the docstring and README say
    assert samplers.select_steps(full, 4, "time") == [999, 749, 499, 249]
    alphas_cumprod = [math.exp(-math.log1p(math.exp(-value))) for value in log_snr]  # sigmoid(log-SNR)
    assert [round(math.sqrt(1 - alphas_cumprod[i]), 2) for i in (124, 249)] == [0.39, 0.69]  # the last steps' sigma
    assert round(math.sqrt(1 - cosine_alphas_cumprod(1 / 4)), 2) == 0.39  # the cosine 4-step student's last sigma
    for points in (512, 256):
        chosen = samplers.select_steps(full, points, "cosine")
        assert len(set(chosen)) == points and chosen == sorted(chosen, reverse=True)
    points = 128
    while points >= 2:
        chosen = samplers.select_steps(full, points, "cosine")
        assert chosen[0::2] == samplers.select_steps(full, points // 2, "cosine"), points
        points //= 2
    assert samplers.select_steps(full, 1, "cosine") == [999]
    cosine = model_grid(make_beta_schedule("cosine", 1024))
    for points in (1, 2, 4, 64, 512):
        assert samplers.select_steps(cosine, points, "cosine") == trailing(1024, points)


def test_a_schedule_grid_record_gives_the_base_levels_and_labels():
    betas = make_beta_schedule("linear", 1000)
    alpha, sigma = alpha_sigma_tables(betas)
    indices = trailing(1000, 8)
    grid = checkpoint_grid({"n_timesteps": 8, "time_scale": 125.0, "noise_levels": "schedule_grid", "grid": indices,
                            "schedule": {"name": "linear", "betas": betas}})
    assert grid.labels.tolist() == [float(i) for i in indices]
    assert torch.equal(grid.alphas[:-1], alpha[indices]) and torch.equal(grid.sigmas[:-1], sigma[indices])
    coarse = checkpoint_grid({"n_timesteps": 8, "time_scale": 125.0, "noise_levels": "schedule_grid",
                              "grid": indices, "schedule": {"name": "linear", "betas": betas}}, coarsen=2)
    assert coarse.labels.tolist() == [float(i) for i in trailing(1000, 4)]


def teacher_x_of(network, grid, position):
    def teacher_x(z_k, k):
        label = grid.label(position + k, z_k)
        return predict_start(network.prediction, z_k, network(z_k, label), *grid.level(position + k, z_k))
    return teacher_x


@pytest.mark.parametrize("teacher_prediction", ["eps", "x"])
def test_algorithm_2_target_of_a_teacher_does_not_depend_on_what_it_predicts(teacher_prediction):
    betas = make_beta_schedule("linear", 1000)
    full = model_grid(betas)
    grid = full.take(grid_indices(1000, trailing(1000, 16)))
    z = 2 * torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for position in (0, 5, 14):  # the noisiest point, a middle one, the one whose second step is into clean data
        levels = [grid.level(position + k, z) for k in range(3)]
        targets = [distillation_target(z, two_teacher_steps(teacher_x_of(GaussianNetwork(betas, p), grid, position),
                                                            z, levels)[0], levels) for p in (teacher_prediction, "v")]
        assert (targets[0] - targets[1]).abs().max() < 1e-9, position


def two_step_x(z, grid, position):
    """x~ of Algorithm 2 for the exact teacher, by hand: it is linear in z, x_hat = c z at each level."""
    (a_t, s_t), (a_1, s_1), (a_2, s_2) = [tuple(float(v[position + k]) for v in (grid.alphas, grid.sigmas))
                                          for k in range(3)]
    c_t = a_t * SCALE ** 2 / (a_t ** 2 * SCALE ** 2 + s_t ** 2)
    c_1 = a_1 * SCALE ** 2 / (a_1 ** 2 * SCALE ** 2 + s_1 ** 2)
    z_1 = a_1 * c_t + s_1 / s_t * (1 - a_t * c_t)  # per unit of z
    z_2 = (a_2 * c_1 + s_2 / s_1 * (1 - a_1 * c_1)) * z_1
    r = s_2 / s_t
    return (z_2 - r) / (a_2 - r * a_t) * z


class TwoStepStudent(torch.nn.Module):
    """Outputs, in its parameterisation, the Algorithm 2 target x~ computed by hand (two_step_x) at the teacher
    point whose label it receives (its own levels are the teacher's at those points)."""

    def __init__(self, betas, prediction, teacher_grid):
        super().__init__()
        self.alphas, self.sigmas = alpha_sigma_tables(betas)
        self.prediction, self.teacher_grid = prediction, teacher_grid
        self.position = {int(label): p for p, label in enumerate(teacher_grid.labels.tolist())}

    def forward(self, z, label):
        z = z.double()
        rows = [two_step_x(z[r:r + 1], self.teacher_grid, self.position[int(round(float(l)))])
                for r, l in enumerate(label)]
        i = label.round().long()
        alpha, sigma = self.alphas[i].reshape(-1, 1, 1, 1), self.sigmas[i].reshape(-1, 1, 1, 1)
        return prediction_target(self.prediction, z, torch.cat(rows), alpha, sigma)


@pytest.mark.parametrize("teacher_prediction", PREDICTIONS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_the_two_step_teacher_as_a_student_has_zero_loss_for_every_parameterisation(teacher_prediction, prediction):
    """A 1000-step linear teacher on its trailing grid of 16 points, a student on every other one: the
    student that outputs the Algorithm 2 target (computed by hand) in its own parameterisation has zero loss;
    the one-step ideal denoiser does not."""
    betas = make_beta_schedule("linear", 1000)
    teacher_grid = model_grid(betas).take(grid_indices(1000, trailing(1000, 16)))
    student_grid = model_grid(betas).take(grid_indices(1000, trailing(1000, 8)))
    assert student_grid.labels.tolist() == teacher_grid.labels[0::2].tolist()
    teacher = GaussianNetwork(betas, teacher_prediction)
    g = torch.Generator().manual_seed(6)
    x = SCALE * torch.randn(64, 1, 2, 2, generator=g)
    draws = Draws(torch.arange(8).repeat(8), torch.randn(64, 1, 2, 2, generator=g, dtype=torch.float64))
    losses = {name: distillation_loss(student, x, draws, {}, teacher=teacher, teacher_grid=teacher_grid,
                                      student_grid=student_grid, teacher_prediction=teacher_prediction,
                                      prediction=prediction)
              for name, student in (("paper", TwoStepStudent(betas, prediction, teacher_grid)),
                                    ("one step", GaussianNetwork(betas, prediction)))}
    assert losses["paper"].max() < 1e-8, (float(losses["paper"].max()), prediction, teacher_prediction)
    assert losses["one step"].mean() > 1e-4


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_base_loss_is_the_mse_of_the_output_and_a_change_of_prediction_keeps_the_network(prediction):
    """training_loss with each prediction's own weighting (output_mse_weighting) is the plain MSE of
    the output: a network off its target by 0.1 everywhere has loss 0.01 at every level. imitation_loss of the
    exact network of one prediction against the exact network of another is 0."""
    betas = make_beta_schedule("linear", 1000)
    grid = model_grid(betas)
    alpha, sigma = alpha_sigma_tables(betas)
    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, 1000, (64,), generator=g)
    x = SCALE * torch.randn(64, 1, 2, 2, generator=g)
    eps = torch.randn(x.shape, generator=g)
    a, s = alpha[t].reshape(-1, 1, 1, 1), sigma[t].reshape(-1, 1, 1, 1)
    off = lambda z, label: training_target(prediction, x.double(), eps.double(), a, s) + 0.1
    weighting = output_mse_weighting(prediction)
    loss = training_loss(off, x, Draws(t, eps), {}, grid=grid, prediction=prediction, weighting=weighting)
    assert (loss - 0.01).abs().max() < 1e-6
    other = training_loss(off, x, Draws(t, eps), {}, grid=grid, prediction=prediction, weighting="truncated_snr")
    by_hand = (x_error_weight("truncated_snr", a, s) * output_weight(prediction, a, s)).flatten() * 0.01
    assert torch.allclose(other, by_hand.float(), rtol=1e-5)
    for teacher_prediction in PREDICTIONS:
        imitation = imitation_loss(GaussianNetwork(betas, prediction), x, Draws(t, eps), {},
                                   teacher=GaussianNetwork(betas, teacher_prediction), grid=grid,
                                   teacher_prediction=teacher_prediction, prediction=prediction)
        assert imitation.max() < 1e-6, (teacher_prediction, prediction, float(imitation.max()))


def test_a_change_of_prediction_weighted_snr_is_the_mse_of_eps():
    """imitation_loss of a v student against an eps teacher, weighted "snr", is the MSE between the teacher's eps
    and the eps the student's v implies (eps = sigma z + alpha v), recomputed here; "snr+1" is the MSE of v."""
    betas = make_beta_schedule("linear", 1000)
    grid = model_grid(betas)
    alpha, sigma = alpha_sigma_tables(betas)
    g = torch.Generator().manual_seed(8)
    t = torch.randint(0, 1000, (64,), generator=g)
    x = SCALE * torch.randn(64, 1, 2, 2, generator=g)
    eps = torch.randn(x.shape, generator=g)
    a, s = alpha[t].reshape(-1, 1, 1, 1), sigma[t].reshape(-1, 1, 1, 1)
    z = (a * x + s * eps).float()
    teacher = GaussianNetwork(betas, "eps")
    off = torch.linspace(-0.2, 0.3, 4).reshape(1, 1, 2, 2)
    student = lambda z_, label: GaussianNetwork(betas, "v")(z_, label) + off
    teacher_eps = teacher(z, grid.label(999 - t, x)).double()
    student_eps = s * z.double() + a * student(z, grid.label(999 - t, x)).double()
    by_hand = {"snr": ((student_eps - teacher_eps) ** 2).flatten(1).mean(1), "snr+1": (off.double() ** 2).mean().expand(64)}
    for weighting, expected in by_hand.items():
        loss = imitation_loss(student, x, Draws(t, eps), {}, teacher=teacher, grid=grid, teacher_prediction="eps",
                              prediction="v", weighting=weighting)
        assert torch.allclose(loss.double(), expected, rtol=1e-3, atol=1e-8), weighting


# -- through the scripts ------------------------------------------------------------------------------

def record(path):
    return torch.load(path, weights_only=True)


def test_a_1000_step_linear_eps_teacher_distils_to_one_step_through_the_scripts(run, tmp_path):
    run("train.py", "--module", "toy_u", "--name", "eps", "--dname", "teacher", "--schedule", "linear",
        "--prediction", "eps", "--num_timesteps", 1000, "--num_iters", 3, "--batch_size", 8, *FAST)
    teacher = record(tmp_path / "checkpoints/eps/teacher/checkpoint.pt")
    assert teacher["prediction"] == "eps" and teacher["schedule"]["name"] == "linear"
    assert torch.equal(teacher["schedule"]["betas"], make_beta_schedule("linear", 1000))
    assert teacher["noise_levels"] == "schedule_grid" and teacher["grid"] == list(range(999, -1, -1))
    out = run("distillate.py", "--module", "toy_u", "--name", "eps", "--dname", "base", "--num_stages", 9,
              "--base_checkpoint", "checkpoints/eps/teacher/checkpoint.pt", "--num_iters", 2, "--batch_size", 8,
              *FAST).stdout
    assert "sampled on 512 of them" in out
    reparameterised = record(tmp_path / "checkpoints/eps/base_v/checkpoint.pt")
    assert reparameterised["prediction"] == "v" and reparameterised["grid"] == teacher["grid"]
    assert reparameterised["stage"] == "prediction"
    # --halving_grid cosine (the default): the cosine levels of 512 points, then every other one of the teacher's
    levels = samplers.select_steps(model_grid(make_beta_schedule("linear", 1000)), 512, "cosine")
    for k in range(9):
        student = record(tmp_path / f"checkpoints/eps/base_{k}/checkpoint.pt")
        points = 256 >> k
        levels = levels[0::2]
        assert student["grid"] == levels, k
        assert (student["n_timesteps"], student["prediction"], student["noise_levels"]) == (points, "v", "schedule_grid")
        assert torch.equal(student["schedule"]["betas"], teacher["schedule"]["betas"])
        assert student["time_scale"] == 1000 / points
    run("sample.py", "--module", "toy_u", "--checkpoint", "checkpoints/eps/base_8/checkpoint.pt", "--num_images", 6,
        "--out_npz", "one.npz", "--float_samples", "True", "--device", "cpu")
    samples = np.load(tmp_path / "one.npz")["samples"]
    assert samples.shape == (6, 2, 1, 1) and np.isfinite(samples).all()
    assert [record(tmp_path / f"checkpoints/eps/base_{k}/checkpoint.pt")["grid"] for k in (6, 7, 8)] == \
        [[999, 435, 260, 127], [999, 260], [999]]  # from 512 points, whose least noisy levels crowd up from 0
    # the teacher itself samples on any trailing subset of its 1000 steps
    run("sample.py", "--module", "toy_u", "--checkpoint", "checkpoints/eps/teacher/checkpoint.pt", "--steps", 10,
        "--num_images", 4, "--out_npz", "ten.npz", "--float_samples", "True", "--device", "cpu")
    # --num_stages 0: only the change of prediction, into <dname>
    run("distillate.py", "--module", "toy_u", "--name", "eps", "--dname", "copy", "--num_stages", 0,
        "--base_checkpoint", "checkpoints/eps/teacher/checkpoint.pt", "--num_iters", 2, "--batch_size", 8, *FAST)
    copy = record(tmp_path / "checkpoints/eps/copy/checkpoint.pt")
    assert (copy["stage"], copy["prediction"], copy["grid"]) == ("prediction", "v", teacher["grid"])
    assert not os.path.exists(tmp_path / "checkpoints/eps/copy_0")
    # --teacher_steps 64 --halving_grid trailing: the first halving distils the v copy's DDIM on the trailing 64
    # of its 1000 levels
    out = run("distillate.py", "--module", "toy_u", "--name", "eps", "--dname", "short", "--num_stages", 2,
              "--base_checkpoint", "checkpoints/eps/teacher/checkpoint.pt", "--num_iters", 2, "--batch_size", 8,
              "--teacher_steps", 64, "--halving_grid", "trailing", *FAST).stdout
    assert "sampled on 64 of them" in out
    for k, points in enumerate((32, 16)):
        student = record(tmp_path / f"checkpoints/eps/short_{k}/checkpoint.pt")
        assert student["grid"] == trailing(1000, points) and student["n_timesteps"] == points, k
    refused = run("export_checkpoint.py", "checkpoints/eps/base_3/checkpoint.pt", "exported", "--for_original", "True",
                  "--module", "toy_u", check=False)
    assert refused.returncode == 2 and "original's sample.py" in refused.stderr
    assert not os.path.exists(tmp_path / "exported")
