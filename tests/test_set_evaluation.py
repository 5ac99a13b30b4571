"""evaluate.py --samples: scoring sample folders and npz files written elsewhere, the FID Inception network from a
weights file, torchrun, and the folders it refuses."""
import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import digits_u
import fid
from conftest import ROOT, TESTS, run_script
from image_sets import NpzSet, npz_array, uint8_to_float

BASE4 = os.path.join(ROOT, "checkpoints", "digits", "base_4", "checkpoint.pt")  # the 4-step student
BASE5 = os.path.join(ROOT, "checkpoints", "digits", "base_5", "checkpoint.pt")  # the 2-step student
SCORE = ["--module", "digits_u", "--kid_subset_size", 50, "--kid_subsets", 20, "--fid_bootstrap", 10, "--device", "cpu"]


def sample_set(folder, checkpoint, n, shard_size, seed=0, npz=None):
    args = ["--module", "digits_u", "--checkpoint", checkpoint, "--sampler", "ddim", "--num_images", n,
            "--shard_size", shard_size, "--seed", seed, "--device", "cpu", "--out_dir", folder]
    run_script("sample.py", *args, *(["--out_npz", npz] if npz else []), cwd=os.path.dirname(folder))


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Two sample folders of the same noise (4- and 2-step students, 120 images, shards of 50), the first also as
    an npz, and a 2-step folder of another seed and size."""
    root = tmp_path_factory.mktemp("sets")
    sample_set(str(root / "four"), BASE4, 120, 50, npz=str(root / "four.npz"))
    sample_set(str(root / "two"), BASE5, 120, 50)
    sample_set(str(root / "other"), BASE5, 90, 40, seed=5)
    return root


def test_npz_entries_stored_uncompressed_are_memory_maps_and_compressed_ones_are_read(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (7, 5, 4, 3), dtype=np.uint8)
    labels = np.arange(7) % 3
    np.savez(tmp_path / "stored.npz", arr_0=images, arr_1=labels)
    np.savez_compressed(tmp_path / "packed.npz", arr_0=images, arr_1=labels)
    stored = npz_array(str(tmp_path / "stored.npz"), "arr_0")
    assert isinstance(stored, np.memmap) and np.array_equal(stored, images)
    packed = npz_array(str(tmp_path / "packed.npz"), "arr_0")
    assert not isinstance(packed, np.memmap) and np.array_equal(packed, images)
    for name in ("stored.npz", "packed.npz"):
        s = NpzSet(str(tmp_path / name), block_size=3)
        assert s.blocks() == [(0, 3), (3, 6), (6, 7)] and s.image_shape == (3, 5, 4)
        assert torch.equal(s.images(3, 6), torch.from_numpy(images[3:6].astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1)
        assert s.labels(2, 5).tolist() == labels[2:5].tolist()


def test_uint8_images_map_back_onto_the_grid_they_were_rounded_to():
    values = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16, 1).numpy()
    back = uint8_to_float(values)
    assert back.min() == -1 and back.max() == 1
    assert torch.allclose((back + 1) * 127.5, torch.arange(256.).reshape(1, 1, 16, 16), atol=1e-4)


def random_inception_weights(path):
    """Random weights of the FID InceptionV3 (none can be downloaded here), saved as a user's file would be."""
    state = fid.random_inception_weights(seed=0)
    torch.save(state, path)
    return state


def test_the_fid_inception_from_a_weights_file_computes_pytorch_fids_own_network(tmp_path, monkeypatch):
    from pytorch_fid import inception as pf
    state = random_inception_weights(tmp_path / "w.pth")
    ours, described = fid.load_inception("cpu", str(tmp_path / "w.pth"))
    assert "not the published FID weights" in described
    monkeypatch.setattr(pf, "load_state_dict_from_url", lambda *a, **k: state)  # pytorch-fid's loader, given the file
    theirs = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    images = torch.rand(3, 3, 40, 28)
    with torch.no_grad():
        expected = theirs(images)[0].flatten(1)
        got = ours(images)
    assert got.shape == (3, 2048) and got.std(0).mean() > 0.01 * got.abs().mean() > 0  # features of each image
    assert torch.equal(got, expected)


