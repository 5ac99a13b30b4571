#!/usr/bin/env python
"""This project against diffusers on the same device, the same UNet2DModel and the same batch.

    python bench/diffusers_speed.py --device cpu --threads 2 --json bench/out/diffusers_speed_cpu.json

The network is google/ddpm-cifar10-32's (cifar10_u.UNET_CONFIG) with seeded random weights, saved as a DDPMPipeline
folder (DDPM's linear schedule, eps, 1000 steps) and read back the way distillate.py and train.py read one
(checkpoints.load_checkpoint on the folder, the recorded UNet2DModel rebuilt with its weights).

  train   steps/s of train.py's loop (train_utils.train with train.py's loss for an eps model: the x error weighted by
          the SNR, the guard, clipping at 1, AdamW, EMA; the scripts' defaults, channels_last included) against a step
          written as diffusers' unconditional training example writes it (examples/unconditional_image_generation/
          train_unconditional.py: randn noise, randint timesteps, DDPMScheduler.add_noise, the UNet, MSE on eps,
          backward, clip_grad_norm_ 1.0, AdamW (its betas 0.95/0.999, weight decay 1e-6), the cosine lr scheduler,
          zero_grad, EMAModel.step with its warm-up). Each side is timed as bench.py times train: a run of
          --warmup + --iters steps less a run of --warmup steps, over --iters (set-up cancels out).
  sample  images/s of sample.py's DDIM (sample_utils.generate over the folder's trailing grid of S levels, per-image
          noise, to uint8) against DDIMPipeline (its DDIMScheduler from the folder's config, eta 0, output_type "np")
          at each of --steps; the median of --sample_reps alternating pairs after one warm-up of each.
A ratio is this project's rate over diffusers'; the goal is at least 1.0 for every row.
"""
import argparse
import datetime
import functools
import os
import statistics
import sys
import tempfile
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

import torch  # noqa: E402
import diffusers  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402
from diffusers.optimization import get_scheduler  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402

import cifar10_u  # noqa: E402
from bench import machine_info, write_json  # noqa: E402
from checkpoints import checkpoint_prediction, checkpoint_time_labels, load_checkpoint, load_weights  # noqa: E402
from diffusion import model_grid  # noqa: E402
from runtime import RunContext  # noqa: E402
from sample_shards import to_uint8  # noqa: E402
from sample_utils import SamplerSpec, generate, spec_grid  # noqa: E402
from train_flags import train_argument_parser  # noqa: E402
from train_utils import Stage, train, training_loss  # noqa: E402
from user_modules import network_of  # noqa: E402

