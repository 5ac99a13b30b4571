"""The GPU speed paths, exercised on the CPU: autocast (bf16, fp16 with a gradient scaler),
activation checkpointing, channels_last and torch.compile, in training, distillation and sampling."""
import copy

import pytest
import torch

from unet import UNet

FAST = ["--num_workers", 0, "--device", "cpu", "--batch_size", 4]


def test_grad_checkpoint_gives_the_same_gradients():
    torch.manual_seed(0)
    model = UNet(in_channel=1, channel=16, channel_multiplier=[1, 2], n_res_blocks=1, attn_strides=[2], use_affine_time=True)
    for p in model.parameters():  # away from the near-zero initial output layers, so every gradient is non-trivial
        torch.nn.init.normal_(p, std=0.1)
    checkpointed = copy.deepcopy(model)
    checkpointed.grad_checkpoint = True
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 10.0])
    model(x, t).square().mean().backward()
    checkpointed(x, t).square().mean().backward()
    for a, b in zip(model.parameters(), checkpointed.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_channels_last_gives_the_same_output():
    model = UNet(in_channel=3, channel=16, channel_multiplier=[1, 2], n_res_blocks=1, attn_strides=[2]).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0.0, 5.0])
    with torch.no_grad():
        expected = model(x, t)
        model.to(memory_format=torch.channels_last)
        got = model(x.contiguous(memory_format=torch.channels_last), t)
    assert torch.allclose(expected, got, atol=1e-5)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_train_distil_sample(run, tmp_path, amp):
    common = ["--module", "digits_u", "--name", "d", *FAST, "--amp", amp, "--grad_checkpoint", "True"]
    run("train.py", *common, "--dname", "original", "--num_timesteps", 8, "--num_iters", 3)
    run("distillate.py", *common, "--dname", "base_0", "--base_checkpoint", "checkpoints/d/original/checkpoint.pt",
        "--num_iters", 3)
    saved = torch.load(tmp_path / "checkpoints/d/base_0/checkpoint.pt", weights_only=True)
    assert saved["n_timesteps"] == 4 and all(torch.isfinite(v).all() for v in saved["G"].values())
    assert all(v.dtype == torch.float32 for v in saved["G"].values() if v.is_floating_point())  # weights stay fp32
    if amp == "fp16":
        assert saved["scaler"]["scale"] > 0  # the gradient scaler's state is saved for resuming
    run("sample.py", "--module", "digits_u", "--checkpoint", "checkpoints/d/base_0/checkpoint.pt", "--amp", amp,
        "--batch_size", 4, "--out_npz", "s.npz", "--device", "cpu")
    assert (tmp_path / "s.npz").exists()


def test_compiled_training_and_sampling(run, tmp_path):
    common = ["--module", "toy_u", "--name", "c", "--dname", "base", *FAST, "--num_timesteps", 8]
    run("train.py", *common, "--num_iters", 3, "--compile", "True", timeout=900)
    saved = torch.load(tmp_path / "checkpoints/c/base/checkpoint.pt", weights_only=True)
    assert not any("_orig_mod" in k for k in saved["G"]) and saved["step"] == 3
    run("sample.py", "--module", "toy_u", "--checkpoint", "checkpoints/c/base/checkpoint.pt", "--compile", "True",
        "--batch_size", 4, "--out_npz", "s.npz", "--device", "cpu", timeout=900)
