"""Interoperability with the original implementation, both ways (SPEC "Checkpoints" and "Time labels").

- `export_checkpoint.py --for_original True` turns a file of this project (labels (i+1)s - 1, RGB) into one
  the original's sample.py samples the same way (three keys, labels i*s, BGR). Checked through this
  project's own `time_labels="original"` path, which tests/test_end_to_end.py and tests/test_reference.py
  hold to the original's outputs: network outputs at every step index and DDIM samples, colours flipped,
  equal those of the source; the edited layers against closed forms.
- `unet_ddpm.py`: the original's user modules (`from unet_ddpm import UNet`) import, and its weights give
  its reference outputs.
"""
import os

import pytest
import torch

import toy_u
from conftest import REFERENCE
import samplers
from checkpoints import checkpoint_channel_order, checkpoint_grid, checkpoint_time_labels, load_weights
from original import ORIGINAL_CLIPPING_VALUE
from sample_utils import image_noise
from user_modules import load_user_module, make_user_model
from unet import UNet, spatial_fold

N_STEPS = 4
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny networks: a second thread only waits (and much longer on a busy machine)


def reference_case(name):
    cases = torch.load(os.path.join(REFERENCE, "unet_tiny_cases.pt"), weights_only=True)
    return next(c for c in cases if c["name"] == name)


UNET_MODULE = """import torch
from unet import UNet


def make_model():
    net = UNet(**{config!r})
    net.image_size = [1, {c}, {size}, {size}]
    return net


def make_dataset():
    return [(torch.zeros({c}, {size}, {size}), 0)] * 4
"""


def write_unet_module(tmp_path, config, size, name="tiny_unet_u"):
    text = UNET_MODULE.format(config=config, c=config["in_channel"], size=size)
    (tmp_path / f"{name}.py").write_text(text)


def source_checkpoint(case, time_scale, channel_order):
    """A file as distillate.py writes it: aligned labels, a recorded channel order, training state."""
    return {"G": case["G"], "n_timesteps": N_STEPS, "time_scale": time_scale, "time_labels": "aligned",
            "channel_order": channel_order, "stage": "distill", "step": 10, "format_version": 1,
            "args": {"lr": 1e-4}, "model": case["G"], "optimizer": {"state": {}, "param_groups": []}}


