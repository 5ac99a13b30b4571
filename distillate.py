#!/usr/bin/env python
"""Progressive distillation (Salimans & Ho 2022, Algorithm 2): teacher with N steps -> student with N/2.

    python distillate.py --module celeba_u --diffusion GaussianDiffusionDefault --name celeba --dname base_0 \
        --base_checkpoint ./checkpoints/celeba/original/checkpoint.pt --batch_size 1 --num_iters 5000

The student starts from the teacher's weights and learns to match two deterministic DDIM steps of the
teacher with one of its own. --num_stages K chains K halvings in one command: stage k is written to
<dname>_k and becomes the next stage's teacher (base_0, base_1, ... as in the original's notebook); a
stage whose checkpoint is already complete is skipped, an incomplete one is continued.
"""
import os

import torch

from diffusion import DISTILL_WEIGHTINGS, GaussianDiffusion
from script_utils import (CHECKPOINT_NAME, DIFFUSIONS, ArgumentParser, UserError, add_common_arguments,
                          checkpoint_channel_order, checkpoint_time_labels, extra_args_fn, load_checkpoint,
                          load_user_module, load_weights, main_guard, make_diffusion, make_user_dataset,
                          make_user_model, positive_int)
from train_utils import RunContext, Trainer, add_training_arguments


def make_argument_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--base_checkpoint", required=True, help="the teacher's checkpoint")
    parser.add_argument("--diffusion", default="GaussianDiffusionDefault", choices=["GaussianDiffusionDefault"],
                        help="the teacher's diffusion class (the original's flag; only this one distils)")
    parser.add_argument("--weighting", default="snr+1", choices=DISTILL_WEIGHTINGS,
                        help="snr+1: MSE on v; truncated_snr: max(SNR,1) on x (the paper's); "
                             "original: the original implementation's clipped one-x target (not Algorithm 2)")
    parser.add_argument("--gamma", type=float, default=0.0, help="extra weight (1 + alpha/sigma)^gamma on the v error")
    parser.add_argument("--num_stages", type=positive_int, default=1, help="halvings to run, each into <dname>_k")
    add_training_arguments(parser, lr=0.3 * 5e-5, scheduler="StrategyLinearLR", num_iters=5000, ema_decay=0.0)
    return parser


def make_distillation_loss(args, ctx, module, teacher, student_net, n, time_scale, teacher_time_labels):
    """loss_fn(images, labels) -> (per-sample losses, noise levels) of a teacher with n steps at time_scale
    and its student; the teacher runs under inference mode and --amp autocast (compiled with --compile)."""
    teacher.to(ctx.device).eval().requires_grad_(False)
    if args.channels_last:
        teacher.to(memory_format=torch.channels_last)
    teacher_diffusion = make_diffusion(torch.compile(teacher) if args.compile else teacher, n, time_scale,
                                       DIFFUSIONS[args.diffusion], ctx.device, time_labels=teacher_time_labels,
                                       weighting=args.weighting, gamma=args.gamma)
    student_diffusion = make_diffusion(student_net, n // 2, 2 * time_scale, GaussianDiffusion, ctx.device)
    extra_args = extra_args_fn(module)

    def loss_fn(images, labels):
        t = 2 * torch.randint(0, n // 2, (images.shape[0],), device=ctx.device)
        losses = teacher_diffusion.distill_loss(student_diffusion, images, t, extra_args(images, labels, ctx.device),
                                                reduction="none")
        return losses, t / n

    return loss_fn


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
            "channel_order": checkpoint_channel_order(teacher_ckpt),
            "teacher": {"path": teacher_path, "n_timesteps": n, "time_scale": time_scale}}
    trainer = Trainer(args, ctx, student, checkpoint_dir, meta)
    if resume_path:
        resume = load_checkpoint(resume_path)
        if resume["n_timesteps"] != n // 2 or resume["time_scale"] != 2 * time_scale:
            raise UserError(f"{resume_path} has {resume['n_timesteps']} steps at time scale {resume['time_scale']}, "
                            f"but the student of {teacher_path} has {n // 2} at {2 * time_scale}")
        trainer.restore(resume, resume_path)

    loss_fn = make_distillation_loss(args, ctx, module, teacher, trainer.net, n, time_scale,
                                     checkpoint_time_labels(teacher_ckpt))
    print(f"Distilling {teacher_path} ({n} steps, time scale {time_scale}) into {checkpoint_dir} "
          f"({n // 2} steps, time scale {2 * time_scale})")
    sample_diffusion = make_diffusion(trainer.sampling_model, n // 2, 2 * time_scale, device=ctx.device)
    status = trainer.fit(dataset, loss_fn, sample_diffusion, bgr=meta["channel_order"] == "BGR")
    return os.path.join(checkpoint_dir, CHECKPOINT_NAME), status


@main_guard
def main(argv=None):
    args = make_argument_parser().parse_args(argv)
    ctx = RunContext(args)
    torch.manual_seed(args.seed)
    module = load_user_module(args.module)
    load_checkpoint(args.base_checkpoint)  # fail early, before the data set is built
    dataset = make_user_dataset(module)
    teacher_path = args.base_checkpoint
    for stage in range(args.num_stages):
        dname = args.dname if args.num_stages == 1 else f"{args.dname}_{stage}"
        resume_path = args.checkpoint_to_continue if stage == 0 else ""
        own = os.path.join("checkpoints", args.name, dname, CHECKPOINT_NAME)
        if args.num_stages > 1 and not resume_path and os.path.isfile(own):
            resume_path = own
        teacher_path, status = distill_stage(args, ctx, module, dataset, teacher_path, dname, resume_path)
        if status == "stopped":
            break
    ctx.close()
    print("Finished.")


if __name__ == "__main__":
    main()
