"""sample.py at scale: the sample folder of shards, the streamed npz, resuming after a kill, refusing another
run's folder, a full disk, and the picture read back from the shards."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import sample
import sample_shards
import toy_u
from conftest import ROOT, TESTS, run_script
from sample_utils import SamplerSpec, generate, spec_grid
from user_modules import load_model_from_checkpoint

COMMON = ["--module", "toy_u", "--checkpoint", "toy.pt", "--sampler", "ancestral", "--num_images", 23,
          "--shard_size", 5, "--chunk_size", 4, "--seed", 3, "--device", "cpu"]


@pytest.fixture
def toy(tmp_path):
    torch.manual_seed(0)
    torch.save({"G": toy_u.make_model().state_dict(), "n_timesteps": 16, "time_scale": 1}, tmp_path / "toy.pt")
    return tmp_path


def expected_images(folder, n=23, seed=3):
    model, ckpt = load_model_from_checkpoint(toy_u, str(folder / "toy.pt"), "cpu")
    spec = SamplerSpec("ancestral", {})
    return generate(model, spec_grid(spec, ckpt), spec, range(n), [2, 1, 1], seed, chunk_size=n).clamp(-1, 1)


def test_shards_and_the_streamed_npz_hold_what_generate_draws(toy):
    run_script("sample.py", *COMMON, "--out_npz", "set.npz", "--float_samples", "True", cwd=toy)
    folder = toy / "set_shards"
    assert sorted(os.listdir(folder)) == ["manifest.json"] + [f"shard_{k:06d}.npz" for k in range(5)]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["num_images"] == 23 and manifest["shard_size"] == 5 and manifest["seed"] == 3
    assert manifest["checkpoint"]["bytes"] == os.path.getsize(toy / "toy.pt")
    expected = expected_images(toy)
    data = np.load(toy / "set.npz")
    assert sorted(data.files) == ["arr_0", "samples"]
    np.testing.assert_allclose(data["samples"], expected.numpy(), atol=1e-6)
    uint8 = ((expected + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert data["arr_0"].dtype == np.uint8 and np.array_equal(data["arr_0"], uint8)
    with np.load(folder / "shard_000004.npz") as last:
        assert last["arr_0"].shape == (3, 1, 1, 2) and last["indices"].tolist() == [20, 21, 22]


def test_a_rerun_redoes_only_missing_or_broken_shards_and_gives_the_same_file(toy):
    run_script("sample.py", *COMMON, "--out_npz", "whole.npz", cwd=toy)
    folder = toy / "whole_shards"
    reference = (toy / "whole.npz").read_bytes()
    kept = os.stat(folder / "shard_000000.npz").st_mtime_ns
    os.remove(folder / "shard_000001.npz")  # never written
    (folder / "shard_000003.npz").write_bytes((folder / "shard_000003.npz").read_bytes()[:40])  # cut short
    (folder / "shard_000002.npz.tmp-999").write_bytes(b"half a shard")  # what a kill mid-write leaves
    other = COMMON[:COMMON.index("--seed")] + ["--seed", 4]
    run_script("sample.py", *other, "--out_dir", "other", cwd=toy)
    shutil.copy(toy / "other" / "shard_000004.npz", folder / "shard_000004.npz")  # another run's images 20..22
    os.remove(toy / "whole.npz")
    result = run_script("sample.py", *COMMON, "--out_npz", "whole.npz", cwd=toy)
    assert "continuing, 2 of this process's 5 shards already there" in result.stdout
    assert (toy / "whole.npz").read_bytes() == reference
    assert os.stat(folder / "shard_000000.npz").st_mtime_ns == kept


def test_a_killed_run_resumed_finishes_with_the_same_file(toy):
    args = COMMON[:COMMON.index("--num_images")] + ["--num_images", 400, "--shard_size", 10, "--chunk_size", 10,
                                                    "--seed", 3, "--device", "cpu"]
    run_script("sample.py", *args, "--out_npz", "straight.npz", cwd=toy)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, ROOT]), OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "sample.py"), *map(str, args), "--out_npz",
                                "killed.npz"], cwd=toy, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (toy / "killed_shards" / "shard_000003.npz").exists() and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (toy / "killed.npz").exists()
    shards = [f for f in os.listdir(toy / "killed_shards") if f.startswith("shard_") and f.endswith(".npz")]
    assert 4 <= len(shards) < 40
    run_script("sample.py", *args, "--out_npz", "killed.npz", cwd=toy)
    assert (toy / "killed.npz").read_bytes() == (toy / "straight.npz").read_bytes()


@pytest.mark.parametrize("change, named", [(["--seed", 4], "seed"), (["--sampler", "ddim"], "sampler"),
                                           (["--steps", 8], "sigmas"), (["--num_images", 24], "num_images")])
def test_a_rerun_with_other_settings_is_refused_and_changes_nothing(toy, change, named):
    run_script("sample.py", *COMMON, "--out_dir", "set", cwd=toy)
    before = {f: (toy / "set" / f).read_bytes() for f in os.listdir(toy / "set")}
    argv = list(COMMON)
    for flag, value in zip(change[::2], change[1::2]):
        argv = argv[:argv.index(flag)] + [flag, value] + argv[argv.index(flag) + 2:] if flag in argv else argv + [flag, value]
    result = run_script("sample.py", *argv, "--out_dir", "set", cwd=toy, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error:") and "another sampling run" in line and named in line
    assert {f: (toy / "set" / f).read_bytes() for f in os.listdir(toy / "set")} == before


def test_another_checkpoint_in_the_same_folder_is_refused(toy):
    run_script("sample.py", *COMMON, "--out_dir", "set", cwd=toy)
    torch.manual_seed(1)
    torch.save({"G": toy_u.make_model().state_dict(), "n_timesteps": 16, "time_scale": 1}, toy / "other.pt")
    argv = [a if a != "toy.pt" else "other.pt" for a in COMMON]
    result = run_script("sample.py", *argv, "--out_dir", "set", cwd=toy, check=False)
    assert result.returncode == 2 and "checkpoint" in result.stderr.splitlines()[-1]


def test_a_folder_that_is_not_a_sample_folder_is_refused_before_any_work(toy):
    (toy / "photos").mkdir()
    (toy / "photos" / "cat.png").write_bytes(b"not ours")
    result = run_script("sample.py", *COMMON, "--out_dir", "photos", cwd=toy, check=False)
    assert result.returncode == 2 and "is not a sample folder" in result.stderr
    assert os.listdir(toy / "photos") == ["cat.png"]


def test_a_full_disk_stops_with_one_line_and_keeps_the_finished_shards(toy, monkeypatch, capsys):
    monkeypatch.chdir(toy)
    real_savez, calls = np.savez, []

    def savez(file, **arrays):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_savez(file, **arrays)

    monkeypatch.setattr(sample_shards.np, "savez", savez)
    with pytest.raises(SystemExit) as stopped:
        sample.main([str(a) for a in COMMON] + ["--out_dir", "set"])
    assert stopped.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error: no space left on the device") and "finished shards" in message
    assert sorted(os.listdir(toy / "set")) == ["manifest.json", "shard_000000.npz", "shard_000001.npz"]
    for k in (0, 1):
        assert sample_shards.shard_is_whole(str(toy / "set" / f"shard_00000{k}.npz"), 5 * k, 5 * k + 5, (1, 1, 2), False)
    monkeypatch.setattr(sample_shards.np, "savez", real_savez)
    sample.main([str(a) for a in COMMON] + ["--out_dir", "set", "--out_npz", "set.npz"])
    assert np.load(toy / "set.npz")["arr_0"].shape == (23, 1, 1, 2)


def test_a_conditional_set_holds_its_labels_as_arr_1(tmp_path):
    run_script("train.py", "--module", "cond_toy_u", "--name", "c", "--dname", "base", "--num_timesteps", 4,
               "--num_iters", 1, "--batch_size", 8, "--num_workers", 0, "--device", "cpu", cwd=tmp_path)
    run_script("sample.py", "--module", "cond_toy_u", "--checkpoint", "checkpoints/c/base/checkpoint.pt",
               "--num_images", 6, "--labels", "2,0", "--shard_size", 4, "--out_npz", "c.npz", "--device", "cpu",
               cwd=tmp_path)
    data = np.load(tmp_path / "c.npz")
    assert sorted(data.files) == ["arr_0", "arr_1"] and data["arr_1"].tolist() == [2, 2, 2, 0, 0, 0]


def test_the_picture_of_a_sample_folder_is_drawn_from_its_shards(tmp_path):
    checkpoint = os.path.join(ROOT, "checkpoints/digits/base_6/checkpoint.pt")
    run_script("sample.py", "--module", "digits_u", "--checkpoint", checkpoint, "--sampler", "ddim", "--num_images", 20,
               "--shard_size", 8, "--out_dir", "set", "--out_file", "set.png", "--device", "cpu", cwd=tmp_path)
    arr = np.concatenate(list(sample_shards.read_shards(str(tmp_path / "set"), 20, 8)))
    expected = torchvision.utils.make_grid(torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255, nrow=5, padding=2)
    expected = (expected * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "set.png").convert("RGB")), expected)
