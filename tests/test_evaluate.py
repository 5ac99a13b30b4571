"""evaluate.py's FID table, export_checkpoint.py's slim copies and demo.py on the shipped models."""
import csv
import os

import pytest
import torch

import digits_u
from conftest import ROOT
from fid import fid_from_features

FAST = ["--num_workers", 0, "--device", "cpu"]


def test_evaluate_writes_the_figure_4_table(run, tmp_path):
    run("train.py", "--module", "digits_u", "--name", "d", "--dname", "original", "--num_timesteps", 8,
        "--num_iters", 2, "--batch_size", 4, *FAST)
    run("distillate.py", "--module", "digits_u", "--name", "d", "--dname", "base", "--num_stages", 2,
        "--base_checkpoint", "checkpoints/d/original/checkpoint.pt", "--num_iters", 2, "--batch_size", 4, *FAST)
    run("export_checkpoint.py", "checkpoints/d/base_1/checkpoint.pt", "slim/base_1", "--half", "True")
    slim = torch.load(tmp_path / "slim/base_1/checkpoint.pt", weights_only=True)
    assert "optimizer" not in slim and all(v.dtype == torch.float16 for v in slim["G"].values() if v.is_floating_point())
    result = run("evaluate.py", "--module", "digits_u", "--checkpoints", "checkpoints/d/original/checkpoint.pt",
                 "checkpoints/d/base_0/checkpoint.pt", "slim/base_1/checkpoint.pt", "--num_samples", 40,
                 "--ddim_steps", "4,2,1", "--out", "ev/table", "--device", "cpu")
    with open(tmp_path / "ev/table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["steps"], r["sampler"]) for r in rows] == [
        ("floor: training split vs held-out split", "0", ""), ("base, ancestral", "8", "ancestral"),
        ("base, DDIM", "8", "ddim"), ("base, DDIM, 4 steps", "4", "ddim"), ("base, DDIM, 2 steps", "2", "ddim"),
        ("base, DDIM, 1 steps", "1", "ddim"), ("distilled, 4 steps", "4", "ddim"), ("distilled, 2 steps", "2", "ddim")]
    extractor = digits_u.make_feature_extractor()
    features = lambda ds: extractor(torch.stack([ds[i][0] for i in range(len(ds))])).double()
    with torch.no_grad():
        floor = fid_from_features(features(digits_u.make_dataset()), features(digits_u.make_test_dataset()))
    assert float(rows[0]["fid"]) == pytest.approx(floor, rel=1e-6)
    assert all(float(r["fid"]) > 0 for r in rows)
    assert (tmp_path / "ev/table.png").stat().st_size > 0 and (tmp_path / "ev/table.md").exists()
    assert os.path.isdir(tmp_path / "ev/table_tb")
    assert "Wrote" in result.stdout


@pytest.mark.skipif(not os.path.isfile(os.path.join(ROOT, "checkpoints/digits/base_6/checkpoint.pt")),
                    reason="the shipped digits checkpoints are not in this checkout")
def test_demo_samples_the_shipped_checkpoints(run, tmp_path):
    result = run("demo.py", "--num_images", 4, "--out_dir", tmp_path / "images")
    names = sorted(os.listdir(tmp_path / "images"))
    assert names == sorted(["digits_base.png", "digits_base_8_steps.png", "digits_demo.png",
                            "digits_distilled_1_step.png", "digits_distilled_4_steps.png",
                            "digits_distilled_8_steps.png"])
    assert "| distilled, 4 steps |" in result.stdout  # the shipped evaluation table
    steps = [torch.load(os.path.join(ROOT, f"checkpoints/digits/{d}/checkpoint.pt"), weights_only=True)["n_timesteps"]
             for d in ["original"] + [f"base_{k}" for k in range(7)]]
    assert steps == [128, 64, 32, 16, 8, 4, 2, 1]
