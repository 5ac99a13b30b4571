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
import os

import torch

from cli import UserError, main_guard
from script_utils import (CHECKPOINT_NAME, checkpoint_channel_order, checkpoint_conditioning, checkpoint_time_labels,
                          load_checkpoint, load_user_module, make_diffusion, make_guidance_student, make_user_dataset,
                          model_for_checkpoint)
from losses import make_distillation_loss, make_guidance_distillation_loss
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


def check_guidance_teacher(record, teacher_path):
    """Stage one of guidance distillation needs a class-conditional teacher without a w-input."""
    if "num_classes" not in record:
        raise UserError(f"--guidance_distill True needs a class-conditional teacher (trained by train.py on a user module "
                        f"with NUM_CLASSES); {teacher_path} is unconditional")
    if "guidance_range" in record:
        raise UserError(f"{teacher_path} already takes the guidance weight as an input (guidance_range "
                        f"{record['guidance_range']}); distil it with halvings, without --guidance_distill")


def distill_stage(args, ctx, module, dataset, teacher_path, dname, resume_path, guidance=False):
    """One stage: teacher at teacher_path -> student in checkpoints/<name>/<dname>. A halving (Algorithm 2);
    with guidance=True stage one of guidance distillation instead (same steps, a w-input student). Returns
    its path and the training status."""
    teacher_ckpt = load_checkpoint(teacher_path, map_location="cpu")
    n, time_scale = int(teacher_ckpt["n_timesteps"]), teacher_ckpt["time_scale"]
    record = checkpoint_conditioning(teacher_ckpt)  # the student keeps its teacher's conditioning
    if guidance:
        check_guidance_teacher(record, teacher_path)
        record["guidance_range"] = [args.w_min, args.w_max]
        student_n, student_scale, time_labels = n, time_scale, checkpoint_time_labels(teacher_ckpt)
    elif n < 2 or n % 2:
        raise UserError(f"cannot distil {teacher_path}: it samples in {n} step(s); a teacher needs an even number of steps")
    else:
        student_n, student_scale, time_labels = n // 2, 2 * time_scale, "aligned"
    teacher = model_for_checkpoint(module, teacher_ckpt, teacher_path)
    if guidance:
        student = make_guidance_student(module, teacher_ckpt["G"], teacher_path)
    else:
        student = model_for_checkpoint(module, teacher_ckpt, teacher_path)

    checkpoint_dir = os.path.join("checkpoints", args.name, dname)
    meta = {"n_timesteps": student_n, "time_scale": student_scale, "time_labels": time_labels,
            "stage": "guidance" if guidance else "distill",
            "channel_order": checkpoint_channel_order(teacher_ckpt),  # the student keeps its teacher's order
            "teacher": {"path": teacher_path, "n_timesteps": n, "time_scale": time_scale}, **record}
    trainer = Trainer(args, ctx, student, checkpoint_dir, meta)
    if resume_path:
        resume = load_checkpoint(resume_path)
        if resume["n_timesteps"] != student_n or resume["time_scale"] != student_scale:
            raise UserError(f"{resume_path} has {resume['n_timesteps']} steps at time scale {resume['time_scale']}, "
                            f"but the student of {teacher_path} has {student_n} at {student_scale}")
        if checkpoint_conditioning(resume) != record:
            raise UserError(f"{resume_path} records the conditioning {checkpoint_conditioning(resume)}, but this "
                            f"student of {teacher_path} would have {record}; give the same flags, or another --dname")
        check_teacher(resume, resume_path, teacher_path, n, time_scale)
        trainer.restore(resume, resume_path)

    if guidance:
        loss_fn = make_guidance_distillation_loss(args, ctx, module, teacher, trainer.net, n, time_scale, time_labels,
                                                  meta["channel_order"], record)
        print(f"Guidance distillation, stage one: {teacher_path} ({n} steps, time scale {time_scale}) under "
              f"guidance w in [{args.w_min:g}, {args.w_max:g}] into {checkpoint_dir} (a w-input model, same steps)")
    else:
        loss_fn = make_distillation_loss(args, ctx, module, teacher, trainer.net, n, time_scale,
                                         checkpoint_time_labels(teacher_ckpt), channel_order=meta["channel_order"],
                                         record=record)
        print(f"Distilling {teacher_path} ({n} steps, time scale {time_scale}) into {checkpoint_dir} "
              f"({n // 2} steps, time scale {2 * time_scale})")
    sample_diffusion = make_diffusion(trainer.sampling_model, student_n, student_scale, device=ctx.device,
                                      time_labels=time_labels)
    status = trainer.fit(dataset, loss_fn, sample_diffusion, bgr=meta["channel_order"] == "BGR")
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
    parser = distill_argument_parser(__doc__)
    args = parser.parse_args(argv)
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
    for number, (suffix, guidance) in enumerate(stages):
        dname = args.dname if len(stages) == 1 else f"{args.dname}_{suffix}"
        # A stage continues (or, when finished, skips) its own checkpoint unless told which to continue.
        own = os.path.join("checkpoints", args.name, dname, CHECKPOINT_NAME)
        resume_path = args.checkpoint_to_continue if number == 0 else ""
        if not resume_path and os.path.isfile(own):
            resume_path = own
        stage_args = args
        if guidance and args.guidance_num_iters:
            stage_args = argparse.Namespace(**{**vars(args), "num_iters": args.guidance_num_iters})
        teacher_path, status = distill_stage(stage_args, ctx, module, dataset, teacher_path, dname, resume_path, guidance)
        if status == "stopped":
            break
    ctx.close()
    print("Finished.")


if __name__ == "__main__":
    main()