RATIO_GOAL = 1.0  # this project's steps/s (images/s) over diffusers' at least this


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--batch_size", type=int, default=8, help="images per training step and per sampling call")
    p.add_argument("--iters", type=int, default=5, help="timed training steps per side")
    p.add_argument("--warmup", type=int, default=2, help="training steps of the shorter run")
    p.add_argument("--step_reps", type=int, default=3, help="alternating (ours, diffusers) rounds of training runs")
    p.add_argument("--steps", default="4,32", help="sampling steps to compare (each must divide 1000's trailing grid)")
    p.add_argument("--sample_reps", type=int, default=3, help="timed (ours, diffusers) sampling pairs per step count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="write the machine, config and all numbers here")
    return p.parse_args(argv)


def make_folder(directory, seed):
    """A DDPMPipeline folder of google/ddpm-cifar10-32's network (seeded random weights) and scheduler."""
    torch.manual_seed(seed)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    DDPMPipeline(unet=UNet2DModel(**cifar10_u.UNET_CONFIG), scheduler=scheduler).save_pretrained(directory)
    return directory


def read_network(folder):
    """(the folder's network as the project's scripts build it, its checkpoint dict)."""
    ckpt = load_checkpoint(folder)
    net = network_of(ckpt, folder)
    load_weights(net, ckpt["G"], folder)
    return net, ckpt


# -- training ---------------------------------------------------------------------------------

def ours_train_run(folder, ctx, args, images, steps):
    """Seconds of train.py's loop over `steps` optimizer steps of a fresh run on the folder's model."""
    net, ckpt = read_network(folder)
    flags = ["--module", "cifar10_u", "--name", "bench", "--dname", "bench", "--device", str(ctx.device),
             "--batch_size", str(args.batch_size), "--num_iters", str(steps), "--num_workers", "0", "--log_images", "0",
             "--log_every", "1000000", "--ckpt_interval", "1e9", "--seed", str(args.seed)]
    train_args = train_argument_parser("").parse_args(flags)
    prediction = checkpoint_prediction(ckpt)
    grid = model_grid(ckpt["schedule"]["betas"], 1, checkpoint_time_labels(ckpt))
    loss = functools.partial(training_loss, grid=grid, prediction=prediction, weighting="snr")  # train.py's for eps
    stage = Stage(net, loss, len(grid), torch.float32, {}, lambda images, labels, device: {}, grid,
                  tempfile.mkdtemp(prefix="bench-"), {})
    dataset = [(image, 0) for image in images]
    sync(ctx.device)
    start = time.perf_counter()
    train(train_args, ctx, stage, dataset)
    sync(ctx.device)
    return time.perf_counter() - start


def diffusers_train_run(folder, ctx, args, images, steps):
    """Seconds of `steps` steps written as diffusers' train_unconditional.py writes them (without accelerate, which
    on one process only forwards these calls)."""
    device = ctx.device
    torch.manual_seed(args.seed)
    model = UNet2DModel.from_pretrained(folder, subfolder="unet").to(device).train()
    noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=500, num_training_steps=10000)
    ema_model = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75,
                         model_cls=UNet2DModel, model_config=model.config)
    ema_model.to(device)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=args.batch_size,
                                         shuffle=True, drop_last=True)
    sync(device)
    start = time.perf_counter()
    done = 0
    while done < steps:
        for (clean_images,) in loader:
            clean_images = clean_images.to(device)
            noise = torch.randn(clean_images.shape, device=device)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean_images.shape[0],),
                                      device=device).long()
            noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
            model_output = model(noisy_images, timesteps).sample
            loss = F.mse_loss(model_output.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            ema_model.step(model.parameters())
            done += 1
            if done == steps:
                break
    sync(device)
    return time.perf_counter() - start


def bench_train(folder, ctx, args):
    """Steps/s of each side: the median over --step_reps alternating rounds of iters / (time of a run of warmup + iters
    steps - time of a run of warmup steps), after one untimed run of each (the process's first allocations)."""
    images = (torch.rand(args.batch_size, 3, 32, 32) * 2 - 1).contiguous()
    runs = {"ours": functools.partial(ours_train_run, folder, ctx, args, images),
            "diffusers": functools.partial(diffusers_train_run, folder, ctx, args, images)}
    for run in runs.values():
        run(1)
    rates = {name: [] for name in runs}
    for _ in range(args.step_reps):
        for name, run in runs.items():
            rates[name].append(args.iters / (run(args.warmup + args.iters) - run(args.warmup)))
    ours, theirs = (statistics.median(rates[name]) for name in runs)
    row = {"ours_steps_per_s": ours, "diffusers_steps_per_s": theirs, "ratio": ours / theirs, "rates": rates}
    print(f"  train, batch {args.batch_size}: ours {ours:.3f} steps/s, diffusers' example {theirs:.3f} steps/s: "
          f"ratio {row['ratio']:.3f}")
    return row


# -- sampling ---------------------------------------------------------------------------------

def bench_sample(folder, ctx, args):
    net, ckpt = read_network(folder)
    net = net.to(ctx.device, memory_format=torch.channels_last).eval().requires_grad_(False)  # sample.py's default
    pipeline = DDIMPipeline(unet=UNet2DModel.from_pretrained(folder, subfolder="unet").to(ctx.device).eval(),
                            scheduler=DDIMScheduler.from_pretrained(folder, subfolder="scheduler"))
    pipeline.set_progress_bar_config(disable=True)
    shape, batch, rows = list(net.image_size[1:]), args.batch_size, {}
    for steps in [int(s) for s in args.steps.split(",")]:
        spec = SamplerSpec("ddim", {"eta": 0.0, "clip_value": None}, steps=steps)
        grid = spec_grid(spec, ckpt)

        def ours():
            with torch.inference_mode():
                to_uint8(generate(net, grid, spec, range(batch), shape, args.seed, device=ctx.device, chunk_size=batch,
                                  channels_last=True, prediction=checkpoint_prediction(ckpt)).clamp(-1, 1))

        def theirs():
            with torch.inference_mode():
                pipeline(batch_size=batch, num_inference_steps=steps, eta=0.0, output_type="np",
                         generator=torch.Generator(ctx.device).manual_seed(args.seed))

        times = {"ours": [], "diffusers": []}
        for fn in (ours, theirs):
            fn()  # warm-up
        for _ in range(args.sample_reps):
            for name, fn in (("ours", ours), ("diffusers", theirs)):
                sync(ctx.device)
                start = time.perf_counter()
                fn()
                sync(ctx.device)
                times[name].append(time.perf_counter() - start)
        ours_rate, theirs_rate = (batch / statistics.median(times[k]) for k in ("ours", "diffusers"))
        rows[str(steps)] = {"ours_images_per_s": ours_rate, "diffusers_images_per_s": theirs_rate,
                            "ratio": ours_rate / theirs_rate, "seconds": times}
        print(f"  DDIM {steps:3d} steps, batch {batch}: ours {ours_rate:.3f} images/s, DDIMPipeline {theirs_rate:.3f} "
              f"images/s: ratio {ours_rate / theirs_rate:.3f}")
    return rows


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    args = parse_args(argv)
    diffusers.utils.logging.set_verbosity_error()  # not its advice to install accelerate, for each loaded model
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    ctx = RunContext(types.SimpleNamespace(device=args.device, amp="no"))
    machine = machine_info(types.SimpleNamespace(device=ctx.device, cuda=ctx.device.type == "cuda"))
    print(f"diffusers_speed: google/ddpm-cifar10-32's UNet2DModel, batch {args.batch_size}, on "
          f"{machine['gpu'] or machine['cpu']} ({machine['torch_threads']} threads), torch {machine['torch']}")
    with tempfile.TemporaryDirectory() as directory:
        folder = make_folder(os.path.join(directory, "ddpm-cifar10-32"), args.seed)
        print("[train]")
        train_row = bench_train(folder, ctx, args)
        print("[sample]")
        sample_rows = bench_sample(folder, ctx, args)
    goals = [{"goal": "train.py's step / diffusers' example step, steps/s >= 1.0", "value": train_row["ratio"],
              "passed": train_row["ratio"] >= RATIO_GOAL}]
    goals += [{"goal": f"sample.py's DDIM / DDIMPipeline at {s} steps, images/s >= 1.0", "value": row["ratio"],
               "passed": row["ratio"] >= RATIO_GOAL} for s, row in sample_rows.items()]
    print("[goals]")
    for g in goals:
        print(f"  {'PASS' if g['passed'] else 'FAIL'}  {g['goal']}: {g['value']:.3f}")
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "machine": machine,
              "diffusers": diffusers.__version__, "config": vars(args),
              "command": [os.path.relpath(__file__, ROOT)] + sys.argv[1:],
              "results": {"train": train_row, "sample": sample_rows}, "goals": goals}
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()
