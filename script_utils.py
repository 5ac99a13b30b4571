"""What the scripts share outside the training loop: user errors, flags, user modules, checkpoints.

Checkpoint format (SPEC "Checkpoints"): one dict readable with torch.load(weights_only=True):
  G             state_dict for sampling and as the next teacher (EMA weights where an EMA is kept)
  n_timesteps   sampling steps N of this model
  time_scale    how many base steps one step spans
and, written by this project only:
  format_version, time_labels ("aligned" | "original"), channel_order ("RGB" | "BGR"), step, stage
  ("train" | "distill" | "guidance"), args (plain dict), model (raw weights when G holds an EMA), optimizer,
  scaler, bad_steps; for conditional models (SPEC "Conditioning and classifier-free guidance") num_classes,
  null_label, cond_drop_prob, and for a model with a guidance-weight input guidance_range [w_min, w_max].
A file with only the first three keys is the original implementation's: original time labels, BGR.
"""
import errno
import importlib
import inspect
import os
import pickle
import sys
import tempfile
import zipfile

import torch

import seeding
from cli import UserError, seed_value
from diffusion import GaussianDiffusion, GaussianDiffusionDefault, make_beta_schedule
from guidance import ClassifierFreeGuidance

FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
CHANNEL_ORDERS = ("RGB", "BGR")
CONDITIONING_KEYS = ("num_classes", "null_label", "cond_drop_prob", "guidance_range")
DEFAULT_COND_DROP_PROB = 0.1  # Ho & Salimans 2022 found 0.1-0.2 best
# The original's --diffusion values, chosen from a table (never looked up by name).
DIFFUSIONS = {"GaussianDiffusion": GaussianDiffusion, "GaussianDiffusionDefault": GaussianDiffusionDefault}


def choose_device(name):
    """`--device`: 'auto' is CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"unknown device {name!r} ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA, but no CUDA device is available; use --device cpu")
    return device


# -- user modules ----------------------------------------------------------------------------

def load_user_module(name):
    """Import the user module NAME and check it offers make_model and make_dataset."""
    if name.endswith(".py"):
        name = name[:-3]
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name or name.startswith(f"{e.name}."):
            raise UserError(f"no user module named {name!r} (a file {name}.py in the current folder or on PYTHONPATH)") from None
        raise UserError(f"user module {name!r} could not be imported: it needs {e.name!r}, which is not installed") from None
    except SyntaxError as e:
        raise UserError(f"user module {name!r} has a syntax error: {e.msg} ({e.filename}, line {e.lineno})") from None
    missing = [f for f in ("make_model", "make_dataset") if not callable(getattr(module, f, None))]
    if missing:
        raise UserError(f"user module {name!r} has no {' or '.join(missing)}(); it must define make_model() and make_dataset()")
    return module


def make_user_model(module, guidance_embedding=False):
    """module.make_model(); with guidance_embedding=True its model with a guidance-weight input,
    make_model(guidance_embedding=True), which a conditional module offers for guidance distillation."""
    if guidance_embedding:
        if module_num_classes(module) is None:
            raise UserError(f"a model with a guidance-weight input needs a conditional user module (one with "
                            f"NUM_CLASSES); {module.__name__} has none")
        if "guidance_embedding" not in inspect.signature(module.make_model).parameters:
            raise UserError(f"{module.__name__}.make_model() takes no guidance_embedding argument; guidance "
                            "distillation needs make_model(guidance_embedding=True), a model with a w-input")
        model = module.make_model(guidance_embedding=True)
    else:
        model = module.make_model()
    size = getattr(model, "image_size", None)
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"{module.__name__}.make_model() must return a torch.nn.Module, got {type(model).__name__}")
    if size is None or len(size) != 4:
        raise UserError(f"the model from {module.__name__}.make_model() needs an attribute image_size = [1, C, H, W]")
    return model


def make_user_dataset(module):
    try:
        dataset = module.make_dataset()
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    if len(dataset) == 0:
        raise UserError(f"{module.__name__}.make_dataset() returned an empty data set")
    return dataset


# -- checkpoints -----------------------------------------------------------------------------

def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint safely (weights_only: a file crafted to run code is refused, not run)."""
    if not path:
        raise UserError("no checkpoint given")
    if os.path.isdir(path):
        raise UserError(f"checkpoint {path} is a folder; give the file inside it, e.g. {os.path.join(path, CHECKPOINT_NAME)}")
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


def data_channel_order(module):
    """The channel order of the user module's data set: its CHANNEL_ORDER, "RGB" when it has none."""
    order = getattr(module, "CHANNEL_ORDER", "RGB")
    if order not in CHANNEL_ORDERS:
        raise UserError(f"{module.__name__}.CHANNEL_ORDER is {order!r}; it must be 'RGB' or 'BGR'")
    return order


def to_channel_order(images, source, target):
    """Images [B, C, H, W] stored in channel order `source`, as a network of order `target` sees them:
    3-channel images are flipped along dim 1 (RGB <-> BGR) where the orders differ; others pass as they are."""
    if source != target and images.shape[1] == 3:
        return images.flip(1)
    return images


