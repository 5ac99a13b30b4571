"""The checkpoint format: reading, writing (crash-safe) and the records a file keeps.

One dict, `checkpoints/<name>/<dname>/checkpoint.pt`, readable with torch.load(weights_only=True) (SPEC
"Checkpoints"):
  G             state_dict for sampling and as the next teacher (EMA weights where an EMA is kept)
  n_timesteps   sampling steps N of this model
  time_scale    how many base steps one step spans
and, written by this project only:
  format_version, network (a model whose network is diffusers' UNet2DModel: {"class": "UNet2DModel", "config": its
  configuration}; absent: the user module's make_model()), source (a model read from a diffusers folder),
  time_labels ("aligned" | "original"), channel_order ("RGB" | "BGR"), schedule (the base
  model's float64 beta table and its name; absent: cosine), prediction ("eps" | "x" | "v"; absent: v),
  noise_levels ("own_cosine_table": the levels of a fresh cosine table of n_timesteps steps, as every file
  without the record; "schedule_grid": the schedule's levels at the base indices `grid`, noisiest first, which
  are also the time labels), grid, step, stage ("train" | "distill" | "guidance"), teacher, args (plain dict), model (raw weights when
  G holds an EMA), optimizer, scaler, bad_steps; for conditional models (SPEC "Conditioning and
  classifier-free guidance") num_classes, null_label, cond_drop_prob, and for a model with a guidance-weight
  input guidance_range [w_min, w_max].
A file with only the first three keys is the original implementation's: original time labels, BGR.
"""
import errno
import os
import pickle
import tempfile
import zipfile

import torch

from cli import UserError
from diffusion import PREDICTIONS, grid_indices, make_beta_schedule, model_grid
from samplers import select_steps

FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
OWN_COSINE_TABLE = "own_cosine_table"  # the noise_levels record of every cosine file of train.py and its students
SCHEDULE_GRID = "schedule_grid"  # levels of the base schedule at the recorded base indices
CONDITIONING_KEYS = ("num_classes", "null_label", "cond_drop_prob", "guidance_range")
TRAINING_STATE = ("model", "optimizer", "scaler", "bad_steps")  # what resuming needs beyond G


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint safely (weights_only: a file crafted to run code is refused, not run); a diffusers
    pipeline folder is read as the checkpoint of its model (diffusers_folder.read_folder)."""
    if not path:
        raise UserError("no checkpoint given")
    if os.path.isdir(path):
        from diffusers_folder import is_diffusers_folder, read_folder
        if is_diffusers_folder(path):
            return read_folder(path)
        raise UserError(f"checkpoint {path} is a folder, but not a diffusers pipeline (no model_index.json, unet/ or "
                        f"scheduler/); give the checkpoint file inside it, e.g. {os.path.join(path, CHECKPOINT_NAME)}")
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):
            raise UserError(f"refusing to load {path}: it holds objects other than tensors and plain values, "
                            "which could run code when unpickled") from None
        raise UserError(f"checkpoint {path} is truncated or not a PyTorch checkpoint (unpickling failed)") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise UserError(f"checkpoint {path} is truncated or not a PyTorch checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    missing = [k for k in ("G", "n_timesteps", "time_scale") if k not in ckpt]
    if missing:
        raise UserError(f"checkpoint {path} lacks {', '.join(missing)}; expected a dict with G, n_timesteps, time_scale")
    return ckpt


def clean_state_dict(state_dict):
    """Strip the prefixes that DistributedDataParallel and torch.compile add to parameter names."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def load_weights(model, state_dict, source, allow_missing=()):
    """load_state_dict(strict=True) with a one-line error when the weights belong to another model;
    the parameters named in allow_missing may be absent from state_dict (they keep their initialisation)."""
    try:
        result = model.load_state_dict(clean_state_dict(state_dict), strict=not allow_missing)
        missing = sorted(set(result.missing_keys) - set(allow_missing))
        if missing or result.unexpected_keys:
            raise RuntimeError(f"missing keys {missing}, unexpected keys {result.unexpected_keys}")
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise UserError(f"the weights in {source} do not fit the model of this user module ({detail[:200]}...)") from None


def checkpoint_time_labels(ckpt):
    """Files of the original implementation carry no record and use its labels i*time_scale."""
    return ckpt.get("time_labels", "original")


def checkpoint_channel_order(ckpt):
    """Files of the original implementation carry no record; its CelebA weights produce BGR images."""
    return ckpt.get("channel_order", "BGR")


def checkpoint_conditioning(ckpt):
    """The checkpoint's conditioning record (num_classes, null_label, cond_drop_prob, guidance_range where
    present); {} for an unconditional model."""
    return {key: ckpt[key] for key in CONDITIONING_KEYS if key in ckpt}


def check_guidance_weight(record, w, source):
    """UserError when a guidance-distilled model (its record's guidance_range) is asked for a w outside it."""
    w_range = record.get("guidance_range")
    if w_range is not None and not w_range[0] <= w <= w_range[1]:
        raise UserError(f"--guidance {w:g} lies outside the range [{w_range[0]:g}, {w_range[1]:g}] that "
                        f"{source} was distilled for")


