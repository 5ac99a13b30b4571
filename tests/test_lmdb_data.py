"""Tests of the LMDB data sets: prepare_data.py (as a subprocess) and lmdb_data's reader."""
import io
import os
import pickle
import subprocess
import sys
import warnings

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import lmdb_data  # noqa: E402
from lmdb_data import LENGTH_KEY, DataError, LMDBImageDataset, encode_image, image_key  # noqa: E402

RED, GREEN, BLUE, GREY = (255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128)


def prepare(*args, cwd=REPO):
    return subprocess.run([sys.executable, os.path.join(REPO, "prepare_data.py"), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def read_all(path):
    with lmdb_data.read_txn(path) as txn:
        return dict(txn.cursor())


def write_lmdb(path, entries):
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, value in entries.items():
            txn.put(key, value)
    env.close()


def jpeg(color, size):
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="JPEG", quality=100)
    return buffer.getvalue()


def mean_color(image):
    return tuple(((image.mean(dim=(1, 2)) + 1) * 127.5).round().int().tolist())


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Flat and nested images of several formats and modes; in sorted order:
    a.png (left half red, right half black), broken.jpg (corrupt), d.gif (P, green),
    sub1/b.jpg (L, grey), sub1/deeper/c.webp (transparent RGBA), sub2/e.PNG (blue)."""
    root = tmp_path_factory.mktemp("images")
    (root / "sub1" / "deeper").mkdir(parents=True)
    (root / "sub2").mkdir()
    wide = np.zeros((16, 24, 3), np.uint8)
    wide[:, :12, 0] = 255
    Image.fromarray(wide).save(root / "a.png")
    Image.new("RGB", (10, 10), GREEN).convert("P").save(root / "d.gif")
    Image.new("L", (16, 24), 128).save(root / "sub1" / "b.jpg", quality=100)
    transparent = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    transparent.save(root / "sub1" / "deeper" / "c.webp", lossless=True)
    Image.new("RGB", (12, 12), BLUE).save(root / "sub2" / "e.PNG")
    (root / "broken.jpg").write_bytes(b"this is not a JPEG")
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def prepared(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "ds"
    result = prepare("--size", "8,16", "--n_worker", 2, "--out", out, images)
    assert result.returncode == 0, result.stderr
    return out, result


def test_image_key():
    assert image_key(256, 42) == b"256-00042"
    assert LENGTH_KEY == b"length"


def test_encode_image_crops_centre_square():
    for size in [(30, 10), (10, 30), (7, 7)]:
        data = encode_image(Image.new("L", size, 200), 8)
        with Image.open(io.BytesIO(data)) as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (8, 8))


def test_prepare_writes_keys_length_and_sizes(prepared):
    out, result = prepared
    entries = read_all(out)
    expected = {image_key(size, i) for size in (8, 16) for i in range(5)}
    assert set(entries) == expected | {LENGTH_KEY}
    assert entries[LENGTH_KEY] == b"5"
    for key in expected:
        with Image.open(io.BytesIO(entries[key])) as img:
            size = int(key.split(b"-")[0])
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (size, size))
    skipped = [line for line in result.stderr.splitlines() if "broken.jpg" in line]
    assert len(skipped) == 1 and "Traceback" not in result.stderr
    assert "wrote 5 images (1 skipped)" in result.stdout


def test_prepare_orders_by_path_and_converts_modes(prepared):
    colors = [mean_color(LMDBImageDataset(prepared[0], 16, flip=False)[i][0]) for i in range(5)]
    assert max(colors[0][1:]) <= 3 and 100 < colors[0][0] < 155  # half red
    expected = [GREEN, GREY, (255, 255, 255), BLUE]  # P, L, transparent RGBA onto white, RGB
    for color, want in zip(colors[1:], expected):
        assert np.abs(np.subtract(color, want)).max() <= 3, (color, want)


def test_original_invocation_refusal_and_overwrite(images, tmp_path):
    # The original README's form, with --out relative to the working directory.
    assert prepare("--size", 8, "--out", "celeba_8", images, cwd=tmp_path).returncode == 0
    assert read_all(tmp_path / "celeba_8")[LENGTH_KEY] == b"5"
    refused = prepare("--size", 8, "--out", "celeba_8", images, cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.startswith("error:") and "--overwrite True" in refused.stderr
    again = prepare("--size", 16, "--out", "celeba_8", "--overwrite", "true", images, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert {key[:3] for key in read_all(tmp_path / "celeba_8")} == {b"16-", b"len"}


@pytest.mark.parametrize("mistake", ["missing path", "empty folder", "size abc", "size 0"])
def test_user_mistakes_give_one_line_and_write_nothing(mistake, images, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    path, size = {"missing path": (tmp_path / "nope", "8"), "empty folder": (empty, "8"),
                  "size abc": (images, "abc"), "size 0": (images, "0")}[mistake]
    result = prepare("--size", size, "--out", tmp_path / "out", path)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_reader_items(prepared):
    dataset = LMDBImageDataset(prepared[0], 16)
    assert len(dataset) == 5
    image, label = dataset[-1]
    assert label == 0 and image.dtype == torch.float32 and image.shape == (3, 16, 16)
    assert image.min() >= -1 and image.max() <= 1
    assert dataset.num_bad == 0


def test_reader_flip(prepared):
    plain = LMDBImageDataset(prepared[0], 8, flip=False)[0][0]
    assert plain[0, :, :4].mean() > 0.5 > plain[0, :, 4:].mean()  # red on the left
    dataset = LMDBImageDataset(prepared[0], 8)
    torch.manual_seed(0)
    first = [dataset[0][0] for _ in range(16)]
    flipped = [torch.equal(image, plain.flip(-1)) for image in first]
    assert all(f or torch.equal(image, plain) for f, image in zip(flipped, first))
    assert 0 < sum(flipped) < 16
    torch.manual_seed(0)
    assert all(torch.equal(image, dataset[0][0]) for image in first)


def test_reader_opens_lazily_and_pickles(tmp_path):
    write_lmdb(tmp_path / "ds", {**{image_key(8, i): jpeg(RED, 8) for i in range(4)},
                                 LENGTH_KEY: b"4"})
    real_path = os.path.realpath(tmp_path / "ds")
    dataset = LMDBImageDataset(tmp_path / "ds", 8, flip=False)
    assert real_path not in lmdb_data._environments  # validated, then closed
    copy = pickle.loads(pickle.dumps(dataset))
    first = dataset[0][0]
    assert lmdb_data._environments[real_path][0] == os.getpid()
    assert torch.equal(pickle.loads(pickle.dumps(dataset))[0][0], first)
    assert torch.equal(copy[1][0], first)
    # Forked workers replace the environment they inherit with their own.
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2)
    assert next(iter(loader))[0].shape == (4, 3, 8, 8)


def test_reader_errors(prepared, tmp_path):
    def error_for(path, resolution):
        with pytest.raises(DataError) as info:
            LMDBImageDataset(path, resolution)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "python prepare_data.py --size 16 --out" in error_for(tmp_path / "nope", 16)
    write_lmdb(tmp_path / "partial", {image_key(8, 0): jpeg(RED, 8)})
    message = error_for(tmp_path / "partial", 8)
    assert "incomplete" in message and "prepare_data.py" in message
    message = error_for(prepared[0], 32)
    assert "wrong resolution" in message and "sizes present: 8, 16" in message


@pytest.fixture
def with_bad_entries(tmp_path):
    """Entries 0 and 3 are good; 1 is not an image, 2 has the wrong size, 4 is missing."""
    path = tmp_path / "bad"
    write_lmdb(path, {image_key(8, 0): jpeg(RED, 8), image_key(8, 1): b"garbage",
                      image_key(8, 2): jpeg(GREEN, 16), image_key(8, 3): jpeg(BLUE, 8),
                      LENGTH_KEY: b"5"})
    return path


def test_bad_entries_skipped(with_bad_entries):
    dataset = LMDBImageDataset(with_bad_entries, 8, flip=False)
    with pytest.warns(UserWarning) as record:
        colors = [mean_color(dataset[i][0]) for i in range(5)]
    messages = [str(w.message) for w in record]
    assert len(messages) == 3
    for key in ("8-00001", "8-00002", "8-00004"):
        assert sum(key in message for message in messages) == 1, messages
    assert colors[1] == colors[2] == colors[3] != colors[4] == colors[0]
    assert dataset.num_bad == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # each bad key is reported once
        dataset[1]
    assert dataset.num_bad == 3


def test_bad_entries_raise(with_bad_entries, tmp_path):
    dataset = LMDBImageDataset(with_bad_entries, 8, bad_entries="error")
    assert dataset[0][0].shape == (3, 8, 8)
    for index, words in [(1, "not a readable image"), (2, "16x16, not 8x8"), (4, "missing")]:
        with pytest.raises(DataError, match=f"8-0000{index}.*{words}"):
            dataset[index]
    write_lmdb(tmp_path / "all_bad", {image_key(8, 0): b"x", LENGTH_KEY: b"1"})
    with pytest.warns(UserWarning), pytest.raises(DataError, match="no readable image"):
        LMDBImageDataset(tmp_path / "all_bad", 8)[0]
