"""The scripts end to end, as a user runs them: train -> distil three times -> sample, on a small MLP
user module (tests/toy_u.py, 2-D points from two Gaussians), the original README's command lines, and
checkpoints written by the original implementation."""
import os

import numpy as np
import pytest
import torch

import toy_u
from conftest import REFERENCE
from diffusion import make_beta_schedule
from original import GaussianDiffusion
from sample_utils import image_noise

FAST = ["--num_workers", "0", "--device", "cpu"]


def ckpt(path):
    return torch.load(path, weights_only=True)


def mode_statistics(samples):
    x = torch.as_tensor(samples).reshape(-1, 2)
    distance = torch.cdist(x, toy_u.CENTERS)
    nearest = distance.min(dim=1)
    offsets = x - toy_u.CENTERS[nearest.indices]
    return dict(near=(nearest.values < 0.3).float().mean().item(),
                first=(nearest.indices == 0).float().mean().item(),
                std=offsets.std(0), mean=x.mean(0))


def test_train_then_three_halvings_then_sample(run, tmp_path):
    run("train.py", "--module", "toy_u", "--name", "toy", "--dname", "base", "--num_timesteps", 64,
        "--num_iters", 1500, "--batch_size", 256, "--lr", 2e-3, "--ema_decay", 0.995, *FAST)
    teacher = "checkpoints/toy/base/checkpoint.pt"
    for k in range(3):
        run("distillate.py", "--module", "toy_u", "--diffusion", "GaussianDiffusionDefault", "--name", "toy",
            "--dname", f"stage_{k}", "--base_checkpoint", teacher, "--num_iters", 400, "--batch_size", 256,
            "--lr", 5e-4, *FAST)
        teacher = f"checkpoints/toy/stage_{k}/checkpoint.pt"
    expected = {"base": (64, 1), "stage_0": (32, 2), "stage_1": (16, 4), "stage_2": (8, 8)}
    for dname, (steps, scale) in expected.items():
        c = ckpt(tmp_path / "checkpoints" / "toy" / dname / "checkpoint.pt")
        assert (c["n_timesteps"], c["time_scale"]) == (steps, scale)
        assert c["time_labels"] == "aligned" and c["channel_order"] == "RGB"
        assert os.path.isdir(tmp_path / "checkpoints" / "toy" / dname / "tensorboard")
    run("sample.py", "--module", "toy_u", "--checkpoint", teacher, "--batch_size", 2000, "--out_npz", "s.npz", "--float_samples", "True",
        "--out_file", "s.png", "--clipped_sampling", "True", "--clipping_value", 3, "--device", "cpu")
    data = np.load(tmp_path / "s.npz")
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (2000, 1, 1, 2)
    assert data["samples"].dtype == np.float32 and data["samples"].shape == (2000, 2, 1, 1)
    stats = mode_statistics(data["samples"])
    assert stats["near"] > 0.85, stats
    assert 0.4 < stats["first"] < 0.6, stats
    assert ((stats["std"] > 0.06) & (stats["std"] < 0.2)).all(), stats
    assert stats["mean"].abs().max() < 0.1, stats
    assert (tmp_path / "s.png").stat().st_size > 0


def test_several_halvings_in_one_command_and_rerun_skips_finished_stages(run, tmp_path):
    run("train.py", "--module", "toy_u", "--name", "toy", "--dname", "original", "--num_timesteps", 16,
        "--num_iters", 5, "--batch_size", 8, *FAST)
    args = ["--module", "toy_u", "--name", "toy", "--dname", "base", "--num_stages", 3, "--base_checkpoint",
            "checkpoints/toy/original/checkpoint.pt", "--num_iters", 4, "--batch_size", 8, *FAST]
    run("distillate.py", *args)
    stages = [ckpt(tmp_path / f"checkpoints/toy/base_{k}/checkpoint.pt") for k in range(3)]
    assert [(c["n_timesteps"], c["time_scale"]) for c in stages] == [(8, 2), (4, 4), (2, 8)]
    assert stages[1]["teacher"]["path"] == "checkpoints/toy/base_0/checkpoint.pt"
    before = os.path.getmtime(tmp_path / "checkpoints/toy/base_2/checkpoint.pt")
    out = run("distillate.py", *args).stdout
    assert out.count("Nothing to do") == 3
    assert os.path.getmtime(tmp_path / "checkpoints/toy/base_2/checkpoint.pt") == before


