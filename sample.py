#!/usr/bin/env python
"""Sample images from any stage.

    python sample.py --out_file ./images/celeba_u_6.png --module celeba_u \
        --checkpoint ./checkpoints/celeba/base_6/checkpoint.pt --batch_size 1

The default sampler is the original's ancestral one; --sampler chooses any of the family (ddim,
dpmpp_2m, stochastic), --steps or --step_indices the steps it visits, --time_scale k samples with N/k
steps as the original did. Under torchrun the images are shared out over the processes; image i always
gets the same noise, at the start and at every step (seeded by --seed and i), whatever the number of
processes, the batch or the chunk size.

A class-conditional model samples with classifier-free guidance: --guidance w (0: plain conditional) and
--labels (default: the images spread over all classes, one class per row of the picture). A model trained
with the conditioning dropped is sampled with v_w = (1 + w) v(z, c) - w v(z, null), two network calls per
step; a guidance-distilled model takes w itself, one call per step. The checkpoint's record decides.
"""
import argparse
import math
import os

import numpy as np
import torch
import torch.distributed as dist
import torchvision

import samplers
from checkpoints import check_guidance_weight, checkpoint_channel_order, checkpoint_conditioning, checkpoint_prediction
from cli import (ArgumentParser, UserError, add_common_arguments, label_list, main_guard, nonnegative_float,
                 positive_int, str2bool)
from runtime import AMP_DTYPES, RunContext
from sample_utils import (add_sampler_arguments, describe, generate, image_noise, sampler_from_args, spec_grid,
                          trajectory_grid)
from user_modules import extra_args_fn, guided_network, load_model_from_checkpoint, load_user_module

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def make_argument_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--checkpoint", required=True, help="checkpoint to sample from")
    parser.add_argument("--out_file", default="", help="PNG grid of the samples")
    parser.add_argument("--out_npz", default="", help="also write arr_0 (uint8 NHWC) and samples (float32 NCHW in [-1, 1])")
    add_sampler_arguments(parser, default_sampler="ancestral")
    parser.add_argument("--batch_size", dest="num_images", type=positive_int, default=argparse.SUPPRESS,
                        help="the original's name of --num_images")
    parser.add_argument("--diffusion", default="GaussianDiffusion", choices=["GaussianDiffusion", "GaussianDiffusionDefault"],
                        help="accepted for the original's command lines; both sample the same way")
    parser.add_argument("--trajectory", type=str2bool, default=False, help="draw 5 rows: intermediate states and the result")
    parser.add_argument("--channel_order", default="auto", choices=["auto", "RGB", "BGR"],
                        help="channel order of the model's images; auto: as recorded, BGR for the original's files")
    parser.add_argument("--amp", default="no", choices=sorted(AMP_DTYPES), help="mixed precision for the network")
    parser.add_argument("--channels_last", type=str2bool, default=True, help="channels_last memory format (faster convolutions)")
    parser.add_argument("--compile", type=str2bool, default=False, help="torch.compile the network")
    parser.add_argument("--guidance", type=nonnegative_float, default=None,
                        help="conditional models: the classifier-free guidance weight w (0: plain conditional; "
                             "default 0, or the lowest w a guidance-distilled model was trained for)")
    parser.add_argument("--labels", type=label_list, default=None,
                        help="conditional models: class labels, e.g. 0,1,2, spread over the images one per row "
                             "(unset: all classes)")
    return parser


