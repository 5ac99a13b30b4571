#!/usr/bin/env python
"""Where a student departs from its teacher: the teacher's DDIM for its first 2k steps, then the student's from its
step k, for k = 0 ... n (n the student's steps), against the teacher's own 2n steps.

    python bench/student_steps.py --module digits_u --pairs TEACHER:STUDENT ... --out checkpoints/digits_eps/student_steps.md

Each student is a halving of its teacher (every other level of the teacher's grid, distillate.py). From the same
starting noise (sample_utils.image_noise, --seed), deterministic DDIM over the mixed grid (the teacher's first 2k
levels, then the student's from its k-th): the paired RMSE to the teacher's images. k = 0 is the student alone, k = n
the teacher alone (0); the drop from k to k + 1 is what the student's step k adds, with what follows it.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from checkpoints import checkpoint_grid, checkpoint_prediction  # noqa: E402
from diffusion import Grid  # noqa: E402
from metrics import mean_and_standard_error, paired_rmse  # noqa: E402
from prediction_change import Hybrid, images, paired_parser  # noqa: E402
from user_modules import load_model_from_checkpoint, load_user_module  # noqa: E402


def handed_over(teacher_grid, student_grid, k):
    """The teacher's first 2k levels, then the student's from its k-th, ending at clean data."""
    first = slice(0, 2 * k)
    return Grid(torch.cat([teacher_grid.alphas[first], student_grid.alphas[k:]]),
                torch.cat([teacher_grid.sigmas[first], student_grid.sigmas[k:]]),
                torch.cat([teacher_grid.labels[first], student_grid.labels[k:]]))


def table(module, teacher_path, student_path, args):
    """The markdown lines of one teacher and its student."""
    teacher, teacher_ckpt = load_model_from_checkpoint(module, teacher_path, "cpu")
    student, ckpt = load_model_from_checkpoint(module, student_path, "cpu")
    teacher_grid, student_grid = checkpoint_grid(teacher_ckpt), checkpoint_grid(ckpt)
    if student_grid.labels.tolist() != teacher_grid.labels[0::2].tolist():
        sys.exit(f"error: {student_path} is not on every other level of {teacher_path}")
    shape, teacher_pair = list(teacher.image_size[1:]), (teacher, checkpoint_prediction(teacher_ckpt))
    reference = images(teacher, teacher_grid, teacher_pair[1], args, shape)
    cells, n = [], len(student_grid)
    for k in range(n + 1):
        grid = handed_over(teacher_grid, student_grid, k)
        # the student on its levels from the k-th down (labels up to its k-th), the teacher above
        high = int(student_grid.labels[k]) + 1 if k < n else 0
        net = Hybrid((student, checkpoint_prediction(ckpt)), teacher_pair, grid, 0, high)
        cells.append("{:.4f} ± {:.4f}".format(*mean_and_standard_error(
            paired_rmse(images(net, grid, "x", args, shape), reference))))
    print(student_path, cells, flush=True)
    labels = [int(label) for label in student_grid.labels]
    header = ["student alone"] + [f"teacher down to {labels[k]}" for k in range(1, n)] + ["teacher alone"]
    return [f"`{student_path}` ({n} steps, levels {labels}) from `{teacher_path}`:", "",
            "| " + " | ".join(header) + " |", "|" + "---|" * len(header), "| " + " | ".join(cells) + " |", ""]


def main(argv=None):
    parser = paired_parser(__doc__)
    parser.add_argument("--pairs", nargs="+", required=True, help="TEACHER:STUDENT checkpoint paths")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    module = load_user_module(args.module)
    lines = [f"Students handed over from their teachers (`bench/student_steps.py`, {args.num_images} images, seed "
             f"{args.seed}): paired RMSE ± standard error to the teacher's own DDIM from the same noise, when the "
             "teacher takes the steps down to the student's named level and the student the rest.", ""]
    for pair in args.pairs:
        lines += table(module, *pair.split(":"), args)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
