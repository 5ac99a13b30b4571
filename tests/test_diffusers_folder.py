"""diffusers folders in and out (diffusers_folder.py): a UNet2DModel pipeline as the teacher of distillate.py and the
starting point of train.py, its schedule and prediction as diffusers reads them, its students exported with the
images of sample.py, the published configurations of google/ddpm-*, and the refusals."""
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMPipeline, DDPMScheduler, DiffusionPipeline, EulerDiscreteScheduler,
                       PNDMScheduler, UNet2DModel)

from conftest import ROOT, run_script
from diffusion import model_grid
from sample_shards import file_fingerprint
from sample_utils import image_noise

sys.path.insert(0, os.path.join(ROOT, "bench"))
from diffusers_exports import diffusers_ddim  # noqa: E402  (bench/diffusers_exports.py: the scheduler loop)

FAST = ["--device", "cpu", "--num_workers", 0, "--log_every", 1, "--log_images", 0, "--seed", 0]
N_IMAGES, SEED = 3, 4


def digits_unet(**kwargs):
    """A UNet2DModel for the 8x8 grey digits in Ho et al.'s layout (freq_shift 1, flip_sin_to_cos, padding 0), with
    random weights whose output is small enough that DDIM's images are not all clipped."""
    torch.manual_seed(0)
    config = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                  norm_num_groups=8, freq_shift=1, flip_sin_to_cos=True, downsample_padding=0, norm_eps=1e-6)
    unet = UNet2DModel(**{**config, **kwargs})
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.2)
    return unet.eval()


