#!/usr/bin/env python
"""How close a change of prediction comes to its teacher, and at which noise levels it departs from it.

    python bench/prediction_change.py --module digits_u --teacher checkpoints/digits_eps/original/checkpoint.pt \
        --checkpoints checkpoints/digits_eps/base_v/checkpoint.pt ... --out checkpoints/digits_eps/prediction_change.md

Each checkpoint is a copy of the teacher that predicts something else (distillate.py's <dname>_<prediction> stage:
the teacher's levels, its own weights to start). From the same starting noise (sample_utils.image_noise, --seed),
deterministic DDIM over all the teacher's levels: the paired RMSE of the copy's images to the teacher's, and of
hybrids that call the copy only on the step indices of one range (--ranges) and the teacher elsewhere, so that the
copy's departure is split by noise level. Each row names the recorded settings of the run that made the copy.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from checkpoints import checkpoint_grid, checkpoint_prediction  # noqa: E402
from diffusion import extract, output_mse_weighting, predict_start  # noqa: E402
from metrics import mean_and_standard_error, paired_rmse  # noqa: E402
from sample_utils import SamplerSpec, generate  # noqa: E402
from user_modules import load_model_from_checkpoint, load_user_module  # noqa: E402

DDIM = SamplerSpec("ddim", {}, None, "time", 1)


class Hybrid(torch.nn.Module):
    """x-predicting network over one grid of base indices (labels): `copy` on the labels in [low, high), `teacher`
    elsewhere, each output turned into x_hat (diffusion.predict_start) at its level."""

    def __init__(self, copy, teacher, grid, low, high):
        super().__init__()
        self.copy, self.teacher, self.low, self.high = copy, teacher, low, high
        self.levels = {round(float(label)): k for k, label in enumerate(grid.labels)}
        self.grid = grid

    def forward(self, z, label):
        index = round(float(label[0]))
        (net, prediction) = self.copy if self.low <= index < self.high else self.teacher
        k = self.levels[index]
        alpha, sigma = extract(self.grid.alphas, k, z), extract(self.grid.sigmas, k, z)
        return predict_start(prediction, z.double(), net(z, label).double(), alpha, sigma).float()


def images(net, grid, prediction, args, shape):
    with torch.no_grad():
        return generate(net, grid, DDIM, range(args.num_images), shape, args.seed, prediction=prediction).clamp(-1, 1)


def settings(ckpt, teacher_prediction):
    """The recorded settings of the run that made a copy: steps, learning rate, weighting (unset: the MSE of the
    teacher's output, as distillate.py; files written before --prediction_weighting: snr+1, the MSE of v)."""
    run = ckpt.get("args", {})
    weighting = (run["prediction_weighting"] or output_mse_weighting(teacher_prediction)
                 if "prediction_weighting" in run else "snr+1")
    return f"{ckpt.get('step', '?')} steps, lr {run.get('lr', '?'):g}, x error weighted {weighting}"


def paired_parser(description):
    """The flags of a paired comparison of DDIM images (this script's, bench/student_steps.py's): the user module,
    the number of images and their noise seed, CPU threads, the markdown file to write."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--module", default="digits_u")
    parser.add_argument("--num_images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True, help="the markdown file to write")
    return parser


def main(argv=None):
    parser = paired_parser(__doc__)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--checkpoints", nargs="+", required=True)
    parser.add_argument("--ranges", default="0:400,400:1000", help="step-index ranges low:high of the hybrids")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    module = load_user_module(args.module)
    teacher, teacher_ckpt = load_model_from_checkpoint(module, args.teacher, "cpu")
    grid, shape = checkpoint_grid(teacher_ckpt), list(teacher.image_size[1:])
    teacher_pair = (teacher, checkpoint_prediction(teacher_ckpt))
    reference = images(teacher, grid, teacher_pair[1], args, shape)
    ranges = [tuple(int(v) for v in r.split(":")) for r in args.ranges.split(",")]
    header = ["copy", "its run", "paired RMSE, all steps"] + [f"copy on indices {lo}-{hi - 1} only" for lo, hi in ranges]
    rows = []
    for path in args.checkpoints:
        copy, ckpt = load_model_from_checkpoint(module, path, "cpu")
        if checkpoint_grid(ckpt).labels.tolist() != grid.labels.tolist():
            sys.exit(f"error: {path} does not have the teacher's levels")
        pair = (copy, checkpoint_prediction(ckpt))
        cells = [images(Hybrid(pair, teacher_pair, grid, lo, hi), grid, "x", args, shape)
                 for lo, hi in [(0, len(grid))] + ranges]
        values = ["{:.4f} ± {:.4f}".format(*mean_and_standard_error(paired_rmse(x, reference))) for x in cells]
        rows.append([f"`{path}` ({pair[1]})", settings(ckpt, teacher_pair[1])] + values)
        print(rows[-1], flush=True)
    lines = [f"Copies of `{args.teacher}` ({teacher_pair[1]}, {len(grid)} steps) that predict otherwise "
             f"(`bench/prediction_change.py`, {args.num_images} images, seed {args.seed}): paired RMSE ± standard "
             "error of deterministic DDIM over all the teacher's levels against the teacher's own, from the same "
             "noise; the hybrids call the copy on one range of step indices (0 the least noisy) and the teacher "
             "elsewhere.", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
