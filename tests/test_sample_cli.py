"""One sampler vocabulary: the flags of sample.py (and demo.py, evaluate.py), their refusals, and the
original's commands."""
import numpy as np
import pytest
import torch
from PIL import Image

import demo
import toy_u
from cli import ArgumentParser, UserError
from diffusion import make_beta_schedule
from original import GaussianDiffusion
from sample_utils import SamplerSpec, add_sampler_arguments, generate, image_noise, sampler_from_args, spec_grid
from user_modules import load_model_from_checkpoint


def parse(*argv):
    parser = ArgumentParser()
    add_sampler_arguments(parser, default_sampler="ancestral")
    return sampler_from_args(parser.parse_args([str(a) for a in argv]))


def save_toy(path, **record):
    """A small random toy_u model (2 channels, so no colour flips); record: this project's extra keys."""
    torch.manual_seed(3)
    torch.save({"G": toy_u.make_model().state_dict(), "n_timesteps": 16, "time_scale": 1, **record}, path)
    return path


@pytest.mark.parametrize("argv,expected", [
    ([], SamplerSpec("ancestral", {})),
    (["--sampler", "ddpm"], SamplerSpec("ancestral", {})),
    (["--clipped_sampling", "True"], SamplerSpec("ddim", {"eta": 0.0, "clip_value": 1.2})),
    (["--clipped_sampling", "True", "--clipping_value", 3, "--eta", 0.5], SamplerSpec("ddim", {"eta": 0.5, "clip_value": 3.0})),
    (["--sampler", "ddim"], SamplerSpec("ddim", {"eta": 0.0, "clip_value": None})),
    (["--clipped_sampling", "True", "--clipping_value", 0], SamplerSpec("ddim", {"eta": 0.0, "clip_value": None})),
    (["--sampler", "dpmpp_2m", "--steps", 8, "--step_schedule", "logsnr"], SamplerSpec("dpmpp_2m", {}, 8, "logsnr")),
    (["--sampler", "ddim", "--steps", 4, "--step_schedule", "cosine"],
     SamplerSpec("ddim", {"eta": 0.0, "clip_value": None}, 4, "cosine")),
    (["--sampler", "stochastic", "--step_indices", "3,15,7"], SamplerSpec("stochastic", {}, 0, (3, 15, 7))),
    (["--time_scale", 4, "--eta", 0], SamplerSpec("ancestral", {}, coarsen=4)),
])
def test_flags_give_the_sampler(argv, expected):
    assert parse(*argv) == expected


@pytest.mark.parametrize("argv,flag", [
    (["--eta", 0.5], "--eta"),
    (["--sampler", "dpmpp_2m", "--clipping_value", 1], "--clipping_value"),
    (["--sampler", "stochastic", "--eta", 1], "--eta"),
    (["--sampler", "dpmpp_2m", "--clipped_sampling", "True"], "--clipped_sampling"),
    (["--step_indices", "3,1", "--steps", 3], "--steps"),
    (["--step_indices", "3,1", "--step_schedule", "logsnr"], "--step_schedule"),
])
def test_flags_the_sampler_ignores_are_refused(argv, flag):
    with pytest.raises(UserError, match=flag):
        parse(*argv)


@pytest.mark.parametrize("argv", [["--eta", 3], ["--eta", -0.1], ["--steps", -1], ["--clipping_value", -1],
                                  ["--chunk_size", 0], ["--num_images", 0], ["--step_indices", "4,4"],
                                  ["--step_indices", "3,-1"], ["--sampler", "euler"]])
def test_values_out_of_range_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: argument " + argv[0])


@pytest.mark.parametrize("argv,message", [(["--sampler", "ddim", "--eta", 3], "--eta: must lie in [0, 1]"),
                                          (["--eta", 0.5], "ignores --eta")])
