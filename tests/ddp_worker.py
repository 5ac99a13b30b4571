"""Run under torchrun by test_distributed.py: a few DDP training steps, then report every rank's
weights, EMA and data so the test can compare them."""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

import toy_u
from diffusion import GaussianDiffusion, make_beta_schedule
from runtime import RunContext
from train_utils import Trainer

args = argparse.Namespace(device="cpu", amp="no", seed=0, batch_size=8, num_workers=0, lr=1e-3, scheduler="constant",
                          warmup=0, weight_decay=0.0, grad_clip=1.0, ema_decay=0.9, log_interval=1e9, log_every=1000,
                          log_images=2, ckpt_interval=1e9, save_every=0, keep_last=0, max_bad_steps=5, num_iters=6,
                          stop_at=0, channels_last=False, compile=False, grad_checkpoint=False)
ctx = RunContext(args)
model = toy_u.make_model()
trainer = Trainer(args, ctx, model, sys.argv[1], {"n_timesteps": 8, "time_scale": 1})
diffusion = GaussianDiffusion(trainer.net, make_beta_schedule("cosine", 8))
seen = []


def loss_fn(images, labels):
    seen.append(images.flatten(1)[:, 0].tolist())
    t = torch.randint(0, 8, (images.shape[0],))
    return diffusion.p_loss(images, t, {}, reduction="none"), t / 8


trainer.fit(toy_u.make_dataset(), loss_fn, GaussianDiffusion(trainer.sampling_model, make_beta_schedule("cosine", 8)))
report = {"rank": ctx.rank, "seen": seen,
          "model": [p.sum().item() for p in model.parameters()],
          "ema": [p.sum().item() for p in trainer.ema.model.parameters()]}
reports = [None] * ctx.world_size
dist.all_gather_object(reports, report)
if ctx.is_main:
    with open(os.path.join(sys.argv[1], "report.json"), "w") as f:
        json.dump(reports, f)
ctx.close()
