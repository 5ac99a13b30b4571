#!/usr/bin/env python
r"""Progressive distillation (Salimans & Ho 2022, Algorithm 2): teacher with N steps -> student with N/2.

    python distillate.py --module celeba_u --diffusion GaussianDiffusionDefault --name celeba --dname base_0 \
        --base_checkpoint ./checkpoints/celeba/original/checkpoint.pt --batch_size 1 --num_iters 5000

The student starts from the teacher's weights and learns to match two deterministic DDIM steps of the
teacher with one of its own. --num_stages K chains K halvings in one command: stage k is written to
<dname>_k and becomes the next stage's teacher (base_0, base_1, ... as in the original's notebook).
Rerunning a command picks up where it stopped: a stage whose checkpoint is already complete is skipped,
an incomplete one is continued, and one that was distilled from another teacher is refused.

Guidance distillation (Meng et al. 2023, "On Distillation of Guided Diffusion Models"), for a class-conditional
teacher trained for classifier-free guidance (train.py with a NUM_CLASSES module):

    python distillate.py --module digits_cond_u --name digits_cond --dname guided --guidance_distill True \
        --w_min 0 --w_max 4 --num_stages 7 --base_checkpoint ./checkpoints/digits_cond/original/checkpoint.pt

writes stage one to <dname>_w: a student with the teacher's steps and a guidance-weight input, started from
the teacher's weights (the new w-input starts at zero, so its output is the teacher's), trained to match the
teacher's guided v_w = (1 + w) v(z, c) - w v(z, null) at uniform noise levels with w ~ U[w_min, w_max] per
image and the data's labels (dropped to the null label at the teacher's cond_drop_prob); then --num_stages
halvings of it to <dname>_0 ... <dname>_(K-1), each Algorithm 2 with one w ~ U[w_min, w_max] per image given
to teacher and student alike. The user module's make_model(guidance_embedding=True) builds the w-input
model. Every student records num_classes, null_label, cond_drop_prob and guidance_range = [w_min, w_max];
--weighting and --gamma apply to the halvings (stage one is a v regression); --guidance_num_iters sets
stage one's optimizer steps (default: --num_iters, as each halving). Reruns resume as above.
"""
import argparse
import functools
import os

import torch

from checkpoints import (CHECKPOINT_NAME, OWN_COSINE_TABLE, checkpoint_channel_order, checkpoint_conditioning,
                         checkpoint_grid, checkpoint_time_labels, continued_checkpoint, load_checkpoint)
from cli import UserError, main_guard
from guidance import ClassifierFreeGuidance
from lr_schedules import check_training_arguments
from runtime import RunContext
from train_flags import distill_argument_parser
from train_utils import Stage, distillation_loss, guidance_loss, train
from user_modules import (data_channel_order, extra_args_fn, make_guidance_student, load_user_module,
                          make_user_dataset, model_for_checkpoint)


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


def check_guidance_teacher(record, teacher_path):
    """Stage one of guidance distillation needs a class-conditional teacher without a w-input."""
    if "num_classes" not in record:
        raise UserError(f"--guidance_distill True needs a class-conditional teacher (trained by train.py on a user module "
                        f"with NUM_CLASSES); {teacher_path} is unconditional")
    if "guidance_range" in record:
        raise UserError(f"{teacher_path} already takes the guidance weight as an input (guidance_range "
                        f"{record['guidance_range']}); distil it with halvings, without --guidance_distill")


def prepare_teacher(args, ctx, teacher):
    """The teacher on the device without gradients, in eval mode, channels_last and compiled as asked."""
    teacher.to(ctx.device).eval().requires_grad_(False)
    if args.channels_last:
        teacher.to(memory_format=torch.channels_last)
    return torch.compile(teacher) if args.compile else teacher