def test_sample_py_refuses_with_one_line_and_writes_nothing(run, tmp_path, argv, message):
    save_toy(tmp_path / "toy.pt")
    result = run("sample.py", "--module", "toy_u", "--checkpoint", "toy.pt", "--out_npz", "out.npz", *argv, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr
    assert not (tmp_path / "out.npz").exists()


@pytest.mark.parametrize("argv,spec", [
    (["--sampler", "ddim"], SamplerSpec("ddim", {"eta": 0.0, "clip_value": None})),  # the DDIM of evaluate.py
    (["--batch_size", 5, "--sampler", "stochastic", "--steps", 8], SamplerSpec("stochastic", {}, steps=8)),
])
def test_sample_py_draws_what_generate_draws(run, tmp_path, argv, spec):
    save_toy(tmp_path / "toy.pt", time_labels="aligned", channel_order="RGB")
    run("sample.py", "--module", "toy_u", "--checkpoint", "toy.pt", "--out_npz", "out.npz", "--float_samples", "True", "--num_images", 5,
        "--chunk_size", 2, "--seed", 11, "--device", "cpu", *argv)
    got = torch.from_numpy(np.load(tmp_path / "out.npz")["samples"])
    model, ckpt = load_model_from_checkpoint(toy_u, str(tmp_path / "toy.pt"), "cpu")
    expected = generate(model, spec_grid(spec, ckpt), spec, range(5), [2, 1, 1], seed=11)
    assert got.shape == (5, 2, 1, 1) and (got - expected.clamp(-1, 1)).abs().max() < 1e-6


def test_the_original_command_samples_with_its_ancestral_sampler(run, tmp_path):
    save_toy(tmp_path / "original.pt")  # the original's three keys
    result = run("sample.py", "--out_file", "./images/IMAGE.png", "--module", "toy_u", "--time_scale", 1,
                 "--checkpoint", "original.pt", "--batch_size", 1)
    assert (tmp_path / "images/IMAGE.png").exists() and "sampler ancestral, 16 of 16 steps" in result.stdout


def test_the_original_clipped_command_is_the_original_clipped_sampler(run, tmp_path):
    save_toy(tmp_path / "original.pt")
    run("sample.py", "--out_npz", "clipped.npz", "--float_samples", "True", "--module", "toy_u", "--checkpoint", "original.pt", "--batch_size", 3,
        "--clipped_sampling", "True", "--clipping_value", 1.2, "--time_scale", 2, "--seed", 4)
    model, _ = load_model_from_checkpoint(toy_u, str(tmp_path / "original.pt"), "cpu")
    diffusion = GaussianDiffusion(model, make_beta_schedule("cosine", 8), time_scale=2, sampler="clipped",
                                  time_labels="original")  # the original's clipped DDIM on 16/2 steps
    expected = diffusion.p_sample_loop(image_noise(range(3), [2, 1, 1], 4), clip_value=1.2).clamp(-1, 1)
    assert torch.allclose(torch.from_numpy(np.load(tmp_path / "clipped.npz")["samples"]), expected, atol=1e-6)


def test_the_trajectory_picture_with_any_sampler(run, tmp_path):
    """The original's picture: 5 rows (4 intermediate states and the result) of --batch_size images."""
    save_toy(tmp_path / "original.pt")
    run("sample.py", "--out_file", "trajectory.png", "--module", "toy_u", "--checkpoint", "original.pt",
        "--batch_size", 3, "--trajectory", "True", "--sampler", "dpmpp_2m", "--steps", 6)
    assert Image.open(tmp_path / "trajectory.png").size == (3 * 2 + 1, 5 * 2 + 1)  # 1x1 images, padding 1


def test_demo_samples_every_panel_with_the_chosen_sampler():
    """demo.py's flags: the sampler for every panel, the step flags for the base model's few-step panel
    (by default 8 steps through --time_scale N/8, the picture's original way)."""
    every = SamplerSpec("ddim", {"eta": 0.0, "clip_value": None})
    assert [(f, s) for _, _, f, s in demo.panels(128, every)] == [
        ("original", every), ("original", every._replace(coarsen=16)), ("base_3", every), ("base_4", every),
        ("base_6", every)]
    spec = parse("--sampler", "dpmpp_2m", "--steps", 4, "--step_schedule", "logsnr")
    solver = SamplerSpec("dpmpp_2m", {})
    assert [s for _, _, _, s in demo.panels(128, spec)] == [solver, spec, solver, solver, solver]


def test_demo_refuses_a_flag_its_sampler_ignores(run, tmp_path):
    refused = run("demo.py", "--sampler", "dpmpp_2m", "--eta", 0.5, "--out_dir", tmp_path / "no", check=False)
    assert refused.returncode == 2 and "ignores --eta" in refused.stderr and not (tmp_path / "no").exists()
