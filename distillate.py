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

A teacher of another schedule or parameterisation (train.py --schedule linear --prediction eps, or a file without
records described by --schedule and --teacher_prediction) is distilled as it is: a teacher that predicts other
than --prediction (default v) is first turned into one that does (<dname>_<prediction>, the teacher's steps,
trained to match the teacher's prediction at every level), then halved on nested grids of its
schedule's levels (halving_levels; --halving_grid: the cosine schedule's levels or the trailing ones), down to one
step from any step count:

    python distillate.py --module digits_u --name eps --dname base --num_stages 9 \
        --base_checkpoint ./checkpoints/eps/original/checkpoint.pt
"""
import argparse
import functools
import os

import torch

from checkpoints import (CHECKPOINT_NAME, OWN_COSINE_TABLE, SCHEDULE_GRID, checkpoint_channel_order,
                         checkpoint_conditioning, checkpoint_grid, checkpoint_prediction, checkpoint_schedule,
                         checkpoint_time_labels, continued_checkpoint, load_checkpoint, same_schedule, schedule_record)
from cli import UserError, main_guard
from diffusion import grid_indices, output_mse_weighting
from guidance import ClassifierFreeGuidance
from lr_schedules import check_training_arguments
from runtime import RunContext
from samplers import select_steps
from train_flags import distill_argument_parser, schedule_from_args
from train_utils import Stage, distillation_loss, imitation_loss, train
from user_modules import (check_image_shape, data_channel_order, extra_args_fn, make_guidance_student, load_user_module,
                          make_user_dataset, model_for_checkpoint)

LEVEL_RECORDS = ("n_timesteps", "time_scale", "time_labels", "noise_levels", "grid", "schedule")


def described_teacher(ckpt, args, source):
    """The teacher's checkpoint with its schedule and prediction records, taken from --schedule ... and
    --teacher_prediction where the file has none (a file of the original or of another library); a flag that
    contradicts a record is refused. An unrecorded schedule other than cosine makes the file a base model whose
    levels are that schedule's (noise_levels schedule_grid)."""
    ckpt = dict(ckpt)
    prediction = checkpoint_prediction(ckpt)
    if args.teacher_prediction is not None:
        if "prediction" in ckpt and args.teacher_prediction != prediction:
            raise UserError(f"--teacher_prediction {args.teacher_prediction}, but {source} records that it predicts "
                            f"{prediction}; leave the flag out")
        ckpt["prediction"] = args.teacher_prediction
    if args.schedule is None:
        if args.betas or args.beta_start or args.beta_end:
            raise UserError("--betas, --beta_start and --beta_end describe the teacher's schedule with --schedule")
        return ckpt
    name, betas = schedule_from_args(args, None if args.schedule == "table" else
                                     round(ckpt["n_timesteps"] * ckpt["time_scale"]))
    if "schedule" in ckpt:
        recorded, recorded_betas = checkpoint_schedule(ckpt)
        if not same_schedule((recorded, recorded_betas), (name, betas)):
            raise UserError(f"--schedule {args.schedule}, but {source} records the {recorded} schedule of "
                            f"{len(recorded_betas)} steps; a student keeps its teacher's schedule: leave the flags out")
        return ckpt
    if name != "cosine":
        if ckpt["time_scale"] != 1 or len(betas) != ckpt["n_timesteps"]:
            raise UserError(f"{source} has {ckpt['n_timesteps']} steps at time scale {ckpt['time_scale']}; an "
                            f"unrecorded teacher of the {name} schedule ({len(betas)} steps) must be its base model "
                            "(time scale 1, one step per beta)")
        ckpt.update(noise_levels=SCHEDULE_GRID, grid=list(range(len(betas) - 1, -1, -1)),
                    time_labels=checkpoint_time_labels(ckpt))
    ckpt["schedule"] = schedule_record(name, betas)
    return ckpt


def halving_levels(teacher_ckpt, source, points=None, spacing="cosine"):
    """(the teacher's grid that the halving distils, the student's level records). A teacher on its own cosine
    table of even N steps gets a student on the fresh table of N/2 steps at twice the time scale (as the
    original). A teacher on its schedule's grid of S points is sampled on P of them (P the given power of two
    <= S, by default the largest: all S when S is a power of two), chosen by spacing "cosine" (the levels of
    the cosine schedule's P steps, by log-SNR) or "trailing" (every S/P-th), and its student takes every other
    one of them, noisiest first: so the grids of a chain nest down to one step, and each student's time labels
    are the base indices of its levels, as for the teacher."""
    n, time_scale = int(teacher_ckpt["n_timesteps"]), teacher_ckpt["time_scale"]
    teacher_grid = checkpoint_grid(teacher_ckpt)
    if teacher_ckpt.get("noise_levels", OWN_COSINE_TABLE) == OWN_COSINE_TABLE:
        if n < 2 or n % 2:
            raise UserError(f"cannot distil {source}: it samples in {n} step(s) on its own cosine table; a teacher "
                            "needs an even number of steps")
        return teacher_grid, {"n_timesteps": n // 2, "time_scale": 2 * time_scale, "time_labels": "aligned",
                              "noise_levels": OWN_COSINE_TABLE}
    if n < 2:
        raise UserError(f"cannot distil {source}: it samples in {n} step; a teacher needs at least 2")
    points = points or 1 << (n.bit_length() - 1)
    schedule = {"cosine": "cosine", "trailing": "time"}[spacing]
    teacher_grid = teacher_grid.take(grid_indices(n, select_steps(teacher_grid, points, schedule)))
    student = [int(label) for label in teacher_grid.labels[0::2]]
    base = len(checkpoint_schedule(teacher_ckpt)[1])
    return teacher_grid, {"n_timesteps": len(student), "time_scale": base / len(student), "time_labels": "aligned",
                          "noise_levels": SCHEDULE_GRID, "grid": student}


