#!/usr/bin/env python
"""Write a slim copy of a checkpoint (G and metadata, no training state), or one for the original's sample.py.

    python export_checkpoint.py checkpoints/digits_run/base_6/checkpoint.pt checkpoints/digits/base_6 --half True
    python export_checkpoint.py checkpoints/celeba/base_6/checkpoint.pt checkpoints/celeba_for_original/base_6 \
        --for_original True --module celeba_u

each writes TARGET_DIR/checkpoint.pt. --half True stores floating-point weights in float16 (they are loaded
back into float32 models).

--for_original True writes a file that the original implementation's sample.py samples exactly as this
project samples the source: only the keys G, n_timesteps and time_scale, a network that takes the original's
time labels i*s and produces BGR images (its sample.py writes them with OpenCV), by exact edits of the UNet's
weights (original.for_original says which).

--for_diffusers True writes a diffusers folder (model_index.json, unet/, scheduler/, timesteps.json): a
DDIMPipeline when the checkpoint's labels are diffusers' trailing steps, else a DDPMPipeline with a first-order
DPM-Solver scheduler run over timesteps.json's labels (diffusers_folder.export_pipeline). --module names the
user module for this project's UNet; a checkpoint that records a UNet2DModel needs none.
"""
import os

from checkpoints import CHECKPOINT_NAME, load_checkpoint, save_checkpoint, slim
from cli import ArgumentParser, UserError, main_guard, str2bool
from original import for_original
from user_modules import load_user_module, make_user_model


def half(state_dict):
    """Floating-point weights in float16; the sinusoidal frequencies (inv_freq buffers) stay float32: rounded,
    they would move the time embedding's phase by up to 5e-4 relative (0.2 rad at label 1000)."""
    return {k: v.half() if v.is_floating_point() and not k.endswith("inv_freq") else v for k, v in state_dict.items()}


@main_guard
def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="checkpoint to read")
    parser.add_argument("target_dir", help="folder to write checkpoint.pt into (created if missing)")
    parser.add_argument("--half", type=str2bool, default=False, help="store weights in float16")
    parser.add_argument("--for_original", type=str2bool, default=False,
                        help="a file for the original implementation's sample.py: three keys, BGR, labels i*s")
    parser.add_argument("--for_diffusers", type=str2bool, default=False,
                        help="a diffusers folder (model_index.json, unet/, scheduler/) that DDIMPipeline.from_pretrained "
                             "loads and samples over the checkpoint's own steps")
    parser.add_argument("--overwrite", type=str2bool, default=False, help="with --for_diffusers: write into a non-empty folder")
    parser.add_argument("--module", default="", help="with --for_original or --for_diffusers: the user module whose "
                                                     "make_model() builds the source's UNet (not needed for a "
                                                     "UNet2DModel, which the checkpoint records)")
    args = parser.parse_args(argv)
    if args.for_original and args.for_diffusers:
        raise UserError("choose one of --for_original True and --for_diffusers True")
    wanted = "--for_original True" if args.for_original else "--for_diffusers True" if args.for_diffusers else ""
    if args.for_original and not args.module:
        raise UserError(f"{wanted} needs --module NAME, the user module whose make_model() builds the UNet")
    if args.module and not wanted:
        raise UserError("--module is used only with --for_original True or --for_diffusers True")
    if args.for_diffusers:
        return export_diffusers(args)
    target = os.path.join(args.target_dir, CHECKPOINT_NAME)
    if os.path.exists(args.target_dir) and not os.path.isdir(args.target_dir):
        raise UserError(f"cannot write into {args.target_dir}: it is a file, not a folder")
    ckpt = load_checkpoint(args.source)
    if os.path.exists(target) and os.path.samefile(target, args.source):
        raise UserError(f"{target} is the source itself; give another target folder")
    if args.for_original:
        out = for_original(ckpt, make_user_model(load_user_module(args.module)), args.source)
    else:
        out = slim(ckpt)
    if args.half:
        out["G"] = half(out["G"])
    path = save_checkpoint(out, args.target_dir)
    print(f"Wrote {path}")


def export_diffusers(args):
    """export_checkpoint.py --for_diffusers True: the checkpoint as a diffusers pipeline folder (diffusers_folder.py)."""
    from diffusers_folder import export_pipeline
    from diffusers_unet import NotExpressible
    from user_modules import model_for_checkpoint
    if os.path.exists(args.target_dir) and not os.path.isdir(args.target_dir):
        raise UserError(f"cannot write into {args.target_dir}: it is a file, not a folder")
    if os.path.isdir(args.target_dir) and os.listdir(args.target_dir) and not args.overwrite:
        raise UserError(f"{args.target_dir} is not empty; choose an empty folder or give --overwrite True")
    ckpt = load_checkpoint(args.source)
    if "network" not in ckpt and not args.module:
        raise UserError("--for_diffusers True needs --module NAME, the user module whose make_model() builds the UNet")
    net = model_for_checkpoint(load_user_module(args.module) if args.module else None, ckpt, args.source).eval()
    try:
        kind, labels = export_pipeline(net, ckpt, args.target_dir, args.source)
    except NotExpressible as e:
        raise UserError(f"cannot export {args.source} to diffusers: {e}") from None
    if kind == "DDIMScheduler":
        print(f"Wrote {args.target_dir}: DDIMPipeline.from_pretrained({args.target_dir!r})"
              f"(num_inference_steps={len(labels)}) samples it")
    else:
        print(f"Wrote {args.target_dir}: its {len(labels)} steps do not divide the {labels[0] + 1} base steps, so its "
              f"scheduler is {kind} (order 1: DDIM), to be given the time labels of timesteps.json through "
              "scheduler.set_timesteps(timesteps=...)")


if __name__ == "__main__":
    main()
