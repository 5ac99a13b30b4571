#!/usr/bin/env python
"""The compute of a distillation recipe, from the network's counted FLOPs, and its GPU hours at a stated rate.

    python bench/recipe_cost.py --module celeba_u --resolution 256 --out bench/recipe_cost.md

FLOPs per image are counted with torch's FlopCounterMode on the meta device (no weights, no data, seconds on
any machine): F the forward of the UNet, B its forward+backward. One training step costs B per image; one
distillation step (Algorithm 2) two teacher forwards and the student's forward+backward, 2F + B per image;
sampling one image with S steps S F. A teacher that predicts eps or x (--teacher_prediction) first gets distillate.py's
change of prediction: one stage of the halvings' updates (--prediction_num_iters unset), F + B per image. N base steps
give floor(log2 N) - log2(final) halvings (distillate.halving_levels: 1000 steps are first sampled on 512).
The GPU hours divide the total by --tflops, the sustained rate assumed
for one GPU (default: 40% of an H100 SXM's 989 dense bf16 TFLOP/s, the project's GPU goal for a training
step, not a measurement) and are an estimate of that arithmetic only: data loading, checkpoints and
evaluation come on top.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import network_flops  # noqa: E402  (bench/bench.py, beside this file)
from user_modules import load_user_module, make_user_model  # noqa: E402

# (name, what it is, images per halving = batch x updates)
RECIPES = [
    ("paper", "Salimans & Ho 2022, official configs: batch 128, 50k updates per halving, lr 5e-5 annealed "
              "linearly to 0, no EMA for students, gradient clipping at 1 (distillate.py --batch_size 128 "
              "--num_iters 50000 --lr 5e-5 --scheduler linear --ema_decay 0 --grad_clip 1)", 128 * 50_000),
    ("original", "the original's README: batch 1, 5,000 updates per halving (distillate.py --batch_size 1 "
                 "--num_iters 5000)", 1 * 5_000),
]


def counted_flops(module, resolution):
    """(forward, forward+backward) FLOPs of one image through the module's network, and its image shape."""
    model = make_user_model(module)
    _, c, h, w = model.image_size
    if resolution:
        h = w = resolution
    forward, backward = network_flops(model, [1, c, h, w])
    return forward, backward, [c, h, w]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", default="celeba_u")
    parser.add_argument("--resolution", type=int, default=0, help="H = W (0: the module's)")
    parser.add_argument("--base_steps", type=int, default=1024, help="steps of the base model")
    parser.add_argument("--final_steps", type=int, default=4, help="steps of the last student")
    parser.add_argument("--teacher_prediction", default="v", choices=["eps", "x", "v"],
                        help="what the base model predicts (eps or x: a change-of-prediction stage first)")
    parser.add_argument("--tflops", type=float, default=0.4 * 989, help="sustained TFLOP/s of one GPU (assumed)")
    parser.add_argument("--out", default="", help="also write the table here (markdown)")
    args = parser.parse_args()
    module = load_user_module(args.module)
    forward, backward, shape = counted_flops(module, args.resolution)
    halvings = (args.base_steps // args.final_steps).bit_length() - 1
    step = 2 * forward + backward  # per image of one distillation step
    change = forward + backward if args.teacher_prediction != "v" else 0  # per image of the change of prediction
    rate = args.tflops * 1e12
    lines = [f"Compute of distilling `{args.module}` ({'x'.join(map(str, shape))}) from {args.base_steps} to "
             f"{args.final_steps} steps ({halvings} halvings), from FLOPs counted by `bench/recipe_cost.py` "
             f"(FlopCounterMode, meta device): forward F = {forward / 1e9:.1f} GFLOP, forward+backward B = "
             f"{backward / 1e9:.1f} GFLOP per image; a distillation step 2F + B = {step / 1e9:.1f} GFLOP per image"
             + (f"; the {args.teacher_prediction} teacher's change of prediction to v first, F + B = {change / 1e9:.1f} "
                "GFLOP per image, as many updates as a halving" if change else "") + ". "
             f"GPU hours at an assumed sustained {args.tflops:.0f} TFLOP/s per GPU (40% of an H100 SXM's dense bf16 "
             "peak by default; not measured here).", "",
             f"| recipe | images per halving | PFLOP per halving | all {'stages' if change else 'halvings'}: PFLOP | GPU hours (one GPU) |",
             "|---|---:|---:|---:|---:|"]
    for name, what, images in RECIPES:
        per_halving = images * step
        total = halvings * per_halving + images * change
        lines.append(f"| {name}: {what} | {images:,} | {per_halving / 1e15:,.1f} | {total / 1e15:,.1f} | "
                     f"{total / rate / 3600:,.1f} |")
    sampling = [f"{s} step{'s' if s > 1 else ''}: {s * forward / 1e9:,.1f} GFLOP" for s in (args.base_steps, 8, args.final_steps, 1)]
    lines += ["", f"Sampling one image: {'; '.join(sampling)} (classifier-free guidance doubles the base model's). "
              f"FID-50k of one {args.final_steps}-step student: {50_000 * args.final_steps * forward / rate / 3600:.2f} GPU "
              f"hours of sampling at the same rate."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
