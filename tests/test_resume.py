"""Nothing lost: crash-safe checkpoints, exact resume, graceful stop and the non-finite guard."""
import errno
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoints
import toy_u
from conftest import ROOT, TESTS
from cli import UserError
from checkpoints import save_checkpoint

TOY = ["--module", "toy_u", "--num_workers", "0", "--device", "cpu", "--batch_size", 16]


def load(path):
    return torch.load(path, weights_only=True)


def assert_same_tensors(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_tensors(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tensors(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def test_keep_last_checkpoints_and_checkpoint_pt_is_the_newest(tmp_path):
    for step in range(1, 6):
        save_checkpoint({"step": step}, tmp_path, step=step, keep=2)
    names = sorted(os.listdir(tmp_path))
    assert names == ["checkpoint-00000004.pt", "checkpoint-00000005.pt", "checkpoint.pt"]
    assert load(tmp_path / "checkpoint.pt")["step"] == 5


def test_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    save_checkpoint({"step": 1, "x": torch.ones(3)}, tmp_path)
    before = (tmp_path / "checkpoint.pt").read_bytes()

    def disk_full(obj, f):
        f.write(b"partial data")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoints.torch, "save", disk_full)
    with pytest.raises(UserError, match="No space left on device.*previous checkpoint is intact"):
        save_checkpoint({"step": 2}, tmp_path)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary file left behind


def test_sigkill_at_random_moments_leaves_a_loadable_checkpoint(run, tmp_path):
    """Kill training with SIGKILL at random moments; each time checkpoint.pt loads and the run resumes
    from its step. bench/sigkill_soak.py does the same 20 times."""
    rng = random.Random(0)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, ROOT]), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    ckpt = tmp_path / "checkpoints/toy/base/checkpoint.pt"
    args = [sys.executable, os.path.join(ROOT, "train.py"), "--name", "toy", "--dname", "base", "--num_timesteps", 16,
            "--num_iters", 100000, "--save_every", 3, "--keep_last", 2, *TOY]
    previous = None  # the step saved before the last kill
    for kill in range(int(os.environ.get("SIGKILL_ROUNDS", "5"))):
        cmd = args + (["--checkpoint_to_continue", ckpt] if ckpt.exists() else [])
        proc = subprocess.Popen([str(a) for a in cmd], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        started, deadline = time.time(), time.monotonic() + 60
        while not (ckpt.exists() and ckpt.stat().st_mtime > started) and time.monotonic() < deadline:
            time.sleep(0.05)  # until this process has written a checkpoint of its own
        time.sleep(rng.uniform(0.0, 1.5))
        proc.kill()
        output = proc.communicate()[0]
        saved = load(ckpt)  # must load whatever the moment of the kill
        assert saved["step"] > 0 and len(saved["G"]) > 0
        if kill > 0:
            assert "Continuing from" in output and f"at step {previous}" in output
        previous = saved["step"]
    result = run("train.py", "--name", "toy", "--dname", "base", "--num_timesteps", 16, "--num_iters", previous + 2,
                 "--checkpoint_to_continue", ckpt, *TOY)
    assert f"at step {previous}" in result.stdout
    assert load(ckpt)["step"] == previous + 2


@pytest.mark.parametrize("script,schedule", [("train.py", ["--scheduler", "linear", "--warmup", 3]),
                                             ("train.py", ["--scheduler", "StrategyOneCycle"]),
                                             ("distillate.py", ["--scheduler", "linear", "--warmup", 3])])
def test_resume_is_bit_exact(run, tmp_path, script, schedule):
    extra = ["--num_timesteps", 16, "--ema_decay", 0.9] if script == "train.py" else []
    if script == "distillate.py":
        run("train.py", "--name", "toy", "--dname", "teacher", "--num_timesteps", 16, "--num_iters", 20, *TOY)
        extra = ["--base_checkpoint", "checkpoints/toy/teacher/checkpoint.pt", "--ema_decay", 0.9]
    common = [*extra, *TOY, "--name", "toy", "--num_iters", 20, "--seed", 3, *schedule]
    run(script, *common, "--dname", "whole")
    run(script, *common, "--dname", "halves", "--stop_at", 10)
    assert load(tmp_path / "checkpoints/toy/halves/checkpoint.pt")["step"] == 10
    run(script, *common, "--dname", "halves", "--checkpoint_to_continue", "checkpoints/toy/halves/checkpoint.pt")
    whole = load(tmp_path / "checkpoints/toy/whole/checkpoint.pt")
    halves = load(tmp_path / "checkpoints/toy/halves/checkpoint.pt")
    for key in ("G", "model", "optimizer", "scaler", "step"):
        assert_same_tensors(whole[key], halves[key])


def test_rerunning_one_distillation_stage_continues_or_skips_it(run, tmp_path):
    """The same distillate.py command (one stage, no --checkpoint_to_continue) run again continues an
    unfinished stage exactly and leaves a finished one alone, as --num_stages K does."""
    run("train.py", "--name", "toy", "--dname", "teacher", "--num_timesteps", 16, "--num_iters", 5, *TOY)
    common = ["--base_checkpoint", "checkpoints/toy/teacher/checkpoint.pt", *TOY, "--name", "toy", "--num_iters", 12,
              "--seed", 3]
    run("distillate.py", *common, "--dname", "whole")
    run("distillate.py", *common, "--dname", "again", "--stop_at", 5)
    out = run("distillate.py", *common, "--dname", "again").stdout
    assert "Continuing from checkpoints/toy/again/checkpoint.pt at step 5" in out
    whole = load(tmp_path / "checkpoints/toy/whole/checkpoint.pt")
    again = tmp_path / "checkpoints/toy/again/checkpoint.pt"
    for key in ("G", "optimizer", "step"):
        assert_same_tensors(whole[key], load(again)[key])
    finished = again.read_bytes()
    out = run("distillate.py", *common, "--dname", "again").stdout
    assert "Nothing to do" in out and again.read_bytes() == finished


def test_rerunning_train_continues_or_skips_instead_of_overwriting(run, tmp_path):
    """The same train.py command run again continues an unfinished run exactly and leaves a finished
    base model alone: a finished model is never silently trained again from scratch."""
    common = [*TOY, "--name", "toy", "--num_timesteps", 16, "--num_iters", 12, "--ema_decay", 0.9, "--seed", 3]
    run("train.py", *common, "--dname", "whole")
    run("train.py", *common, "--dname", "again", "--stop_at", 5)
    unfinished = (tmp_path / "checkpoints/toy/again/checkpoint.pt").read_bytes()
    out = run("train.py", *common, "--dname", "again", "--stop_at", 4).stdout  # a stop already passed: said, not ignored
    assert "at or past --stop_at 4" in out
    assert (tmp_path / "checkpoints/toy/again/checkpoint.pt").read_bytes() == unfinished
    out = run("train.py", *common, "--dname", "again").stdout
    assert "Continuing from checkpoints/toy/again/checkpoint.pt at step 5" in out
    whole = load(tmp_path / "checkpoints/toy/whole/checkpoint.pt")
    again = tmp_path / "checkpoints/toy/again/checkpoint.pt"
    for key in ("G", "model", "optimizer", "step"):
        assert_same_tensors(whole[key], load(again)[key])
    finished = again.read_bytes()
    out = run("train.py", *common, "--dname", "again").stdout
    assert "Nothing to do" in out and again.read_bytes() == finished


@pytest.mark.parametrize("record", [None, "aligned"])
def test_continuing_keeps_the_files_time_label_convention(run, tmp_path, record):
    """train.py --checkpoint_to_continue writes the convention of the file it continues: a file of the
    original (no record) keeps its i * time_scale labels."""
    ckpt = {"G": toy_u.make_model().state_dict(), "n_timesteps": 8, "time_scale": 1}
    if record is not None:
        ckpt["time_labels"] = record
    torch.save(ckpt, tmp_path / "start.pt")
    run("train.py", "--name", "toy", "--dname", "continued", "--num_timesteps", 8, "--num_iters", 2,
        "--checkpoint_to_continue", "start.pt", *TOY)
    assert load(tmp_path / "checkpoints/toy/continued/checkpoint.pt")["time_labels"] == (record or "original")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_exits_cleanly(tmp_path, signum):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, ROOT]))
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--name", "toy", "--dname", "base", "--num_timesteps", 16,
           "--num_iters", 1000000, "--log_every", 1, *TOY]
    proc = subprocess.Popen([str(a) for a in cmd], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    while not (tmp_path / "checkpoints/toy/base/tensorboard").exists():
        time.sleep(0.05)
    time.sleep(1.0)
    sent = time.monotonic()
    proc.send_signal(signum)
    output = proc.communicate(timeout=30)[0]
    assert time.monotonic() - sent < 10
    assert proc.returncode == 0, output
    assert "Stopped at step" in output and "Traceback" not in output
    assert load(tmp_path / "checkpoints/toy/base/checkpoint.pt")["step"] > 0


NAN_MODULE = """
import torch
import toy_u
from toy_u import make_model

class SomeNaN(torch.utils.data.Dataset):
    def __init__(self):
        self.points = toy_u.make_dataset()

    def __len__(self):
        return len(self.points)

    def __getitem__(self, i):
        x, y = self.points[i]
        return (x * float("nan") if i % {every} == 0 else x), y

def make_dataset():
    return SomeNaN()
"""


def test_non_finite_losses_are_skipped_and_counted(run, tmp_path):
    (tmp_path / "nan_u.py").write_text(NAN_MODULE.format(every=50))
    result = run("train.py", "--module", "nan_u", "--name", "nan", "--dname", "base", "--num_timesteps", 8,
                 "--num_iters", 200, "--batch_size", 1, "--num_workers", 0, "--device", "cpu")
    assert re.search(r"Step \d+: non-finite loss or gradient, 1 update skipped since the last check \(\d in a row\)",
                     result.stderr + result.stdout)
    saved = load(tmp_path / "checkpoints/nan/base/checkpoint.pt")
    assert all(torch.isfinite(v).all() for v in saved["G"].values())


def test_many_non_finite_losses_in_a_row_stop_the_run_with_a_clear_message(run, tmp_path):
    (tmp_path / "nan_u.py").write_text(NAN_MODULE.format(every=1))
    result = run("train.py", "--module", "nan_u", "--name", "nan", "--dname", "base", "--num_timesteps", 8,
                 "--num_iters", 200, "--batch_size", 4, "--num_workers", 0, "--device", "cpu", "--max_bad_steps", 3,
                 check=False)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 3 non-finite losses in a row") and "Traceback" not in result.stderr


def test_a_finished_run_can_drop_its_training_state(run, tmp_path):
    """--keep_training_state until_done: the finished checkpoint holds the weights and records only (smaller), a
    rerun has nothing to do, continuing it to more steps is refused with one line, a stage distils from it, and a
    run stopped before its end keeps everything it needs to resume."""
    common = ["--module", "toy_u", "--name", "toy", "--num_timesteps", 8, "--batch_size", 4, "--num_workers", 0,
              "--device", "cpu", "--ema_decay", 0.9]
    run("train.py", *common, "--dname", "full", "--num_iters", 3)
    run("train.py", *common, "--dname", "slim", "--num_iters", 3, "--keep_training_state", "until_done")
    full, slim = (tmp_path / f"checkpoints/toy/{d}/checkpoint.pt" for d in ("full", "slim"))
    full_ckpt, slim_ckpt = load(full), load(slim)
    assert {"optimizer", "scaler", "model"} <= set(full_ckpt) and not {"optimizer", "scaler", "model"} & set(slim_ckpt)
    assert slim_ckpt["step"] == 3 and slim_ckpt["training_state"] == "dropped"
    assert all(torch.equal(slim_ckpt["G"][k], full_ckpt["G"][k]) for k in full_ckpt["G"])  # the same EMA weights
    assert os.path.getsize(slim) < 0.3 * os.path.getsize(full)  # G of G + raw weights + AdamW's two moments
    again = run("train.py", *common, "--dname", "slim", "--num_iters", 3, "--keep_training_state", "until_done")
    assert "Nothing to do" in again.stdout
    refused = run("train.py", *common, "--dname", "slim", "--num_iters", 5, check=False)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].startswith("error:")
    assert "without its optimizer state" in refused.stderr and load(slim)["step"] == 3
    run("distillate.py", "--module", "toy_u", "--name", "toy", "--dname", "student", "--base_checkpoint", slim,
        "--num_iters", 2, "--batch_size", 4, "--num_workers", 0, "--device", "cpu", "--keep_training_state", "until_done")
    assert load(tmp_path / "checkpoints/toy/student/checkpoint.pt")["training_state"] == "dropped"
    run("train.py", *common, "--dname", "cut", "--num_iters", 6, "--stop_at", 2, "--keep_training_state", "until_done")
    assert "optimizer" in load(tmp_path / "checkpoints/toy/cut/checkpoint.pt")
