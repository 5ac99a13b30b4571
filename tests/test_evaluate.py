"""evaluate.py end to end (the table, the floor, the headline, held-out slices, channel orders, user
mistakes), export_checkpoint.py's slim copies, and demo.py on the shipped models."""
import csv
import math
import os

import numpy as np
import pytest
import torch

import demo
import digits_u
import fid
import metrics
import seeding
import toy_u
from conftest import REFERENCE, ROOT, run_script

FAST = ["--num_workers", 0, "--device", "cpu"]
SMALL = ["--kid_subsets", 4, "--fid_bootstrap", 4, "--device", "cpu"]  # cheap error bars for tiny runs
COLUMNS = ["model", "steps", "sampler", "nfe", "w", "accuracy", "accuracy_se", "n_samples", "n_reference", "n_paired", "fid", "fid_sd", "kid", "kid_sd",
           "fid_diff", "fid_diff_sd", "kid_diff", "kid_diff_sd", "density", "coverage", "paired_rmse", "paired_rmse_se", "paired_feature_distance",
           "paired_feature_distance_se", "seconds", "checkpoint"]
MEASURES = ["fid", "fid_sd", "kid", "kid_sd", "density", "coverage", "paired_rmse", "paired_rmse_se",
            "paired_feature_distance", "paired_feature_distance_se"]
