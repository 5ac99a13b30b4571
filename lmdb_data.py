"""LMDB image data sets: the key format, the writer behind prepare_data.py, and the reader.

An LMDB data set holds one JPEG (quality 100) per image and size under `image_key(size, index)`,
and `LENGTH_KEY` -> the image count as text, written last so that an interrupted run never looks
complete.
"""
import contextlib
import io
import os
import warnings

import lmdb
import numpy as np
import torch
from PIL import Image, ImageOps

from cli import UserError

LENGTH_KEY = b"length"
PREPARE_HINT = "python prepare_data.py --size {size} --out {path} IMAGE_FOLDER"
REBUILD = "rebuild the data set with prepare_data.py --overwrite True"


def image_key(size: int, index: int) -> bytes:
    """The key of image `index` at resolution `size`, e.g. b"256-00042"."""
    return f"{size}-{index:05d}".encode("utf-8")


class DataError(UserError, ValueError):
    """A problem with a data set that the user can fix; the message is one line saying how."""


# ---------------------------------------------------------------------------------------------
# Writing


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels are composited onto white."""
    img = ImageOps.exif_transpose(img)  # the picture as viewers show it
    if img.mode.startswith("I;16"):  # 16-bit grayscale: keep the top 8 bits
        img = Image.fromarray((np.asarray(img, dtype=np.uint32) >> 8).astype(np.uint8))
    if img.mode == "P" or img.mode.endswith("A") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img.alpha_composite(rgba)
    return img.convert("RGB")


def encode_image(img: Image.Image, size: int, resample=Image.Resampling.LANCZOS) -> bytes:
    """Resize the short side to `size`, centre-crop to size x size, return JPEG (quality 100)."""
    img = to_rgb(img)
    width, height = img.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    img = img.resize((new_w, new_h), resample)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=100)
    return buffer.getvalue()


def encode_file(path, sizes, resample=Image.Resampling.LANCZOS):
    """Encode one image file at every size: (list of JPEG bytes, None) or (None, reason).

    Never raises on a bad file, so that a worker pool can report it and go on.
    """
    try:
        with Image.open(path) as img:
            img.load()
            return [encode_image(img, size, resample) for size in sizes], None
    except Exception as error:  # any unreadable file (PIL raises many kinds) is skipped
        return None, f"{type(error).__name__}: {error}"


class LMDBWriter:
    """Writes an LMDB data set in batched transactions; `finish` stores the length key last.

    Opening empties the LMDB at `path`, so a rewrite that is interrupted never looks complete.
    The memory map grows as needed.
    """

    def __init__(self, path, batch_bytes=64 << 20):
        os.makedirs(path, exist_ok=True)
        self.env = lmdb.open(os.fspath(path), map_size=1 << 30, readahead=False, meminit=False)
        main_db = self.env.open_db()
        with self.env.begin(write=True) as txn:
            txn.drop(main_db, delete=False)
        self.batch_bytes = batch_bytes
        self.pending = []
        self.pending_bytes = 0

    def put(self, key: bytes, value: bytes):
        self.pending.append((key, value))
        self.pending_bytes += len(value)
        if self.pending_bytes >= self.batch_bytes:
            self.flush()

    def flush(self):
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for key, value in self.pending:
                        txn.put(key, value)
                break
            except lmdb.MapFullError:
                self.env.set_mapsize(2 * self.env.info()["map_size"])
        self.pending, self.pending_bytes = [], 0

    def finish(self, length: int):
        """Write what is pending, then the length key, which marks the data set complete."""
        self.flush()
        self.put(LENGTH_KEY, str(length).encode("utf-8"))
        self.flush()

    def close(self):
        self.env.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------------
# Reading


_environments = {}  # real path -> (pid, environment); LMDB allows one per path and process


def _environment(real_path):
    """This process's read-only environment for `real_path`, opened on first use."""
    pid, env = _environments.get(real_path, (None, None))
    if pid != os.getpid():
        if env is not None:  # inherited through fork: unusable here, and it blocks a new open
            del _environments[real_path]
            env.close()
        env = lmdb.open(real_path, readonly=True, lock=False, readahead=False, meminit=False)
        _environments[real_path] = (os.getpid(), env)
    return env


@contextlib.contextmanager
def read_txn(path):
    """A read transaction on the LMDB at `path`; leaves no environment open that was not."""
    real_path = os.path.realpath(path)
    was_open = _environments.get(real_path, (None,))[0] == os.getpid()
    try:
        with _environment(real_path).begin() as txn:
            yield txn
    finally:
        if not was_open and real_path in _environments:
            _environments.pop(real_path)[1].close()


def read_length(path):
    """The image count of the complete data set at `path`, or None where there is none."""
    if not os.path.isfile(os.path.join(path, "data.mdb")):
        return None
    with read_txn(path) as txn:
        raw = txn.get(LENGTH_KEY)
    return int(raw) if raw is not None and raw.isdigit() else None


