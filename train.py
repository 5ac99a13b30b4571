#!/usr/bin/env python
"""Train a base v-diffusion model (cosine schedule, N steps, time scale 1) on a user module's data.

    python train.py --module celeba_u --name celeba --dname original --batch_size 1 --num_iters 150000

Writes ./checkpoints/<name>/<dname>/checkpoint.pt (EMA weights as G) and TensorBoard logs beside it. Rerunning
the command continues that checkpoint (or, when it is finished, does nothing) instead of overwriting it.

A class-conditional user module (one with NUM_CLASSES) trains a model for classifier-free guidance: each
label is replaced by the null label with probability --cond_drop_prob (Ho & Salimans 2022, Algorithm 1), and
the checkpoint records num_classes, null_label and cond_drop_prob.
"""
import os

import torch

from cli import UserError, main_guard
from losses import make_training_loss
from script_utils import (CHECKPOINT_NAME, checkpoint_channel_order, checkpoint_time_labels, data_channel_order,
                          load_checkpoint, load_user_module, make_diffusion, make_user_dataset, make_user_model,
                          training_conditioning)
from runtime import RunContext
from train_utils import Trainer, check_training_arguments, train_argument_parser


@main_guard
def main(argv=None):
    parser = train_argument_parser(__doc__)
    args = parser.parse_args(argv)
    check_training_arguments(args)
    ctx = RunContext(args)
    torch.manual_seed(args.seed)
    module = load_user_module(args.module)
    record = training_conditioning(module, args.cond_drop_prob)
    model = make_user_model(module)
    dataset = make_user_dataset(module)
    checkpoint_dir = os.path.join("checkpoints", args.name, args.dname)
    # A rerun continues (or, when finished, skips) its own checkpoint instead of overwriting it.
    own = os.path.join(checkpoint_dir, CHECKPOINT_NAME)
    resume_path = args.checkpoint_to_continue or (own if os.path.isfile(own) else "")
    ckpt = load_checkpoint(resume_path) if resume_path else None
    n = args.num_timesteps
    if ckpt is not None and (ckpt["n_timesteps"] != n or ckpt["time_scale"] != 1):
        raise UserError(f"{resume_path} is a model with {ckpt['n_timesteps']} steps and time scale "
                        f"{ckpt['time_scale']}; train.py continues base models (time scale 1) with --num_timesteps {n}")

    # A continued file keeps its time-label convention (at time scale 1 both give the label i).
    time_labels = "aligned" if ckpt is None else checkpoint_time_labels(ckpt)
    meta = {"n_timesteps": n, "time_scale": 1, "time_labels": time_labels, "stage": "train",
            # a continued run keeps its file's channel order; a new one takes the data's
            "channel_order": data_channel_order(module) if ckpt is None else checkpoint_channel_order(ckpt), **record}
    trainer = Trainer(args, ctx, model, checkpoint_dir, meta)
    if ckpt is not None:
        trainer.restore(ckpt, resume_path)
    loss_fn = make_training_loss(args, ctx, module, trainer.net, n, channel_order=meta["channel_order"],
                                 time_labels=time_labels, record=record)
    print(f"Training a {n}-step base model on {len(dataset)} images; output in {checkpoint_dir}")
    sample_diffusion = make_diffusion(trainer.sampling_model, n, 1, device=ctx.device, time_labels=time_labels)
    trainer.fit(dataset, loss_fn, sample_diffusion, bgr=meta["channel_order"] == "BGR")
    ctx.close()
    print("Finished.")


if __name__ == "__main__":
    main()
