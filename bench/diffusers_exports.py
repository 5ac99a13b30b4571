#!/usr/bin/env python
"""Every shipped digits checkpoint exported as a diffusers folder, and how close diffusers' DDIM over the folder comes
to sample.py's DDIM over the file.

    python bench/diffusers_exports.py --out_dir hub --report bench/diffusers_exports.md

For each checkpoint of checkpoints/digits, checkpoints/digits_cond and checkpoints/digits_eps: export_checkpoint.py
--for_diffusers True into OUT_DIR/<chain>/<stage> (or the one line with which it refuses: the guidance-weight
students), then from the same starting noise (sample_utils.image_noise, --seed) the folder's scheduler stepped over
timesteps.json's labels (the class labels i % 10 given to the conditional teacher) against sample_utils.generate's
deterministic DDIM over the checkpoint (what sample.py --sampler ddim computes), both clamped to [-1, 1]: the largest
absolute difference, and how many uint8 values (sample_shards.to_uint8) differ.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from diffusers import DDIMScheduler, DiffusionPipeline  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402

from checkpoints import checkpoint_prediction  # noqa: E402
from sample_shards import to_uint8  # noqa: E402
from sample_utils import SamplerSpec, generate, image_noise, spec_grid  # noqa: E402
from user_modules import load_model_from_checkpoint, load_user_module  # noqa: E402

CHAINS = {"digits": "digits_u", "digits_cond": "digits_cond_u", "digits_eps": "digits_u"}  # folder -> user module


def diffusers_ddim(folder, x, labels=None):
    """The exported folder's scheduler stepped from x over the labels of timesteps.json (the class labels given to a
    conditional UNet): (the images clamped to [-1, 1] as sample.py stores them, the scheduler)."""
    pipeline = DiffusionPipeline.from_pretrained(folder)
    with open(os.path.join(folder, "timesteps.json")) as f:
        timesteps = json.load(f)["timesteps"]
    if isinstance(pipeline.scheduler, DDIMScheduler):
        pipeline.scheduler.set_timesteps(len(timesteps))
    else:
        pipeline.scheduler.set_timesteps(timesteps=timesteps)
    with torch.no_grad():
        for t in pipeline.scheduler.timesteps:
            x = pipeline.scheduler.step(pipeline.unet(x, t, class_labels=labels).sample, t, x).prev_sample
    return x.clamp(-1, 1), pipeline.scheduler


def project_ddim(model, ckpt, indices, seed, labels):
    spec = SamplerSpec("ddim", {"eta": 0.0, "clip_value": None})
    extra = {} if labels is None else {"y": labels}
    with torch.no_grad():
        return generate(model, spec_grid(spec, ckpt), spec, indices, model.image_size[1:], seed, extra_args=extra,
                        prediction=checkpoint_prediction(ckpt)).clamp(-1, 1)


def compare(module, checkpoint, folder, n_images, seed):
    model, ckpt = load_model_from_checkpoint(module, checkpoint, "cpu")
    indices = range(n_images)
    labels = torch.arange(n_images) % ckpt["num_classes"] if "num_classes" in ckpt else None
    theirs, _ = diffusers_ddim(folder, image_noise(indices, model.image_size[1:], seed), labels)
    ours = project_ddim(model, ckpt, indices, seed, labels)
    return {"steps": int(ckpt["n_timesteps"]), "max_abs": float((theirs - ours).abs().max()),
            "uint8_differ": int((to_uint8(theirs) != to_uint8(ours)).sum()), "values": theirs.numel()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", default="hub", help="the folders go to OUT_DIR/<chain>/<stage>")
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", default="", help="also write the table here (markdown)")
    args = parser.parse_args()
    diffusers_logging.set_verbosity_error()
    rows = []
    for chain, module_name in CHAINS.items():
        module = load_user_module(module_name)
        stages = sorted(os.listdir(os.path.join(ROOT, "checkpoints", chain)))
        for stage in stages:
            checkpoint = os.path.join("checkpoints", chain, stage, "checkpoint.pt")  # relative to ROOT
            if not os.path.isfile(os.path.join(ROOT, checkpoint)):
                continue
            folder = os.path.abspath(os.path.join(args.out_dir, chain, stage))
            result = subprocess.run([sys.executable, "export_checkpoint.py", checkpoint, folder, "--for_diffusers", "True",
                                     "--module", module_name, "--overwrite", "True"], capture_output=True, text=True, cwd=ROOT)
            if result.returncode:
                row = {"stage": f"{chain}/{stage}", "refused": result.stderr.strip()}
            else:
                with open(os.path.join(folder, "timesteps.json")) as f:
                    kind = json.load(f)["scheduler"]
                row = {"stage": f"{chain}/{stage}", "scheduler": kind,
                       **compare(module, os.path.join(ROOT, checkpoint), folder, args.num_images, args.seed)}
            rows.append(row)
            print(json.dumps(row))
    lines = [f"Every shipped digits checkpoint through `export_checkpoint.py --for_diffusers True` "
             f"(`bench/diffusers_exports.py --num_images {args.num_images} --seed {args.seed}`): diffusers' scheduler "
             "over the folder against sample.py's DDIM over the file, from the same starting noise, images clamped to "
             "[-1, 1].", "",
             "| checkpoint | steps | diffusers scheduler | max abs difference | uint8 values that differ |",
             "|---|---:|---|---:|---:|"]
    for row in rows:
        if "refused" in row:
            lines.append(f"| {row['stage']} | | refused: {row['refused'].replace('|', '/')} | | |")
        else:
            lines.append(f"| {row['stage']} | {row['steps']} | {row['scheduler']} | {row['max_abs']:.1e} | "
                         f"{row['uint8_differ']} of {row['values']} |")
    text = "\n".join(lines) + "\n"
    if args.report:
        with open(args.report, "w") as f:
            f.write(text)
        print(f"wrote {args.report}")


if __name__ == "__main__":
    main()
