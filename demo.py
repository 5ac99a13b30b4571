#!/usr/bin/env python
"""`make demo`: sample the shipped digits models and print their evaluation.

Writes images/digits_demo.png — the base model with all its steps | the base model with 8 steps | the
distilled 8-step | 4-step | 1-step models, by default all deterministic (DDIM, no clipping) from the
same noise, so each column shows the same digit — and one PNG per panel
(images/digits_<panel>.png), then prints checkpoints/digits/evaluation.md. Then the guided models
(checkpoints/digits_cond/): images/digits_cond_demo.png holds one row per digit and a block per guidance
weight w = 0, 1, 2, 4, the 128-step CFG teacher (two network calls per step, one at w = 0) above its 4-step
guidance-distilled student (one call per step), every block from the same noise; then the headline of
checkpoints/digits_cond/evaluation.md.

The sampling flags are sample.py's and evaluate.py's: --sampler (and --eta, --clipping_value) samples
every panel; --steps, --step_schedule, --step_indices or --time_scale choose the steps of the second
panel, the base model with few steps (unset: 8 steps through --time_scale N/8, the original's way).
"""
import os

import torch
import torchvision
from PIL import Image, ImageDraw

from cli import ArgumentParser, UserError, main_guard, seed_value
from runtime import choose_device
from sample_utils import add_sampler_arguments, generate, nfe, sampler_from_args, spec_grid
from samplers import LABELS
from user_modules import guided_network, load_model_from_checkpoint, load_user_module

ROOT = os.path.dirname(os.path.abspath(__file__))
SHIPPED = os.path.join(ROOT, "checkpoints", "digits")
SHIPPED_GUIDED = os.path.join(ROOT, "checkpoints", "digits_cond")
GUIDED_PANELS = [("original", "CFG teacher"), ("guided_4", "guidance-distilled")]  # (folder, caption) of each row
GUIDANCE_WEIGHTS = [0.0, 1.0, 2.0, 4.0]  # one block of the guided picture per w
PER_DIGIT = 3  # samples per digit in each block
ZOOM = 4  # pixels per digit pixel in the pictures


def panels(base_steps, spec):
    """(file name, model, checkpoint folder, spec) of each panel, all with the sampler of `spec`; a file
    name of None is <model>_<steps>_steps."""
    every_step = spec._replace(steps=0, schedule="time", coarsen=1)
    few = spec if (spec.steps, spec.schedule, spec.coarsen) != (0, "time", 1) else every_step._replace(
        coarsen=base_steps // 8)
    return [("base", "base", "original", every_step), (None, "base", "original", few),
            (None, "distilled", "base_3", every_step), (None, "distilled", "base_4", every_step),
            (None, "distilled", "base_6", every_step)]


def sample_panel(module, folder, spec, args, device):
    """(images in [-1, 1], number of steps) of one panel."""
    model, ckpt = load_model_from_checkpoint(module, os.path.join(SHIPPED, folder, "checkpoint.pt"), device)
    grid = spec_grid(spec, ckpt)
    samples = generate(model, grid, spec, range(args.num_images), list(model.image_size[1:]), args.seed,
                       device=device, chunk_size=args.chunk_size)
    return samples.clamp(-1, 1), nfe(grid, model)


def to_picture(samples, nrow):
    grid = torchvision.utils.make_grid((samples + 1) / 2, nrow=nrow, padding=1, pad_value=1.0)
    grid = torch.nn.functional.interpolate(grid[None], scale_factor=ZOOM, mode="nearest")[0]
    return Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().numpy())


