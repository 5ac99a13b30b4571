"""Drawing images from a model as the scripts do (sample.py, evaluate.py, demo.py, the training previews).

One vocabulary for every script: `add_sampler_arguments` adds the flags, `sampler_from_args` turns them into
a `SamplerSpec` (a sampler of samplers.SAMPLERS, its options, the steps it visits), `spec_grid` makes the grid
of a checkpoint that the spec visits, and `generate` draws the images `indices`. Image i depends only on
(seed, i): its starting noise is image_noise(i, seed) and each step's noise samplers.per_image_noise(i, seed),
so a picture does not change with the batch, the chunk size or the number of processes.
"""
from typing import NamedTuple

import torch
import torchvision

import samplers
import seeding
from checkpoints import checkpoint_grid
from cli import UserError, index_list, nonnegative_float, nonnegative_int, positive_int, str2bool, unit_interval
from diffusion import grid_indices
from guidance import calls_per_step
from original import ORIGINAL_CLIPPING_VALUE


class SamplerSpec(NamedTuple):
    """How to sample. name: a key of samplers.SAMPLERS; options: its keyword options (ddim: eta, clip_value);
    steps: network calls per image without guidance (0: every step of the model); schedule: "time", "logsnr"
    or a tuple of step indices (samplers.select_steps); coarsen: sample the model as one of N/coarsen steps
    (the original's --time_scale; checkpoints.checkpoint_grid)."""
    name: str
    options: dict
    steps: int = 0
    schedule: object = "time"
    coarsen: int = 1


def add_sampler_arguments(parser, default_sampler):
    """The sampling flags that sample.py, evaluate.py and demo.py share (same names, same defaults)."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--sampler", default=default_sampler, choices=list(samplers.SAMPLERS) + list(samplers.ALIASES),
                       help="ancestral (the original's ddpm): the posterior with x clipped to [-1, 1]; ddim: "
                            "DDIM with --eta and --clipping_value; dpmpp_2m: DPM-Solver++(2M); stochastic: "
                            "the N-step stochastic sampler of Meng et al. 2023")
    group.add_argument("--steps", type=nonnegative_int, default=0,
                       help="steps to visit, i.e. network calls per image without guidance (0: every step of the model)")
    group.add_argument("--step_schedule", default="time", choices=samplers.STEP_SCHEDULES,
                       help="which indices --steps visits: time-uniform (every k-th, ending at k-1), uniform in "
                            "log-SNR (the noisiest index, then the rest spaced from the next one), or cosine (the "
                            "levels of the cosine schedule's --steps steps, by log-SNR)")
    group.add_argument("--step_indices", type=index_list, default=None,
                       help="visit exactly these step indices, e.g. 127,63,31,0 (instead of --steps and --step_schedule)")
    group.add_argument("--time_scale", type=positive_int, default=1,
                       help="sample the model as one of N/k steps on its own schedule (the original's flag); "
                            "--steps and --step_indices then refer to those N/k steps")
    group.add_argument("--eta", type=unit_interval, default=0.0,
                       help="ddim only (refused with the others): noise in [0, 1], 0 deterministic, 1 the ancestral posterior's")
    group.add_argument("--clipping_value", type=nonnegative_float, default=None,
                       help="ddim only (refused with the others): clip the x and eps predictions at +-value, "
                            f"0 = no clipping; unset: {ORIGINAL_CLIPPING_VALUE} with --clipped_sampling True, else none")
    group.add_argument("--clipped_sampling", type=str2bool, default=False,
                       help=f"the original's clipped sampler: --sampler ddim with --clipping_value {ORIGINAL_CLIPPING_VALUE}")
    group.add_argument("--chunk_size", type=positive_int, default=256, help="images per network call")
    group.add_argument("--num_images", type=positive_int, default=64, help="number of images")


def sampler_from_args(args):
    """The SamplerSpec of parsed add_sampler_arguments flags; a flag the chosen sampler ignores is refused."""
    name = samplers.sampler_name(args.sampler)
    if args.clipped_sampling:
        if name not in ("ancestral", "ddim"):
            raise UserError(f"--clipped_sampling True is the original's clipped DDIM; it cannot be combined "
                            f"with --sampler {args.sampler}")
        name = "ddim"
    options = {}
    if name == "ddim":
        clip = args.clipping_value
        if clip is None:
            clip = ORIGINAL_CLIPPING_VALUE if args.clipped_sampling else 0.0
        options = {"eta": args.eta, "clip_value": clip or None}
    elif args.eta != 0.0 or args.clipping_value is not None:
        flag = "--eta" if args.eta != 0.0 else "--clipping_value"
        raise UserError(f"--sampler {args.sampler} ignores {flag}; it applies to --sampler ddim only")
    schedule = args.step_schedule
    if args.step_indices is not None:
        if args.step_schedule != "time":
            raise UserError("--step_schedule chooses the indices of --steps; --step_indices gives them itself")
        if args.steps not in (0, len(args.step_indices)):
            raise UserError(f"--steps {args.steps} but {len(args.step_indices)} --step_indices; give one of them")
        schedule = tuple(args.step_indices)
    return SamplerSpec(name, options, args.steps, schedule, args.time_scale)


def spec_grid(spec, ckpt):
    """The grid that `spec` visits on the checkpoint's model (UserError for steps it does not have)."""
    full = checkpoint_grid(ckpt, spec.coarsen)
    try:
        return full.take(grid_indices(len(full), samplers.select_steps(full, spec.steps, spec.schedule)))
    except ValueError as e:
        raise UserError(f"cannot choose the sampling steps: {e}") from None