def save_pipeline(folder, unet=None, scheduler=None):
    DDPMPipeline(unet=unet or digits_unet(), scheduler=scheduler or DDPMScheduler()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """google/ddpm-style digits folder (DDPM linear schedule, eps, 1000 steps) distilled to one step: its v copy,
    then students on the trailing grids of 256, 128, ..., 1 points; and a train.py run started from the folder."""
    folder = tmp_path_factory.mktemp("diffusers_import")
    save_pipeline(folder / "ddpm-digits")
    # an x-predicting base of the same schedule: a random eps network's DDIM images are all clipped (x = z / 0.0064)
    save_pipeline(folder / "x-digits", scheduler=DDIMScheduler(beta_schedule="linear", prediction_type="sample"))
    run = lambda *args: run_script(*args, cwd=folder)
    # on the trailing levels, whose 4 of 1000 are diffusers' own trailing DDIM steps
    run("distillate.py", "--module", "digits_u", "--name", "d", "--dname", "base", "--num_stages", 9,
        "--base_checkpoint", "ddpm-digits", "--num_iters", 2, "--batch_size", 4, "--halving_grid", "trailing", *FAST)
    run("train.py", "--module", "digits_u", "--name", "d", "--dname", "tuned", "--checkpoint_to_continue",
        "ddpm-digits", "--num_iters", 2, "--batch_size", 4, "--ema_decay", 0, *FAST)
    return folder


def test_the_chain_keeps_the_unet2dmodel_and_the_folders_schedule(chain):
    fingerprint = file_fingerprint(chain / "ddpm-digits")
    for stage, steps in [("base_v", 1000), ("base_0", 256), ("base_6", 4), ("base_8", 1), ("tuned", 1000)]:
        ckpt = torch.load(chain / "checkpoints" / "d" / stage / "checkpoint.pt", weights_only=True)
        assert ckpt["network"]["class"] == "UNet2DModel" and ckpt["n_timesteps"] == steps
        assert ckpt["network"]["config"]["freq_shift"] == 1 and all(k.startswith("unet.") for k in ckpt["G"])
        assert ckpt["schedule"]["name"] == "linear" and len(ckpt["schedule"]["betas"]) == 1000
    assert ckpt["prediction"] == "eps"  # train.py kept the folder's prediction and schedule without flags
    four = torch.load(chain / "checkpoints" / "d" / "base_6" / "checkpoint.pt", weights_only=True)
    assert four["grid"] == [999, 749, 499, 249] and four["teacher"]["path"].endswith("base_5/checkpoint.pt")
    first = torch.load(chain / "checkpoints" / "d" / "base_v" / "checkpoint.pt", weights_only=True)
    assert first["teacher"]["path"] == "ddpm-digits" and first["prediction"] == "v"
    assert file_fingerprint(chain / "ddpm-digits") == fingerprint  # the source folder is only read


def sample_py_ddim(folder, checkpoint, shape_args=("--module", "digits_u")):
    out = checkpoint.replace("/", "_") + ".npz"
    run_script("sample.py", *shape_args, "--checkpoint", checkpoint, "--sampler", "ddim", "--num_images", N_IMAGES,
               "--seed", SEED, "--device", "cpu", "--out_npz", out, "--float_samples", "True", cwd=folder)
    return torch.from_numpy(np.load(folder / out)["samples"])


@pytest.mark.parametrize("stage, scheduler", [
    ("x-digits", "DDIMScheduler"),  # a folder itself, read and written back: 1000 steps
    ("checkpoints/d/base_v/checkpoint.pt", "DDIMScheduler"),
    ("checkpoints/d/base_2/checkpoint.pt", "DPMSolverMultistepScheduler"),  # 64 steps do not divide 1000
    ("checkpoints/d/base_6/checkpoint.pt", "DDIMScheduler"),  # 4 steps
    ("checkpoints/d/base_8/checkpoint.pt", "DDIMScheduler"),  # 1 step
])
def test_exported_unet2dmodel_students_sample_the_images_of_sample_py(chain, stage, scheduler):
    target = f"hub/{stage.replace('/', '_')}"
    run_script("export_checkpoint.py", stage, target, "--for_diffusers", "True", cwd=chain)  # no module needed
    expected = sample_py_ddim(chain, stage)
    got, used = diffusers_ddim(chain / target, image_noise(range(N_IMAGES), [1, 8, 8], SEED))
    with open(chain / target / "timesteps.json") as f:
        assert used.timesteps.tolist() == json.load(f)["timesteps"]
    assert type(used).__name__ == scheduler
    assert (expected.abs() < 0.98).float().mean() > 0.5  # images, not clipped noise
    assert (got - expected).abs().max() <= 1e-4
    assert (sample_py_ddim(chain, target) - expected).abs().max() <= 1e-5  # the exported folder comes back as itself


def test_the_folders_own_ddim_gives_the_images_of_sample_py_on_the_folder(chain):
    """The import reads the schedule and the timesteps as diffusers does: the folder's own scheduler turned into
    DDIM (trailing, no clipping, last step to x0) over all 1000 steps gives sample.py's DDIM of the folder."""
    expected = sample_py_ddim(chain, "x-digits")
    assert (expected.abs() < 0.98).float().mean() > 0.5
    pipeline = DiffusionPipeline.from_pretrained(chain / "x-digits")
    scheduler = DDIMScheduler.from_config(pipeline.scheduler.config, timestep_spacing="trailing", clip_sample=False,
                                          set_alpha_to_one=True)
    scheduler.set_timesteps(1000)
    x = image_noise(range(N_IMAGES), [1, 8, 8], SEED)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(pipeline.unet(x, t).sample, t, x).prev_sample
    assert (x.clamp(-1, 1) - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("scheduler, prediction", [
    (DDPMScheduler(beta_schedule="linear"), "eps"),
    (DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction"), "v"),
    (PNDMScheduler(beta_schedule="squaredcos_cap_v2", num_train_timesteps=500, prediction_type="sample"), "x"),
    (EulerDiscreteScheduler(trained_betas=np.linspace(1e-3, 0.05, 200).tolist(), num_train_timesteps=200), "eps"),
    (DDIMScheduler(beta_schedule="scaled_linear", rescale_betas_zero_snr=True, prediction_type="v_prediction"), "v"),
], ids=["ddpm-linear", "ddim-scaled-linear-v", "pndm-cosine-x", "euler-trained-betas", "zero-terminal-snr"])
def test_each_scheduler_kind_is_read_as_diffusers_reads_it(tmp_path, scheduler, prediction):
    from diffusers_folder import read_folder
    ckpt = read_folder(str(save_pipeline(tmp_path / "folder", scheduler=scheduler)))
    n = scheduler.config.num_train_timesteps
    grid = model_grid(ckpt["schedule"]["betas"])
    ours = (grid.alphas[:-1] ** 2).flip(0)  # alpha^2 at index 0 ... n-1
    assert ckpt["prediction"] == prediction and ckpt["n_timesteps"] == n and ckpt["grid"] == list(range(n - 1, -1, -1))
    assert torch.allclose(ours, scheduler.alphas_cumprod.double(), rtol=2e-5, atol=1e-9)
    assert grid.labels.tolist() == list(range(n - 1, -1, -1))  # diffusers' timesteps are the labels


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return save_pipeline(tmp_path_factory.mktemp("good") / "ddpm-digits")


def broken(tmp_path, good, edit):
    folder = tmp_path / "source"
    shutil.copytree(good, folder)
    edit(folder)
    return folder


def rewrite_json(path, **changes):
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


BAD_FOLDERS = {
    "not-diffusers": (lambda f: [shutil.rmtree(f), f.mkdir(), (f / "notes.txt").write_text("mine")],
                      "not a diffusers pipeline"),
    "index-only": (lambda f: [shutil.rmtree(f / name) for name in ("unet", "scheduler")], "it has no unet/ and scheduler/"),
    "no-scheduler": (lambda f: shutil.rmtree(f / "scheduler"), "it has no scheduler/"),
    "no-weights": (lambda f: os.remove(f / "unet" / "diffusion_pytorch_model.safetensors"), "it has no weights"),
    "bad-weights": (lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 64),
                    "cannot be loaded"),
    "bad-json": (lambda f: (f / "unet" / "config.json").write_text("{not json"), "cannot be read as JSON"),
    "latent": (lambda f: rewrite_json(f / "model_index.json", _class_name="LDMPipeline", vqvae=["diffusers", "VQModel"]),
               "latent diffusion pipeline"),
    "text": (lambda f: rewrite_json(f / "unet" / "config.json", _class_name="UNet2DConditionModel"),
             "UNet2DConditionModel"),
    "other-family": (lambda f: rewrite_json(f / "scheduler" / "scheduler_config.json", _class_name="ScoreSdeVeScheduler"),
                     "not of the DDPM family"),
    "learned-variance": (lambda f: rewrite_json(f / "scheduler" / "scheduler_config.json", variance_type="learned_range"),
                         "a learned variance"),
    "other-prediction": (lambda f: rewrite_json(f / "scheduler" / "scheduler_config.json", prediction_type="flow"),
                         "prediction_type 'flow'"),
}


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_folders_this_project_cannot_distil_are_refused_in_one_line(tmp_path, good, case):
    edit, said = BAD_FOLDERS[case]
    folder = broken(tmp_path, good, edit)
    fingerprint = file_fingerprint(folder)
    result = run_script("distillate.py", "--module", "digits_u", "--name", "d", "--dname", "s", "--base_checkpoint",
                        "source", *FAST, check=False, cwd=tmp_path)
    assert result.returncode == 2 and said in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr and file_fingerprint(folder) == fingerprint
    assert not os.path.exists(tmp_path / "checkpoints")


def test_data_of_another_shape_are_refused(tmp_path, good):
    result = run_script("distillate.py", "--module", "colour_u", "--name", "d", "--dname", "s", "--base_checkpoint",
                        str(good), *FAST, check=False, cwd=tmp_path)
    said = "gives images of shape [3, 16, 16], but the model makes [1, 8, 8]"
    assert result.returncode == 2 and said in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not os.path.exists(tmp_path / "checkpoints")


def test_a_class_conditional_unet2dmodel_is_distilled_with_its_labels_and_guided(tmp_path):
    """num_class_embeds K + 1: K classes and the null label K (the layout of classifier-free guidance)."""
    save_pipeline(tmp_path / "cond", unet=digits_unet(num_class_embeds=11), scheduler=DDPMScheduler(num_train_timesteps=8))
    run_script("distillate.py", "--module", "digits_cond_u", "--name", "c", "--dname", "s", "--base_checkpoint", "cond",
               "--prediction", "eps", "--num_iters", 2, "--batch_size", 4, *FAST, cwd=tmp_path)
    ckpt = torch.load(tmp_path / "checkpoints" / "c" / "s" / "checkpoint.pt", weights_only=True)
    assert (ckpt["num_classes"], ckpt["null_label"], ckpt["n_timesteps"]) == (10, 10, 4)
    run_script("sample.py", "--module", "digits_cond_u", "--checkpoint", "checkpoints/c/s/checkpoint.pt", "--guidance", 2,
               "--num_images", 4, "--device", "cpu", "--out_npz", "s.npz", cwd=tmp_path)
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (4, 8, 8, 1)
    for module, flags, said in [("digits_u", [], "is a model of 10 classes, but user module digits_u is unconditional"),
                                ("digits_cond_u", ["--guidance_distill", "True"], "has no guidance-weight input")]:
        result = run_script("distillate.py", "--module", module, "--name", "c", "--dname", "u", "--base_checkpoint",
                            "cond", *flags, *FAST, check=False, cwd=tmp_path)
        assert result.returncode == 2 and said in result.stderr and result.stderr.count("\n") == 1, result.stderr


# -- the published configurations (random weights: the real ones cannot be downloaded here) -----------

CIFAR10 = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=[128, 256, 256, 256],
               layers_per_block=2, down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
               up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], attention_head_dim=None,
               downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32,
               mid_block_scale_factor=1, center_input_sample=False, act_fn="silu", time_embedding_type="positional")