N_IMAGES, SEED = 12, 3


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A digits base model of 8 steps and two halvings (4 and 2 steps), the last as a float16 slim copy."""
    folder = tmp_path_factory.mktemp("chain")
    run = lambda *args: run_script(*args, cwd=folder)
    run("train.py", "--module", "digits_u", "--name", "d", "--dname", "original", "--num_timesteps", 8,
        "--num_iters", 2, "--batch_size", 4, *FAST)
    run("distillate.py", "--module", "digits_u", "--name", "d", "--dname", "base", "--num_stages", 2,
        "--base_checkpoint", "checkpoints/d/original/checkpoint.pt", "--num_iters", 2, "--batch_size", 4, *FAST)
    run("export_checkpoint.py", "checkpoints/d/base_1/checkpoint.pt", "slim/base_1", "--half", "True")
    return folder


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def digits_features(images):
    with torch.no_grad():
        return digits_u.make_feature_extractor()(torch.as_tensor(images)).double()


def sample_npz(folder, checkpoint, name):
    """The images sample.py draws with deterministic DDIM (an independent path to the same samples)."""
    run_script("sample.py", "--module", "digits_u", "--checkpoint", checkpoint, "--sampler", "ddim",
               "--num_images", N_IMAGES, "--seed", SEED, "--device", "cpu", "--out_npz", f"{name}.npz", "--float_samples", "True", cwd=folder)
    return np.load(folder / f"{name}.npz")["samples"]


def first_reach(curve, target):
    """NFE where a curve [(nfe, value)] first gets to <= target, linear in log NFE (written out here)."""
    nfes, values = zip(*sorted(curve))
    j = next(j for j, v in enumerate(values) if v <= target)
    assert j > 0
    return math.exp(np.interp(target, [values[j], values[j - 1]], [math.log(nfes[j]), math.log(nfes[j - 1])]))


def test_evaluate_writes_every_measure_against_nfe(chain):
    slim = torch.load(chain / "slim/base_1/checkpoint.pt", weights_only=True)
    assert "optimizer" not in slim and all(v.dtype == torch.float16 for k, v in slim["G"].items()
                                           if v.is_floating_point() and not k.endswith("inv_freq"))
    result = run_script("evaluate.py", "--module", "digits_u", "--checkpoints", "checkpoints/d/original/checkpoint.pt",
                        "checkpoints/d/base_0/checkpoint.pt", "slim/base_1/checkpoint.pt", "--num_samples", N_IMAGES,
                        "--ddim_steps", "1,2,4", "--seed", SEED, "--out", "ev/table", *SMALL, cwd=chain)
    rows = read_csv(chain / "ev/table.csv")
    assert list(rows[0]) == COLUMNS
    base = [("base", "8", name, str(k)) for name in ("ancestral", "ddim", "dpmpp_2m", "stochastic")
            for k in ((1, 2, 4, 8) if name == "ancestral" else (1, 2, 4))]
    assert [(r["model"], r["steps"], r["sampler"], r["nfe"]) for r in rows] == (
        [("floor", "", "real", ""), ("base", "8", "ddim", "8")] + base +
        [("distilled", "4", "ddim", "4"), ("distilled", "4", "stochastic", "4"),
         ("distilled", "2", "ddim", "2"), ("distilled", "2", "stochastic", "2")])
    # the floor compares as many real images with the reference as every row compares samples
    assert {(r["n_samples"], r["n_reference"], r["n_paired"]) for r in rows} == {(str(N_IMAGES), "500", str(N_IMAGES))}
    assert all(math.isfinite(float(r[m])) for r in rows for m in MEASURES)

    # the rows against the same samples drawn by sample.py and measured here with fid.py
    reference = sample_npz(chain, "checkpoints/d/original/checkpoint.pt", "reference")
    four = sample_npz(chain, "checkpoints/d/base_0/checkpoint.pt", "four")
    held_out = digits_features(digits_u.make_test_dataset().tensors[0])
    assert float(rows[1]["fid"]) == pytest.approx(fid.fid_from_features(digits_features(reference), held_out), rel=1e-6)
    assert float(rows[1]["paired_rmse"]) == 0.0
    distilled_4 = rows[-4]
    rmse = np.sqrt(((four - reference) ** 2).reshape(N_IMAGES, -1).mean(axis=1))
    assert float(distilled_4["paired_rmse"]) == pytest.approx(rmse.mean(), rel=1e-5)
    assert float(distilled_4["paired_rmse_se"]) == pytest.approx(rmse.std(ddof=1) / math.sqrt(N_IMAGES), rel=1e-4)
    distance = np.linalg.norm(digits_features(four) - digits_features(reference), axis=1)
    assert float(distilled_4["paired_feature_distance"]) == pytest.approx(distance.mean(), rel=1e-5)
    # FID and KID minus the reference row's, with the paired spread over the resamples both rows meet
    four_draws, reference_draws = (metrics.bootstrap_draws(fid.fid_from_features, digits_features(x), held_out, 4, SEED)
                                   for x in (four, reference))
    assert float(distilled_4["fid_diff"]) == pytest.approx(float(distilled_4["fid"]) - float(rows[1]["fid"]), abs=1e-9)
    assert float(distilled_4["fid_diff_sd"]) == pytest.approx(float((four_draws - reference_draws).std()), rel=1e-5)
    assert float(distilled_4["fid_sd"]) == pytest.approx(float(four_draws.std()), rel=1e-5)
    assert float(rows[1]["fid_diff"]) == 0 and float(rows[1]["kid_diff_sd"]) == 0 and rows[0]["fid_diff"] == ""

    # the floor: N_IMAGES training images (a seeded choice), disjoint from the 500 held-out ones
    chosen = torch.randperm(1297, generator=seeding.generator(SEED, "floor-images"))[:N_IMAGES]
    floor_images = digits_u.make_dataset().tensors[0][chosen]
    assert float(rows[0]["fid"]) == pytest.approx(fid.fid_from_features(digits_features(floor_images), held_out), rel=1e-6)
    unrelated = (floor_images - floor_images.roll(-1, 0)).pow(2).flatten(1).mean(1).sqrt()
    assert float(rows[0]["paired_rmse"]) == pytest.approx(float(unrelated.mean()), rel=1e-5)

    # the headline: DDIM's NFE to reach the distilled 4-step model's paired RMSE, recomputed from the table
    markdown = (chain / "ev/table.md").read_text()
    ddim = [(int(r["nfe"]), float(r["paired_rmse"])) for r in rows if r["model"] == "base" and r["sampler"] == "ddim"]
    needed = first_reach(ddim, float(distilled_4["paired_rmse"]))
    ddim_line = next(line for line in markdown.splitlines() if line.startswith("| DDIM |"))
    assert ddim_line.split(" | ")[3].split(" ")[0] == f"{needed:.3g}"
    assert ddim_line.split(" | ")[4].split(" ")[0] == f"{needed / 4:.3g}×"
    assert "Evaluated in" in markdown and "| distilled, 4 steps | DDIM | 4 |" in markdown
    assert f"The floor compares {N_IMAGES} real images" in markdown
    assert (chain / "ev/table.png").stat().st_size > 0 and os.path.isdir(chain / "ev/table_tb")
    assert "Wrote" in result.stdout


TOY_EVAL_MODULE = '''"""tests/toy_u.py with a feature space (the points themselves) and no make_test_dataset()."""
import torch
from toy_u import make_dataset, make_model


def make_feature_extractor():
    return torch.nn.Flatten()
'''


def test_evaluate_a_held_out_slice_of_make_dataset(run, tmp_path):
    (tmp_path / "toy_eval_u.py").write_text(TOY_EVAL_MODULE)
    run("train.py", "--module", "toy_u", "--name", "t", "--dname", "base", "--num_timesteps", 8,
        "--num_iters", 2, "--batch_size", 8, *FAST)
    ckpt = "checkpoints/t/base/checkpoint.pt"
    args = ["--module", "toy_eval_u", "--checkpoints", ckpt, "--nfe", "2", "--samplers", "ddim,dpmpp_2m", *SMALL]
    run("evaluate.py", *args, "--held_out", 100, "--num_images", 50, "--num_paired", 20, "--chunk_size", 16,
        "--out", "ev/toy")
    rows = read_csv(tmp_path / "ev/toy.csv")
    assert [(r["model"], r["sampler"], r["nfe"]) for r in rows] == [
        ("floor", "real", ""), ("base", "ddim", "8"), ("base", "ddim", "2"), ("base", "dpmpp_2m", "2")]
    assert {(r["n_samples"], r["n_reference"], r["n_paired"]) for r in rows} == {("50", "100", "20")}
    points = toy_u.make_dataset().tensors[0].flatten(1).double()  # the features are the points themselves
    chosen = torch.randperm(4096 - 100, generator=seeding.generator(0, "floor-images"))[:50]
    floor = points[chosen]
    assert float(rows[0]["fid"]) == pytest.approx(fid.fid_from_features(floor, points[-100:]), rel=1e-6)
    unrelated = (floor[:20] - floor[:20].roll(-1, 0)).norm(dim=1)  # the first 20, image i against image i+1
    assert float(rows[0]["paired_feature_distance"]) == pytest.approx(float(unrelated.mean()), rel=1e-6)
    assert float(rows[0]["paired_rmse"]) == pytest.approx(float((unrelated / math.sqrt(2)).mean()), rel=1e-6)
    for extra, words in ((["--num_images", 50], "make_test_dataset"), (["--held_out", 4096], "leaves no images"),
                         (["--held_out", 100, "--num_images", 4000], "floor needs")):
        result = run("evaluate.py", *args, *extra, "--out", "bad/toy", check=False)
        assert result.returncode == 2 and words in result.stderr and not os.path.exists(tmp_path / "bad")


COLOUR_MODULES = {
    "colour_eval_u": '''"""tests/colour_u.py (RGB) with held-out images and channel-sensitive features."""
import torch
import colour_u
from colour_u import make_dataset, make_model


def make_test_dataset():
    g = torch.Generator().manual_seed(11)
    return [(x, 0) for x in (0.4 * torch.randn(16, 3, 16, 16, generator=g) + colour_u.RED_CAST).clamp(-1, 1)]


class ChannelStatistics(torch.nn.Module):
    def forward(self, x):
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3)), x[:, :, ::4, ::4].flatten(1)], dim=1)


def make_feature_extractor():
    return ChannelStatistics()
''',
    "colour_eval_bgr_u": '''"""colour_eval_u with its images stored as BGR, and its features (say, a classifier trained on these
BGR images) taking BGR images: the same features of the same pictures."""
import torch
import colour_eval_u
from colour_u import make_model

CHANNEL_ORDER = "BGR"


def make_dataset():
    return [(x.flip(0), y) for x, y in colour_eval_u.make_dataset()]


def make_test_dataset():
    return [(x.flip(0), y) for x, y in colour_eval_u.make_test_dataset()]


class FromBGR(torch.nn.Module):
    def forward(self, x):
        return colour_eval_u.ChannelStatistics()(x.flip(1))


def make_feature_extractor():
    return FromBGR()
'''}


def test_evaluate_measures_every_image_in_the_feature_order(run, tmp_path):
    """A: an unrecorded (BGR) file with RGB data: its samples are flipped to RGB. B: the same file with the
    same pictures stored as BGR: nothing to flip. C: the same weights recorded as RGB. A = B, C differs."""
    for name, text in COLOUR_MODULES.items():
        (tmp_path / f"{name}.py").write_text(text)
    weights = torch.load(os.path.join(REFERENCE, "unet_tiny_cases.pt"), weights_only=True)[0]["G"]
    torch.save({"G": weights, "n_timesteps": 8, "time_scale": 1}, tmp_path / "original.pt")
    torch.save({"G": weights, "n_timesteps": 8, "time_scale": 1, "time_labels": "aligned", "channel_order": "RGB"},
               tmp_path / "rgb.pt")
    for out, module, ckpt in (("a", "colour_eval_u", "original.pt"), ("b", "colour_eval_bgr_u", "original.pt"),
                              ("c", "colour_eval_u", "rgb.pt")):
        run("evaluate.py", "--module", module, "--checkpoints", ckpt, "--nfe", "2", "--samplers", "ddim",
            "--num_images", 8, "--out", out, *SMALL)
    a, b, c = (read_csv(tmp_path / f"{out}.csv") for out in "abc")
    for row_a, row_b in zip(a, b):
        assert [float(row_a[m]) for m in MEASURES] == pytest.approx([float(row_b[m]) for m in MEASURES], rel=1e-9, abs=1e-12)
    assert a[0]["fid"] == c[0]["fid"]  # the same real images
    assert abs(float(a[1]["fid"]) - float(c[1]["fid"])) > 1e-3 * float(a[1]["fid"])  # flipped samples differ


@pytest.mark.parametrize("mistake, words", [
    (["--ddim_steps", "0"], "--nfe/--ddim_steps"),
    (["--ddim_steps", "-4"], "--nfe/--ddim_steps"),
    (["--num_images", "0"], "--num_images"),
    (["--num_images", "1"], "--num_images must be at least 2"),
    (["--samplers", "ddim,euler"], "unknown sampler euler"),
    (["--nfe", "16"], "exceeds the base model's 8 steps"),
    (["--no_base"], "exactly one base model"),
])
def test_evaluate_refuses_mistakes_before_any_work(chain, tmp_path, mistake, words):
    checkpoints = ["checkpoints/d/base_0/checkpoint.pt", "checkpoints/d/base_1/checkpoint.pt"]
    if mistake != ["--no_base"]:
        checkpoints.insert(0, "checkpoints/d/original/checkpoint.pt")
        extra = mistake
    else:
        extra = []
    out = tmp_path / "ev" / "table"
    result = run_script("evaluate.py", "--module", "digits_u", "--checkpoints", *checkpoints, "--out", out,
                        "--device", "cpu", *extra, cwd=chain, check=False)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and words in lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert not os.path.exists(tmp_path / "ev")  # no OUT.md/.csv/.png, no OUT_tb/


@pytest.mark.skipif(not os.path.isfile(os.path.join(ROOT, "checkpoints/digits/base_6/checkpoint.pt")),
                    reason="the shipped digits checkpoints are not in this checkout")
def test_demo_samples_the_shipped_checkpoints(run, tmp_path):
    result = run("demo.py", "--num_images", 4, "--out_dir", tmp_path / "images")
    names = sorted(os.listdir(tmp_path / "images"))
    assert names == sorted(["digits_base.png", "digits_base_8_steps.png", "digits_demo.png",
                            "digits_distilled_1_step.png", "digits_distilled_4_steps.png",
                            "digits_distilled_8_steps.png", "digits_cond_demo.png"])
    assert "| distilled, 4 steps |" in result.stdout  # the shipped evaluation table
    # the guided picture: the CFG teacher (128 steps) above its 4-step student, w = 0, 1, 2, 4
    assert "CFG teacher, 128 steps, w = 0, 1, 2, 4" in result.stdout
    assert "guidance-distilled, 4 steps, w = 0, 1, 2, 4" in result.stdout
    assert "## Headline" in result.stdout.split("digits_cond_demo.png")[1]  # the guided evaluation's headline
    from PIL import Image
    width, height = Image.open(tmp_path / "images" / "digits_cond_demo.png").size
    digit = demo.ZOOM * (8 + 1)  # one 8x8 digit and its padding, zoomed
    assert width >= 4 * demo.PER_DIGIT * digit and height >= 2 * 10 * digit  # 4 blocks of w; 2 models of 10 rows
    steps = [torch.load(os.path.join(ROOT, f"checkpoints/digits/{d}/checkpoint.pt"), weights_only=True)["n_timesteps"]
             for d in ["original"] + [f"base_{k}" for k in range(7)]]
    assert steps == [128, 64, 32, 16, 8, 4, 2, 1]


def test_a_float16_copy_keeps_the_time_embeddings_frequencies_in_float32(chain):
    from unet import TimeEmbedding
    state = torch.load(chain / "slim" / "base_1" / "checkpoint.pt", weights_only=True)["G"]
    assert state["down.0.weight"].dtype == torch.float16
    frequencies = [k for k in state if k.endswith("inv_freq")]
    assert frequencies
    for k in frequencies:
        assert torch.equal(state[k], TimeEmbedding(2 * len(state[k])).inv_freq), k
