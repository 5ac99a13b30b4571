#!/usr/bin/env python
"""Wall-clock time of each stage of a run, read from its TensorBoard logs (no timer needed at training time).

    python bench/training_time.py --run checkpoints/digits_cond_run --machine "2-core CPU, one thread" \
        --out checkpoints/digits_cond/training_time.md

Each stage folder <run>/<dname>/tensorboard holds scalars with wall-clock stamps; the stage's time is the span
from its first to its last "loss" record, scaled by steps / (last step - first step + log_every) to cover the
steps before the first record (the rate is steady within a stage). For stages trained in one sitting: the
pause of a resumed stage would count as training time.
"""
import argparse
import os
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def stage_time(folder):
    """(steps, seconds) of one stage from its TensorBoard logs."""
    events = EventAccumulator(os.path.join(folder, "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    records = sorted(events.Scalars("loss"), key=lambda e: e.step)
    if len(records) < 2:
        raise SystemExit(f"error: {folder} has fewer than two loss records; nothing to time")
    every = records[1].step - records[0].step
    seconds = records[-1].wall_time - records[0].wall_time
    covered = records[-1].step - records[0].step
    return records[-1].step, seconds * (covered + every) / covered


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="the run folder, checkpoints/<name>")
    parser.add_argument("--machine", required=True, help="where it ran (written into the table)")
    parser.add_argument("--out", required=True, help="the markdown file to write")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.run):
        raise SystemExit(f"error: {args.run} is not a run folder")
    stages = sorted((d for d in os.listdir(args.run) if os.path.isdir(os.path.join(args.run, d, "tensorboard"))),
                    key=lambda d: (d != "original", not d.endswith(("_w", "_v", "_x")), len(d), d))  # in chain order
    rows, total = [], {"train": 0.0, "distill": 0.0}
    for stage in stages:
        steps, seconds = stage_time(os.path.join(args.run, stage))
        kind = "train" if stage == "original" else "distill"
        total[kind] += seconds
        rows.append(f"| {stage} | {steps} | {seconds / 60:.1f} | {steps / seconds:.2f} |")
    lines = [f"Training time of `{args.run}` ({args.machine}), from its TensorBoard logs (`bench/training_time.py`).",
             "", "| stage | steps | minutes | steps per second |", "|---|---:|---:|---:|"] + rows + [
             "", (f"Base model: {total['train'] / 60:.1f} minutes; every" if "original" in stages else "Every")
             + f" distillation stage together: {total['distill'] / 60:.1f} minutes."]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
