"""evaluate.py on a class-conditional chain (a CFG teacher, stage one of guidance distillation, halvings):
rows at every guidance weight, network calls counted per call, accuracy on the requested classes, the
pairing with the teacher of the same w, the report, and the mistakes it refuses."""
import csv
import math
import os

import numpy as np
import pytest
import torch

import digits_u
import fid
from conftest import run_script

FAST = ["--num_workers", 0, "--device", "cpu"]
SMALL = ["--kid_subsets", 4, "--fid_bootstrap", 4, "--device", "cpu"]
N_IMAGES, SEED, K = 12, 5, 10
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def cond_chain(tmp_path_factory):
    """A conditional digits base of 8 steps, its w-input model (w in [0, 3]) and two halvings (4, 2 steps)."""
    folder = tmp_path_factory.mktemp("cond_chain")
    run = lambda *args: run_script(*args, cwd=folder, env_extra=ONE_THREAD)
    run("train.py", "--module", "digits_cond_u", "--name", "c", "--dname", "original", "--num_timesteps", 8,
        "--num_iters", 2, "--batch_size", 8, *FAST)
    run("distillate.py", "--module", "digits_cond_u", "--name", "c", "--dname", "guided", "--guidance_distill", "True",
        "--w_min", 0, "--w_max", 3, "--num_stages", 2, "--base_checkpoint", "checkpoints/c/original/checkpoint.pt",
        "--num_iters", 2, "--batch_size", 8, *FAST)
    return folder


CHECKPOINTS = ["checkpoints/c/original/checkpoint.pt", "checkpoints/c/guided_w/checkpoint.pt",
               "checkpoints/c/guided_0/checkpoint.pt", "checkpoints/c/guided_1/checkpoint.pt"]


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def sample_npz(folder, checkpoint, w, name):
    """sample.py's images with image i asked for class i mod 10: an independent path to evaluate.py's samples."""
    labels = ",".join(str(i % K) for i in range(N_IMAGES))
    run_script("sample.py", "--module", "digits_cond_u", "--checkpoint", checkpoint, "--sampler", "ddim",
               "--guidance", w, "--labels", labels, "--num_images", N_IMAGES, "--seed", SEED, "--device", "cpu",
               "--out_npz", f"{name}.npz", "--float_samples", "True", cwd=folder, env_extra=ONE_THREAD)
    return torch.from_numpy(np.load(folder / f"{name}.npz")["samples"])


