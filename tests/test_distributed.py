"""DistributedDataParallel through torchrun with two CPU processes (gloo)."""
import json
import os
import subprocess
import sys

import numpy as np
import torch

import toy_u
from conftest import ROOT, TESTS, run_script
from train_utils import draw_step


def torchrun(*args, cwd, nproc=2):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, ROOT]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, args)]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_ranks_see_disjoint_data_and_keep_identical_weights_and_ema(tmp_path):
    torchrun(os.path.join(TESTS, "ddp_worker.py"), tmp_path, cwd=tmp_path)
    reports = json.loads((tmp_path / "report.json").read_text())
    assert [r["rank"] for r in reports] == [0, 1] and {r["status"] for r in reports} == {"done"}
    assert reports[0]["model"] == reports[1]["model"]
    assert reports[0]["ema"] == reports[1]["ema"]
    first, second = (set(sum(r["seen"], [])) for r in reports)
    assert len(first) == len(second) == 6 * 8 and not first & second
    # each rank's step draws are draw_step's of (seed, its rank, step): the ranks' noise levels differ
    for r in reports:
        assert r["times"] == [draw_step(0, r["rank"], k, torch.zeros(8, 2, 1, 1), 8, {}).t.tolist() for k in range(6)]
    assert reports[0]["times"] != reports[1]["times"]
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # written by rank 0 alone, G the EMA
    assert saved["step"] == 6 and not any(k.startswith("module.") for k in saved["G"])
    assert [v.sum().item() for k, v in saved["G"].items() if k != "freq"] == reports[0]["ema"]


def test_train_resume_and_sample_under_torchrun(tmp_path):
    common = ["--module", "toy_u", "--name", "toy", "--dname", "base", "--num_timesteps", 16, "--batch_size", 8,
              "--num_workers", 0, "--device", "cpu"]
    torchrun(os.path.join(ROOT, "train.py"), *common, "--num_iters", 4, cwd=tmp_path)
    ckpt = tmp_path / "checkpoints/toy/base/checkpoint.pt"
    assert torch.load(ckpt, weights_only=True)["step"] == 4
    out = torchrun(os.path.join(ROOT, "train.py"), *common, "--num_iters", 6, "--checkpoint_to_continue", ckpt, cwd=tmp_path)
    assert "at step 4" in out.stdout
    saved = torch.load(ckpt, weights_only=True)
    assert saved["step"] == 6 and not any(k.startswith("module.") for k in saved["G"])

    sample = [os.path.join(ROOT, "sample.py"), "--module", "toy_u", "--checkpoint", ckpt, "--batch_size", 7,
              "--clipped_sampling", "True", "--device", "cpu"]
    torchrun(*sample, "--out_npz", "two.npz", "--float_samples", "True", "--shard_size", 2, cwd=tmp_path)
    torchrun(*sample, "--out_npz", "one.npz", "--float_samples", "True", cwd=tmp_path, nproc=1)
    two, one = np.load(tmp_path / "two.npz")["samples"], np.load(tmp_path / "one.npz")["samples"]
    assert two.shape == (7, 2, 1, 1)
    np.testing.assert_allclose(two, one, atol=1e-6)  # image i gets the same noise whatever the split
    assert sorted(os.listdir(tmp_path / "two_shards")) == ["manifest.json"] + [f"shard_00000{k}.npz" for k in range(4)]


def test_ancestral_sampling_under_torchrun_equals_one_process(tmp_path):
    """The original's default sampler draws fresh noise at every step: image i's must not depend on the split."""
    torch.manual_seed(0)
    torch.save({"G": toy_u.make_model().state_dict(), "n_timesteps": 16, "time_scale": 1}, tmp_path / "toy.pt")
    sample = ["--module", "toy_u", "--checkpoint", "toy.pt", "--batch_size", 7, "--chunk_size", 2, "--device", "cpu"]
    torchrun(os.path.join(ROOT, "sample.py"), *sample, "--out_npz", "two.npz", "--float_samples", "True", "--shard_size", 3,
             cwd=tmp_path)
    run_script("sample.py", *sample, "--chunk_size", 7, "--out_npz", "one.npz", "--float_samples", "True", cwd=tmp_path)
    two, one = np.load(tmp_path / "two.npz")["samples"], np.load(tmp_path / "one.npz")["samples"]
    assert two.shape == (7, 2, 1, 1) and np.abs(one).max() > 0.1
    np.testing.assert_allclose(two, one, atol=1e-6)