def nfe(grid, model, w=None):
    """Network calls per image of sampling `model` over `grid` at guidance weight w: one per point, two under
    classifier-free guidance (guidance.calls_per_step)."""
    return len(grid) * calls_per_step(model, w)


def describe(spec, grid, ckpt, model, w=None):
    """A short label, e.g. 'ddim (eta 0.5, clip 1.2), 8 of 128 steps'."""
    options = ", ".join(f"{'clip' if key == 'clip_value' else key} {value:g}" for key, value in spec.options.items()
                        if value is not None)
    calls = nfe(grid, model, w)
    guided = f" ({calls} network calls: classifier-free guidance)" if calls != len(grid) else ""
    total = int(ckpt["n_timesteps"]) // spec.coarsen
    return f"{spec.name}{f' ({options})' if options else ''}, {len(grid)} of {total} steps{guided}"


def image_noise(indices, shape, seed, device="cpu"):
    """The starting noise of images `indices` on `device`: image i always gets the same noise, whatever the batch
    or device."""
    return seeding.image_randn(indices, shape, seed, "start", device=device)


def sample_batch(model, grid, spec, x, extra_args=None, noise=None, callback=None, progress=False, prediction="v"):
    """spec's sampler from the starting noise x over `grid`, the network (predicting eps, x or v) in eval mode
    meanwhile."""
    was_training = model.training
    model.eval()
    try:
        return samplers.SAMPLERS[spec.name].function(model, x, grid, extra_args, callback, progress, noise,
                                                     prediction, **spec.options)
    finally:
        model.train(was_training)


def generate(model, grid, spec, indices, shape, seed, extra_args=None, device="cpu", chunk_size=256,
             channels_last=False, progress=False, callback=None, prediction="v"):
    """The images `indices` as a float32 CPU tensor [len(indices), C, H, W], unclamped.

    Image i starts from image_noise(i, seed) and draws its step noise from per_image_noise(i, seed): it
    depends only on (seed, i). extra_args: the network's keyword arguments; a tensor whose first dimension is
    len(indices) holds one row per image and is cut into the same chunks. callback: the samplers' callback,
    called for each chunk. prediction: what the network outputs (eps, x or v; checkpoints.checkpoint_prediction).
    """
    indices = list(indices)
    out = []
    for start in range(0, len(indices), chunk_size):
        chunk = indices[start:start + chunk_size]
        x = image_noise(chunk, shape, seed, device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        chunk_args = {key: value[start:start + len(chunk)] if _per_image(value, len(indices)) else value
                      for key, value in (extra_args or {}).items()}
        images = sample_batch(model, grid, spec, x, chunk_args, samplers.per_image_noise(chunk, seed), callback,
                              progress, prediction)
        out.append(images.float().cpu())
    return torch.cat(out) if out else torch.zeros([0] + list(shape))


def _per_image(value, count):
    return torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == count


def preview_extra_args(make_extra_args, conditioning, count, device):
    """The extra_args of `count` preview images: class i mod K for a conditional model, and for a w-input
    model the largest guidance weight it learns."""
    if "num_classes" not in conditioning:
        return make_extra_args(None, None, device)
    labels = torch.arange(count) % conditioning["num_classes"]
    extra_args = dict(make_extra_args(None, labels, device))
    if "guidance_range" in conditioning:
        extra_args["w"] = float(conditioning["guidance_range"][1])
    return extra_args


def trajectory_grid(model, grid, noise, captures=5, bgr=False, spec=None, step_noise=None, extra_args=None,
                    progress=False, prediction="v"):
    """Sample from `noise` over `grid`; return a CHW picture in [0, 1] with one row per captured step, the last
    row the final images (the original's visualisation). spec: the sampler (default: the original's
    ancestral); step_noise: the samplers' noise(i, like) (default: torch.randn_like). bgr=True flips channels
    for display."""
    spec = spec or SamplerSpec("ancestral", {})
    n = len(grid)
    capture_at = {round(k * (n - 1) / (captures - 1)) for k in range(captures - 1)} if captures > 1 else set()
    rows = []

    def callback(state):
        if state["i"] in capture_at and state["i"] != n - 1:
            rows.append(state["x"].float().cpu())

    final = sample_batch(model, grid, spec, noise, extra_args, step_noise, callback, progress, prediction)
    images = torch.cat(rows + [final.float().cpu()], dim=0)
    if bgr and images.shape[1] == 3:
        images = images.flip(1)
    return torchvision.utils.make_grid((images.clamp(-1, 1) + 1) / 2, nrow=noise.shape[0], padding=1)