def checkpoint_prediction(ckpt):
    """What the network outputs: eps, x or v (files without the record predict v)."""
    prediction = ckpt.get("prediction", "v")
    if prediction not in PREDICTIONS:
        raise UserError(f"unknown prediction record {prediction!r}; this version reads {', '.join(PREDICTIONS)}")
    return prediction


def schedule_record(name, betas):
    return {"name": name, "betas": betas.to(torch.float64)}


def checkpoint_schedule(ckpt):
    """(name, float64 betas) of the base model's schedule; a file without the record is cosine, its base
    the model's steps times its time scale."""
    if "schedule" in ckpt:
        return ckpt["schedule"]["name"], ckpt["schedule"]["betas"].to(torch.float64)
    return "cosine", make_beta_schedule("cosine", round(ckpt["n_timesteps"] * ckpt["time_scale"]))


def same_schedule(a, b):
    """Whether two (name, betas) schedules are one: the same name and table (to 1e-12)."""
    return a[0] == b[0] and len(a[1]) == len(b[1]) and torch.allclose(a[1], b[1], rtol=0, atol=1e-12)


def checkpoint_grid(ckpt, coarsen=1):
    """The grid of all levels of a checkpoint's model, sampled as one of N/coarsen steps (SPEC "Samplers", the
    original's --time_scale). own_cosine_table: the levels of a fresh cosine table of N/coarsen steps, time
    labels at time scale s * coarsen; schedule_grid: the base schedule at the recorded indices (the labels),
    every coarsen-th of them ending at coarsen - 1. UserError when coarsen does not divide N."""
    n = int(ckpt["n_timesteps"])
    if coarsen < 1 or n % coarsen:
        raise UserError(f"--time_scale {coarsen} does not divide the model's {n} steps")
    levels = ckpt.get("noise_levels", OWN_COSINE_TABLE)
    if levels == OWN_COSINE_TABLE:
        return model_grid(make_beta_schedule("cosine", n // coarsen), ckpt["time_scale"] * coarsen,
                          checkpoint_time_labels(ckpt))
    if levels != SCHEDULE_GRID:
        raise UserError(f"unknown noise_levels record {levels!r}; this version reads {OWN_COSINE_TABLE!r} "
                        f"and {SCHEDULE_GRID!r}")
    betas = checkpoint_schedule(ckpt)[1]
    grid = model_grid(betas).take(grid_indices(len(betas), ckpt["grid"]))
    return grid.take(grid_indices(n, select_steps(grid, n // coarsen, "time"))) if coarsen > 1 else grid


def continued_checkpoint(given, checkpoint_dir):
    """(checkpoint, path) that a run writing to checkpoint_dir continues: the one given, else its own file
    when there is one (so a rerun continues, or skips when finished, instead of overwriting); else None."""
    own = os.path.join(checkpoint_dir, CHECKPOINT_NAME)
    path = given or (own if os.path.isfile(own) else "")
    return (load_checkpoint(path), path) if path else None


def slim(ckpt):
    """The checkpoint without its training state."""
    return {k: v for k, v in ckpt.items() if k not in TRAINING_STATE}


def save_checkpoint(state, directory, step=None, keep=0):
    """Write `directory/checkpoint.pt` crash-safely; with keep > 0 also keep the last `keep` step files.

    The data go to a temporary file in the same folder, are flushed to disk and renamed into place, so
    a crash at any moment leaves the previous checkpoint or the new one, never a torn file. A failed
    write (disk full, say) removes the temporary file and raises UserError; the old file is intact.
    """
    os.makedirs(directory, exist_ok=True)
    final = os.path.join(directory, CHECKPOINT_NAME)
    target = os.path.join(directory, f"checkpoint-{step:08d}.pt") if keep > 0 and step is not None else final
    _atomic_save(state, target)
    if target != final:
        _atomic_link_or_copy(target, final)
        _prune(directory, keep)
    _fsync_dir(directory)
    return final


def _atomic_save(state, path):
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=os.path.dirname(path))
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, (OSError, RuntimeError)):
            reason = os.strerror(e.errno) if getattr(e, "errno", None) else str(e).splitlines()[0]
            raise UserError(f"could not write checkpoint {path} ({reason}); the previous checkpoint is intact") from None
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_link_or_copy(source, path):
    """Point `path` at the same data as `source` (a hard link, or a copy where links are unsupported)."""
    tmp = os.path.join(os.path.dirname(path), f".tmp-link-{os.getpid()}.pt")
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(source, tmp)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        _atomic_save(torch.load(source, weights_only=True, map_location="cpu"), path)
        return
    os.replace(tmp, path)


def _prune(directory, keep):
    step_files = sorted(f for f in os.listdir(directory) if f.startswith("checkpoint-") and f.endswith(".pt"))
    for name in step_files[:-keep]:
        os.remove(os.path.join(directory, name))


def _fsync_dir(directory):
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