def check_teacher_steps(points, base, source):
    """--teacher_steps P: a power of two, 2 <= P <= S, for a teacher on its schedule's grid of S steps."""
    if points is None:
        return
    n = int(base["n_timesteps"])
    if base.get("noise_levels", OWN_COSINE_TABLE) == OWN_COSINE_TABLE:
        raise UserError(f"--teacher_steps applies to a teacher on its schedule's grid; {source} samples on its own "
                        f"cosine table, whose halvings go from {n} to {n // 2} steps: leave the flag out")
    if points < 2 or points & (points - 1) or points > n:
        raise UserError(f"--teacher_steps {points}: the first halving needs a power of two between 2 and the "
                        f"teacher's {n} steps")


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


def check_resumed_student(resume, meta, teacher_path):
    """A continued student has the levels, prediction and conditioning that this stage would give it."""
    ckpt, path = resume
    if ckpt["n_timesteps"] != meta["n_timesteps"] or ckpt["time_scale"] != meta["time_scale"]:
        raise UserError(f"{path} has {ckpt['n_timesteps']} steps at time scale {ckpt['time_scale']}, "
                        f"but the student of {teacher_path} has {meta['n_timesteps']} at {meta['time_scale']}")
    if checkpoint_prediction(ckpt) != meta["prediction"]:
        raise UserError(f"{path} predicts {checkpoint_prediction(ckpt)}, but this student of {teacher_path} would "
                        f"predict {meta['prediction']}; give --prediction {checkpoint_prediction(ckpt)}, or another --dname")
    if ckpt.get("grid") != meta.get("grid"):
        raise UserError(f"{path} has other noise levels than the student of {teacher_path}; give another --dname")
    record = checkpoint_conditioning(meta)
    if checkpoint_conditioning(ckpt) != record:
        raise UserError(f"{path} records the conditioning {checkpoint_conditioning(ckpt)}, but this "
                        f"student of {teacher_path} would have {record}; give the same flags, or another --dname")
    check_teacher(ckpt, path, teacher_path, meta["teacher"]["n_timesteps"], meta["teacher"]["time_scale"])


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


STAGE_KINDS = ("halving", "guidance", "prediction")