# -- conditioning (SPEC "Conditioning and classifier-free guidance") ----------------------------

def module_num_classes(module):
    """The user module's NUM_CLASSES (a class-conditional module; its null label is NUM_CLASSES), or None."""
    k = getattr(module, "NUM_CLASSES", None)
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
        raise UserError(f"{module.__name__}.NUM_CLASSES is {k!r}; it must be a positive integer (the number of classes)")
    return k


def training_conditioning(module, cond_drop_prob):
    """The conditioning record of a base model trained on `module` with --cond_drop_prob (None: the default
    DEFAULT_COND_DROP_PROB for a conditional module); {} for an unconditional one."""
    k = module_num_classes(module)
    if k is None:
        if cond_drop_prob is not None:
            raise UserError(f"--cond_drop_prob drops class labels, but {module.__name__} is unconditional (it has no "
                            "NUM_CLASSES)")
        return {}
    p = DEFAULT_COND_DROP_PROB if cond_drop_prob is None else cond_drop_prob
    return {"num_classes": k, "null_label": k, "cond_drop_prob": p}


def checkpoint_conditioning(ckpt):
    """The checkpoint's conditioning record (num_classes, null_label, cond_drop_prob, guidance_range where
    present); {} for an unconditional model."""
    return {key: ckpt[key] for key in CONDITIONING_KEYS if key in ckpt}


def model_for_checkpoint(module, ckpt, source):
    """The user module's model as `ckpt` records it (with a guidance-weight input where it has a
    guidance_range), with ckpt's G loaded; UserError when the module's classes differ from the record's."""
    record = checkpoint_conditioning(ckpt)
    k = module_num_classes(module)
    if record.get("num_classes") != k:
        def kind(n):
            return f"a model of {n} classes" if n else "unconditional"
        raise UserError(f"{source} is {kind(record.get('num_classes'))}, but user module {module.__name__} is "
                        f"{kind(k)}; give the module the checkpoint was trained with")
    model = make_user_model(module, guidance_embedding="guidance_range" in record)
    load_weights(model, ckpt["G"], source)
    return model


def make_guidance_student(module, state_dict, source):
    """A model of `module` with a guidance-weight input, initialised from a conditional teacher's weights: the
    parameters the w-input adds keep their initialisation, whose last layer of zeros leaves the teacher's output
    unchanged (Meng et al. 2023, Sec. 3.1: the student starts as the teacher)."""
    student = make_user_model(module, guidance_embedding=True)
    added = set(student.state_dict()) - set(make_user_model(module).state_dict())
    load_weights(student, state_dict, source, allow_missing=added)
    return student


def guided_network(model, ckpt):
    """The network to sample `ckpt` with, called with extra_args y (labels) and w (the guidance weight):
    the model itself when it takes w (a guidance-distilled model: one call per step) or is unconditional;
    classifier-free guidance over it for a conditional model (two calls per step, batched)."""
    record = checkpoint_conditioning(ckpt)
    if "num_classes" in record and "guidance_range" not in record:
        return ClassifierFreeGuidance(model, record["null_label"])
    return model


def make_diffusion(model, n_timesteps, time_scale, cls=GaussianDiffusion, device="cpu", **kwargs):
    betas = make_beta_schedule("cosine", n_timesteps).to(device)
    return cls(model, betas, time_scale=time_scale, **kwargs)


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


def add_common_arguments(parser):
    """Flags every script shares."""
    parser.add_argument("--module", required=True, help="user module with make_model() and make_dataset(), e.g. celeba_u")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--seed", type=seed_value, default=0, help="random seed")


def extra_args_fn(module):
    """The user module's optional make_extra_args(images, labels, device) -> dict (conditioning)."""
    fn = getattr(module, "make_extra_args", None)
    return fn if callable(fn) else (lambda images, labels, device: {})


def load_model_from_checkpoint(module, path, device):
    """(model with the checkpoint's G weights in eval mode on device, checkpoint dict)."""
    ckpt = load_checkpoint(path)
    model = model_for_checkpoint(module, ckpt, path)
    return model.to(device).eval().requires_grad_(False), ckpt


def make_sampling_diffusion(model, ckpt, time_scale=1, clipped=False, device="cpu"):
    """The diffusion of a checkpoint sampled with n_timesteps // time_scale steps (SPEC "Samplers")."""
    n = int(ckpt["n_timesteps"])
    if time_scale < 1 or n % time_scale:
        raise UserError(f"--time_scale {time_scale} does not divide the model's {n} steps")
    return make_diffusion(model, n // time_scale, ckpt["time_scale"] * time_scale, device=device,
                          sampler="clipped" if clipped else "ddpm", time_labels=checkpoint_time_labels(ckpt))


def image_noise(indices, shape, seed):
    """The starting noise of images `indices`: image i always gets the same noise, whatever the batch."""
    return seeding.image_randn(indices, shape, seed, "start")