def distill_stage(args, ctx, module, dataset, teacher_path, dname, resume, guidance_stage_one=False):
    """One stage: the teacher at teacher_path -> a student in checkpoints/<name>/<dname>. A halving (Algorithm
    2: N/2 steps at twice the time scale); with guidance_stage_one=True stage one of guidance distillation
    instead (the teacher's steps, a w-input student). resume: (checkpoint, path) to continue, or None.
    Returns the student's path and the training status."""
    teacher_ckpt = load_checkpoint(teacher_path, map_location="cpu")
    n, time_scale = int(teacher_ckpt["n_timesteps"]), teacher_ckpt["time_scale"]
    record = checkpoint_conditioning(teacher_ckpt)  # the student keeps its teacher's conditioning
    teacher = prepare_teacher(args, ctx, model_for_checkpoint(module, teacher_ckpt, teacher_path))
    if guidance_stage_one:
        check_guidance_teacher(record, teacher_path)
        record["guidance_range"] = [args.w_min, args.w_max]
        student_n, student_scale, time_labels = n, time_scale, checkpoint_time_labels(teacher_ckpt)
        student = make_guidance_student(module, teacher_ckpt["G"], teacher_path)
    elif n < 2 or n % 2:
        raise UserError(f"cannot distil {teacher_path}: it samples in {n} step(s); a teacher needs an even number of steps")
    else:
        student_n, student_scale, time_labels = n // 2, 2 * time_scale, "aligned"
        student = model_for_checkpoint(module, teacher_ckpt, teacher_path)
    channel_order = checkpoint_channel_order(teacher_ckpt)  # the student keeps its teacher's order
    checkpoint_dir = os.path.join("checkpoints", args.name, dname)
    meta = {"n_timesteps": student_n, "time_scale": student_scale, "time_labels": time_labels,
            "noise_levels": OWN_COSINE_TABLE, "stage": "guidance" if guidance_stage_one else "distill",
            "channel_order": channel_order, "teacher": {"path": teacher_path, "n_timesteps": n, "time_scale": time_scale},
            **record}
    if resume is not None:
        ckpt, path = resume
        if ckpt["n_timesteps"] != student_n or ckpt["time_scale"] != student_scale:
            raise UserError(f"{path} has {ckpt['n_timesteps']} steps at time scale {ckpt['time_scale']}, "
                            f"but the student of {teacher_path} has {student_n} at {student_scale}")
        if checkpoint_conditioning(ckpt) != record:
            raise UserError(f"{path} records the conditioning {checkpoint_conditioning(ckpt)}, but this "
                            f"student of {teacher_path} would have {record}; give the same flags, or another --dname")
        check_teacher(ckpt, path, teacher_path, n, time_scale)

    teacher_grid, student_grid = checkpoint_grid(teacher_ckpt), checkpoint_grid(meta)
    if guidance_stage_one:
        loss = functools.partial(guidance_loss, teacher=ClassifierFreeGuidance(teacher, record["null_label"]),
                                 grid=teacher_grid)
        n_levels, eps_dtype = n, torch.float32
        print(f"Guidance distillation, stage one: {teacher_path} ({n} steps, time scale {time_scale}) under "
              f"guidance w in [{args.w_min:g}, {args.w_max:g}] into {checkpoint_dir} (a w-input model, same steps)")
    else:
        loss = functools.partial(distillation_loss, teacher=teacher, teacher_grid=teacher_grid,
                                 student_grid=student_grid, weighting=args.weighting, gamma=args.gamma)
        n_levels, eps_dtype = n // 2, torch.float64
        print(f"Distilling {teacher_path} ({n} steps, time scale {time_scale}) into {checkpoint_dir} "
              f"({n // 2} steps, time scale {2 * time_scale})")
    stage = Stage(student, loss, n_levels, eps_dtype, record, extra_args_fn(module), student_grid, checkpoint_dir,
                  meta, flip_channels=channel_order != data_channel_order(module))
    status = train(args, ctx, stage, dataset, resume)
    return os.path.join(checkpoint_dir, CHECKPOINT_NAME), status


def check_guidance_arguments(args):
    """--w_min, --w_max and --guidance_num_iters belong to --guidance_distill True (default range [0, 4]);
    w_min <= w_max."""
    if not args.guidance_distill:
        for flag, value in (("--w_min", args.w_min), ("--w_max", args.w_max),
                            ("--guidance_num_iters", args.guidance_num_iters)):
            if value is not None:
                raise UserError(f"{flag} applies to stage one of --guidance_distill True; a halving of a w-input teacher "
                                "uses the teacher's recorded guidance_range")
        return
    args.w_min = 0.0 if args.w_min is None else args.w_min
    args.w_max = 4.0 if args.w_max is None else args.w_max
    if args.w_min > args.w_max:
        raise UserError(f"--w_min {args.w_min:g} is larger than --w_max {args.w_max:g}")


@main_guard
def main(argv=None):
    args = distill_argument_parser(__doc__).parse_args(argv)
    check_training_arguments(args)
    check_guidance_arguments(args)
    if args.weighting == "truncated_snr" and args.gamma:
        raise UserError(f"--gamma {args.gamma} weights the v error, which --weighting truncated_snr does not use; "
                        "give --gamma 0, or --weighting snr+1 for the original's weighted loss")
    ctx = RunContext(args)
    torch.manual_seed(args.seed)
    module = load_user_module(args.module)
    base = load_checkpoint(args.base_checkpoint)  # fail early, before the data set is built
    if args.guidance_distill:
        check_guidance_teacher(checkpoint_conditioning(base), args.base_checkpoint)
    dataset = make_user_dataset(module)
    teacher_path = args.base_checkpoint
    # (suffix of the stage's dname, whether it is stage one of guidance distillation)
    stages = ([("w", True)] if args.guidance_distill else []) + [(k, False) for k in range(args.num_stages)]
    for number, (suffix, stage_one) in enumerate(stages):
        dname = args.dname if len(stages) == 1 else f"{args.dname}_{suffix}"
        # A stage continues (or, when finished, skips) its own checkpoint unless told which to continue.
        resume = continued_checkpoint(args.checkpoint_to_continue if number == 0 else "",
                                      os.path.join("checkpoints", args.name, dname))
        stage_args = args
        if stage_one and args.guidance_num_iters:
            stage_args = argparse.Namespace(**{**vars(args), "num_iters": args.guidance_num_iters})
        teacher_path, status = distill_stage(stage_args, ctx, module, dataset, teacher_path, dname, resume, stage_one)
        if status == "stopped":
            break
    ctx.close()
    print("Finished.")


if __name__ == "__main__":
    main()
