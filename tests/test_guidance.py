"""Class conditioning, classifier-free guidance and guidance distillation (SPEC "Conditioning and
classifier-free guidance"): the CFG combination, the zero-initialised guidance-weight input, stage one's
loss against a closed-form Gaussian teacher, label dropout, the unconditional layout, the chain through
the scripts on a tiny conditional module (tests/cond_toy_u.py), and the user mistakes."""
import json
import os

import pytest
import torch

import cond_toy_u
import distillate
import sample
import samplers
import toy_u
import train
from diffusion import alpha_sigma_tables, make_beta_schedule, model_grid
from guidance import ClassifierFreeGuidance, calls_per_step, cfg_calls
from sample_utils import nfe
from train_utils import conditioned, draw_step, imitation_loss
from unet import UNet
from user_modules import guided_network, load_model_from_checkpoint, make_guidance_student

FAST = ["--num_workers", "0", "--device", "cpu"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the tiny networks here run faster on one thread than on two busy ones
K = cond_toy_u.NUM_CLASSES


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomised(model, seed=0):
    """The model with every parameter redrawn from N(0, 0.3^2): every layer (the zero-initialised
    output convolution included) then acts, so outputs differ visibly between inputs and labels."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def toy_inputs(batch=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn([batch] + cond_toy_u.IMAGE_SIZE[1:], generator=g)
    t = torch.randint(0, 16, (batch,), generator=g).float()
    y = torch.tensor([0, 1, 2, K, 1, 0][:batch])
    return x, t, y


# -- classifier-free guidance ------------------------------------------------------------------

class Recording(torch.nn.Module):
    """The wrapped network, recording the batch size and the labels of each call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, t, y=None):
        self.calls.append((x.shape[0], None if y is None else y.clone()))
        return self.net(x, t, y=y)


