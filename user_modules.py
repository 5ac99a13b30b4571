"""User modules (SPEC "The user-module protocol"): loading one, building its model and data, and the
optional attributes a module may define (CHANNEL_ORDER, NUM_CLASSES, make_extra_args).

A module NAME on the path offers make_model() (an nn.Module with forward(x, t, **extra_args) predicting v and
an attribute image_size = [1, C, H, W]) and make_dataset() (items (image in [-1, 1], label)).
"""
import importlib
import inspect
import os
import sys

import torch

from checkpoints import checkpoint_conditioning, load_checkpoint, load_weights
from cli import UserError
from guidance import ClassifierFreeGuidance

CHANNEL_ORDERS = ("RGB", "BGR")
DEFAULT_COND_DROP_PROB = 0.1  # Ho & Salimans 2022 found 0.1-0.2 best


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


def reference_data(module, held_out):
    """(the real images evaluations measure against, a name saying which, the rest of make_dataset()): the last
    `held_out` images of make_dataset() when held_out > 0, else make_test_dataset() (and all of make_dataset())."""
    from torch.utils.data import Subset
    dataset = make_user_dataset(module)
    if held_out:
        if held_out >= len(dataset):
            raise UserError(f"--held_out {held_out} leaves no images of the {len(dataset)} in make_dataset()")
        return (Subset(dataset, range(len(dataset) - held_out, len(dataset))),
                f"the last {held_out} images of {module.__name__}.make_dataset()",
                Subset(dataset, range(len(dataset) - held_out)))
    make_test = getattr(module, "make_test_dataset", None)
    if make_test is None:
        raise UserError(f"user module {module.__name__!r} has no make_test_dataset(); give --held_out N to "
                        "hold out the last N images of make_dataset() as the reference")
    return make_test(), f"{module.__name__}.make_test_dataset()", dataset


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


def model_for_checkpoint(module, ckpt, source):
    """The model `ckpt` records (its network record: a UNet2DModel; else the user module's model, with a
    guidance-weight input where it has a guidance_range), with ckpt's G loaded; UserError when the module's classes
    differ from the record's. module may be None for a checkpoint with a network record."""
    record = checkpoint_conditioning(ckpt)
    network = network_of(ckpt, source)
    if module is None and network is not None:  # the checkpoint describes its network in full
        load_weights(network, ckpt["G"], source)
        return network
    k = module_num_classes(module)
    if record.get("num_classes") != k:
        def kind(n):
            return f"a model of {n} classes" if n else "unconditional"
        raise UserError(f"{source} is {kind(record.get('num_classes'))}, but user module {module.__name__} is "
                        f"{kind(k)}; give the module the checkpoint was trained with")
    model = network or make_user_model(module, guidance_embedding="guidance_range" in record)
    load_weights(model, ckpt["G"], source)
    return model


def network_of(ckpt, source):
    """The network a checkpoint records (its "network": diffusers' UNet2DModel, diffusers_unet.DiffusersUNet) with
    its initial weights, or None when the user module's make_model() builds it."""
    if "network" not in ckpt:
        return None
    from diffusers_unet import DiffusersUNet
    try:
        return DiffusersUNet.from_record(ckpt["network"])
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"{source} records a network this version cannot build ({' '.join(str(e).split())[:160]})") from None


def check_image_shape(model, dataset, module):
    """The data set's images have the shape the model makes (its image_size [1, C, H, W]); the item is read under
    a forked random state, so the run's draws stay as they were."""
    with torch.random.fork_rng(devices=[]):
        shape, wanted = list(dataset[0][0].shape), list(model.image_size[1:])
    if shape != wanted:
        raise UserError(f"{module.__name__}.make_dataset() gives images of shape {shape}, but the model makes "
                        f"{wanted}; give a user module whose data fit the model")


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


def extra_args_fn(module):
    """The user module's optional make_extra_args(images, labels, device) -> dict (conditioning)."""
    fn = getattr(module, "make_extra_args", None)
    return fn if callable(fn) else (lambda images, labels, device: {})


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


def load_model_from_checkpoint(module, path, device):
    """(model with the checkpoint's G weights in eval mode on device, checkpoint dict)."""
    ckpt = load_checkpoint(path)
    model = model_for_checkpoint(module, ckpt, path)
    return model.to(device).eval().requires_grad_(False), ckpt
