#!/usr/bin/env python
"""Write a slim copy of a checkpoint for sampling and distillation: G and the metadata, no training state.

    python export_checkpoint.py checkpoints/digits_run/base_6/checkpoint.pt checkpoints/digits/base_6 --half True

writes checkpoints/digits/base_6/checkpoint.pt. --half True stores floating-point weights in float16
(they are loaded back into float32 models).
"""
from cli import ArgumentParser, main_guard, str2bool
from script_utils import load_checkpoint, save_checkpoint

TRAINING_STATE = ("model", "optimizer", "scaler", "bad_steps")


def slim(ckpt, half):
    out = {k: v for k, v in ckpt.items() if k not in TRAINING_STATE}
    if half:
        out["G"] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["G"].items()}
    return out


@main_guard
def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="checkpoint to read")
    parser.add_argument("target_dir", help="folder to write checkpoint.pt into (created if missing)")
    parser.add_argument("--half", type=str2bool, default=False, help="store weights in float16")
    args = parser.parse_args(argv)
    path = save_checkpoint(slim(load_checkpoint(args.source), args.half), args.target_dir)
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
