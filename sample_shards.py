"""A sample set on disk, written in shards so that its size is bounded by the disk, not by memory.

    DIR/manifest.json        what the set is: checkpoint (its size and SHA-256), sampler, grid, seed, guidance,
                             labels, image shape, number of images, shard size; written once, before any shard
    DIR/shard_000000.npz     images [k S, (k+1) S) of shard k: arr_0 uint8 NHWC in guided-diffusion's layout,
                             arr_1 the class labels of a conditional model, indices, the manifest's SHA-256, and
                             with float32 copies asked for, samples (float32 NCHW in [-1, 1])

Shard k is written by rank k mod W (each torchrun process writes its own shards), to a temporary name renamed
into place when complete: a shard file is whole or absent, whatever kills the run. A rerun with the same settings
checks the shards that are there (one that does not read back whole is redone) and writes the missing ones; a
rerun with other settings is refused. The final npz (assemble) streams the shards into one zip entry per array,
so neither writing nor assembling holds more than one shard in memory.
"""
import errno
import hashlib
import json
import os
import zipfile

import numpy as np
import torch

MANIFEST = "manifest.json"


class ShardError(Exception):
    """A sample folder that cannot be used as asked (another run's, incomplete, unwritable): one line for the user."""


def file_fingerprint(path, block=1 << 24):
    """{'bytes': size, 'sha256': hex digest} of a file, read in blocks; of a folder (a diffusers pipeline), the
    digest of each file's relative path and contents in sorted order, and their total size."""
    digest = hashlib.sha256()
    if os.path.isdir(path):
        files = sorted(os.path.relpath(os.path.join(top, name), path) for top, _, names in os.walk(path) for name in names)
    else:
        files = [""]
    for name in files:
        if name:
            digest.update(name.encode() + b"\0")
        with open(os.path.join(path, name) if name else path, "rb") as f:
            for chunk in iter(lambda: f.read(block), b""):
                digest.update(chunk)
    return {"bytes": sum(os.path.getsize(os.path.join(path, name) if name else path) for name in files),
            "sha256": digest.hexdigest()}


def shard_ranges(num_images, shard_size):
    """[(first image, end)] of each shard."""
    return [(start, min(start + shard_size, num_images)) for start in range(0, num_images, shard_size)]


def shard_path(folder, k):
    return os.path.join(folder, f"shard_{k:06d}.npz")


def _settings_text(settings):
    return json.dumps(settings, indent=1, sort_keys=True)


def check_usable(folder):
    """ShardError when `folder` cannot become or be a sample folder: a file, or a non-empty folder without a
    manifest (not written by sample.py)."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ShardError(f"cannot use {folder} as the sample folder: it is a file")
    if os.path.isdir(folder) and os.listdir(folder) and not os.path.exists(os.path.join(folder, MANIFEST)):
        raise ShardError(f"{folder} exists and is not a sample folder of sample.py (no {MANIFEST}); choose another")


def _write_error(path, folder, error):
    """The ShardError of a failed write of `path` (an OSError), a full disk said as such."""
    kept = f"the finished shards in {folder} are intact"
    if error.errno == errno.ENOSPC:
        return ShardError(f"no space left on the device while writing {path}; {kept}: free some space and rerun the "
                          "same command to finish")
    return ShardError(f"cannot write {path} ({error.strerror or error}); {kept}: rerun the same command to finish")


def open_folder(folder, settings, create=True):
    """Check `folder` against `settings` (a JSON-able dict); create it with its manifest if new and `create`
    (else its manifest must be there). ShardError when it holds another run's shards (naming the settings that
    differ) or cannot be written."""
    path = os.path.join(folder, MANIFEST)
    if not create and not os.path.exists(path):
        raise ShardError(f"{path} is missing: the folder was not created by this run's first process")
    if os.path.exists(path):
        try:
            with open(path) as f:
                recorded = json.load(f)
        except (OSError, ValueError) as e:
            raise ShardError(f"cannot read {path} ({e}); it is not a sample folder of sample.py") from None
        settings = json.loads(_settings_text(settings))  # as JSON reads it back (tuples as lists)
        differ = sorted(key for key in set(recorded) | set(settings) if recorded.get(key) != settings.get(key))
        if differ:
            shown = "; ".join(f"{key}: {recorded.get(key)!r} there, {settings.get(key)!r} now" for key in differ[:4])
            raise ShardError(f"{folder} holds the shards of another sampling run ({shown}); rerun with its settings to "
                             "finish it, or choose another folder")
        return
    check_usable(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        write_atomically(path, lambda f: f.write(_settings_text(settings).encode()))
    except OSError as e:
        raise _write_error(path, folder, e) from None


def write_atomically(path, write):
    """write(binary file) into path's temporary sibling, flushed to disk, then renamed into place."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def shard_is_whole(path, start, end, image_shape, float_copies):
    """Whether a shard file reads back with the images [start, end) of the shape (H, W, C) asked for, written by
    the run of its folder's manifest."""
    try:
        with np.load(path) as data:
            whole = (data["arr_0"].shape == (end - start, *image_shape) and data["arr_0"].dtype == np.uint8
                     and np.array_equal(data["indices"], np.arange(start, end))
                     and np.array_equal(data["manifest_sha256"], manifest_digest(os.path.dirname(path))))
            if whole and float_copies:
                whole = data["samples"].shape == (end - start, image_shape[2], image_shape[0], image_shape[1])
            return bool(whole)
    except Exception:  # any unreadable file (truncated, not a zip, missing arrays) is redone
        return False


