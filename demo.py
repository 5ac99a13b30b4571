#!/usr/bin/env python
"""`make demo`: sample the shipped digits models and print their evaluation.

Writes images/digits_demo.png — the base model with all its steps | the base model with 8 steps | the
distilled 8-step | 4-step | 1-step models, all deterministic (DDIM) from the same noise, so each column
shows the same digit — and one PNG per panel
(images/digits_<panel>.png), then prints checkpoints/digits/evaluation.md.
"""
import os

import torch
import torchvision
from PIL import Image, ImageDraw

from cli import ArgumentParser, UserError, main_guard, positive_int
from script_utils import (choose_device, image_noise, load_model_from_checkpoint, load_user_module,
                          make_sampling_diffusion)

ROOT = os.path.dirname(os.path.abspath(__file__))
SHIPPED = os.path.join(ROOT, "checkpoints", "digits")
ZOOM = 4  # pixels per digit pixel in the pictures


def panels(base_steps):
    """(file name, caption, checkpoint folder, time_scale, sampler) of each panel."""
    return [("base", f"base, {base_steps} steps (DDIM)", "original", 1, "ddim"),
            ("base_8_steps", "base, 8 steps (DDIM)", "original", base_steps // 8, "ddim"),
            ("distilled_8_steps", "distilled, 8 steps", "base_3", 1, "ddim"),
            ("distilled_4_steps", "distilled, 4 steps", "base_4", 1, "ddim"),
            ("distilled_1_step", "distilled, 1 step", "base_6", 1, "ddim")]


def sample_panel(module, folder, time_scale, sampler, noise, device):
    model, ckpt = load_model_from_checkpoint(module, os.path.join(SHIPPED, folder, "checkpoint.pt"), device)
    diffusion = make_sampling_diffusion(model, ckpt, time_scale, clipped=sampler == "ddim", device=device)
    samples = diffusion.p_sample_loop(noise, clip_denoised=sampler == "ancestral")
    return samples.clamp(-1, 1).cpu()


def to_picture(samples, nrow):
    grid = torchvision.utils.make_grid((samples + 1) / 2, nrow=nrow, padding=1, pad_value=1.0)
    grid = torch.nn.functional.interpolate(grid[None], scale_factor=ZOOM, mode="nearest")[0]
    return Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().numpy())


def side_by_side(pictures, captions):
    caption_height, gap = 18, 12
    width = sum(p.width for p in pictures) + gap * (len(pictures) - 1)
    canvas = Image.new("RGB", (width, max(p.height for p in pictures) + caption_height), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for picture, caption in zip(pictures, captions):
        canvas.paste(picture, (x, caption_height))
        draw.text((x + 2, 3), caption, fill="black")
        x += picture.width + gap
    return canvas


@main_guard
def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_images", type=positive_int, default=64, help="images per panel")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shared noise")
    parser.add_argument("--device", default="cpu", help="device to sample on")
    parser.add_argument("--out_dir", default=os.path.join(ROOT, "images"), help="where the pictures go")
    args = parser.parse_args(argv)
    device = choose_device(args.device)
    if not os.path.isfile(os.path.join(SHIPPED, "original", "checkpoint.pt")):
        raise UserError(f"the shipped digits checkpoints are missing from {SHIPPED}; run `make reproduce-digits`")
    module = load_user_module("digits_u")
    base_steps = int(torch.load(os.path.join(SHIPPED, "original", "checkpoint.pt"), weights_only=True)["n_timesteps"])
    noise = image_noise(range(args.num_images), [1, 8, 8], args.seed).to(device)
    nrow = max(1, int(args.num_images ** 0.5))
    os.makedirs(args.out_dir, exist_ok=True)
    pictures, captions = [], []
    for name, caption, folder, time_scale, sampler in panels(base_steps):
        torch.manual_seed(args.seed)
        picture = to_picture(sample_panel(module, folder, time_scale, sampler, noise, device), nrow)
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


if __name__ == "__main__":
    main()
