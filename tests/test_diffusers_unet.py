"""This project's UNet as diffusers' UNet2DModel: the same outputs through the weight mapping, and the refusals."""
import os
import re

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

import digits_u
from conftest import ROOT, run_script
from diffusers_folder import scheduler_config
from diffusers_unet import NotExpressible, unet2d_config, unet2d_state_dict
from sample_utils import image_noise
from unet import UNet


def as_unet2d(net, sample_size):
    model = UNet2DModel(**unet2d_config(net, sample_size)).eval()
    model.load_state_dict(unet2d_state_dict(net), strict=True)
    return model


def random_unet(**kwargs):
    torch.manual_seed(0)
    net = UNet(in_channel=3, channel=16, channel_multiplier=[1, 2, 2], n_res_blocks=2, attn_strides=[2], **kwargs)
    for p in net.parameters():  # every layer active (the zero-initialised outputs too)
        p.data.normal_(0, 0.2)
    return net.eval()


@pytest.mark.parametrize("kwargs", [
    dict(attn_heads=1, use_affine_time=True),
    dict(attn_heads=2, use_affine_time=False),
    dict(attn_heads=4, use_affine_time=True, num_classes=3),
], ids=["one-head-affine", "two-heads-additive", "four-heads-classes"])
def test_unet2d_gives_the_unets_outputs(kwargs):
    net = random_unet(**kwargs)
    model = as_unet2d(net, 16)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.0, 17.0, 999.0])  # the sinusoidal embedding at small and large labels
    y = torch.tensor([0, 2, 3]) if "num_classes" in kwargs else None  # 3: the null label
    with torch.no_grad():
        expected, got = net(x, t, y), model(x, t, class_labels=y).sample
    assert expected.abs().mean() > 0.1
    assert (got - expected).abs().max() < 1e-5


def test_the_digits_network_saved_as_a_diffusers_folder_reloads_with_its_outputs(tmp_path):
    torch.manual_seed(3)
    net = digits_u.make_model()
    for p in net.parameters():
        p.data.normal_(0, 0.1)
    net.eval()
    as_unet2d(net, 8).save_pretrained(tmp_path / "unet")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").exists()
    model = UNet2DModel.from_pretrained(tmp_path / "unet").eval()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([1.0, 250.0, 600.0, 1023.0])
    with torch.no_grad():
        expected = net(x, t)
        assert (model(x, t).sample - expected).abs().max() < 1e-5 * expected.abs().max()


@pytest.mark.parametrize("kwargs, said", [
    (dict(fold=2), "folds space into channels"),
    (dict(guidance_embedding=True), "guidance weight w as an input"),
    (dict(attn_strides=[1, 4]), re.escape("attention heads of widths [16, 32]")),
])
def test_networks_unet2d_cannot_express_are_refused(kwargs, said):
    base = dict(in_channel=3, channel=16, channel_multiplier=[1, 2, 2], n_res_blocks=1, attn_strides=[2], attn_heads=1)
    net = UNet(**{**base, **kwargs})
    with pytest.raises(NotExpressible, match=said):
        unet2d_config(net)
    with pytest.raises(NotExpressible, match=said):
        unet2d_state_dict(net)


