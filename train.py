#!/usr/bin/env python
"""Train a base v-diffusion model (cosine schedule, N steps, time scale 1) on a user module's data.

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

from checkpoints import (OWN_COSINE_TABLE, checkpoint_channel_order, checkpoint_time_labels,
                         continued_checkpoint)
from cli import UserError, main_guard
from diffusion import make_beta_schedule, model_grid
from lr_schedules import check_training_arguments
from runtime import RunContext
from train_flags import train_argument_parser
from train_utils import Stage, train, training_loss
from user_modules import (data_channel_order, extra_args_fn, load_user_module, make_user_dataset, make_user_model,
                          training_conditioning)


@main_guard
def main(argv=None):
    args = train_argument_parser(__doc__).parse_args(argv)
    check_training_arguments(args)
    ctx = RunContext(args)
    torch.manual_seed(args.seed)
    module = load_user_module(args.module)
    record = training_conditioning(module, args.cond_drop_prob)
    model = make_user_model(module)
    dataset = make_user_dataset(module)
    checkpoint_dir = os.path.join("checkpoints", args.name, args.dname)
    resume = continued_checkpoint(args.checkpoint_to_continue, checkpoint_dir)  # a rerun continues its own file
    n = args.num_timesteps
    if resume is not None and (resume[0]["n_timesteps"] != n or resume[0]["time_scale"] != 1):
        raise UserError(f"{resume[1]} is a model with {resume[0]['n_timesteps']} steps and time scale "
                        f"{resume[0]['time_scale']}; train.py continues base models (time scale 1) with --num_timesteps {n}")

    # A continued file keeps its time labels (at time scale 1 both conventions give the label i) and its
    # channel order; a new one takes the data's.
    time_labels = "aligned" if resume is None else checkpoint_time_labels(resume[0])
    channel_order = data_channel_order(module) if resume is None else checkpoint_channel_order(resume[0])
    meta = {"n_timesteps": n, "time_scale": 1, "time_labels": time_labels, "noise_levels": OWN_COSINE_TABLE,
            "stage": "train", "channel_order": channel_order, **record}
    grid = model_grid(make_beta_schedule("cosine", n), 1, time_labels)
    stage = Stage(model, functools.partial(training_loss, grid=grid), n, torch.float32, record, extra_args_fn(module),
                  grid, checkpoint_dir, meta, flip_channels=channel_order != data_channel_order(module))
    print(f"Training a {n}-step base model on {len(dataset)} images; output in {checkpoint_dir}")
    train(args, ctx, stage, dataset, resume)
    ctx.close()
    print("Finished.")


if __name__ == "__main__":
    main()
