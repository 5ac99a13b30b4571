#!/usr/bin/env python
"""Train a base v-diffusion model (cosine schedule, N steps, time scale 1) on a user module's data.

    python train.py --module celeba_u --name celeba --dname original --batch_size 1 --num_iters 150000

Writes ./checkpoints/<name>/<dname>/checkpoint.pt (EMA weights as G) and TensorBoard logs beside it.
"""
import os

import torch

from script_utils import (DIFFUSIONS, ArgumentParser, UserError, add_common_arguments, extra_args_fn,
                          load_checkpoint, load_user_module, main_guard, make_diffusion, make_user_dataset,
                          make_user_model, positive_int)
from train_utils import RunContext, Trainer, add_training_arguments


def make_argument_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--num_timesteps", type=positive_int, default=1024, help="diffusion steps N of the base model")
    parser.add_argument("--diffusion", default="GaussianDiffusion", choices=sorted(DIFFUSIONS), help="diffusion class")
    add_training_arguments(parser, lr=5e-5, scheduler="StrategyConstantLR", num_iters=100000, ema_decay=0.9999)
    return parser


def make_training_loss(args, ctx, module, net, n):
    """loss_fn(images, labels) -> (per-sample v-MSE at uniform step indices, their noise levels)."""
    diffusion = make_diffusion(net, n, 1, DIFFUSIONS[args.diffusion], ctx.device)
    extra_args = extra_args_fn(module)

    def loss_fn(images, labels):
        t = torch.randint(0, n, (images.shape[0],), device=ctx.device)
        losses = diffusion.p_loss(images, t, extra_args(images, labels, ctx.device), reduction="none")
        return losses, t / n

    return loss_fn


@main_guard
def main(argv=None):
    args = make_argument_parser().parse_args(argv)
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
