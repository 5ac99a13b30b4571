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
from tqdm import tqdm

import sample_shards
import samplers
from checkpoints import check_guidance_weight, checkpoint_channel_order, checkpoint_conditioning, checkpoint_prediction
from cli import (ArgumentParser, UserError, add_common_arguments, label_list, main_guard, nonnegative_float,
                 positive_int, str2bool)
from runtime import AMP_DTYPES, RunContext
from sample_utils import (add_sampler_arguments, describe, generate, image_noise, sampler_from_args, spec_grid,
                          trajectory_grid)
from user_modules import extra_args_fn, guided_network, load_model_from_checkpoint, load_user_module

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
PICTURE_IMAGES = 1024  # with a sample folder, --out_file draws its first images, at most this many


def make_argument_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--checkpoint", required=True, help="checkpoint to sample from")
    parser.add_argument("--out_file", default="", help="PNG grid of the samples")
    parser.add_argument("--out_npz", default="", help="the sample set as one npz: arr_0 (uint8 NHWC), arr_1 (the labels of a "
                             "conditional model) and, with --float_samples True, samples (float32 NCHW in [-1, 1]); "
                             "assembled from the shards of --out_dir")
    parser.add_argument("--out_dir", default="",
                        help="the sample folder of shards (sample_shards.py): written as the images come, resumable by "
                             "rerunning the same command; unset with --out_npz: OUT_NPZ without .npz, plus _shards")
    parser.add_argument("--shard_size", type=positive_int, default=1000,
                        help="images per shard: what one process holds in memory at a time (with --chunk_size per call)")
    parser.add_argument("--float_samples", type=str2bool, default=False,
                        help="also keep float32 copies (samples) in the shards and the npz, 4x the size of arr_0")
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

    folder = shard_folder(args)
    if folder:
        write_sample_set(args, ctx, folder, net, grid, spec, shape, bgr, extra_args, ckpt)
        if args.out_file and ctx.is_main:  # the picture from the first images, read back from the shards
            count = min(args.num_images, PICTURE_IMAGES)
            arr = np.concatenate(list(sample_shards.read_shards(folder, args.num_images, args.shard_size, limit=count)))
            save_picture(torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255, args.out_file, per_row)
        return finish(ctx)
    this_rank = range(ctx.rank, args.num_images, ctx.world_size)
    with ctx.autocast():
        samples = generate(net, grid, spec, this_rank, shape, args.seed, extra_args=images_of(extra_args, this_rank),
                           device=ctx.device, chunk_size=args.chunk_size, channels_last=args.channels_last,
                           progress=ctx.is_main, prediction=checkpoint_prediction(ckpt))
    samples = gather_in_order(ctx, samples, args.num_images)
    if ctx.is_main:
        save_picture((shown(samples, bgr) + 1) / 2, args.out_file, per_row)
    return finish(ctx)


def shown(samples, bgr):
    """Samples as they are shown and stored: RGB (a BGR network's flipped) and clamped to [-1, 1]."""
    if bgr and samples.shape[1] == 3:
        samples = samples.flip(1)
    return samples.clamp(-1, 1)


def shard_folder(args):
    """The sample folder of this run ('' for a picture only)."""
    if args.out_dir:
        return args.out_dir
    return args.out_npz[:-len(".npz")] + "_shards" if args.out_npz else ""


def run_settings(args, ckpt, spec, grid, shape, bgr, extra_args):
    """What a sample folder records and a rerun must repeat: everything that decides the images."""
    labels = extra_args.get("y")
    return {"checkpoint": sample_shards.file_fingerprint(args.checkpoint), "seed": args.seed,
            "sampler": spec.name, "options": {k: v for k, v in spec.options.items() if v is not None},
            "time_labels": [round(float(t), 9) for t in grid.labels], "sigmas": [round(float(s), 12) for s in grid.sigmas],
            "prediction": checkpoint_prediction(ckpt), "guidance": extra_args.get("w"),
            "labels": None if labels is None else [int(y) for y in labels.tolist()], "image_shape": shape,
            "channel_order": "BGR" if bgr else "RGB", "num_images": args.num_images, "shard_size": args.shard_size,
            "float_samples": args.float_samples, "amp": args.amp}


