#!/usr/bin/env python
"""Write a slim copy of a checkpoint (G and metadata, no training state), or one for the original's sample.py.

    python export_checkpoint.py checkpoints/digits_run/base_6/checkpoint.pt checkpoints/digits/base_6 --half True
    python export_checkpoint.py checkpoints/celeba/base_6/checkpoint.pt checkpoints/celeba_for_original/base_6 \
        --for_original True --module celeba_u

each writes TARGET_DIR/checkpoint.pt. --half True stores floating-point weights in float16 (they are loaded
back into float32 models).

--for_original True writes a file that the original implementation's sample.py samples exactly as this
project samples the source: only the keys G, n_timesteps and time_scale, a network that takes the original's
time labels i*s and produces BGR images (its sample.py writes them with OpenCV). Both are exact edits of the
UNet's weights (unet.py):
- time labels: this project feeds step i of a model with time scale s the label (i+1)*s - 1 = i*s + d,
  d = s - 1 (SPEC "Time labels"). The time embedding emb(t) = [sin(t w_k), cos(t w_k)] of t + d is that of t
  with each (sin, cos) pair rotated by the angle d*w_k, so the first Linear layer after the embedding
  (`time.1`) becomes W' = W R(d w), and W' emb(t) = W emb(t + d);
- colours: RGB -> BGR reverses the image channels at the input of the first convolution (`down.0`) and at
  the output (weight and bias) of the last one (`out.2`); with a spatial fold f each image channel is a
  group of f*f folded channels, and whole groups change places.
"""
import os

import torch

from cli import ArgumentParser, UserError, main_guard, str2bool
from script_utils import (CHECKPOINT_NAME, checkpoint_channel_order, checkpoint_conditioning, checkpoint_time_labels,
                          clean_state_dict, load_checkpoint, load_user_module, load_weights, make_user_model,
                          save_checkpoint)
from unet import UNet

TRAINING_STATE = ("model", "optimizer", "scaler", "bad_steps")


def slim(ckpt):
    """The checkpoint without its training state."""
    return {k: v for k, v in ckpt.items() if k not in TRAINING_STATE}


def half(state_dict):
    return {k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()}


def rotate_time_embedding(weight, inv_freq, offset):
    """W' with W' emb(t) = W emb(t + offset), emb(t) = [sin(t w_k) for k, cos(t w_k) for k] (unet.TimeEmbedding).

    By the angle-addition formulas sin(a + b) = sin a cos b + cos a sin b and
    cos(a + b) = cos a cos b - sin a sin b with b = offset * w_k, the columns of W acting on the k-th
    (sin, cos) pair become (W_sin cos b - W_cos sin b, W_sin sin b + W_cos cos b). Computed in float64.
    """
    half_dim = inv_freq.numel()
    angle = offset * inv_freq.double()
    cos, sin = angle.cos(), angle.sin()
    w = weight.double()
    w_sin, w_cos = w[:, :half_dim], w[:, half_dim:]
    return torch.cat([w_sin * cos - w_cos * sin, w_sin * sin + w_cos * cos], dim=1)


def colour_permutation(in_channel, fold):
    """Folded channel k of the BGR network is folded channel perm[k] of the RGB one: image channel c holds
    folded channels c*f*f ... c*f*f + f*f - 1 (unet.spatial_fold), so the groups are reversed as a whole."""
    return torch.arange(in_channel * fold * fold).reshape(in_channel, fold * fold).flip(0).reshape(-1)


def for_original(ckpt, model, source):
    """The three-key checkpoint (G, n_timesteps, time_scale) that the original's sample.py samples as this
    project samples `ckpt`: labels i*s instead of (i+1)*s - 1, BGR instead of RGB. Only 3-channel UNets: the
    original's UNet has 3 output channels whatever its in_channel."""
    if not isinstance(model, UNet):
        raise UserError(f"--for_original True converts the UNet of unet.py (the original's layout); "
                        f"this user module's make_model() returns a {type(model).__name__}")
    if model.in_channel != 3:
        raise UserError(f"--for_original True needs a 3-channel UNet: the original's UNet always outputs 3 channels, "
                        f"this one has {model.in_channel}")
    if checkpoint_conditioning(ckpt):
        raise UserError(f"{source} is a conditional model ({', '.join(sorted(checkpoint_conditioning(ckpt)))}); "
                        "the original's UNet has no class or guidance input, so it cannot load it")
    load_weights(model, ckpt["G"], source)  # the weights fit this UNet
    time_scale = ckpt["time_scale"]
    offset = time_scale - 1 if checkpoint_time_labels(ckpt) == "aligned" else 0
    flip = checkpoint_channel_order(ckpt) == "RGB"
    if not offset and not flip:
        raise UserError(f"{source} needs no conversion: the original's sample.py already gives it the time labels "
                        "and channel order it expects (it loads the file as it is)")
    G = clean_state_dict(ckpt["G"])
    edited = {}
    if offset:
        edited["time.1.weight"] = rotate_time_embedding(G["time.1.weight"], G["time.0.inv_freq"], offset)
    if flip:
        perm = colour_permutation(model.in_channel, model.fold)
        edited["down.0.weight"] = G["down.0.weight"][:, perm]
        edited["out.2.weight"] = G["out.2.weight"][perm]
        edited["out.2.bias"] = G["out.2.bias"][perm]
    # edited tensors are stored in at least float32, so a float16 source is not rounded a second time
    G.update({k: v.to(torch.promote_types(G[k].dtype, torch.float32)) for k, v in edited.items()})
    return {"G": G, "n_timesteps": ckpt["n_timesteps"], "time_scale": time_scale}


@main_guard
def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="checkpoint to read")
    parser.add_argument("target_dir", help="folder to write checkpoint.pt into (created if missing)")
    parser.add_argument("--half", type=str2bool, default=False, help="store weights in float16")
    parser.add_argument("--for_original", type=str2bool, default=False,
                        help="a file for the original implementation's sample.py: three keys, BGR, labels i*s")
    parser.add_argument("--module", default="", help="with --for_original: the user module whose make_model() "
                                                     "builds the source's UNet")
    args = parser.parse_args(argv)
    if args.for_original and not args.module:
        raise UserError("--for_original True needs --module NAME, the user module whose make_model() builds the UNet")
    if args.module and not args.for_original:
        raise UserError("--module is used only with --for_original True")
    target = os.path.join(args.target_dir, CHECKPOINT_NAME)
    if os.path.exists(args.target_dir) and not os.path.isdir(args.target_dir):
        raise UserError(f"cannot write into {args.target_dir}: it is a file, not a folder")
    ckpt = load_checkpoint(args.source)
    if os.path.exists(target) and os.path.samefile(target, args.source):
        raise UserError(f"{target} is the source itself; give another target folder")
    if args.for_original:
        out = for_original(ckpt, make_user_model(load_user_module(args.module)), args.source)
    else:
        out = slim(ckpt)
    if args.half:
        out["G"] = half(out["G"])
    path = save_checkpoint(out, args.target_dir)
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