def missing_shards(folder, num_images, shard_size, rank, world_size, image_shape, float_copies):
    """[(k, start, end)] of this rank's shards that are not on disk whole (a broken file is removed)."""
    todo = []
    for k, (start, end) in enumerate(shard_ranges(num_images, shard_size)):
        if k % world_size != rank:
            continue
        path = shard_path(folder, k)
        if os.path.exists(path) and not shard_is_whole(path, start, end, image_shape, float_copies):
            os.remove(path)
        if not os.path.exists(path):
            todo.append((k, start, end))
    return todo


def manifest_digest(folder):
    """The SHA-256 of the folder's manifest as uint8 [32]: each shard carries its run's, so a shard copied from
    another run's folder is told apart."""
    with open(os.path.join(folder, MANIFEST), "rb") as f:
        return np.frombuffer(hashlib.sha256(f.read()).digest(), dtype=np.uint8)


def to_uint8(samples):
    """float images [N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C] (guided-diffusion's rounding)."""
    return ((samples + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def write_shard(folder, k, start, samples, labels=None, float_copies=False):
    """Shard k of images [start, start + len(samples)) from float samples [N, C, H, W] in [-1, 1]. A full disk is
    one line saying so (the finished shards stay); the partial file is removed."""
    arrays = {"arr_0": to_uint8(samples), "indices": np.arange(start, start + len(samples)),
              "manifest_sha256": manifest_digest(folder)}  # which run's shard it is
    if labels is not None:
        arrays["arr_1"] = np.asarray(labels, dtype=np.int64)
    if float_copies:
        arrays["samples"] = samples.numpy().astype(np.float32)
    path = shard_path(folder, k)
    try:
        write_atomically(path, lambda f: np.savez(f, **arrays))
    except OSError as e:
        raise _write_error(path, folder, e) from None


def listed(ks, most=8):
    """'3, 7, 9 ...': the first `most` shard numbers of a list, for a message."""
    return ", ".join(map(str, ks[:most])) + (" ..." if len(ks) > most else "")


def check_complete(folder, num_images, shard_size):
    """ShardError naming the shards that are not on disk."""
    absent = [k for k in range(len(shard_ranges(num_images, shard_size))) if not os.path.exists(shard_path(folder, k))]
    if absent:
        raise ShardError(f"{folder} lacks {len(absent)} of its shards ({listed(absent)}); rerun the same command to "
                         "finish them")


def read_shards(folder, num_images, shard_size, key="arr_0", limit=None):
    """Yield each shard's array `key` in image order (the first `limit` images only, if given)."""
    for k, (start, end) in enumerate(shard_ranges(num_images, shard_size)):
        if limit is not None and start >= limit:
            return
        with np.load(shard_path(folder, k)) as data:
            yield data[key][:None if limit is None else limit - start]


def assemble(folder, out_path, num_images, shard_size, keys):
    """The final npz at out_path with one array per key (arr_0, arr_1, samples), each streamed shard by shard into
    its zip entry (np.load reads it as any npz); written beside out_path and renamed into place."""
    first = {}
    with np.load(shard_path(folder, 0)) as data:
        for key in keys:
            first[key] = (data[key].dtype, data[key].shape[1:])

    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for key in keys:
                dtype, shape = first[key]
                with zf.open(f"{key}.npy", "w", force_zip64=True) as entry:
                    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                              "shape": (num_images, *shape)}
                    np.lib.format.write_array_header_2_0(entry, header)
                    for part in read_shards(folder, num_images, shard_size, key):
                        entry.write(np.ascontiguousarray(part, dtype=dtype).tobytes())

    try:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        write_atomically(out_path, write)
    except OSError as e:
        raise _write_error(out_path, folder, e) from None
