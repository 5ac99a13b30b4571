#!/usr/bin/env python
"""FID against steps: the table of Figure 4 of Salimans & Ho for a base model and its distilled stages.

    python evaluate.py --module digits_u --checkpoints checkpoints/digits/original/checkpoint.pt \
        checkpoints/digits/base_*/checkpoint.pt --num_samples 1000 --out checkpoints/digits/evaluation

Rows: the base model with all its steps (ancestral and DDIM), the base model with fewer steps through
--time_scale (DDIM at --ddim_steps), every distilled stage (DDIM at its own steps), and the floor (the
real training split against the held-out split). Every row draws the same noise (image i from --seed
and i). FID is computed in the features of the user module's make_feature_extractor() (a classifier
trained on the data), or in Inception features (--features inception) for real RGB data sets.
Writes OUT.md, OUT.csv, OUT.png (FID against steps, distilled and not) and TensorBoard logs in OUT_tb/.
"""
import csv
import os

import torch

from fid import fid_from_features, inception_features
from cli import ArgumentParser, UserError, main_guard, positive_int
from script_utils import (add_common_arguments, choose_device, image_noise,
                          load_model_from_checkpoint, load_user_module, make_sampling_diffusion)


def make_argument_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--checkpoints", nargs="+", required=True, help="the base checkpoint and its distilled stages")
    parser.add_argument("--num_samples", type=positive_int, default=1000, help="generated images per row")
    parser.add_argument("--ddim_steps", default="8,4,2,1", help="steps at which to sample the base model with DDIM")
    parser.add_argument("--ddim_clip", type=float, default=0.0, help="clip DDIM's x and eps predictions at this value (0: no clipping)")
    parser.add_argument("--features", default="classifier", choices=["classifier", "inception"], help="feature space of the FID")
    parser.add_argument("--chunk_size", type=positive_int, default=1000, help="images per network call")
    parser.add_argument("--out", required=True, help="output prefix: OUT.md, OUT.csv, OUT.png, OUT_tb/")
    return parser


class FeatureSpace:
    """Maps images in [-1, 1] to FID features."""

    def __init__(self, module, kind, device):
        self.kind, self.device = kind, device
        if kind == "classifier":
            make = getattr(module, "make_feature_extractor", None)
            if make is None:
                raise UserError(f"user module {module.__name__!r} has no make_feature_extractor(); use --features inception")
            self.net = make().to(device).eval()

    @torch.no_grad()
    def __call__(self, images):
        if self.kind == "inception":
            try:
                return inception_features(images, self.device)
            except RuntimeError as e:
                raise UserError(str(e)) from None
        return torch.cat([self.net(chunk.to(self.device)).double().cpu() for chunk in images.split(500)])


def real_images(module):
    """(training split, held-out split) as tensors in [-1, 1]."""
    make_test = getattr(module, "make_test_dataset", None)
    if make_test is None:
        raise UserError(f"user module {module.__name__!r} has no make_test_dataset() with held-out images")
    stack = lambda ds: torch.stack([ds[i][0] for i in range(len(ds))])
    return stack(module.make_dataset()), stack(make_test())


def generate(diffusion, args, shape, device, **sample_kwargs):
    out = []
    for start in range(0, args.num_samples, args.chunk_size):
        indices = range(start, min(start + args.chunk_size, args.num_samples))
        noise = image_noise(indices, shape, args.seed).to(device)
        out.append(diffusion.p_sample_loop(noise, **sample_kwargs).float().cpu())
    return torch.cat(out).clamp(-1, 1)