def test_a_file_that_is_not_the_fid_inception_is_refused_in_one_line(tmp_path):
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    for name, said in (("other.pth", "does not hold the FID InceptionV3 weights"), ("junk.pth", "cannot read")):
        with pytest.raises(RuntimeError, match=said):
            fid.load_inception("cpu", str(tmp_path / name))
    result = run_script("evaluate.py", "--module", "colour_u", "--samples", "x", "--features", "inception",
                        "--inception_weights", tmp_path / "junk.pth", "--out", tmp_path / "r", check=False, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr


def test_scored_sets_give_the_measures_computed_from_their_images(sets, tmp_path):
    run_script("evaluate.py", *SCORE, "--samples", sets / "four", sets / "two", sets / "four.npz", sets / "other",
               "--num_paired", 100, "--out", tmp_path / "r", cwd=tmp_path)
    rows = read_csv(tmp_path / "r.csv")
    assert [r["set"] for r in rows] == [str(sets / n) for n in ("four", "two", "four.npz", "other")]
    extractor = digits_u.make_feature_extractor().eval()
    with torch.no_grad():
        reference = torch.cat([extractor(x[None]) for x, _ in digits_u.make_test_dataset()]).double()
        four = uint8_to_float(np.load(sets / "four.npz")["arr_0"])
        two = uint8_to_float(np.concatenate([np.load(sets / "two" / f"shard_00000{k}.npz")["arr_0"] for k in range(3)]))
        four_f, two_f = extractor(four).double(), extractor(two).double()
    assert float(rows[0]["fid"]) == pytest.approx(fid.fid_from_features(four_f, reference), rel=1e-6)
    assert float(rows[1]["fid"]) == pytest.approx(fid.fid_from_features(two_f, reference), rel=1e-6)
    # paired with the first set, image by image over the first 100
    rmse = ((two[:100] - four[:100]).flatten(1).pow(2).mean(1).sqrt()).mean()
    assert float(rows[1]["paired_rmse"]) == pytest.approx(float(rmse), rel=1e-6)
    assert float(rows[1]["fid_diff"]) == pytest.approx(float(rows[1]["fid"]) - float(rows[0]["fid"]), rel=1e-9)
    assert float(rows[0]["paired_rmse"]) == 0 and float(rows[1]["fid_diff_sd"]) > 0
    # the npz of the first folder: the same images, but no manifest to say they share its noise
    assert rows[2]["fid"] == rows[0]["fid"] and float(rows[2]["fid_diff"]) == 0 and rows[2]["paired_rmse"] == ""
    # another seed and size: measured, not paired
    assert rows[3]["paired_rmse"] == "" and rows[3]["fid_diff"] == "" and rows[3]["n_samples"] == "90"
    assert rows[0]["steps"] == "4" and rows[1]["steps"] == "2" and rows[3]["seed"] == "5"
    assert "| set |" in (tmp_path / "r.md").read_text()


def test_two_processes_under_torchrun_score_like_one(sets, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, ROOT]), OMP_NUM_THREADS="1")
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", os.path.join(ROOT, "evaluate.py"),
            *map(str, SCORE), "--samples", str(sets / "four"), str(sets / "other"), "--chunk_size", 64,
            "--out", str(tmp_path / "two")]
    result = subprocess.run([sys.executable, *map(str, args)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run_script("evaluate.py", *SCORE, "--samples", sets / "four", sets / "other", "--chunk_size", 64,
               "--out", tmp_path / "one", cwd=tmp_path)
    one, two = read_csv(tmp_path / "one.csv"), read_csv(tmp_path / "two.csv")
    for a, b in zip(one, two):
        for column in ("fid", "fid_sd", "kid", "kid_sd", "density", "coverage", "paired_rmse"):
            # the same features up to float32 round-off of the network on another thread count
            assert (a[column] == b[column] == "") or float(a[column]) == pytest.approx(float(b[column]), rel=1e-6), column
    assert "read by 2 processes" in (tmp_path / "two.md").read_text()


def test_a_folder_with_missing_or_broken_shards_is_named_before_any_work(sets, tmp_path):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(sets / "four", broken)
    os.remove(broken / "shard_000001.npz")
    with open(broken / "shard_000002.npz", "r+b") as f:
        f.truncate(100)  # a kill mid-copy
    result = run_script("evaluate.py", *SCORE, "--samples", broken, "--out", tmp_path / "r", check=False, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "1 of its 3 shards whole" in result.stderr and "shards 1 missing" in result.stderr
    assert "shard 2 does not read" in result.stderr
    os.remove(broken / "shard_000002.npz")
    shutil.copy(sets / "two" / "shard_000000.npz", broken / "shard_000002.npz")  # another set's shard 0
    result = run_script("evaluate.py", *SCORE, "--samples", broken, "--out", tmp_path / "r", check=False, cwd=tmp_path)
    assert result.returncode == 2 and "shard 2 holds uint8 images of shape (50, 8, 8, 1)" in result.stderr
    shutil.copy(sets / "two" / "shard_000001.npz", broken / "shard_000001.npz")  # images 50..99 of another run
    result = run_script("evaluate.py", *SCORE, "--samples", broken, "--out", tmp_path / "r", check=False, cwd=tmp_path)
    assert "shard 1 was written by another sampling run" in result.stderr, result.stderr
    assert not os.path.exists(tmp_path / "r.csv") and not os.path.exists(tmp_path / "r.md")


@pytest.mark.parametrize("extra, said", [
    (["--samples", "nowhere"], "nowhere does not exist"),
    (["--samples", "."], "is not a sample folder of sample.py"),
    (["--samples", "four", "--reference", "nothing.npz"], "nothing.npz does not exist"),
    (["--checkpoints", BASE4, "--reference", "train"], "--reference is for --samples"),
])
def test_bad_sets_are_one_line(sets, tmp_path, extra, said):
    result = run_script("evaluate.py", *SCORE, *extra, "--out", tmp_path / "r", check=False, cwd=sets)
    assert result.returncode == 2 and said in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_evaluate_with_checkpoints_under_torchrun_points_to_samples(tmp_path):
    result = run_script("evaluate.py", *SCORE, "--checkpoints", BASE4, "--out", tmp_path / "r", check=False,
                        cwd=tmp_path, env_extra={"WORLD_SIZE": "2", "RANK": "0"})
    assert result.returncode == 2 and "evaluate.py --samples" in result.stderr, result.stderr


def test_inception_features_of_sets_through_a_users_weights_file(tmp_path):
    random_inception_weights(tmp_path / "w.pth")
    rng = np.random.default_rng(1)
    real = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    fake = np.clip(real.astype(int) + rng.integers(-40, 40, real.shape), 0, 255).astype(np.uint8)
    np.savez(tmp_path / "real.npz", arr_0=real)
    np.savez(tmp_path / "fake.npz", arr_0=fake)
    run_script("evaluate.py", "--module", "colour_u", "--samples", "fake.npz", "--reference", "real.npz",
               "--features", "inception", "--inception_weights", "w.pth", "--kid_subset_size", 6, "--kid_subsets", 4,
               "--fid_bootstrap", 3, "--chunk_size", 5, "--device", "cpu", "--out", "r", cwd=tmp_path)
    net, _ = fid.load_inception("cpu", str(tmp_path / "w.pth"))
    features = [fid.inception_features(uint8_to_float(x), "cpu", model=net) for x in (fake, real)]
    row = read_csv(tmp_path / "r.csv")[0]
    assert float(row["fid"]) == pytest.approx(fid.fid_from_features(*features), rel=1e-6)
    assert "w.pth (SHA-256" in (tmp_path / "r.md").read_text()


def test_the_reference_is_the_training_set_a_held_out_part_or_a_file(sets, tmp_path):
    common = [*SCORE, "--samples", sets / "four", "--num_paired", 10]
    for extra, expected in ((["--reference", "train"], len(digits_u.make_dataset())), (["--held_out", 300], 300),
                            (["--reference", sets / "four.npz"], 120)):
        run_script("evaluate.py", *common, *extra, "--out", tmp_path / "r", cwd=tmp_path)
        row = read_csv(tmp_path / "r.csv")[0]
        assert int(row["n_reference"]) == expected
    assert abs(float(row["fid"])) < 1e-4  # a set against its own images: 0 up to the round-off of the eigenvalues


@pytest.mark.parametrize("extra, said", [
    (["--module", "colour_u", "--samples", "four", "--reference", "train"], "cannot be compared"),
    (["--module", "digits_u", "--samples", "four", "--reference", "tiny.npz"], "density and coverage need more than 5"),
])
def test_sets_that_cannot_be_measured_are_one_line(sets, tmp_path, extra, said):
    np.savez(sets / "tiny.npz", arr_0=np.zeros((4, 8, 8, 1), np.uint8))
    result = run_script("evaluate.py", *SCORE[2:], *extra, "--out", tmp_path / "r", check=False, cwd=sets)
    assert result.returncode == 2 and said in result.stderr and result.stderr.count("\n") == 1, result.stderr
