#!/usr/bin/env python
"""Train a base diffusion model (N steps, time scale 1) on a user module's data: by default the original's
(cosine schedule, v-prediction); any schedule (--schedule, --zero_terminal_snr) and parameterisation
(--prediction eps | x | v) can be asked for, e.g. DDPM's (--schedule linear --prediction eps --num_timesteps 1000).

    python train.py --module celeba_u --name celeba --dname original --batch_size 1 --num_iters 150000

Writes ./checkpoints/<name>/<dname>/checkpoint.pt (EMA weights as G) and TensorBoard logs beside it. Rerunning
the command continues that checkpoint (or, when it is finished, does nothing) instead of overwriting it.

A class-conditional user module (one with NUM_CLASSES) trains a model for classifier-free guidance: each
label is replaced by the null label with probability --cond_drop_prob (Ho & Salimans 2022, Algorithm 1), and
the checkpoint records num_classes, null_label and cond_drop_prob.
"""
import functools
import os

import torch

from checkpoints import (OWN_COSINE_TABLE, SCHEDULE_GRID, checkpoint_channel_order, checkpoint_prediction,
                         checkpoint_schedule, checkpoint_time_labels, continued_checkpoint, same_schedule,
                         schedule_record)
from cli import UserError, main_guard
from diffusion import model_grid, rescale_zero_terminal_snr
from lr_schedules import check_training_arguments
from runtime import RunContext
from train_flags import schedule_from_args, train_argument_parser
from train_utils import Stage, train, training_loss
from user_modules import (data_channel_order, extra_args_fn, load_user_module, make_user_dataset, make_user_model,
                          training_conditioning)


def check_continued(resume, n, name, betas, prediction):
    """A continued file is a base model (time scale 1) of the same steps, schedule and prediction as the flags."""
    ckpt, path = resume
    if ckpt["n_timesteps"] != n or ckpt["time_scale"] != 1:
        raise UserError(f"{path} is a model with {ckpt['n_timesteps']} steps and time scale {ckpt['time_scale']}; "
                        f"train.py continues base models (time scale 1) with --num_timesteps {n}")
    recorded = checkpoint_schedule(ckpt)[0]
    if not same_schedule(checkpoint_schedule(ckpt), (name, betas)):
        raise UserError(f"{path} was trained with the {recorded} schedule, not the {name} one these flags give; "
                        "give its schedule flags, or another --dname")
    if checkpoint_prediction(ckpt) != prediction:
        raise UserError(f"{path} predicts {checkpoint_prediction(ckpt)}, not --prediction {prediction}")


@main_guard
def main(argv=None):
    args = train_argument_parser(__doc__).parse_args(argv)
    check_training_arguments(args)
    name, betas = schedule_from_args(args, args.num_timesteps or (None if args.schedule == "table" else 1024))
    if args.zero_terminal_snr:
        if args.prediction == "eps":
            raise UserError("--zero_terminal_snr True leaves no signal at the last step, where an eps prediction "
                            "cannot give x; use --prediction v or x")
        name, betas = f"{name}+zero_terminal_snr", rescale_zero_terminal_snr(betas)
    n = len(betas)
    ctx = RunContext(args)
    torch.manual_seed(args.seed)
    module = load_user_module(args.module)
    record = training_conditioning(module, args.cond_drop_prob)
    model = make_user_model(module)
    dataset = make_user_dataset(module)
    checkpoint_dir = os.path.join("checkpoints", args.name, args.dname)
    resume = continued_checkpoint(args.checkpoint_to_continue, checkpoint_dir)  # a rerun continues its own file
    weighting = args.weighting or {"eps": "snr", "x": "constant", "v": "snr+1"}[args.prediction]
    if resume is not None:
        check_continued(resume, n, name, betas, args.prediction)

    # A continued file keeps its time labels (at time scale 1 both conventions give the label i) and its
    # channel order; a new one takes the data's. The original's schedule keeps the noise_levels record of every
    # earlier file; any other lists its levels.
    time_labels = "aligned" if resume is None else checkpoint_time_labels(resume[0])
    channel_order = data_channel_order(module) if resume is None else checkpoint_channel_order(resume[0])
    levels = {"noise_levels": OWN_COSINE_TABLE} if name == "cosine" else {"noise_levels": SCHEDULE_GRID,
                                                                          "grid": list(range(n - 1, -1, -1))}
    meta = {"n_timesteps": n, "time_scale": 1, "time_labels": time_labels, **levels,
            "schedule": schedule_record(name, betas), "prediction": args.prediction, "stage": "train",
            "channel_order": channel_order, **record}
    grid = model_grid(betas, 1, time_labels)
    loss = functools.partial(training_loss, grid=grid, prediction=args.prediction, weighting=weighting)
    stage = Stage(model, loss, n, torch.float32, record, extra_args_fn(module), grid, checkpoint_dir, meta,
                  flip_channels=channel_order != data_channel_order(module))
    print(f"Training a {n}-step base model on {len(dataset)} images; output in {checkpoint_dir}")
    train(args, ctx, stage, dataset, resume)
    ctx.close()
    print("Finished.")


if __name__ == "__main__":
    main()
