"""diffusers folders in and out: a pipeline folder read as a checkpoint (read_folder: the teacher of distillate.py,
the starting point of train.py, a model for sample.py and evaluate.py), and a checkpoint written as a folder that
diffusers samples over the checkpoint's own grid (export_pipeline: export_checkpoint.py --for_diffusers True).

A folder is what DiffusionPipeline.save_pretrained writes for a pixel-space model (SPEC "diffusers"):
model_index.json, unet/config.json with unet/diffusion_pytorch_model.safetensors (or .bin), and
scheduler/scheduler_config.json (or the UNet's and the scheduler's files side by side at the top). Its network is diffusers' own UNet2DModel (diffusers_unet.DiffusersUNet), loaded by
diffusers' from_pretrained; its base schedule, prediction and step count are the scheduler's: beta_schedule linear,
scaled_linear, squaredcos_cap_v2 (this project's cosine) or trained_betas, with rescale_betas_zero_snr where set;
prediction_type epsilon, sample or v_prediction; num_train_timesteps N. The model is a base model whose levels
are the schedule's N indices, the indices being the time labels (diffusers' timesteps). A folder this project
exported carries timesteps.json, the time labels of its model's grid, so a student comes back as that student.
"""
import json
import os

import torch

from cli import UserError
from diffusion import check_betas, make_beta_schedule, rescale_zero_terminal_snr

MODEL_INDEX, CONFIG, SCHEDULER_CONFIG, TIMESTEPS = "model_index.json", "config.json", "scheduler_config.json", "timesteps.json"
WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# discrete-time variance-preserving schedulers: each reads beta_schedule / trained_betas and prediction_type alike
SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
              "DPMSolverSinglestepScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler",
              "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
              "LMSDiscreteScheduler", "GaussianDDPMScheduler")
# Names of diffusers' first releases that the google/ddpm-* hub repositories still keep in their top-level
# model_index.json and scheduler_config.json: GaussianDDPMScheduler (DDPMScheduler; its "timesteps" is
# num_train_timesteps) and UNetUnconditionalModel (UNet2DModel).
UNET_CLASSES = ("UNet2DModel", "UNetUnconditionalModel")
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
PREDICTION_OF = {"epsilon": "eps", "sample": "x", "v_prediction": "v"}
DIFFUSERS_PREDICTION = {ours: theirs for theirs, ours in PREDICTION_OF.items()}
SUPPORTED = "a pixel-space UNet2DModel pipeline (DDPMPipeline, DDIMPipeline) with a DDPM-family scheduler"


def is_diffusers_folder(path):
    """Whether path is a folder with a diffusers layout (a pipeline, or a lone model or scheduler folder)."""
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, name)) for name in
                                       (MODEL_INDEX, "unet", "scheduler", CONFIG, SCHEDULER_CONFIG))