def evaluation_plan(module, paths, ddim_steps, device):
    """Yield (label, steps, distilled, checkpoint path, time_scale, sampler)."""
    loaded = [(path, load_model_from_checkpoint(module, path, device)[1]) for path in paths]
    bases = [(p, c) for p, c in loaded if c["time_scale"] == 1]
    if len(bases) != 1:
        raise UserError(f"--checkpoints must hold exactly one base model (time scale 1); found {len(bases)}")
    base_path, base = bases[0]
    n = int(base["n_timesteps"])
    yield "base, ancestral", n, False, base_path, 1, "ancestral"
    yield "base, DDIM", n, False, base_path, 1, "ddim"
    for steps in ddim_steps:
        if steps < n:
            if n % steps:
                raise UserError(f"--ddim_steps {steps} does not divide the base model's {n} steps")
            yield f"base, DDIM, {steps} steps", steps, False, base_path, n // steps, "ddim"
    stages = sorted(((p, c) for p, c in loaded if c["time_scale"] != 1), key=lambda pc: -pc[1]["n_timesteps"])
    for path, ckpt in stages:
        yield f"distilled, {ckpt['n_timesteps']} steps", int(ckpt["n_timesteps"]), True, path, 1, "ddim"


@main_guard
def main(argv=None):
    args = make_argument_parser().parse_args(argv)
    device = choose_device(args.device)
    torch.manual_seed(args.seed)
    module = load_user_module(args.module)
    try:
        ddim_steps = [int(s) for s in args.ddim_steps.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--ddim_steps must be a comma-separated list of step counts, got {args.ddim_steps!r}") from None
    features = FeatureSpace(module, args.features, device)
    train, test = real_images(module)
    test_features = features(test)
    rows = [dict(model="floor: training split vs held-out split", steps=0, distilled="", sampler="",
                 n_samples=len(train), fid=fid_from_features(features(train), test_features))]
    print(f"{rows[0]['model']}: FID {rows[0]['fid']:.3f}")
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(args.out + "_tb")
    for label, steps, distilled, path, time_scale, sampler in evaluation_plan(module, args.checkpoints, ddim_steps, device):
        model, ckpt = load_model_from_checkpoint(module, path, device)
        diffusion = make_sampling_diffusion(model, ckpt, time_scale, clipped=sampler == "ddim", device=device)
        samples = generate(diffusion, args, list(model.image_size[1:]), device,
                           clip_denoised=args.ddim_clip > 0 or sampler == "ancestral", clip_value=args.ddim_clip)
        fid = fid_from_features(features(samples), test_features)
        rows.append(dict(model=label, steps=steps, distilled="yes" if distilled else "no", sampler=sampler,
                         n_samples=args.num_samples, fid=fid))
        print(f"{label} ({sampler}): FID {fid:.3f}")
        if sampler == "ddim":
            writer.add_scalar("fid/distilled" if distilled else "fid/undistilled_ddim", fid, steps)
        writer.add_images(f"samples/{label}", (samples[:64] + 1) / 2, 0)
    writer.close()
    write_tables(rows, args, len(test))
    plot(rows, args.out + ".png")
    print(f"Wrote {args.out}.md, {args.out}.csv and {args.out}.png")


def write_tables(rows, args, n_reference):
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".csv", "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=list(rows[0]))
        out.writeheader()
        out.writerows(rows)
    lines = [f"FID in {args.features} features against the {n_reference} held-out images; "
             f"{args.num_samples} samples per row, seed {args.seed}.", "",
             "| model | steps | sampler | samples | FID |", "|---|---:|---|---:|---:|"]
    for r in rows:
        steps = r["steps"] or ""
        lines.append(f"| {r['model']} | {steps} | {r['sampler']} | {r['n_samples']} | {r['fid']:.3f} |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(rows, path):
    """FID against steps on a log axis: distilled stages against the undistilled base with DDIM."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for distilled, name, style in (("yes", "distilled (DDIM)", "o-"), ("no", "undistilled base (DDIM)", "s--")):
        points = sorted((r["steps"], r["fid"]) for r in rows if r["distilled"] == distilled and r["sampler"] == "ddim")
        if points:
            ax.plot(*zip(*points), style, label=name)
    floor = rows[0]["fid"]
    ax.axhline(floor, color="grey", lw=0.8, ls=":", label="floor (real vs real)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("FID")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