def guided_picture(spec, args, device):
    """The guided models' picture: a row of blocks (one per w; rows digits 0-9, PER_DIGIT samples each) per
    model of GUIDED_PANELS, all with spec's sampler through all the model's steps, from the same noise."""
    module = load_user_module("digits_cond_u")
    labels = torch.arange(module.NUM_CLASSES).repeat_interleave(PER_DIGIT)
    spec = spec._replace(steps=0, schedule="time", coarsen=1)
    rows = []
    for folder, who in GUIDED_PANELS:
        model, ckpt = load_model_from_checkpoint(module, os.path.join(SHIPPED_GUIDED, folder, "checkpoint.pt"), device)
        net, grid = guided_network(model, ckpt), spec_grid(spec, ckpt)
        pictures, captions = [], []
        for w in GUIDANCE_WEIGHTS:
            samples = generate(net, grid, spec, range(len(labels)), list(model.image_size[1:]), args.seed,
                               extra_args={"y": labels.to(device), "w": w}, device=device, chunk_size=args.chunk_size)
            pictures.append(to_picture(samples.clamp(-1, 1), PER_DIGIT))
            captions.append(f"w = {w:g}: {nfe(grid, net, w)} calls")
        rows.append(side_by_side(pictures, captions, title=f"{who}: {len(grid)} steps ({LABELS[spec.name]})"))
        print(f"{who}, {len(grid)} steps, w = {', '.join(f'{w:g}' for w in GUIDANCE_WEIGHTS)}")
    return stacked(rows)


def stacked(pictures, gap=12):
    canvas = Image.new("RGB", (max(p.width for p in pictures), sum(p.height for p in pictures) + gap * (len(pictures) - 1)),
                       "white")
    y = 0
    for picture in pictures:
        canvas.paste(picture, (0, y))
        y += picture.height + gap
    return canvas


def side_by_side(pictures, captions, title=None):
    caption_height, gap = 18, 12
    top = caption_height if title else 0
    width = sum(p.width for p in pictures) + gap * (len(pictures) - 1)
    canvas = Image.new("RGB", (width, max(p.height for p in pictures) + caption_height + top), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((2, 3), title, fill="black")
    x = 0
    for picture, caption in zip(pictures, captions):
        canvas.paste(picture, (x, caption_height + top))
        draw.text((x + 2, 3 + top), caption, fill="black")
        x += picture.width + gap
    return canvas


@main_guard
def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_sampler_arguments(parser, default_sampler="ddim")
    parser.add_argument("--seed", type=seed_value, default=0, help="seed of the shared noise")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when present, else CPU), 'cpu', 'cuda', ...")
    parser.add_argument("--out_dir", default=os.path.join(ROOT, "images"), help="where the pictures go")
    args = parser.parse_args(argv)
    spec = sampler_from_args(args)
    device = choose_device(args.device)
    if not os.path.isfile(os.path.join(SHIPPED, "original", "checkpoint.pt")):
        raise UserError(f"the shipped digits checkpoints are missing from {SHIPPED}; run `make reproduce-digits`")
    if not all(os.path.isfile(os.path.join(SHIPPED_GUIDED, folder, "checkpoint.pt")) for folder, _ in GUIDED_PANELS):
        raise UserError(f"the shipped guided digits checkpoints are missing from {SHIPPED_GUIDED}; run "
                        "`make reproduce-digits-cond`")
    module = load_user_module("digits_u")
    base_steps = int(torch.load(os.path.join(SHIPPED, "original", "checkpoint.pt"), weights_only=True)["n_timesteps"])
    nrow = max(1, int(args.num_images ** 0.5))
    os.makedirs(args.out_dir, exist_ok=True)
    pictures, captions = [], []
    for name, model, folder, panel_spec in panels(base_steps, spec):
        samples, steps = sample_panel(module, folder, panel_spec, args, device)
        steps_text = f"{steps} step{'s' if steps > 1 else ''}"
        name = name or f"{model}_{steps_text.replace(' ', '_')}"
        caption = f"{model}, {steps_text} ({LABELS[spec.name]})"
        picture = to_picture(samples, nrow)
        picture.save(os.path.join(args.out_dir, f"digits_{name}.png"))
        pictures.append(picture)
        captions.append(caption)
        print(f"{caption}: images/digits_{name}.png")
    demo = os.path.join(args.out_dir, "digits_demo.png")
    side_by_side(pictures, captions).save(demo)
    print(f"Wrote {demo}\n")
    table = os.path.join(SHIPPED, "evaluation.md")
    if os.path.isfile(table):
        with open(table) as f:
            print(f.read())
    guided = os.path.join(args.out_dir, "digits_cond_demo.png")
    guided_picture(spec, args, device).save(guided)
    print(f"Wrote {guided}\n")
    table = os.path.join(SHIPPED_GUIDED, "evaluation.md")
    if os.path.isfile(table):
        with open(table) as f:
            print(f.read().split("## Accuracy and KID against w")[0].rstrip() + "\n")


if __name__ == "__main__":
    main()