def write_sample_set(args, ctx, folder, net, grid, spec, shape, bgr, extra_args, ckpt):
    """Every missing shard of this rank (shard k: rank k mod W) into `folder`, then, on the main process once all
    ranks are done, the final --out_npz. Host memory: one shard's images at a time."""
    settings = run_settings(args, ckpt, spec, grid, shape, bgr, extra_args)
    hwc = (shape[1], shape[2], shape[0])
    labels = extra_args.get("y")
    # The main process checks or creates the folder and its manifest; then every rank checks it against its settings.
    ctx.raise_together(_shard_error(lambda: sample_shards.open_folder(folder, settings)) if ctx.is_main else None)
    ctx.raise_together(_shard_error(lambda: sample_shards.open_folder(folder, settings, create=False)))
    todo = sample_shards.missing_shards(folder, args.num_images, args.shard_size, ctx.rank, ctx.world_size, hwc,
                                        args.float_samples)
    mine = len(range(ctx.rank, len(sample_shards.shard_ranges(args.num_images, args.shard_size)), ctx.world_size))
    if ctx.is_main and len(todo) < mine:
        print(f"{folder}: continuing, {mine - len(todo)} of this process's {mine} shards already there")
    bar = tqdm(total=sum(end - start for _, start, end in todo), desc="images", unit="img", disable=not ctx.is_main)

    def write_missing():
        with bar:  # closed (its line ended) before any message
            for k, start, end in todo:
                indices = range(start, end)
                with ctx.autocast():
                    samples = generate(net, grid, spec, indices, shape, args.seed, extra_args=images_of(extra_args, indices),
                                       device=ctx.device, chunk_size=args.chunk_size, channels_last=args.channels_last,
                                       prediction=checkpoint_prediction(ckpt))
                sample_shards.write_shard(folder, k, start, shown(samples, bgr),
                                          None if labels is None else labels[start:end].cpu(), args.float_samples)
                bar.update(end - start)

    ctx.raise_together(_shard_error(write_missing))
    if ctx.is_main:
        def finish_set():
            sample_shards.check_complete(folder, args.num_images, args.shard_size)
            if args.out_npz:
                keys = ["arr_0"] + (["arr_1"] if labels is not None else []) + (["samples"] if args.float_samples else [])
                sample_shards.assemble(folder, args.out_npz, args.num_images, args.shard_size, keys)
                print(f"Wrote {args.num_images} samples to {args.out_npz}")
        error = _shard_error(finish_set)
        if error is not None:
            raise error
        print(f"{folder} holds all {args.num_images} images")


def _shard_error(step):
    """Run step(); its ShardError as a UserError (None when it succeeds)."""
    try:
        step()
    except sample_shards.ShardError as e:
        return UserError(str(e))
    return None


def check_outputs(args):
    """Fail before sampling, not after, when the outputs cannot be written."""
    if not args.out_file and not args.out_npz and not args.out_dir:
        raise UserError("nothing to write: give --out_file PATH.png, --out_npz PATH.npz and/or --out_dir FOLDER")
    folder = shard_folder(args)
    if folder and int(os.environ.get("RANK", "0")) == 0:  # under torchrun the others may see it being created
        error = _shard_error(lambda: sample_shards.check_usable(folder))
        if error is not None:
            raise error
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


def save_picture(images, path, per_row):
    """A grid PNG of images [N, C, H, W] in [0, 1] (per_row images per row, or a square), if a path is given."""
    if path:
        nrow = per_row or max(1, math.ceil(math.sqrt(images.shape[0])))
        save_png(torchvision.utils.make_grid(images, nrow=nrow, padding=2), path)


def finish(ctx):
    ctx.close()
    print("Finished.")


if __name__ == "__main__":
    main()