def distill_stage(args, ctx, module, dataset, teacher_path, dname, resume, kind="halving", describe=False,
                  teacher_steps=None):
    """One stage: the teacher at teacher_path -> a student in checkpoints/<name>/<dname>. kind "halving":
    Algorithm 2, half the teacher's steps (halving_levels); "guidance": stage one of guidance distillation (the
    teacher's steps, a w-input student); "prediction": the teacher's steps, a student that predicts
    --prediction. resume: (checkpoint, path) to continue, or None. describe: the teacher is the base checkpoint,
    which the teacher flags describe (described_teacher). teacher_steps: the halving's teacher points (P of
    halving_levels). Returns the student's path and the status."""
    teacher_ckpt = load_checkpoint(teacher_path, map_location="cpu")
    if describe:
        teacher_ckpt = described_teacher(teacher_ckpt, args, teacher_path)
    n, time_scale = int(teacher_ckpt["n_timesteps"]), teacher_ckpt["time_scale"]
    teacher_prediction = checkpoint_prediction(teacher_ckpt)
    record = checkpoint_conditioning(teacher_ckpt)  # the student keeps its teacher's conditioning
    teacher = prepare_teacher(args, ctx, model_for_checkpoint(module, teacher_ckpt, teacher_path))
    teacher_grid = checkpoint_grid(teacher_ckpt)
    same_levels = {key: teacher_ckpt[key] for key in LEVEL_RECORDS if key in teacher_ckpt}
    same_levels.setdefault("time_labels", checkpoint_time_labels(teacher_ckpt))
    same_levels.setdefault("noise_levels", OWN_COSINE_TABLE)
    if kind == "guidance":
        check_guidance_teacher(record, teacher_path)
        record["guidance_range"] = [args.w_min, args.w_max]
        levels, prediction = same_levels, teacher_prediction
        student = make_guidance_student(module, teacher_ckpt["G"], teacher_path)
    elif kind == "prediction":
        levels, prediction = same_levels, args.prediction
        student = model_for_checkpoint(module, teacher_ckpt, teacher_path)
    else:
        teacher_grid, levels = halving_levels(teacher_ckpt, teacher_path, teacher_steps, args.halving_grid)
        prediction = args.prediction
        student = model_for_checkpoint(module, teacher_ckpt, teacher_path)
    channel_order = checkpoint_channel_order(teacher_ckpt)  # the student keeps its teacher's order
    checkpoint_dir = os.path.join("checkpoints", args.name, dname)
    name, betas = checkpoint_schedule(teacher_ckpt)
    network = {key: teacher_ckpt[key] for key in ("network",) if key in teacher_ckpt}  # a UNet2DModel stays one
    meta = {**levels, **network, "schedule": schedule_record(name, betas), "prediction": prediction,
            "stage": {"halving": "distill", "guidance": "guidance", "prediction": "prediction"}[kind],
            "channel_order": channel_order, "teacher": {"path": teacher_path, "n_timesteps": n, "time_scale": time_scale},
            **record}
    if resume is not None:
        check_resumed_student(resume, meta, teacher_path)

    student_grid = checkpoint_grid(meta)
    flip = channel_order != data_channel_order(module)
    if kind == "halving":
        loss = functools.partial(distillation_loss, teacher=teacher, teacher_grid=teacher_grid,
                                 student_grid=student_grid, weighting=args.weighting, gamma=args.gamma,
                                 teacher_prediction=teacher_prediction, prediction=prediction)
        n_levels, eps_dtype = len(student_grid), torch.float64
        on = f", sampled on {len(teacher_grid)} of them" if len(teacher_grid) != n else ""
        print(f"Distilling {teacher_path} ({n} steps, time scale {time_scale:g}{on}) into {checkpoint_dir} "
              f"({len(student_grid)} steps, time scale {meta['time_scale']:g})")
    else:
        guided = ClassifierFreeGuidance(teacher, record["null_label"]) if kind == "guidance" else teacher
        # stage one of guidance distillation is a v regression; a change of prediction is measured, by default, in
        # the teacher's own output, where its training made it accurate (the MSE of eps for an eps teacher)
        weighting = "snr+1" if kind == "guidance" else args.prediction_weighting or output_mse_weighting(teacher_prediction)
        loss = functools.partial(imitation_loss, teacher=guided, grid=teacher_grid,
                                 teacher_prediction=teacher_prediction, prediction=prediction, weighting=weighting)
        n_levels, eps_dtype = n, torch.float32
        what = (f"under guidance w in [{args.w_min:g}, {args.w_max:g}] (a w-input model, same steps)"
                if kind == "guidance" else f"(same steps, predicting {prediction} instead of {teacher_prediction}, "
                                           f"the x error weighted {weighting})")
        print(f"{'Guidance distillation, stage one' if kind == 'guidance' else 'Change of prediction'}: "
              f"{teacher_path} ({n} steps) into {checkpoint_dir} {what}")
    stage = Stage(student, loss, n_levels, eps_dtype, record, extra_args_fn(module), student_grid, checkpoint_dir,
                  meta, flip_channels=flip)
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
    base = described_teacher(load_checkpoint(args.base_checkpoint), args, args.base_checkpoint)  # fail early
    check_teacher_steps(args.teacher_steps, base, args.base_checkpoint)
    if not args.num_stages and checkpoint_prediction(base) == args.prediction and not args.guidance_distill:
        raise UserError(f"--num_stages 0 leaves nothing to do: {args.base_checkpoint} already predicts "
                        f"{args.prediction}; give the number of halvings")
    ctx = RunContext(args)
    torch.manual_seed(args.seed)
    module = load_user_module(args.module)
    if args.guidance_distill:
        check_guidance_teacher(checkpoint_conditioning(base), args.base_checkpoint)
        if "network" in base:
            raise UserError(f"{args.base_checkpoint} is a UNet2DModel, which has no guidance-weight input; guidance "
                            "distillation needs a user module's make_model(guidance_embedding=True)")
    dataset = make_user_dataset(module)
    check_image_shape(model_for_checkpoint(module, base, args.base_checkpoint), dataset, module)
    teacher_path = args.base_checkpoint
    # (suffix of the stage's dname, its kind, its optimizer steps)
    stages = ([(args.prediction, "prediction", args.prediction_num_iters)]
              if checkpoint_prediction(base) != args.prediction else [])
    stages += [("w", "guidance", args.guidance_num_iters)] if args.guidance_distill else []
    stages += [(k, "halving", None) for k in range(args.num_stages)]
    for number, (suffix, kind, num_iters) in enumerate(stages):
        dname = args.dname if len(stages) == 1 else f"{args.dname}_{suffix}"
        # A stage continues (or, when finished, skips) its own checkpoint unless told which to continue.
        resume = continued_checkpoint(args.checkpoint_to_continue if number == 0 else "",
                                      os.path.join("checkpoints", args.name, dname))
        stage_args = argparse.Namespace(**{**vars(args), "num_iters": num_iters}) if num_iters else args
        teacher_path, status = distill_stage(stage_args, ctx, module, dataset, teacher_path, dname, resume, kind,
                                             describe=number == 0,
                                             teacher_steps=args.teacher_steps if suffix == 0 else None)
        if status == "stopped":
            break
    ctx.close()
    print("Finished.")


if __name__ == "__main__":
    main()
