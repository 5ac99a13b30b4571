"""Run under torchrun by test_distributed.py: a few DDP steps of train_utils.train, then report every rank's
weights, EMA, data and draws so the test can compare them."""
import json
import os
import sys

import torch
import torch.distributed as dist

import toy_u
import train_utils
from diffusion import make_beta_schedule, model_grid
from runtime import RunContext
from train_flags import train_argument_parser

N_STEPS = 8

args = train_argument_parser("").parse_args(
    ["--module", "toy_u", "--name", "n", "--dname", "d", "--device", "cpu", "--seed", "0", "--batch_size", "8",
     "--num_workers", "0", "--lr", "1e-3", "--scheduler", "constant", "--ema_decay", "0.9", "--num_iters", "6",
     "--log_images", "2", "--max_bad_steps", "5", "--channels_last", "False"])
ctx = RunContext(args)
emas = []


class RecordedEMA(train_utils.EMA):
    """The loop's EMA, kept where this script can read it after the run."""

    def __init__(self, model, decay):
        super().__init__(model, decay)
        emas.append(self)


train_utils.EMA = RecordedEMA
grid = model_grid(make_beta_schedule("cosine", N_STEPS))
seen, times = [], []


def loss(net, images, draws, extra_args):
    seen.append(images.flatten(1)[:, 0].tolist())
    times.append(draws.t.tolist())
    return train_utils.training_loss(net, images, draws, extra_args, grid=grid)


model = toy_u.make_model()
stage = train_utils.Stage(model, loss, N_STEPS, torch.float32, {}, lambda images, labels, device: {}, grid,
                          sys.argv[1], {"n_timesteps": N_STEPS, "time_scale": 1})
status = train_utils.train(args, ctx, stage, toy_u.make_dataset())
report = {"rank": ctx.rank, "status": status, "seen": seen, "times": times,
          "model": [p.sum().item() for p in model.parameters()],
          "ema": [p.sum().item() for p in emas[0].model.parameters()]}
reports = [None] * ctx.world_size
dist.all_gather_object(reports, report)
if ctx.is_main:
    with open(os.path.join(sys.argv[1], "report.json"), "w") as f:
        json.dump(reports, f)
ctx.close()