CELEBAHQ = dict(CIFAR10, sample_size=256, block_out_channels=[128, 128, 256, 256, 512, 512],
                down_block_types=["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4)


def test_the_first_releases_scheduler_names_and_timesteps_key_are_read(tmp_path):
    from checkpoints import load_checkpoint
    folder = save_pipeline(tmp_path / "old")
    legacy = {"_class_name": "GaussianDDPMScheduler", "beta_schedule": "linear", "beta_start": 0.0001,
              "beta_end": 0.02, "timesteps": 8, "variance_type": "fixed_large"}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(legacy))
    ckpt = load_checkpoint(str(folder))
    assert ckpt["n_timesteps"] == 8 and ckpt["prediction"] == "eps" and ckpt["schedule"]["name"] == "linear"
    assert ckpt["schedule"]["betas"][-1] == pytest.approx(0.02) and ckpt["schedule"]["betas"][0] == pytest.approx(1e-4)


@pytest.mark.parametrize("config, module, layout", [(CIFAR10, "rgb_noise_u", "flat"),
                                                    (CELEBAHQ, "rgb_noise256_u", "pipeline")],
                         ids=["ddpm-cifar10-32", "ddpm-celebahq-256"])
def test_the_published_google_ddpm_configurations_import_halve_and_export(tmp_path, config, module, layout):
    torch.manual_seed(0)
    unet = UNet2DModel(**config)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    if layout == "flat":  # google/ddpm-cifar10-32 keeps config.json and the weights at the top, beside the first
        unet.save_pretrained(tmp_path / "google")  # release's model_index.json and scheduler_config.json (as published)
        index = {"_class_name": "DDPMPipeline", "_module": "modeling_ddpm.py", "scheduler": ["diffusers", "DDPMScheduler"],
                 "unet": ["diffusers", "UNetUnconditionalModel"]}
        legacy = {"_class_name": "GaussianDDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear",
                  "beta_start": 0.0001, "timesteps": 1000, "variance_type": "fixed_large"}
        for name, data in [("model_index.json", index), ("scheduler_config.json", legacy)]:
            (tmp_path / "google" / name).write_text(json.dumps(data))
    else:
        save_pipeline(tmp_path / "google", unet, scheduler)
    run_script("distillate.py", "--module", module, "--name", "g", "--dname", "s", "--base_checkpoint", "google",
               "--prediction", "eps", "--num_iters", 1, "--keep_training_state", "until_done", *FAST, cwd=tmp_path)
    student = torch.load(tmp_path / "checkpoints" / "g" / "s" / "checkpoint.pt", weights_only=True)
    assert student["n_timesteps"] == 256 and student["prediction"] == "eps"
    run_script("export_checkpoint.py", "checkpoints/g/s/checkpoint.pt", "hub", "--for_diffusers", "True", cwd=tmp_path)
    exported = UNet2DModel.from_pretrained(tmp_path / "hub" / "unet")
    plain = lambda v: list(v) if isinstance(v, (list, tuple)) else v
    assert {k: plain(exported.config[k]) for k in config} == config
    weights = exported.state_dict()
    assert all(torch.equal(weights[k[len("unet."):]], v) for k, v in student["G"].items())
    assert any(not torch.equal(unet.state_dict()[k[len("unet."):]], v) for k, v in student["G"].items())  # it trained
    with open(tmp_path / "hub" / "timesteps.json") as f:
        assert json.load(f)["timesteps"] == student["grid"]


def test_the_cifar10_module_builds_the_published_network_and_reads_cifar10(monkeypatch):
    import torchvision
    from PIL import Image

    import cifar10_u
    from cli import UserError
    assert cifar10_u.UNET_CONFIG == CIFAR10 and cifar10_u.BASE_NUM_STEPS == 1000
    model = cifar10_u.make_model()
    assert model.image_size == [1, 3, 32, 32] and list(model.unet.config.block_out_channels) == [128, 256, 256, 256]

    class FakeCIFAR10(torch.utils.data.Dataset):  # torchvision's class reads the downloaded archive; here: 2 images
        def __init__(self, root, train, download, transform):
            assert (root, train, download) == (cifar10_u.DATA_DIR, True, True)
            self.transform = transform

        def __len__(self):
            return 2

        def __getitem__(self, i):
            pixels = np.array([[[0, 255, 128]] * 32] * 32, dtype=np.uint8)  # black, white and mid-grey channels
            return self.transform(Image.fromarray(pixels)), 7

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    image, label = cifar10_u.make_dataset()[0]
    assert label == 7 and image.shape == (3, 32, 32)
    assert torch.allclose(image[:, 0, 0], torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]), atol=1e-6)

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(UserError, match="CIFAR-10 is not in .* and could not be downloaded"):
        cifar10_u.make_dataset()