@pytest.fixture
def one_thread():
    """Tiny networks in this process too: one thread (a second only waits, much longer on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def embedding64(t, inv_freq):
    """unet.TimeEmbedding in float64: [sin(t w_k) for k, cos(t w_k) for k]."""
    angles = t.double().reshape(-1, 1) * inv_freq.double()
    return torch.cat([angles.sin(), angles.cos()], dim=1)


@pytest.mark.parametrize("name, time_scale, channel_order", [
    ("a", 4, "RGB"),  # labels and colours
    ("c", 4, "RGB"),  # the same with a spatial fold of 2
    ("a", 4, "BGR"),  # labels only
    ("c", 1, "RGB"),  # colours only (a base model: both label conventions agree)
])
def test_export_for_original_samples_as_the_source(run, tmp_path, one_thread, name, time_scale, channel_order):
    case = reference_case(name)
    config, fold = case["config"], case["config"]["fold"]
    size = case["x"].shape[-1]
    write_unet_module(tmp_path, config, size)
    source = source_checkpoint(case, time_scale, channel_order)
    torch.save(source, tmp_path / "source.pt")
    run("export_checkpoint.py", "source.pt", "for_original", "--for_original", "True", "--module", "tiny_unet_u",
        env_extra=ONE_THREAD)
    out = torch.load(tmp_path / "for_original" / "checkpoint.pt", weights_only=True)

    assert set(out) == {"G", "n_timesteps", "time_scale"}
    assert (out["n_timesteps"], out["time_scale"]) == (N_STEPS, time_scale)
    assert checkpoint_time_labels(out) == "original" and checkpoint_channel_order(out) == "BGR"
    flip = channel_order == "RGB"

    # The edited layers against closed forms. time.1: W' emb(t) = W emb(t + s - 1) (float64, any t).
    G, G_out = source["G"], out["G"]
    inv_freq, t = G["time.0.inv_freq"], torch.linspace(0, 1000, 37)
    assert torch.allclose(G_out["time.1.weight"].double() @ embedding64(t, inv_freq).T,
                          G["time.1.weight"].double() @ embedding64(t + time_scale - 1, inv_freq).T, atol=1e-5)
    # down.0 / out.2: whole colour groups of fold*fold folded channels change places.
    group = fold * fold
    perm = [(2 - k // group) * group + k % group for k in range(3 * group)] if flip else list(range(3 * group))
    x = torch.randn(2, 3, 4 * fold, 4 * fold)
    assert torch.equal(spatial_fold(x.flip(1) if flip else x, fold), spatial_fold(x, fold)[:, perm])
    assert torch.equal(G_out["down.0.weight"], G["down.0.weight"][:, perm])
    assert torch.equal(G_out["out.2.weight"], G["out.2.weight"][perm])
    assert torch.equal(G_out["out.2.bias"], G["out.2.bias"][perm])
    untouched = set(G) - {"time.1.weight", "down.0.weight", "out.2.weight", "out.2.bias"}
    assert all(torch.equal(G_out[k], G[k]) for k in untouched)

    # Sampled as this project samples a file of the original (no records: labels i*s, BGR shown as RGB).

    def to_rgb(images):  # this project shows the original's (BGR) files flipped
        return images.flip(1) if flip else images

    source_model, exported_model, unconverted_model = (UNet(**config).eval() for _ in range(3))
    source_model.load_state_dict(G)
    exported_model.load_state_dict(G_out)
    unconverted_model.load_state_dict(G)
    grid, exported_grid = checkpoint_grid(source), checkpoint_grid(out)
    unconverted_grid = checkpoint_grid({k: source[k] for k in out})
    assert (checkpoint_time_labels(source), checkpoint_time_labels(out)) == ("aligned", "original")
    z = case["x"]
    with torch.no_grad():
        for i in range(N_STEPS):
            expected = source_model(z, grid.label(i, z))
            assert torch.allclose(to_rgb(exported_model(to_rgb(z), exported_grid.label(i, z))), expected, atol=1e-4)
            # the source itself read the original's way is off: its labels lag by s - 1, its colours swap
            assert (to_rgb(unconverted_model(to_rgb(z), unconverted_grid.label(i, z))) - expected).abs().max() > 1e-2
    noise = image_noise(range(2), list(case["x"].shape[1:]), seed=4)
    clip = ORIGINAL_CLIPPING_VALUE  # the original's clipped sampler
    assert torch.allclose(to_rgb(samplers.sample_ddim(exported_model, to_rgb(noise), exported_grid, clip_value=clip)),
                          samplers.sample_ddim(source_model, noise, grid, clip_value=clip), atol=1e-4)


def test_export_refuses_to_overwrite_its_source(run, tmp_path):
    directory = tmp_path / "checkpoints" / "run"
    directory.mkdir(parents=True)
    torch.save(source_checkpoint(reference_case("a"), 4, "RGB"), directory / "checkpoint.pt")
    before = (directory / "checkpoint.pt").read_bytes()
    result = run("export_checkpoint.py", "checkpoints/run/checkpoint.pt", "checkpoints/run", check=False,
                 env_extra=ONE_THREAD)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: checkpoints/run/checkpoint.pt is the source itself; give another target folder"]
    assert (directory / "checkpoint.pt").read_bytes() == before and os.listdir(directory) == ["checkpoint.pt"]


def write_bad_input_files(tmp_path):
    write_unet_module(tmp_path, reference_case("a")["config"], 16)
    case = reference_case("a")
    torch.save(source_checkpoint(case, 4, "RGB"), tmp_path / "unet.pt")
    torch.save({"G": case["G"], "n_timesteps": N_STEPS, "time_scale": 4}, tmp_path / "original.pt")
    toy = {"G": toy_u.make_model().state_dict(), "n_timesteps": 8, "time_scale": 2, "time_labels": "aligned",
           "channel_order": "RGB"}
    torch.save(toy, tmp_path / "toy.pt")
    torch.save(dict(source_checkpoint(case, 4, "RGB"), num_classes=3, null_label=3, cond_drop_prob=0.1),
               tmp_path / "conditional.pt")
    grey = dict(case["config"], in_channel=1)
    write_unet_module(tmp_path, grey, 16, name="grey_unet_u")
    torch.save({"G": UNet(**grey).state_dict(), "n_timesteps": N_STEPS, "time_scale": 4, "time_labels": "aligned",
                "channel_order": "RGB"}, tmp_path / "grey.pt")
    (tmp_path / "a_file").write_text("")


BAD_INPUTS = [
    (["missing.pt", "out"], "missing.pt does not exist"),
    (["toy.pt", "out", "--for_original", "True", "--module", "toy_u"], "converts the UNet of unet.py"),
    (["toy.pt", "out", "--for_original", "True", "--module", "tiny_unet_u"], "do not fit the model"),
    (["grey.pt", "out", "--for_original", "True", "--module", "grey_unet_u"], "needs a 3-channel UNet"),
    (["original.pt", "out", "--for_original", "True", "--module", "tiny_unet_u"], "needs no conversion"),
    (["unet.pt", "out", "--for_original", "True"], "needs --module"),
    (["unet.pt", "out", "--module", "tiny_unet_u"], "only with --for_original"),
    (["unet.pt", "a_file"], "is a file, not a folder"),
    (["conditional.pt", "out", "--for_original", "True", "--module", "tiny_unet_u"], "is a conditional model"),
    (["unet.pt", "out", "--for_original", "maybe", "--module", "tiny_unet_u"], "expected True or False"),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_export_bad_inputs_are_one_line(run, tmp_path, args, message):
    write_bad_input_files(tmp_path)
    before = sorted(os.listdir(tmp_path))
    result = run("export_checkpoint.py", *args, check=False, env_extra=ONE_THREAD)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


ORIGINAL_STYLE_MODULE = '''from unet_ddpm import UNet

BASE_NUM_STEPS = 1024
BASE_TIME_SCALE = 1


def make_model():
    net = UNet(in_channel = 3,
        channel = 32,
        channel_multiplier = [1, 2],
        n_res_blocks = 1,
        attn_strides = [2],
        attn_heads = 2,
        use_affine_time = True,
        dropout = 0,
        fold = 1)
    net.image_size = [1, 3, 16, 16]
    return net


def make_dataset():
    return []
'''


def test_a_user_module_of_the_original_imports_unet_ddpm(tmp_path, monkeypatch):
    """The original's celeba_u.py pattern (`from unet_ddpm import UNet`, keyword layout as there) loads here,
    and the original's weights give the original's outputs."""
    (tmp_path / "original_style_u.py").write_text(ORIGINAL_STYLE_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = make_user_model(load_user_module("original_style_u")).eval()
    assert type(model) is UNet
    case = reference_case("a")
    load_weights(model, case["G"], "unet_tiny_cases.pt")
    with torch.no_grad():
        assert torch.allclose(model(case["x"], case["t"]), case["out"], atol=1e-4)