def _read_json(path, folder):
    name = os.path.relpath(path, folder)
    if not os.path.isfile(path):
        raise UserError(f"{folder} is not a complete diffusers folder: it has no {name}")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{os.path.join(folder, name)} cannot be read as JSON ({' '.join(str(e).split())[:120]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{os.path.join(folder, name)} holds a {type(data).__name__}, not a configuration")
    return data


def _check_pipeline(index, folder):
    """A pixel-space pipeline: no autoencoder, no text encoder, a UNet2DModel as its unet."""
    components = {key: value for key, value in index.items() if not key.startswith("_")}
    pipeline = index.get("_class_name", "a pipeline")
    latent = [key for key in ("vae", "vqvae") if components.get(key)]
    if latent:
        raise UserError(f"{folder} is a latent diffusion pipeline ({pipeline}, with a {latent[0]}); this project "
                        f"distils {SUPPORTED}")
    text = [key for key in ("text_encoder", "tokenizer", "bert") if components.get(key)]
    if text:
        raise UserError(f"{folder} is a text-conditioned pipeline ({pipeline}, with a {text[0]}); this project "
                        f"distils {SUPPORTED}")
    unet = components.get("unet")
    if not unet or unet[-1] not in UNET_CLASSES:
        raise UserError(f"{folder}'s pipeline {pipeline} has {'a ' + unet[-1] if unet else 'no unet'} as its unet; "
                        f"this project distils {SUPPORTED}")


def _check_unet(config, folder):
    kind = config.get("_class_name")
    if kind == "UNet2DConditionModel":
        raise UserError(f"{folder}'s unet is a UNet2DConditionModel (cross-attention on text or latents); this project "
                        f"distils {SUPPORTED}")
    if kind != "UNet2DModel":
        raise UserError(f"{folder}'s unet is a {kind or 'model without a _class_name'}; this project distils {SUPPORTED}")
    if config.get("time_embedding_type", "positional") != "positional":
        raise UserError(f"{folder}'s UNet2DModel has a {config['time_embedding_type']} time embedding (a continuous-time "
                        "or learned-timestep model); this project distils the positional (sinusoidal) embedding of "
                        "discrete-time models")
    if config.get("class_embed_type") is not None:
        raise UserError(f"{folder}'s UNet2DModel takes a class_embed_type {config['class_embed_type']!r} input (an "
                        "embedding computed outside the UNet); this project distils unconditional UNet2DModels and "
                        "class-conditional ones through num_class_embeds")
    channels_in, channels_out = config.get("in_channels", 3), config.get("out_channels", 3)
    if channels_in != channels_out:
        raise UserError(f"{folder}'s UNet2DModel has {channels_in} input and {channels_out} output channels (a model "
                        "that also predicts its variance, or of another task); this project distils models whose "
                        "output is an image-shaped prediction")
    if not config.get("sample_size"):
        raise UserError(f"{folder}'s unet/config.json has no sample_size; the image size cannot be known")


def _schedule(config, folder):
    """(name, float64 betas) of a scheduler configuration."""
    n = config.get("num_train_timesteps", config.get("timesteps", 1000))
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise UserError(f"{folder}'s scheduler has num_train_timesteps {n!r}; it must be an integer of at least 2")
    if config.get("trained_betas") is not None:
        try:
            name, betas = "table", check_betas(config["trained_betas"])
        except (ValueError, TypeError) as e:
            raise UserError(f"{folder}'s scheduler trained_betas: {' '.join(str(e).split())[:160]}") from None
        if len(betas) != n:
            raise UserError(f"{folder}'s scheduler has {len(betas)} trained_betas for num_train_timesteps {n}")
    else:
        schedule = config.get("beta_schedule", "linear")
        if schedule not in BETA_SCHEDULES:
            raise UserError(f"{folder}'s scheduler has beta_schedule {schedule!r}; this project reads "
                            f"{', '.join(BETA_SCHEDULES)} and trained_betas")
        name = BETA_SCHEDULES[schedule]
        try:
            betas = make_beta_schedule(name, n, config.get("beta_start", 0.0001), config.get("beta_end", 0.02))
        except ValueError as e:
            raise UserError(f"{folder}'s scheduler: {e}") from None
    if config.get("rescale_betas_zero_snr"):
        name, betas = f"{name}+zero_terminal_snr", rescale_zero_terminal_snr(betas)
    return name, betas


def _check_scheduler(config, folder):
    kind = config.get("_class_name")
    if kind not in SCHEDULERS:
        raise UserError(f"{folder}'s scheduler is a {kind or 'scheduler without a _class_name'}, not of the DDPM family "
                        f"(discrete time, variance preserving); this project reads {', '.join(SCHEDULERS)}")
    if config.get("variance_type") in ("learned", "learned_range"):
        raise UserError(f"{folder}'s scheduler has variance_type {config['variance_type']!r} (a learned variance); "
                        "this project distils models that predict the mean only")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_OF:
        raise UserError(f"{folder}'s scheduler has prediction_type {prediction!r}; this project reads "
                        f"{', '.join(PREDICTION_OF)}")
    return PREDICTION_OF[prediction]


def _load_unet(unet_dir, folder):
    """diffusers' UNet2DModel.from_pretrained of the folder's unet/ (its safetensors file, or a .bin read with
    weights_only=True by diffusers), local files only."""
    from diffusers import UNet2DModel
    if not any(name.startswith("diffusion_pytorch_model") for name in os.listdir(unet_dir)):
        raise UserError(f"{folder} is not a complete diffusers folder: it has no weights ({' or '.join(WEIGHTS)} in "
                        f"{unet_dir})")
    try:
        return UNet2DModel.from_pretrained(unet_dir, local_files_only=True, low_cpu_mem_usage=False).eval()
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        detail = " ".join(str(e).split())
        raise UserError(f"the weights in {unet_dir} cannot be loaded ({detail[:160]})") from None


def _layout(folder):
    """(the folder of the UNet's config.json and weights, that of scheduler_config.json): unet/ and scheduler/ as
    save_pretrained writes them, or both at the top (as some hub repositories keep them)."""
    def has(*parts):
        return os.path.exists(os.path.join(folder, *parts))
    if has("unet") or has("scheduler"):
        missing = [name for name in ("unet", "scheduler") if not has(name)]
        if missing:
            raise UserError(f"{folder} is not a complete diffusers folder: it has no {missing[0]}/ (a pipeline of "
                            f"unet/ and scheduler/ is needed)")
        return os.path.join(folder, "unet"), os.path.join(folder, "scheduler")
    if has(CONFIG) and has(SCHEDULER_CONFIG):
        return folder, folder
    if has(CONFIG) or has(SCHEDULER_CONFIG):
        alone = "a model folder" if has(CONFIG) else "a scheduler folder"
        raise UserError(f"{folder} is {alone} on its own; give the pipeline folder that holds unet/ and scheduler/ "
                        "(what save_pretrained writes)")
    raise UserError(f"{folder} is not a complete diffusers folder: it has no unet/ and scheduler/")


def read_folder(folder):
    """The checkpoint dict (checkpoints.py's records) of a diffusers pipeline folder: G the UNet2DModel's weights
    (prefix "unet."), its "network" record, the scheduler's schedule and prediction, N base steps at time scale 1
    on the schedule's levels with the indices as labels — or, for a folder of this project's export, its model's
    grid (timesteps.json). UserError, one line, for what this project cannot distil; the folder is only read."""
    from checkpoints import SCHEDULE_GRID, schedule_record
    from diffusers_unet import DiffusersUNet
    if os.path.isfile(os.path.join(folder, MODEL_INDEX)):
        _check_pipeline(_read_json(os.path.join(folder, MODEL_INDEX), folder), folder)
    unet_dir, scheduler_dir = _layout(folder)
    _check_unet(_read_json(os.path.join(unet_dir, CONFIG), folder), folder)
    scheduler = _read_json(os.path.join(scheduler_dir, SCHEDULER_CONFIG), folder)
    prediction = _check_scheduler(scheduler, folder)
    name, betas = _schedule(scheduler, folder)
    n = len(betas)
    network = DiffusersUNet(_load_unet(unet_dir, folder))
    grid = list(range(n - 1, -1, -1))
    exported = os.path.join(folder, TIMESTEPS)
    if os.path.isfile(exported):
        grid = _read_json(exported, folder).get("timesteps")
        if (not isinstance(grid, list) or not grid or any(not isinstance(t, int) or not 0 <= t < n for t in grid)
                or grid != sorted(set(grid), reverse=True)):
            raise UserError(f"{exported} lists no time labels (distinct integers in 0..{n - 1}, noisiest first)")
    ckpt = {"G": {f"unet.{k}": v for k, v in network.unet.state_dict().items()}, "network": network.record(),
            "n_timesteps": len(grid), "time_scale": n / len(grid) if n % len(grid) else n // len(grid),
            "time_labels": "aligned", "noise_levels": SCHEDULE_GRID, "grid": grid, "schedule": schedule_record(name, betas),
            "prediction": prediction, "channel_order": "RGB", "stage": "import",
            "source": {"diffusers": os.path.abspath(folder)}}
    classes = network.unet.config.num_class_embeds
    if classes:
        if classes < 2:
            raise UserError(f"{folder}'s UNet2DModel has num_class_embeds {classes}; a class-conditional model "
                            "needs its classes and the null label")
        from user_modules import DEFAULT_COND_DROP_PROB
        # the last row is the null label (SPEC "Conditioning"); students drop labels at the usual rate
        ckpt.update(num_classes=classes - 1, null_label=classes - 1, cond_drop_prob=DEFAULT_COND_DROP_PROB)
    return ckpt


# -- out: a checkpoint as a folder ---------------------------------------------------------------

def _trained_betas(labels, alphas, n):
    """Betas of n steps whose cumulative product is alphas[k]^2 at index labels[k] (labels noisiest first, distinct
    integers): the indices between two labels, never visited, take log alpha^2 linear in the index, and those above
    the noisiest label continue its last slope."""
    log_abar = torch.full((n + 1,), float("nan"), dtype=torch.float64)  # position j + 1 holds index j; 0: index -1
    log_abar[0] = 0.0  # clean data
    log_abar[torch.tensor(labels) + 1] = 2 * alphas.log()
    known = torch.nonzero(~log_abar.isnan()).flatten().tolist()
    for a, b in zip(known[:-1], known[1:]):
        fraction = torch.arange(1, b - a, dtype=torch.float64) / (b - a)
        log_abar[a + 1:b] = log_abar[a] + fraction * (log_abar[b] - log_abar[a])
    last, before = known[-1], known[-2]
    slope = (log_abar[last] - log_abar[before]) / (last - before)
    log_abar[last + 1:] = log_abar[last] + slope * torch.arange(1, n + 1 - last, dtype=torch.float64)
    return (1 - (log_abar[1:] - log_abar[:-1]).exp()).tolist()


def scheduler_config(grid, prediction, n):
    """(scheduler class, configuration) that steps over a grid of a model of n base indices whose time labels
    are integer indices: DDIMScheduler (trailing spacing, no clipping, set_alpha_to_one) where its rule
    t - n // S gives the labels (S dividing n, the labels (k + 1) n / S - 1), else DPMSolverMultistepScheduler
    of order 1 (DPM-Solver++'s first-order step is DDIM's) to be given the labels through
    set_timesteps(timesteps=...). Both carry trained_betas whose cumulative product is alpha^2 at each label (a
    cosine student's own noisiest level included). The diffusers_unet.NotExpressible of labels that are not
    integers of 0..n-1."""
    from diffusers_unet import NotExpressible
    labels = grid.labels
    if not bool((labels == labels.round()).all()) or float(labels.min()) < 0 or float(labels.max()) > n - 1:
        raise NotExpressible(f"time labels {[round(float(t), 3) for t in labels[:4]]}... are not indices of the {n} "
                             "base steps, which diffusers passes as timesteps")
    steps, integer_labels = len(labels), [int(t) for t in labels.round()]
    common = dict(num_train_timesteps=n, trained_betas=_trained_betas(integer_labels, grid.alphas[:-1], n),
                  beta_schedule="linear", prediction_type=DIFFUSERS_PREDICTION[prediction], thresholding=False,
                  timestep_spacing="trailing")
    if n % steps == 0 and integer_labels == [(k + 1) * (n // steps) - 1 for k in reversed(range(steps))]:
        return "DDIMScheduler", dict(common, clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                                     rescale_betas_zero_snr=False)
    return "DPMSolverMultistepScheduler", dict(common, solver_order=1, algorithm_type="dpmsolver++",
                                               final_sigmas_type="zero", lower_order_final=True,
                                               use_karras_sigmas=False)


def diffusers_network(net, ckpt, source):
    """(UNet2DModel, the checkpoint as it samples through it) of a model this project samples: a DiffusersUNet's
    own UNet2DModel; this project's UNet mapped (diffusers_unet.unet2d_state_dict), the original's files first
    turned into RGB networks that take the base indices as labels (original.aligned_rgb)."""
    import copy

    from diffusers import UNet2DModel

    from checkpoints import checkpoint_channel_order, checkpoint_time_labels
    from diffusers_unet import DiffusersUNet, unet2d_config, unet2d_state_dict
    from original import aligned_rgb
    if isinstance(net, DiffusersUNet):
        return copy.deepcopy(net.unet).eval(), ckpt
    if checkpoint_time_labels(ckpt) != "aligned" or checkpoint_channel_order(ckpt) != "RGB":
        ckpt = aligned_rgb(ckpt, net, source)
        net = copy.deepcopy(net)
        net.load_state_dict(ckpt["G"])
    image_size = getattr(net, "image_size", None)
    model = UNet2DModel(**unet2d_config(net, None if image_size is None else int(image_size[-1])))
    model.load_state_dict(unet2d_state_dict(net), strict=True)
    return model.eval(), ckpt


def export_pipeline(net, ckpt, folder, source):
    """Write `folder`, a diffusers pipeline of the checkpoint's model that samples it with DDIM over its own grid:
    DDIMPipeline (DDIMScheduler) where S steps divide the base steps — `DDIMPipeline.from_pretrained(folder)
    (num_inference_steps=S)` — else DDPMPipeline with DPMSolverMultistepScheduler of order 1, stepped over the
    labels of timesteps.json (written for every export). Returns (scheduler class, labels)."""
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DPMSolverMultistepScheduler

    from checkpoints import checkpoint_grid, checkpoint_prediction, checkpoint_schedule
    model, ckpt = diffusers_network(net, ckpt, source)
    grid = checkpoint_grid(ckpt)
    kind, config = scheduler_config(grid, checkpoint_prediction(ckpt), len(checkpoint_schedule(ckpt)[1]))
    if kind == "DDIMScheduler":
        pipeline = DDIMPipeline(unet=model, scheduler=DDIMScheduler(**config))
    else:
        pipeline = DDPMPipeline(unet=model, scheduler=DPMSolverMultistepScheduler(**config))
    pipeline.save_pretrained(folder)
    labels = [int(t) for t in grid.labels.round()]
    with open(os.path.join(folder, TIMESTEPS), "w") as f:
        json.dump({"timesteps": labels, "scheduler": kind,
                   "use": "scheduler.set_timesteps(timesteps=timesteps)" if kind != "DDIMScheduler" else
                          f"scheduler.set_timesteps({len(labels)})"}, f, indent=1)
    return kind, labels