def image_labels(labels, num_images):
    """Label of each image: the listed labels in turn, each for ceil(num_images / len(labels)) images (one row
    of the picture each). Returns (labels [num_images], images per row)."""
    per_row = math.ceil(num_images / len(labels))
    return torch.tensor([labels[i // per_row] for i in range(num_images)]), per_row


def conditioning_args(args, module, ckpt, device):
    """(extra_args for all images: y per image and w, images per picture row or None), checked against the
    checkpoint's conditioning record."""
    record = checkpoint_conditioning(ckpt)
    if "num_classes" not in record:
        if args.guidance is not None or args.labels is not None:
            raise UserError(f"{args.checkpoint} is unconditional; --guidance and --labels need a class-conditional model")
        return extra_args_fn(module)(None, None, device), None
    k = record["num_classes"]
    if args.labels is not None and max(args.labels) >= k:
        raise UserError(f"--labels {max(args.labels)} is not a class of {args.checkpoint} (classes 0 to {k - 1})")
    w_range = record.get("guidance_range")
    w = args.guidance if args.guidance is not None else (w_range[0] if w_range is not None else 0.0)
    check_guidance_weight(record, w, args.checkpoint)
    labels, per_row = image_labels(args.labels if args.labels is not None else list(range(k)), args.num_images)
    extra_args = dict(extra_args_fn(module)(None, labels, device))
    extra_args["w"] = w
    return extra_args, per_row


def images_of(extra_args, indices):
    """extra_args of the images `indices` (rows of the per-image tensors)."""
    index = torch.as_tensor(list(indices), dtype=torch.long)
    return {key: value[index.to(value.device)] if torch.is_tensor(value) and value.ndim else value
            for key, value in extra_args.items()}


@main_guard
def main(argv=None):
    args = make_argument_parser().parse_args(argv)
    spec = sampler_from_args(args)
    check_outputs(args)
    ctx = RunContext(args)
    module = load_user_module(args.module)
    model, ckpt = load_model_from_checkpoint(module, args.checkpoint, ctx.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    net = guided_network(torch.compile(model) if args.compile else model, ckpt)
    grid = spec_grid(spec, ckpt)
    bgr = (checkpoint_channel_order(ckpt) if args.channel_order == "auto" else args.channel_order) == "BGR"
    extra_args, per_row = conditioning_args(args, module, ckpt, ctx.device)
    shape = list(model.image_size[1:])
    print(f"Model loaded: {int(ckpt['n_timesteps']) // spec.coarsen} steps at time scale "
          f"{ckpt['time_scale'] * spec.coarsen}; sampler {describe(spec, grid, ckpt, net, extra_args.get('w'))}.")

    if args.trajectory:
        if ctx.is_main:
            images = range(args.num_images)
            with ctx.autocast():
                picture = trajectory_grid(net, grid, image_noise(images, shape, args.seed, ctx.device), bgr=bgr,
                                          spec=spec, step_noise=samplers.per_image_noise(images, args.seed),
                                          extra_args=images_of(extra_args, images), progress=True,
                                          prediction=checkpoint_prediction(ckpt))
            save_png(picture, args.out_file)
        return finish(ctx)

    this_rank = range(ctx.rank, args.num_images, ctx.world_size)
    with ctx.autocast():
        samples = generate(net, grid, spec, this_rank, shape, args.seed, extra_args=images_of(extra_args, this_rank),
                           device=ctx.device, chunk_size=args.chunk_size, channels_last=args.channels_last,
                           progress=ctx.is_main, prediction=checkpoint_prediction(ckpt))
    samples = gather_in_order(ctx, samples, args.num_images)
    if ctx.is_main:
        if bgr and samples.shape[1] == 3:
            samples = samples.flip(1)
        samples = samples.clamp(-1, 1)
        if args.out_file:
            nrow = per_row or max(1, math.ceil(math.sqrt(samples.shape[0])))
            save_png(torchvision.utils.make_grid((samples + 1) / 2, nrow=nrow, padding=2), args.out_file)
        if args.out_npz:
            arr = ((samples + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
            make_parent(args.out_npz)
            np.savez(args.out_npz, arr_0=arr, samples=samples.numpy().astype(np.float32))
            print(f"Wrote {samples.shape[0]} samples to {args.out_npz}")
    return finish(ctx)


def check_outputs(args):
    """Fail before sampling, not after, when the outputs cannot be written."""
    if not args.out_file and not args.out_npz:
        raise UserError("nothing to write: give --out_file PATH.png and/or --out_npz PATH.npz")
    if args.trajectory and not args.out_file:
        raise UserError("--trajectory True draws a picture: give --out_file PATH.png")
    if args.out_file and os.path.splitext(args.out_file)[1].lower() not in IMAGE_EXTENSIONS:
        raise UserError(f"--out_file {args.out_file} needs an image extension ({', '.join(IMAGE_EXTENSIONS)})")
    if args.out_npz and not args.out_npz.endswith(".npz"):
        raise UserError(f"--out_npz {args.out_npz} must end in .npz")
    for path in (args.out_file, args.out_npz):
        parent = os.path.dirname(os.path.abspath(path)) if path else ""
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if path and not os.path.isdir(parent):
            raise UserError(f"cannot write {path}: {parent} is a file, not a folder")
        if path and os.path.isdir(path):
            raise UserError(f"cannot write {path}: it is a folder")


def gather_in_order(ctx, samples, total):
    """Collect every rank's images on rank 0, in image order (rank r holds images r, r+W, ...)."""
    if not ctx.distributed:
        return samples
    parts = [None] * ctx.world_size
    dist.all_gather_object(parts, samples)
    out = torch.empty([total] + list(samples.shape[1:]))
    for rank, part in enumerate(parts):
        out[rank::ctx.world_size] = part
    return out


def make_parent(path):
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)


def save_png(grid, path):
    make_parent(path)
    torchvision.utils.save_image(grid, path)
    print(f"Wrote {path}")


def finish(ctx):
    ctx.close()
    print("Finished.")


if __name__ == "__main__":
    main()
