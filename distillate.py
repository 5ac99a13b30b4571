#!/usr/bin/env python
r"""Progressive distillation (Salimans & Ho 2022, Algorithm 2): teacher with N steps -> student with N/2.

    python distillate.py --module celeba_u --diffusion GaussianDiffusionDefault --name celeba --dname base_0 \
        --base_checkpoint ./checkpoints/celeba/original/checkpoint.pt --batch_size 1 --num_iters 5000

The student starts from the teacher's weights and learns to match two deterministic DDIM steps of the
teacher with one of its own. --num_stages K chains K halvings in one command: stage k is written to
<dname>_k and becomes the next stage's teacher (base_0, base_1, ... as in the original's notebook).
Rerunning a command picks up where it stopped: a stage whose checkpoint is already complete is skipped,
an incomplete one is continued, and one that was distilled from another teacher is refused.
"""
import os

import torch

from cli import UserError, main_guard
from script_utils import (CHECKPOINT_NAME, checkpoint_channel_order, checkpoint_time_labels, load_checkpoint,
                          load_user_module, load_weights, make_diffusion, make_user_dataset, make_user_model)
from losses import make_distillation_loss
from runtime import RunContext
from train_utils import Trainer, check_training_arguments, distill_argument_parser


def check_teacher(resume, resume_path, teacher_path, n, time_scale):
    """A student is continued only with the teacher it was distilled from (its checkpoint's "teacher"
    record; a file of the original has none)."""
    record = resume.get("teacher")
    if record is None:
        return
    if (os.path.realpath(record["path"]) != os.path.realpath(teacher_path) or record["n_timesteps"] != n
            or record["time_scale"] != time_scale):
        raise UserError(f"{resume_path} is the student of {record['path']} ({record['n_timesteps']} steps, time scale "
                        f"{record['time_scale']}), not of {teacher_path} ({n} steps, time scale {time_scale}); "
                        f"give that teacher, or another --dname for a new student")


def distill_stage(args, ctx, module, dataset, teacher_path, dname, resume_path):
    """One halving: teacher at teacher_path -> student in checkpoints/<name>/<dname>. Returns its path."""
    teacher_ckpt = load_checkpoint(teacher_path, map_location="cpu")
    n, time_scale = int(teacher_ckpt["n_timesteps"]), teacher_ckpt["time_scale"]
    if n < 2 or n % 2:
        raise UserError(f"cannot distil {teacher_path}: it samples in {n} step(s); a teacher needs an even number of steps")
    teacher = make_user_model(module)
    load_weights(teacher, teacher_ckpt["G"], teacher_path)
    student = make_user_model(module)
    load_weights(student, teacher_ckpt["G"], teacher_path)

    checkpoint_dir = os.path.join("checkpoints", args.name, dname)
    meta = {"n_timesteps": n // 2, "time_scale": 2 * time_scale, "time_labels": "aligned", "stage": "distill",
            "channel_order": checkpoint_channel_order(teacher_ckpt),  # the student keeps its teacher's order
            "teacher": {"path": teacher_path, "n_timesteps": n, "time_scale": time_scale}}
    trainer = Trainer(args, ctx, student, checkpoint_dir, meta)
    if resume_path:
        resume = load_checkpoint(resume_path)
        if resume["n_timesteps"] != n // 2 or resume["time_scale"] != 2 * time_scale:
            raise UserError(f"{resume_path} has {resume['n_timesteps']} steps at time scale {resume['time_scale']}, "
                            f"but the student of {teacher_path} has {n // 2} at {2 * time_scale}")
        check_teacher(resume, resume_path, teacher_path, n, time_scale)
        trainer.restore(resume, resume_path)

    loss_fn = make_distillation_loss(args, ctx, module, teacher, trainer.net, n, time_scale,
                                     checkpoint_time_labels(teacher_ckpt), channel_order=meta["channel_order"])
    print(f"Distilling {teacher_path} ({n} steps, time scale {time_scale}) into {checkpoint_dir} "
          f"({n // 2} steps, time scale {2 * time_scale})")
    sample_diffusion = make_diffusion(trainer.sampling_model, n // 2, 2 * time_scale, device=ctx.device)
    status = trainer.fit(dataset, loss_fn, sample_diffusion, bgr=meta["channel_order"] == "BGR")
    return os.path.join(checkpoint_dir, CHECKPOINT_NAME), status


@main_guard
def main(argv=None):
    args = distill_argument_parser(__doc__).parse_args(argv)
    check_training_arguments(args)
    if args.weighting == "truncated_snr" and args.gamma:
        raise UserError(f"--gamma {args.gamma} weights the v error, which --weighting truncated_snr does not use; "
                        "give --gamma 0, or --weighting snr+1 for the original's weighted loss")
    ctx = RunContext(args)
    torch.manual_seed(args.seed)
    module = load_user_module(args.module)
    load_checkpoint(args.base_checkpoint)  # fail early, before the data set is built
    dataset = make_user_dataset(module)
    teacher_path = args.base_checkpoint
    for stage in range(args.num_stages):
        dname = args.dname if args.num_stages == 1 else f"{args.dname}_{stage}"
        # A stage continues (or, when finished, skips) its own checkpoint unless told which to continue.
        own = os.path.join("checkpoints", args.name, dname, CHECKPOINT_NAME)
        resume_path = args.checkpoint_to_continue if stage == 0 else ""
        if not resume_path and os.path.isfile(own):
            resume_path = own
        teacher_path, status = distill_stage(args, ctx, module, dataset, teacher_path, dname, resume_path)
        if status == "stopped":
            break
    ctx.close()
    print("Finished.")


if __name__ == "__main__":
    main()
