"""The image sets evaluate.py --samples scores without sampling them, each read in blocks of images by index:

- a sample folder of sample.py (sample_shards.py): its manifest says what the set is, its shards are the blocks;
- an npz in guided-diffusion's layout (arr_0 uint8 NHWC, arr_1 the labels if any), as sample.py --out_npz and
  guided-diffusion's reference batches are: an entry stored uncompressed (np.savez, sample.py) is read through a
  memory map, so a set of 50,000 images at 256x256 never sits in memory at once;
- a data set of the user module (make_dataset() or make_test_dataset()).

Every set gives images as float tensors [n, C, H, W] in [-1, 1], in its channel order. A folder or file that
cannot be read whole is refused before any work, naming what is missing or wrong (ImageSetError).
"""
import json
import os
import struct
import zipfile

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

import sample_shards


class ImageSetError(Exception):
    """A set that cannot be scored: one line naming the file and what is wrong with it."""


def npz_array(path, key):
    """Array `key` of an npz file: a read-only memory map when its entry is stored uncompressed, else read whole.
    KeyError when the file has no such array."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{key}.npy")  # KeyError when absent
        if info.compress_type != zipfile.ZIP_STORED:
            with zf.open(info) as f:
                return np.lib.format.read_array(f)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # the zip local file header: its name and extra field lengths at bytes 26-29
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError(f"{key} holds Python objects")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran_order else "C")


def uint8_to_float(images):
    """uint8 [n, H, W, C] -> float32 [n, C, H, W] in [-1, 1] (the inverse of sample_shards.to_uint8 on its grid)."""
    return torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 127.5 - 1  # a copy: maps are read-only


class ImageSet:
    """A set of images read by index ranges: name, num_images, image_shape (C, H, W), channel_order, info (what
    sample.py recorded, {} when nothing is), has_labels, blocks() [(start, end)] and images(start, end)."""

    info, has_labels = {}, False

    def blocks(self):
        return sample_shards.shard_ranges(self.num_images, self.block_size)

    def labels(self, start, end):
        return None


class SampleFolder(ImageSet):
    def __init__(self, folder):
        manifest = os.path.join(folder, sample_shards.MANIFEST)
        try:
            with open(manifest) as f:
                self.info = json.load(f)
            self.num_images, self.block_size = int(self.info["num_images"]), int(self.info["shard_size"])
            c, h, w = self.info["image_shape"]
        except FileNotFoundError:
            raise ImageSetError(f"{folder} is not a sample folder of sample.py (no {sample_shards.MANIFEST})") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ImageSetError(f"cannot read {manifest} ({e}); it is not a manifest of sample.py") from None
        self.name, self.image_shape, self.channel_order = folder, (c, h, w), self.info.get("channel_order", "RGB")
        self.has_labels = self.info.get("labels") is not None
        problems = [self._problem(k, start, end) for k, (start, end) in enumerate(self.blocks())]
        absent = [k for k, p in enumerate(problems) if p == "absent"]
        wrong = [(k, p) for k, p in enumerate(problems) if p not in (None, "absent")]
        if absent or wrong:
            said = []
            if absent:
                said.append(f"shards {sample_shards.listed(absent)} missing (rerun its sample.py command to finish them)")
            if wrong:
                said.append("; ".join(f"shard {k} {p}" for k, p in wrong[:4]) + (" ..." if len(wrong) > 4 else ""))
            raise ImageSetError(f"{folder} holds {len(problems) - len(absent) - len(wrong)} of its {len(problems)} "
                                f"shards whole: {'; '.join(said)}")

    def _problem(self, k, start, end):
        """None when shard k holds images [start, end) of this set's shape, else what is wrong (from the headers
        and the small index array only: the images are not read)."""
        path = sample_shards.shard_path(self.name, k)
        if not os.path.exists(path):
            return "absent"
        c, h, w = self.image_shape
        try:
            images, indices = npz_array(path, "arr_0"), npz_array(path, "indices")
        except Exception as e:  # truncated, not a zip, an array missing
            return f"does not read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'})"
        if images.dtype != np.uint8 or images.shape != (end - start, h, w, c):
            return f"holds {images.dtype} images of shape {images.shape}, the manifest says uint8 {(end - start, h, w, c)}"
        if not np.array_equal(indices, np.arange(start, end)):
            return f"holds images {int(indices[0]) if len(indices) else '?'}... instead of {start}..{end - 1}"
        try:
            recorded = npz_array(path, "manifest_sha256")
        except KeyError:  # written before shards carried it
            return None
        if not np.array_equal(recorded, sample_shards.manifest_digest(self.name)):
            return "was written by another sampling run (its manifest differs)"
        return None

    def images(self, start, end):
        k = start // self.block_size
        assert (start, end) == self.blocks()[k], "blocks of a sample folder are its shards"
        return uint8_to_float(npz_array(sample_shards.shard_path(self.name, k), "arr_0"))

    def labels(self, start, end):
        if not self.has_labels:
            return None
        return torch.as_tensor(self.info["labels"][start:end]).long()


class NpzSet(ImageSet):
    def __init__(self, path, block_size, channel_order="RGB"):
        try:
            self.array = npz_array(path, "arr_0")
        except KeyError:
            raise ImageSetError(f"{path} has no arr_0 (an npz of uint8 images [N, H, W, C], as sample.py --out_npz "
                                "and guided-diffusion write them)") from None
        except Exception as e:
            raise ImageSetError(f"cannot read {path} as an npz ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        if self.array.dtype != np.uint8 or self.array.ndim != 4 or self.array.shape[3] not in (1, 3):
            raise ImageSetError(f"{path}: arr_0 holds {self.array.dtype} of shape {self.array.shape}; expected uint8 "
                                "images [N, H, W, C] with C 1 or 3")
        try:
            self.label_array = npz_array(path, "arr_1")
        except KeyError:
            self.label_array = None
        n, h, w, c = self.array.shape
        self.name, self.num_images, self.block_size = path, n, block_size
        self.image_shape, self.channel_order, self.has_labels = (c, h, w), channel_order, self.label_array is not None

    def images(self, start, end):
        return uint8_to_float(self.array[start:end])

    def labels(self, start, end):
        return None if self.label_array is None else torch.from_numpy(np.array(self.label_array[start:end])).long()


class DatasetSet(ImageSet):
    """A data set of the user module, items an image [C, H, W] in [-1, 1] or (image, label)."""

    def __init__(self, dataset, name, block_size, channel_order, num_workers=0):
        self.dataset, self.name, self.num_images, self.block_size = dataset, name, len(dataset), block_size
        self.channel_order, self.num_workers = channel_order, num_workers
        first = dataset[0]
        self.has_labels = isinstance(first, (tuple, list))
        self.image_shape = tuple((first[0] if self.has_labels else first).shape)
        self._block = None

    def _read(self, start, end):
        if self._block is None or self._block[0] != (start, end):
            loader = DataLoader(Subset(self.dataset, range(start, end)), batch_size=end - start,
                                num_workers=self.num_workers)
            batch = next(iter(loader))
            self._block = ((start, end), batch)
        return self._block[1]

    def images(self, start, end):
        batch = self._read(start, end)
        return batch[0] if self.has_labels else batch

    def labels(self, start, end):
        return torch.as_tensor(self._read(start, end)[1]).long() if self.has_labels else None


def open_set(path, block_size):
    """The image set at `path`: a sample folder of sample.py, or an npz file."""
    if os.path.isdir(path):
        return SampleFolder(path)
    if not os.path.exists(path):
        raise ImageSetError(f"{path} does not exist (give a sample folder of sample.py or an npz of images)")
    return NpzSet(path, block_size)