def test_evaluate_measures_a_guided_chain_at_every_guidance_weight(cond_chain):
    run_script("evaluate.py", "--module", "digits_cond_u", "--checkpoints", *reversed(CHECKPOINTS), "--num_images",
               N_IMAGES, "--nfe", "1,2,4", "--guidance", "0,2", "--match_steps", 2, "--seed", SEED, "--out", "ev/g",
               *SMALL, cwd=cond_chain, env_extra=ONE_THREAD)
    rows = read_csv(cond_chain / "ev/g.csv")
    # per w > 0: the CFG teacher through its 8 steps (16 calls), CFG DDIM and DPM-Solver++ at 2 and 4 calls (1 and 2
    # steps; the odd NFE 1 is skipped); at w = 0 one conditional call per step: 8 calls, and 1, 2 and 4 steps at
    # NFE 1, 2, 4; then the w-input model (8 steps, 8 calls) and the halvings (4 and 2 calls)
    students = [("w-input", "8", "ddim", "8"), ("distilled", "4", "ddim", "4"), ("distilled", "2", "ddim", "2")]
    unguided = ([("base", "8", "ddim", "8")] + [("base", "8", name, k) for name in ("ddim", "dpmpp_2m")
                                                 for k in ("1", "2", "4")] + students)
    guided = ([("base", "8", "ddim", "16")] + [("base", "8", name, k) for name in ("ddim", "dpmpp_2m") for k in ("2", "4")]
              + students)
    assert [(r["model"], r["steps"], r["sampler"], r["nfe"], r["w"]) for r in rows] == (
        [("floor", "", "real", "", "")] + [row + ("0.0",) for row in unguided] + [row + ("2.0",) for row in guided])
    assert all(0 <= float(r["accuracy"]) <= 1 for r in rows)
    assert all(math.isfinite(float(r[m])) for r in rows for m in ("fid", "kid", "paired_rmse"))

    # the same images drawn by sample.py, measured here: accuracy, FID, pairing with the teacher of the same w
    classifier = digits_u.load_classifier()
    labels = torch.arange(N_IMAGES) % K
    teacher = {w: sample_npz(cond_chain, CHECKPOINTS[0], w, f"teacher{w}") for w in (0, 2)}
    student = sample_npz(cond_chain, CHECKPOINTS[3], 2, "student2")
    for w, images in teacher.items():
        row = next(r for r in rows if (r["model"], r["nfe"], r["w"]) == ("base", "16" if w else "8", f"{w:.1f}"))
        with torch.no_grad():
            accuracy = (classifier(images).argmax(1) == labels).double().mean().item()
        assert float(row["accuracy"]) == pytest.approx(accuracy)
        assert float(row["accuracy_se"]) == pytest.approx(math.sqrt(accuracy * (1 - accuracy) / N_IMAGES))
        assert float(row["paired_rmse"]) == 0.0  # each w's reference
    features = lambda images: digits_u.make_feature_extractor()(images).double().detach()
    held_out = features(digits_u.make_test_dataset().tensors[0])
    two_step = next(r for r in rows if r["model"] == "distilled" and r["steps"] == "2" and r["w"] == "2.0")
    assert float(two_step["fid"]) == pytest.approx(fid.fid_from_features(features(student), held_out), rel=1e-6)
    rmse = (student - teacher[2]).pow(2).flatten(1).mean(1).sqrt()
    assert float(two_step["paired_rmse"]) == pytest.approx(float(rmse.mean()), rel=1e-5)
    with torch.no_grad():
        assert float(two_step["accuracy"]) == pytest.approx((classifier(student).argmax(1) == labels).double().mean().item())

    markdown = (cond_chain / "ev/g.md").read_text()
    assert "| w = 0 | w = 2 |" in markdown and "## Headline" in markdown
    headline = [line for line in markdown.split("## Headline")[1].split("##")[0].splitlines() if line.startswith("| 2 |")]
    assert len(headline) == 1 and f"{100 * float(two_step['accuracy']):.1f}" in headline[0]
    with torch.no_grad():  # the student's accuracy minus the teacher's, paired image by image
        gained = ((classifier(student).argmax(1) == labels).double() - (classifier(teacher[2]).argmax(1) == labels).double())
    gap = f"{100 * float(gained.mean()):+.1f} ± {100 * float(gained.std()) / math.sqrt(N_IMAGES):.1f}"
    assert headline[0].split(" | ")[4] == gap
    assert "The classifier's accuracy on the 500 reference images" in markdown
    assert (cond_chain / "ev/g.png").stat().st_size > 0


@pytest.mark.parametrize("extra, words", [
    (["--guidance", "4"], "lies outside the range [0, 3]"),
    (["--guidance", "-1"], "--guidance"),
    (["--nfe", "32"], "16 network calls with classifier-free guidance"),
    (["--mixed"], "is class-conditional, but the base model"),
])
def test_evaluate_refuses_guided_mistakes_before_any_work(cond_chain, tmp_path, extra, words):
    checkpoints = list(CHECKPOINTS)
    if extra == ["--mixed"]:
        run_script("train.py", "--module", "digits_u", "--name", "u", "--dname", "original", "--num_timesteps", 4,
                   "--num_iters", 1, "--batch_size", 4, *FAST, cwd=tmp_path, env_extra=ONE_THREAD)
        checkpoints[0] = tmp_path / "checkpoints/u/original/checkpoint.pt"  # an unconditional base, guided stages
        extra = []
    out = tmp_path / "ev" / "g"
    result = run_script("evaluate.py", "--module", "digits_cond_u", "--checkpoints", *checkpoints, "--out", out,
                        "--device", "cpu", "--nfe", "2,4", *extra, cwd=cond_chain, check=False)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and words in lines[0], result.stderr
    assert not os.path.exists(tmp_path / "ev")
