#!/usr/bin/env python
"""Train a base v-diffusion model (cosine schedule, N steps, time scale 1) on a user module's data.

    python train.py --module celeba_u --name celeba --dname original --batch_size 1 --num_iters 150000

Writes ./checkpoints/<name>/<dname>/checkpoint.pt (EMA weights as G) and TensorBoard logs beside it.
"""
import os

import torch

from cli import ArgumentParser, UserError, main_guard, positive_int
from script_utils import (DIFFUSIONS, add_common_arguments, extra_args_fn, load_checkpoint,
                          load_user_module, make_diffusion, make_user_dataset, make_user_model)
from losses import make_training_loss
from runtime import RunContext
from train_utils import Trainer, train_argument_parser


@main_guard
def main(argv=None):
    args = train_argument_parser(__doc__).parse_args(argv)
    ctx = RunContext(args)
    torch.manual_seed(args.seed)
    module = load_user_module(args.module)
    model = make_user_model(module)
    dataset = make_user_dataset(module)
    ckpt = load_checkpoint(args.checkpoint_to_continue) if args.checkpoint_to_continue else None
    n = args.num_timesteps
    if ckpt is not None and (ckpt["n_timesteps"] != n or ckpt["time_scale"] != 1):
        raise UserError(f"{args.checkpoint_to_continue} is a model with {ckpt['n_timesteps']} steps and time scale "
                        f"{ckpt['time_scale']}; train.py continues base models (time scale 1) with --num_timesteps {n}")

    meta = {"n_timesteps": n, "time_scale": 1, "time_labels": "aligned", "stage": "train",
            "channel_order": getattr(module, "CHANNEL_ORDER", "RGB")}
    checkpoint_dir = os.path.join("checkpoints", args.name, args.dname)
    trainer = Trainer(args, ctx, model, checkpoint_dir, meta)
    if ckpt is not None:
        trainer.restore(ckpt, args.checkpoint_to_continue)
    loss_fn = make_training_loss(args, ctx, module, trainer.net, n)
    print(f"Training a {n}-step base model on {len(dataset)} images; output in {checkpoint_dir}")
    trainer.fit(dataset, loss_fn, make_diffusion(trainer.sampling_model, n, 1, device=ctx.device))
    ctx.close()
    print("Finished.")


if __name__ == "__main__":
    main()
