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
import argparse
import functools
import os

import torch

from checkpoints import (OWN_COSINE_TABLE, SCHEDULE_GRID, checkpoint_channel_order, checkpoint_prediction,
                         checkpoint_schedule, checkpoint_time_labels, continued_checkpoint, same_schedule,
                         schedule_record)
from cli import UserError, main_guard
from diffusers_unet import DiffusersUNet
from diffusion import model_grid, output_mse_weighting, rescale_zero_terminal_snr
from lr_schedules import check_training_arguments
from runtime import RunContext
from train_flags import schedule_from_args, train_argument_parser
from train_utils import Stage, train, training_loss
from user_modules import (check_image_shape, data_channel_order, extra_args_fn, load_user_module, make_user_dataset,
                          make_user_model, network_of, training_conditioning)


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


def base_schedule(args, continued):
    """(name, float64 betas, prediction) of the base model: the flags; those left unset take a continued file's
    records (a model read from a diffusers folder, say), else the original's cosine schedule of 1024 steps and v."""
    prediction = args.prediction or (checkpoint_prediction(continued) if continued is not None else "v")
    schedule_flags = (args.schedule, args.num_timesteps, args.beta_start, args.beta_end, args.betas or None)
    if continued is not None and schedule_flags == (None,) * 5 and not args.zero_terminal_snr:
        name, betas = checkpoint_schedule(continued)
        return name, betas, prediction
    steps = args.num_timesteps
    if steps is None and args.schedule != "table":
        steps = 1024 if continued is None else round(continued["n_timesteps"] * continued["time_scale"])
    name, betas = schedule_from_args(argparse.Namespace(**{**vars(args), "schedule": args.schedule or "cosine"}), steps)
    if args.zero_terminal_snr:
        if prediction == "eps":
            raise UserError("--zero_terminal_snr True leaves no signal at the last step, where an eps prediction "
                            "cannot give x; use --prediction v or x")
        name, betas = f"{name}+zero_terminal_snr", rescale_zero_terminal_snr(betas)
    return name, betas, prediction


@main_guard
def main(argv=None):
    args = train_argument_parser(__doc__).parse_args(argv)
    check_training_arguments(args)
    checkpoint_dir = os.path.join("checkpoints", args.name, args.dname)
    resume = continued_checkpoint(args.checkpoint_to_continue, checkpoint_dir)  # a rerun continues its own file
    name, betas, prediction = base_schedule(args, None if resume is None else resume[0])
    n = len(betas)
    if resume is not None:
        check_continued(resume, n, name, betas, prediction)
    ctx = RunContext(args)
    torch.manual_seed(args.seed)
    module = load_user_module(args.module)
    record = training_conditioning(module, args.cond_drop_prob)
    # the network a continued file records (a UNet2DModel read from a diffusers folder), else the module's
    model = (resume and network_of(*resume)) or make_user_model(module)
    dataset = make_user_dataset(module)
    check_image_shape(model, dataset, module)
    weighting = args.weighting or output_mse_weighting(prediction)

    # A continued file keeps its time labels (at time scale 1 both conventions give the label i) and its
    # channel order; a new one takes the data's. The original's schedule keeps the noise_levels record of every
    # earlier file; any other lists its levels.
    time_labels = "aligned" if resume is None else checkpoint_time_labels(resume[0])
    channel_order = data_channel_order(module) if resume is None else checkpoint_channel_order(resume[0])
    levels = {"noise_levels": OWN_COSINE_TABLE} if name == "cosine" else {"noise_levels": SCHEDULE_GRID,
                                                                          "grid": list(range(n - 1, -1, -1))}
    network = {"network": model.record()} if isinstance(model, DiffusersUNet) else {}
    meta = {"n_timesteps": n, "time_scale": 1, "time_labels": time_labels, **levels, **network,
            "schedule": schedule_record(name, betas), "prediction": prediction, "stage": "train",
            "channel_order": channel_order, **record}
    grid = model_grid(betas, 1, time_labels)
    loss = functools.partial(training_loss, grid=grid, prediction=prediction, weighting=weighting)
    stage = Stage(model, loss, n, torch.float32, record, extra_args_fn(module), grid, checkpoint_dir, meta,
                  flip_channels=channel_order != data_channel_order(module))
    print(f"Training a {n}-step base model on {len(dataset)} images; output in {checkpoint_dir}")
    train(args, ctx, stage, dataset, resume)
    ctx.close()
    print("Finished.")


if __name__ == "__main__":
    main()
