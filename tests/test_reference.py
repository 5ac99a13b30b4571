"""The UNet, the schedule and the clipped sampler reproduce the original implementation's outputs."""
import json
import os

import pytest
import torch

from diffusion import alpha_sigma_tables, make_beta_schedule
from original import GaussianDiffusion
from unet import UNet


def load(reference_dir, name):
    return torch.load(os.path.join(reference_dir, name), weights_only=True)


def test_celeba_layout_matches_the_original(reference_dir):
    with open(os.path.join(reference_dir, "unet_celeba_keys.json")) as f:
        ref = json.load(f)
    model = UNet(**ref["config"])
    layout = [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in model.state_dict().items()]
    assert layout == ref["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == ref["num_parameters"]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_tiny_unet_cases(reference_dir, index):
    case = load(reference_dir, "unet_tiny_cases.pt")[index]
    model = UNet(**case["config"])
    model.load_state_dict(case["G"], strict=True)
    model.eval()
    with torch.no_grad():
        out = model(case["x"], case["t"])
        out64 = model.double()(case["x"].double(), case["t"].double())
    assert (out - case["out"]).abs().max() < 1e-4
    assert (out64 - case["out_float64"]).abs().max() < 1e-9


def test_grayscale_output_has_the_input_channels():
    model = UNet(in_channel=1, channel=16, channel_multiplier=[1, 2], n_res_blocks=1, attn_strides=[2], fold=2)
    x = torch.randn(2, 1, 16, 16)
    assert model(x, torch.tensor([0.0, 5.0])).shape == x.shape


def test_cosine_schedule(reference_dir):
    for ref in load(reference_dir, "cosine_schedule.pt"):
        betas = make_beta_schedule("cosine", ref["n"], cosine_s=ref["cosine_s"])
        assert betas.dtype == torch.float64
        assert (betas - ref["betas"]).abs().max() < 1e-12
        alpha, sigma = alpha_sigma_tables(betas)
        assert (alpha ** 2 - ref["alphas_cumprod"]).abs().max() < 1e-12
        assert (alpha - ref["alpha"]).abs().max() < 1e-12
        assert (sigma - ref["sigma"]).abs().max() < 1e-12


def test_ddim_runs_match_the_original(reference_dir):
    case = load(reference_dir, "ddim_tiny_case.pt")
    model = UNet(**case["config"])
    model.load_state_dict(case["G"], strict=True)
    for run in [case] + case["variants"]:
        diffusion = GaussianDiffusion(model, make_beta_schedule("cosine", run["n_timesteps"]),
                                      time_scale=run["time_scale"], sampler="clipped", time_labels="original")
        labels, states = [], []
        original_forward = model.forward

        def spy(x, t):
            labels.append(t.clone())
            return original_forward(x, t)

        model.forward = spy
        try:
            out = diffusion.p_sample_loop(run["noise"], {}, eta=run["eta"], clip_value=run["clip_value"],
                                          clip_denoised=run["clip_denoised"], callback=lambda d: states.append(d["x"]))
        finally:
            del model.forward
        assert (out.double() - run["out"]).abs().max() < 1e-4
        assert len(states) == len(run["trajectory"])
        for state, expected in zip(states, run["trajectory"]):
            assert (state - expected).abs().max() < 1e-4
        assert [l.long().tolist() for l in labels] == [l.tolist() for l in run["net_time_inputs"]]


def test_the_repository_carries_its_reference_data_and_reads_nothing_outside_itself(reference_dir):
    """A clone anywhere passes its tests: the reference data live in tests/reference/, and no source file
    points at a folder beside the repository (../NAME for each NAME beside it here)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert os.path.commonpath([root, os.path.abspath(reference_dir)]) == root
    for name in ("README.md", "cosine_schedule.pt", "ddim_tiny_case.pt", "unet_celeba_keys.json", "unet_tiny_cases.pt"):
        assert os.path.isfile(os.path.join(reference_dir, name)), name
    parent = os.path.dirname(root)
    beside = [os.pardir + "/" + name for name in os.listdir(parent) if name != os.path.basename(root)]
    outside = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "checkpoints", "data")]
        for file in files:
            if file.endswith((".py", ".sh", ".ipynb")) or file in ("Makefile", "run"):
                with open(os.path.join(folder, file), encoding="utf-8", errors="replace") as f:
                    text = f.read()
                if any(needle in text for needle in beside):
                    outside.append(os.path.relpath(os.path.join(folder, file), root))
    assert not outside, f"files that read outside the repository: {outside}"