FAST = ["--device", "cpu", "--num_workers", 0, "--log_every", 1, "--seed", 0]
N_IMAGES, SEED = 5, 4


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A float32 digits chain: a base model of 8 steps and its 4-, 2- and 1-step students."""
    folder = tmp_path_factory.mktemp("diffusers_chain")
    run = lambda *args: run_script(*args, cwd=folder)
    run("train.py", "--module", "digits_u", "--name", "d", "--dname", "original", "--num_timesteps", 8,
        "--num_iters", 3, "--batch_size", 4, *FAST)
    run("distillate.py", "--module", "digits_u", "--name", "d", "--dname", "base", "--num_stages", 3,
        "--base_checkpoint", "checkpoints/d/original/checkpoint.pt", "--num_iters", 3, "--batch_size", 4, *FAST)
    # a DDPM-style teacher (linear schedule, eps, 16 steps): its v-predicting copy, then 8 and 4 steps
    run("train.py", "--module", "digits_u", "--name", "e", "--dname", "original", "--num_timesteps", 16,
        "--schedule", "linear", "--prediction", "eps", "--num_iters", 3, "--batch_size", 4, *FAST)
    run("distillate.py", "--module", "digits_u", "--name", "e", "--dname", "base", "--num_stages", 2,
        "--base_checkpoint", "checkpoints/e/original/checkpoint.pt", "--num_iters", 3, "--batch_size", 4, *FAST)
    return folder


@pytest.mark.parametrize("stage, steps", [("d/original", 8), ("d/base_0", 4), ("d/base_1", 2),
                                          ("d/base_2", 1), ("e/original", 16), ("e/base_v", 16), ("e/base_1", 4)])
def test_the_exported_folder_samples_the_images_of_sample_py(chain, stage, steps):
    from diffusers import DDIMPipeline
    checkpoint = f"checkpoints/{stage}/checkpoint.pt"
    result = run_script("export_checkpoint.py", checkpoint, f"hub/{stage}", "--for_diffusers", "True", "--module",
                        "digits_u", cwd=chain)
    assert "note:" not in result.stdout  # a float32 file: the frequencies are exact
    run_script("sample.py", "--module", "digits_u", "--checkpoint", checkpoint, "--sampler", "ddim", "--num_images",
               N_IMAGES, "--seed", SEED, "--device", "cpu", "--out_npz", f"{stage}.npz", "--float_samples", "True", cwd=chain)
    expected = torch.from_numpy(np.load(chain / f"{stage}.npz")["samples"])
    prediction = torch.load(chain / checkpoint, weights_only=True).get("prediction", "v")
    assert pipeline_config(chain / "hub" / stage)["prediction_type"] == {"eps": "epsilon", "v": "v_prediction"}[prediction]
    pipeline = DDIMPipeline.from_pretrained(chain / "hub" / stage)
    x = image_noise(range(N_IMAGES), [1, 8, 8], SEED)  # the same starting noise
    assert (scheduler_loop(pipeline, steps, x) - expected).abs().max() <= 1e-4
    images = pipeline(batch_size=2, num_inference_steps=steps, output_type="np").images
    assert images.shape == (2, 8, 8, 1)


def scheduler_loop(pipeline, steps, x):
    """Deterministic DDIM through diffusers: the pipeline's scheduler stepped over its `steps` timesteps from x,
    the images clamped to [-1, 1] as sample.py stores them."""
    pipeline.scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in pipeline.scheduler.timesteps:
            x = pipeline.scheduler.step(pipeline.unet(x, t).sample, t, x, eta=0.0).prev_sample
    return x.clamp(-1, 1)


def pipeline_config(folder):
    import json
    with open(folder / "scheduler" / "scheduler_config.json") as f:
        return json.load(f)


def test_an_export_refuses_a_non_empty_folder(tmp_path):
    shipped = os.path.join(ROOT, "checkpoints", "digits", "base_4", "checkpoint.pt")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    args = ["--for_diffusers", "True", "--module", "digits_u"]
    result = run_script("export_checkpoint.py", shipped, "full", *args, check=False, cwd=tmp_path)
    assert result.returncode == 2 and "is not empty" in result.stderr and result.stderr.count("\n") == 1
    assert os.listdir(tmp_path / "full") == ["keep.txt"]
    result = run_script("export_checkpoint.py", shipped, "full", *args, "--overwrite", "True", cwd=tmp_path)
    assert (tmp_path / "full" / "model_index.json").exists()
    result = run_script("export_checkpoint.py", shipped, "other", "--for_diffusers", "True", check=False, cwd=tmp_path)
    assert result.returncode == 2 and "needs --module" in result.stderr


def test_trailing_labels_get_ddim_others_first_order_dpm_solver_and_fractional_labels_are_refused():
    from diffusion import make_beta_schedule, model_grid
    aligned_grid = model_grid(make_beta_schedule("cosine", 4), 2, "aligned")  # labels 7, 5, 3, 1 of 8
    kind, aligned = scheduler_config(aligned_grid, "v", 8)
    abar = torch.cumprod(1 - torch.tensor(aligned["trained_betas"], dtype=torch.float64), 0)
    assert kind == "DDIMScheduler" and aligned["num_train_timesteps"] == 8
    assert torch.allclose(abar[[7, 5, 3, 1]], aligned_grid.alphas[:-1] ** 2, rtol=1e-12)  # the levels at the labels
    for indices in ([1, 4, 8, 11], [0, 2, 4, 6, 9]):  # labels 10, 7, 3, 0 and 11, 9, 7, 5, 2 of 12
        grid = model_grid(make_beta_schedule("cosine", 12)).take(indices)
        kind, config = scheduler_config(grid, "eps", 12)
        abar = torch.cumprod(1 - torch.tensor(config["trained_betas"], dtype=torch.float64), 0)
        assert kind == "DPMSolverMultistepScheduler" and config["solver_order"] == 1
        assert torch.allclose(abar[grid.labels.long()], grid.alphas[:-1] ** 2, rtol=1e-12)
        assert bool((abar[1:] < abar[:-1]).all())  # a decreasing table between and beyond the labels
    halves = model_grid(make_beta_schedule("cosine", 4), 2.5, "aligned")  # labels 9.5, 7, ... : not indices
    with pytest.raises(NotExpressible, match="not indices of the 10 base steps"):
        scheduler_config(halves, "v", 10)


def test_a_bgr_file_is_exported_as_rgb_the_same_network_with_its_colour_channels_reversed(tmp_path):
    import colour_u
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    state = colour_u.make_model().state_dict()
    for p in state.values():  # every layer active (the zero-initialised outputs too)
        p.normal_(0, 0.2) if p.is_floating_point() else None
    unets = {}
    for order in ("BGR", "RGB"):
        torch.save({"G": state, "n_timesteps": 8, "time_scale": 1, "channel_order": order}, tmp_path / f"{order}.pt")
        result = run_script("export_checkpoint.py", f"{order}.pt", order, "--for_diffusers", "True", "--module",
                            "colour_u", check=False, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        unets[order] = UNet2DModel.from_pretrained(tmp_path / order / "unet").eval()
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 6])
    flip = lambda v: v.flip(1)
    with torch.no_grad():  # RGB in and out of the BGR network: the channels reversed on both sides
        assert torch.allclose(unets["BGR"](x, t).sample, flip(unets["RGB"](flip(x), t).sample), atol=1e-5)


@pytest.fixture(scope="module")
def original_weights():
    """Random weights of the colour UNet (every layer active, small enough that DDIM's images are not all clipped)."""
    import colour_u
    torch.manual_seed(0)
    state = colour_u.make_model().state_dict()
    for name, p in state.items():
        if p.is_floating_point() and "inv_freq" not in name:
            p.normal_(0, 0.05)
    return state


@pytest.mark.parametrize("steps, time_scale", [(8, 1), (4, 2), (1, 8)])
def test_an_original_file_exports_with_the_images_of_sample_py(tmp_path, original_weights, steps, time_scale):
    """The original's three-key file (labels i*s, BGR): a base model and its 4- and 1-step students of the same
    8-step table. sample.py draws the noise in the network's BGR order and stores RGB images; the exported RGB
    folder, started from that noise with its channels reversed, gives those images."""
    from diffusers import DiffusionPipeline
    torch.save({"G": original_weights, "n_timesteps": steps, "time_scale": time_scale}, tmp_path / "original.pt")
    run_script("export_checkpoint.py", "original.pt", "hub", "--for_diffusers", "True", "--module", "colour_u",
               cwd=tmp_path)
    run_script("sample.py", "--module", "colour_u", "--checkpoint", "original.pt", "--sampler", "ddim", "--num_images",
               3, "--seed", SEED, "--device", "cpu", "--out_npz", "original.npz", "--float_samples", "True", cwd=tmp_path)
    expected = torch.from_numpy(np.load(tmp_path / "original.npz")["samples"])
    pipeline = DiffusionPipeline.from_pretrained(tmp_path / "hub")
    x = scheduler_loop(pipeline, steps, image_noise(range(3), [3, 16, 16], SEED).flip(1))  # BGR noise, read as RGB
    assert pipeline.scheduler.timesteps.tolist() == list(range(8))[::-1][::time_scale]  # (i+1)*s - 1 of 8
    assert (expected.abs() < 0.98).float().mean() > 0.5  # images, not clipped noise
    assert (x - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("stage", ["digits/base_4", "digits_eps/base_4", "digits_cond/original"])
def test_the_shipped_chains_export_with_the_images_of_their_files(tmp_path, stage):
    """The shipped 4-step students of the cosine/v and the linear-eps chains, and the conditional teacher (with class
    labels): the folder's scheduler gives the file's DDIM images (bench/diffusers_exports.md has every stage)."""
    import sys
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from diffusers_exports import CHAINS, compare
    from user_modules import load_user_module
    chain = stage.split("/")[0]
    checkpoint = os.path.join(ROOT, "checkpoints", stage, "checkpoint.pt")
    run_script("export_checkpoint.py", checkpoint, "hub", "--for_diffusers", "True", "--module", CHAINS[chain], cwd=tmp_path)
    row = compare(load_user_module(CHAINS[chain]), checkpoint, str(tmp_path / "hub"), 8, 0)
    assert row["max_abs"] <= 1e-4 and row["steps"] == (128 if chain == "digits_cond" else 4)


def test_the_file_s_rounded_time_frequencies_are_not_used():
    """The shipped float16 files store the time embedding's frequencies rounded; the UNet computes them."""
    from checkpoints import load_checkpoint, load_weights
    from unet import TimeEmbedding
    ckpt = load_checkpoint(os.path.join(ROOT, "checkpoints", "digits", "base_4", "checkpoint.pt"))
    stored = ckpt["G"]["time.0.inv_freq"].clone()
    exact = TimeEmbedding(len(stored) * 2).inv_freq
    assert not torch.equal(stored.float(), exact)  # rounded in the file
    net = digits_u.make_model()
    load_weights(net, ckpt["G"], "base_4")
    assert torch.equal(net.time[0].inv_freq, exact) and torch.equal(ckpt["G"]["time.0.inv_freq"], stored)


def test_the_shipped_guidance_weight_students_are_refused_in_one_line(tmp_path):
    shipped = os.path.join(ROOT, "checkpoints", "digits_cond", "guided_4", "checkpoint.pt")
    result = run_script("export_checkpoint.py", shipped, "hub", "--for_diffusers", "True", "--module", "digits_cond_u",
                        check=False, cwd=tmp_path)
    assert result.returncode == 2 and "guidance weight w as an input" in result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "hub").exists()