def test_original_readme_commands(run, tmp_path):
    """The original README's commands with the module and paths adapted (and fewer training steps)."""
    model = toy_u.make_model()
    os.makedirs(tmp_path / "PATH" / "TO")
    torch.save({"G": model.state_dict(), "n_timesteps": 16, "time_scale": 1.0}, tmp_path / "PATH/TO/CHECKPOINT.pt")
    run("distillate.py", "--module", "toy_u", "--diffusion", "GaussianDiffusionDefault", "--name", "CHECKPOINTS_DIR",
        "--dname", "base_0", "--base_checkpoint", "./PATH/TO/CHECKPOINT.pt", "--batch_size", "1", "--num_workers", "4",
        "--num_iters", "300", "--log_interval", "10")
    distilled = "./checkpoints/CHECKPOINTS_DIR/base_0/checkpoint.pt"
    run("sample.py", "--out_file", "./PATH/TO/IMAGE.png", "--module", "toy_u", "--time_scale", "1", "--checkpoint",
        distilled, "--batch_size", "1")
    run("sample.py", "--out_file", "./images/celeba_u_6_clipped.png", "--module", "toy_u", "--checkpoint", distilled,
        "--batch_size", "1", "--clipped_sampling", "True", "--clipping_value", "1.2")
    run("train.py", "--module", "toy_u", "--name", "celeba", "--dname", "original", "--batch_size", "1",
        "--num_workers", "4", "--num_iters", "20", "--num_timesteps", "16")
    assert (tmp_path / "PATH/TO/IMAGE.png").exists() and (tmp_path / "images/celeba_u_6_clipped.png").exists()
    assert ckpt(tmp_path / distilled)["time_scale"] == 2.0


def write_reference_module(tmp_path, config):
    (tmp_path / "ref_u.py").write_text(
        "import torch\nfrom unet import UNet\n"
        f"def make_model():\n    net = UNet(**{config!r})\n    net.image_size = [1, 3, 16, 16]\n    return net\n"
        "def make_dataset():\n    return [(torch.zeros(3, 16, 16), 0)] * 4\n")


@pytest.mark.parametrize("channel_order", ["auto", "RGB"])
def test_checkpoint_of_the_original_loads_and_samples_in_the_right_colours(run, tmp_path, channel_order):
    case = torch.load(os.path.join(REFERENCE, "ddim_tiny_case.pt"), weights_only=True)
    write_reference_module(tmp_path, case["config"])
    torch.save({"G": case["G"], "n_timesteps": 16, "time_scale": 2}, tmp_path / "original.pt")
    run("sample.py", "--module", "ref_u", "--checkpoint", "original.pt", "--batch_size", 3, "--out_npz", "o.npz", "--float_samples", "True",
        "--clipped_sampling", "True", "--seed", 5, "--channel_order", channel_order, "--device", "cpu")
    got = torch.from_numpy(np.load(tmp_path / "o.npz")["samples"])

    from unet import UNet
    model = UNet(**case["config"]).eval()
    model.load_state_dict(case["G"])
    diffusion = GaussianDiffusion(model, make_beta_schedule("cosine", 16), time_scale=2, sampler="clipped",
                                  time_labels="original")  # the original's labels: no record in the file
    expected = diffusion.p_sample_loop(image_noise(range(3), [3, 16, 16], 5)).clamp(-1, 1)
    if channel_order == "auto":
        expected = expected.flip(1)  # the original's files hold BGR models; shown as RGB
    assert torch.allclose(got, expected, atol=1e-5)