def stored_sizes(txn, limit=64):
    """The image sizes present, found by jumping from one key prefix to the next."""
    sizes, cursor = [], txn.cursor()
    found = cursor.first()
    while found and len(sizes) < limit:
        prefix = cursor.key().split(b"-")[0]
        if prefix.isdigit():
            sizes.append(int(prefix))
        found = cursor.set_range(prefix + b".")  # "." sorts right after "-"
    return sorted(sizes)


class LMDBImageDataset(torch.utils.data.Dataset):
    """Images of one resolution from an LMDB data set, as `(image, 0)`.

    `image` is a float32 RGB tensor [3, H, W] in [-1, 1], flipped horizontally with probability 1/2
    when `flip`, by one draw from torch's CPU generator; training seeds that generator for each item
    from (seed, epoch, index) (training_data.SeededDataset), so the flips repeat exactly on resume and
    with any number of DataLoader workers. Malformed entries raise DataError under
    `bad_entries="error"`; under "skip" each is warned about once, counted in `num_bad`, and
    the next good entry is returned instead. The data set holds no open environment (so it
    pickles): each process opens the LMDB on its first item.
    """

    def __init__(self, path, resolution, flip=True, bad_entries="skip"):
        if bad_entries not in ("skip", "error"):
            raise ValueError(f"bad_entries must be 'skip' or 'error', not {bad_entries!r}")
        self.path = os.fspath(path)
        self.resolution = int(resolution)
        self.flip = flip
        self.bad_entries = bad_entries
        self.length = self._check()
        self.num_bad = 0
        self._bad_keys = set()
        self._real_path = os.path.realpath(self.path)

    def _check(self):
        """Validate the data set without keeping it open; return its length."""
        hint = PREPARE_HINT.format(size=self.resolution, path=self.path)
        if not os.path.isfile(os.path.join(self.path, "data.mdb")):
            what = "not found" if not os.path.exists(self.path) else "holds no LMDB data set"
            raise DataError(f"{self.path} {what}: create it with `{hint}`")
        try:
            with read_txn(self.path) as txn:
                raw = txn.get(LENGTH_KEY)
                if raw is None:
                    raise DataError(f"LMDB data set {self.path} is incomplete (no 'length' entry; "
                                    f"was prepare_data.py interrupted?): rerun `{hint}`")
                if not raw.isdigit() or int(raw) == 0:
                    raise DataError(f"LMDB data set {self.path} has a bad 'length' entry "
                                    f"{raw[:20]!r}: rebuild it with `{hint} --overwrite True`")
                if txn.get(image_key(self.resolution, 0)) is None:
                    sizes = ", ".join(map(str, stored_sizes(txn))) or "none"
                    raise DataError(f"wrong resolution: LMDB data set {self.path} has no images of "
                                    f"size {self.resolution} (sizes present: {sizes}); use one of "
                                    f"those or rerun prepare_data.py with --size {self.resolution}")
        except lmdb.Error as error:
            raise DataError(f"cannot read LMDB data set {self.path} ({error}): "
                            f"rebuild it with `{hint} --overwrite True`") from None
        return int(raw)

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} images")
        for offset in range(self.length):
            key = image_key(self.resolution, (index + offset) % self.length)
            with _environment(self._real_path).begin() as txn:
                data = txn.get(key)
            try:
                image = self._decode(key, data)
            except DataError as error:
                if self.bad_entries == "error":
                    raise
                self._report(key, error)
                continue
            if self.flip and torch.rand(()) < 0.5:
                image = image.flip(-1)
            return image, 0
        raise DataError(f"LMDB data set {self.path} has no readable image of size "
                        f"{self.resolution}; {REBUILD}")

    def _decode(self, key, data):
        name = f"entry {key.decode()!r} of {self.path}"
        if data is None:
            raise DataError(f"{name} is missing; {REBUILD}")
        try:
            with Image.open(io.BytesIO(data)) as img:
                img = img.convert("RGB")
        except Exception as error:  # PIL raises many kinds on bad bytes
            raise DataError(f"{name} is not a readable image ({type(error).__name__}); "
                            f"{REBUILD}") from None
        if img.size != (self.resolution, self.resolution):
            raise DataError(f"{name} is {img.size[0]}x{img.size[1]}, not "
                            f"{self.resolution}x{self.resolution}; {REBUILD}")
        array = torch.from_numpy(np.array(img, dtype=np.uint8))
        return array.permute(2, 0, 1).float().div(127.5).sub(1.0)

    def _report(self, key, error):
        if key not in self._bad_keys:
            self._bad_keys.add(key)
            self.num_bad += 1
            warnings.warn(f"skipped: {error}", stacklevel=3)