def test_cfg_is_the_guided_combination_of_two_separate_calls_made_as_one_batched_call():
    net = Recording(randomised(cond_toy_u.make_model()))
    x, t, y = toy_inputs()
    null = torch.full_like(y, K)
    w = torch.tensor([0.0, 0.5, 1.0, 2.0, 4.0, 7.5])
    with torch.no_grad():
        guided = ClassifierFreeGuidance(net, K)(x, t, y=y, w=w)
        [(batch, labels)] = net.calls  # both halves in one call
        assert batch == 2 * len(x) and torch.equal(labels, torch.cat([y, null]))
        v_cond, v_uncond = net(x, t, y=y), net(x, t, y=null)
        scalar = ClassifierFreeGuidance(net, K)(x, t, y=y, w=3.0)
    assert (v_cond - v_uncond).abs().max() > 1e-2  # the labels matter, so the test can fail
    expected = (1 + w.reshape(-1, 1, 1, 1)) * v_cond - w.reshape(-1, 1, 1, 1) * v_uncond
    assert torch.allclose(guided, expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(scalar, 4 * v_cond - 3 * v_uncond, atol=1e-5, rtol=1e-5)
    assert torch.allclose(guided[0], v_cond[0], atol=1e-6)  # w = 0: plain conditional
    # guiding v guides eps = sigma z + alpha v (and x = alpha z - sigma v) by the same formula
    alpha, sigma = 0.6, 0.8
    eps = (sigma * x + alpha * guided).double()
    eps_cond, eps_uncond = sigma * x + alpha * v_cond, sigma * x + alpha * v_uncond
    w4 = w.reshape(-1, 1, 1, 1)
    assert torch.allclose(eps, ((1 + w4) * eps_cond - w4 * eps_uncond).double(), atol=1e-5)


@pytest.mark.parametrize("w", [0, 0.0, None])
def test_cfg_at_w_0_makes_one_conditional_call_and_returns_its_output(w):
    """w None or the number 0: the guided v is the conditional one, from one call of batch B with the labels."""
    net = Recording(randomised(cond_toy_u.make_model()))
    x, t, y = toy_inputs()
    cfg = ClassifierFreeGuidance(net, K)
    with torch.no_grad():
        out = cfg(x, t, y=y, w=w)
        [(batch, labels)] = net.calls
        assert batch == len(x) and torch.equal(labels, y)
        assert torch.equal(out, net(x, t, y=y))  # exactly the conditional output
        assert not torch.allclose(out, net(x, t, y=torch.full_like(y, K)), atol=1e-3)
        net.calls.clear()
        cfg(x, t, w=w)  # no labels: the null label, still one call
        [(batch, labels)] = net.calls
        assert batch == len(x) and (labels == K).all()
    assert cfg_calls(w) == 1 and calls_per_step(cfg, w) == 1


@pytest.mark.parametrize("w", [1.5, -0.5, torch.zeros(6), torch.tensor([0.0, 1.0, 2.0, 0.0, 3.0, 1.0])])
def test_cfg_at_any_other_w_makes_one_call_of_twice_the_batch(w):
    """w a non-zero number or any tensor (even of zeros): one batched call of 2B, labels then null labels."""
    net = Recording(randomised(cond_toy_u.make_model()))
    x, t, y = toy_inputs()
    cfg = ClassifierFreeGuidance(net, K)
    with torch.no_grad():
        cfg(x, t, y=y, w=w)
    [(batch, labels)] = net.calls
    assert batch == 2 * len(x) and torch.equal(labels, torch.cat([y, torch.full_like(y, K)]))
    assert cfg_calls(w) == 2 and calls_per_step(cfg, w) == 2


@pytest.mark.parametrize("w", [0.0, 2.0])
def test_nfe_counts_the_images_a_sampler_sends_through_the_network(w):
    """Over a grid of 4 points: 4 calls of B images at w = 0, 4 of 2B under guidance; a network that takes
    w itself (or any non-CFG network) counts one call per point whatever w."""
    net = Recording(randomised(cond_toy_u.make_model()))
    x, _, y = toy_inputs()
    grid = model_grid(make_beta_schedule("cosine", 16)).take([3, 7, 11, 15])
    cfg = ClassifierFreeGuidance(net, K)
    samplers.sample_ddim(cfg, x, grid, {"y": y, "w": w})
    assert sum(batch for batch, _ in net.calls) == nfe(grid, cfg, w) * len(x)
    assert nfe(grid, cfg, w) == (4 if w == 0 else 8)
    assert nfe(grid, net, w) == 4 and calls_per_step(net, w) == 1


def test_a_conditional_unet_without_labels_uses_the_null_label_and_unconditional_ones_refuse_labels():
    net = randomised(cond_toy_u.make_model())
    x, t, y = toy_inputs()
    with torch.no_grad():
        assert torch.equal(net(x, t), net(x, t, y=torch.full_like(y, K)))
        assert not torch.allclose(net(x, t), net(x, t, y=y), atol=1e-3)
    plain = UNet(in_channel=1, channel=8, channel_multiplier=[1], n_res_blocks=1, attn_strides=[])
    with pytest.raises(ValueError, match="unconditional"):
        plain(x, t, y=y)
    with pytest.raises(ValueError, match="guidance"):
        net(x, t, y=y, w=1.0)


def test_zero_initialised_guidance_input_leaves_the_output_unchanged_and_learns():
    teacher = randomised(cond_toy_u.make_model())
    torch.manual_seed(0)
    student = make_guidance_student(cond_toy_u, teacher.state_dict(), "teacher").eval()
    assert set(student.state_dict()) - set(teacher.state_dict()) == {k for k in student.state_dict()
                                                                     if k.startswith("guidance.")}
    x, t, y = toy_inputs()
    with torch.no_grad():
        v_teacher = teacher(x, t, y=y)
        for w in (0.0, 1.5, torch.tensor([0.0, 0.3, 1.0, 2.0, 4.0, 9.0])):
            assert torch.equal(student(x, t, y=y, w=w), v_teacher)
    last = student.guidance[-1]
    assert not last.weight.any() and not last.bias.any()
    student(x, t, y=y, w=torch.linspace(0, 4, len(x))).square().sum().backward()
    assert last.weight.grad.abs().max() > 0 and last.bias.grad.abs().max() > 0
    with torch.no_grad():  # one gradient step on the new layer makes the output depend on w
        last.weight -= 0.1 * last.weight.grad / last.weight.grad.norm()
        assert not torch.allclose(student(x, t, y=y, w=0.0), student(x, t, y=y, w=4.0), atol=1e-6)


def test_unconditional_unet_keeps_the_reference_layout_and_conditioning_only_appends(reference_dir):
    with open(os.path.join(reference_dir, "unet_celeba_keys.json")) as f:
        ref = json.load(f)
    with torch.device("meta"):  # shapes without memory
        plain, conditional = UNet(**ref["config"]), UNet(**ref["config"], num_classes=10, guidance_embedding=True)
    layout = [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in plain.state_dict().items()]
    assert layout == ref["state_dict"]
    conditional = conditional.state_dict()
    keys = list(conditional)
    assert keys[:len(ref["state_dict"])] == [k for k, _, _ in ref["state_dict"]]
    added = keys[len(ref["state_dict"]):]
    time_dim = 4 * ref["config"]["channel"]
    assert list(conditional["label.weight"].shape) == [11, time_dim]  # 10 classes and the null label
    assert added[0] == "label.weight" and all(k.startswith("guidance.") for k in added[1:])


# -- stage one against a closed-form Gaussian teacher ------------------------------------------

N_STEPS = 32
DATA_STD = 0.3
MEANS = torch.tensor([[0.5, -0.2, 0.1, 0.7], [-0.6, 0.4, 0.0, -0.3], [0.2, 0.2, -0.8, 0.1],
                      [0.0, 0.1, -0.1, 0.05]], dtype=torch.float64)  # classes 0, 1, 2 and the null label 3


def gaussian_v(z, mean, alpha, sigma):
    """The exact v-prediction for data x ~ N(mean, DATA_STD^2 I) from z = alpha x + sigma eps: the posterior mean
    x_hat = mean + alpha s^2 (z - alpha mean) / (alpha^2 s^2 + sigma^2) (Gaussian conditioning), and
    v_hat = alpha eps_hat - sigma x_hat with eps_hat = (z - alpha x_hat)/sigma, i.e. v_hat = (alpha z - x_hat)/sigma."""
    s2 = DATA_STD ** 2
    x_hat = mean + alpha * s2 * (z - alpha * mean) / (alpha ** 2 * s2 + sigma ** 2)
    return (alpha * z - x_hat) / sigma


class GaussianTeacher(torch.nn.Module):
    """The exact denoiser of class-conditional data N(MEANS[y], DATA_STD^2 I) (y None: the null label's
    mean), at the time labels of a base model (label = step index)."""

    def __init__(self):
        super().__init__()
        self.alpha, self.sigma = alpha_sigma_tables(make_beta_schedule("cosine", N_STEPS))

    def coefficients(self, x, t):
        i = t.round().long()
        return self.alpha[i].reshape(-1, 1, 1, 1), self.sigma[i].reshape(-1, 1, 1, 1)

    def forward(self, x, t, y=None):
        y = torch.full((x.shape[0],), K) if y is None else y
        alpha, sigma = self.coefficients(x, t)
        return gaussian_v(x.double(), MEANS[y].reshape(x.shape), alpha, sigma).float()


class GuidedGaussianStudent(GaussianTeacher):
    """A w-input student written without the CFG formula: with equal variances, (1 + w) x_hat(mu_c) -
    w x_hat(mu_null) is the posterior mean for data N(mu_w, s^2 I) with mu_w = (1 + w) mu_c - w mu_null, so the
    guided teacher is the exact denoiser of that Gaussian."""

    def forward(self, x, t, y=None, w=None):
        w = torch.as_tensor(w, dtype=torch.float64).reshape(-1, 1)
        mean = (1 + w) * MEANS[y] - w * MEANS[K]
        alpha, sigma = self.coefficients(x, t)
        return gaussian_v(x.double(), mean.reshape(x.shape), alpha, sigma).float()


def test_gaussian_teacher_is_the_posterior_mean():
    """The closed form against its defining property: x - x_hat(z) has mean 0 and is uncorrelated with z."""
    g = torch.Generator().manual_seed(0)
    alpha, sigma, mean = 0.7, (1 - 0.49) ** 0.5, 0.4
    x = mean + DATA_STD * torch.randn(400_000, generator=g, dtype=torch.float64)
    z = alpha * x + sigma * torch.randn(400_000, generator=g, dtype=torch.float64)
    x_hat = alpha * z - sigma * gaussian_v(z, mean, alpha, sigma)
    residual = x - x_hat
    assert abs(residual.mean()) < 3e-3 and abs((residual * (z - z.mean())).mean()) < 3e-3


def test_stage_one_loss_is_zero_when_the_student_is_the_guided_teacher():
    grid = model_grid(make_beta_schedule("cosine", N_STEPS))
    teacher = ClassifierFreeGuidance(GaussianTeacher(), K)
    g = torch.Generator().manual_seed(0)
    batch = 64
    y = torch.randint(0, K + 1, (batch,), generator=g)  # null labels (dropped) included
    w = 4 * torch.rand(batch, generator=g, dtype=torch.float64)
    x = (MEANS[y] + DATA_STD * torch.randn(batch, 4, generator=g, dtype=torch.float64)).reshape(batch, 1, 2, 2).float()
    draws = draw_step(0, 0, 0, x, N_STEPS, {})
    assert len(set(draws.t.tolist())) > N_STEPS // 2  # many noise levels
    losses = imitation_loss(GuidedGaussianStudent(), x, draws, {"y": y, "w": w}, teacher=teacher, grid=grid)
    assert losses.shape == (batch,) and losses.max() < 1e-8
    # the student without guidance (w = 0) is wrong wherever w > 0 and the class is not the null one
    student = GuidedGaussianStudent()
    wrong = imitation_loss(lambda z, label, y, w: student(z, label, y, 0 * w), x, draws, {"y": y, "w": w},
                          teacher=teacher, grid=grid)
    assert wrong[(y != K) & (w > 0.5)].min() > 1e-4


# -- label dropout and guidance weights in training ---------------------------------------------

def test_label_dropout_rate_and_guidance_weights_are_drawn_per_image():
    n, p = 30_000, 0.25
    labels = torch.arange(n) % K
    images = torch.zeros(n, 1, 4, 4)
    record = {"num_classes": K, "null_label": K, "cond_drop_prob": p, "guidance_range": [0.5, 3.0]}
    draws = draw_step(0, 0, 0, images, 16, record)
    extra = conditioned(cond_toy_u.make_extra_args, images, labels, draws, record)
    dropped = extra["y"] == K
    assert torch.equal(dropped, draws.drop)
    tolerance = 4 * (n * p * (1 - p)) ** 0.5  # four binomial standard deviations
    assert abs(dropped.sum().item() - n * p) < tolerance
    assert torch.equal(extra["y"][~dropped], labels[~dropped])
    w = extra["w"]
    assert torch.equal(w, draws.w) and w.shape == (n,) and w.min() >= 0.5 and w.max() <= 3.0
    assert abs(w.mean() - 1.75) < 4 * 2.5 / 12 ** 0.5 / n ** 0.5  # U[0.5, 3]: mean 1.75, std 2.5/sqrt(12)
    # the range is filled: P(no w within 2.5 * 10/n of an end) = (1 - 10/n)^n < e^-10
    assert w.min() < 0.5 + 25 / n and w.max() > 3.0 - 25 / n
    below = (w < 1.0).sum().item()  # P(w < 1) = 0.2
    assert abs(below - 0.2 * n) < 4 * (n * 0.2 * 0.8) ** 0.5
    # the drops are independent of the class
    for c in range(K):
        count = (labels == c).sum().item()
        assert abs(dropped[labels == c].sum().item() - count * p) < 4 * (count * p * (1 - p)) ** 0.5
    # the rate follows the record: none at 0, all at 1; no w without a guidance_range, no drop without a null label
    for rate in (0.0, 1.0):
        plain = {"num_classes": K, "null_label": K, "cond_drop_prob": rate}
        draws = draw_step(0, 0, 0, images, 16, plain)
        extra = conditioned(cond_toy_u.make_extra_args, images, labels, draws, plain)
        assert torch.equal(extra["y"], labels if rate == 0 else torch.full_like(labels, K)) and "w" not in extra
    draws = draw_step(0, 0, 0, images, 16, {})
    assert draws.drop is None and draws.w is None
    assert torch.equal(conditioned(cond_toy_u.make_extra_args, images, labels, draws, {})["y"], labels)


# -- the chain through the scripts -------------------------------------------------------------

def ckpt(path):
    return torch.load(path, weights_only=True)


def test_conditional_chain_train_stage_one_halving_through_the_scripts(run, tmp_path, monkeypatch, capsys):
    run("train.py", "--module", "cond_toy_u", "--name", "c", "--dname", "base", "--num_timesteps", 8,
        "--num_iters", 3, "--batch_size", 8, "--cond_drop_prob", 0.2, *FAST, env_extra=ONE_THREAD)
    base = ckpt(tmp_path / "checkpoints/c/base/checkpoint.pt")
    assert (base["num_classes"], base["null_label"], base["cond_drop_prob"]) == (K, K, 0.2)
    assert "guidance_range" not in base and base["stage"] == "train"
    args = ["--module", "cond_toy_u", "--name", "c", "--dname", "guided", "--guidance_distill", "True", "--num_stages",
            "1", "--base_checkpoint", "checkpoints/c/base/checkpoint.pt", "--num_iters", "3", "--guidance_num_iters", "4",
            "--batch_size", "8", *FAST]
    run("distillate.py", *args, "--w_min", "0.5", "--w_max", "3", env_extra=ONE_THREAD)
    stage_one = ckpt(tmp_path / "checkpoints/c/guided_w/checkpoint.pt")
    halving = ckpt(tmp_path / "checkpoints/c/guided_0/checkpoint.pt")
    assert (stage_one["n_timesteps"], stage_one["time_scale"], stage_one["stage"]) == (8, 1, "guidance")
    assert (halving["n_timesteps"], halving["time_scale"], halving["stage"]) == (4, 2, "distill")
    for c in (stage_one, halving):
        assert (c["num_classes"], c["null_label"], c["cond_drop_prob"], c["guidance_range"]) == (K, K, 0.2, [0.5, 3.0])
        assert any(k.startswith("guidance.") for k in c["G"])
    assert (stage_one["step"], halving["step"]) == (4, 3)
    assert stage_one["teacher"]["path"] == "checkpoints/c/base/checkpoint.pt"
    assert halving["teacher"]["path"] == "checkpoints/c/guided_w/checkpoint.pt"

    # reruns in this process (the scripts' main, as `python distillate.py` runs it): resumable, both stages skipped
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    distillate.main(args + ["--w_min", "0.5", "--w_max", "3"])
    assert capsys.readouterr().out.count("Nothing to do") == 2
    with pytest.raises(SystemExit) as exit_info:  # another guidance range for the same stage is refused
        distillate.main(args + ["--w_min", "0.5", "--w_max", "2"])
    assert exit_info.value.code == 2 and "conditioning" in capsys.readouterr().err

    # the models are rebuilt from their records: CFG (two calls per step) or the w-input (one)
    base_model, base_ckpt = load_model_from_checkpoint(cond_toy_u, str(tmp_path / "checkpoints/c/base/checkpoint.pt"), "cpu")
    student, student_ckpt = load_model_from_checkpoint(cond_toy_u, str(tmp_path / "checkpoints/c/guided_0/checkpoint.pt"), "cpu")
    guided = guided_network(base_model, base_ckpt)
    assert isinstance(guided, ClassifierFreeGuidance) and guided.null_label == K
    assert calls_per_step(guided, 2.0) == 2 and calls_per_step(guided, 0.0) == 1
    assert guided_network(student, student_ckpt) is student and student.guidance is not None
    assert calls_per_step(student, 2.0) == 1
    sample.main(["--module", "cond_toy_u", "--checkpoint", "checkpoints/c/guided_0/checkpoint.pt", "--num_images", "4",
                 "--out_npz", "s.npz", "--device", "cpu"])
    assert (tmp_path / "s.npz").stat().st_size > 0


# -- user mistakes: one line, exit status 2, nothing written -----------------------------------

def save(path, model, **record):
    torch.save({"G": model.state_dict(), "n_timesteps": 8, "time_scale": 1, **record}, path)


@pytest.mark.parametrize("script, argv, keyword", [
    ("train", ["--module", "cond_toy_u", "--cond_drop_prob", "1.5"], "[0, 1]"),
    ("train", ["--module", "toy_u", "--cond_drop_prob", "0.1"], "unconditional"),
    ("distillate", ["--module", "cond_toy_u", "--base_checkpoint", "cond.pt", "--guidance_distill", "True",
                    "--w_min", "3", "--w_max", "1"], "--w_min 3 is larger than --w_max 1"),
    ("distillate", ["--module", "toy_u", "--base_checkpoint", "plain.pt", "--guidance_distill", "True"], "unconditional"),
    ("distillate", ["--module", "cond_toy_u", "--base_checkpoint", "w.pt", "--guidance_distill", "True"],
     "already takes the guidance weight"),
    ("distillate", ["--module", "cond_toy_u", "--base_checkpoint", "cond.pt", "--w_max", "2"], "--guidance_distill"),
    ("distillate", ["--module", "cond_toy_u", "--base_checkpoint", "cond.pt", "--guidance_num_iters", "5"],
     "--guidance_distill"),
    ("distillate", ["--module", "toy_u", "--base_checkpoint", "cond.pt"], "unconditional"),
])
def test_bad_inputs_are_one_line_and_exit_2(script, argv, keyword, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(os.path.dirname(os.path.abspath(__file__)))
    save("plain.pt", toy_u.make_model())
    save("cond.pt", cond_toy_u.make_model(), num_classes=K, null_label=K, cond_drop_prob=0.1)
    save("w.pt", cond_toy_u.make_model(guidance_embedding=True), num_classes=K, null_label=K, cond_drop_prob=0.1,
         guidance_range=[0.0, 4.0])
    main = {"train": train.main, "distillate": distillate.main}[script]
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--name", "n", "--dname", "d", "--num_iters", "1", *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert len(err) == 1 and err[0].startswith("error:") and keyword in err[0], err
    assert not os.path.exists("checkpoints")
    assert "Traceback" not in "".join(err)
