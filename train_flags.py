"""The command lines of train.py and distillate.py (the original's flag names and meanings, with SPEC's fixes)."""
import os

import numpy as np
import torch

from cli import (ArgumentParser, UserError, add_common_arguments, decay, finite_float, nonnegative_float,
                 nonnegative_int, positive_float, positive_int, str2bool, unit_interval, worker_count)
from diffusion import PREDICTIONS, SCHEDULES, X_ERROR_WEIGHTINGS, check_betas, make_beta_schedule
from lr_schedules import LR_SCHEDULES
from runtime import AMP_DTYPES
from train_utils import DISTILL_WEIGHTINGS

DIFFUSIONS = ("GaussianDiffusion", "GaussianDiffusionDefault")  # the original's --diffusion values: accepted


def add_training_arguments(parser, *, lr, scheduler, num_iters, ema_decay, dname_help, continue_help, ema_help):
    """Flags shared by train.py and distillate.py (the original's names and meanings, with fixes)."""
    add = parser.add_argument
    add("--name", required=True, help="experiment name; output goes to ./checkpoints/<name>/<dname>/")
    add("--dname", required=True, help=dname_help)
    add("--checkpoint_to_continue", default="", help=continue_help)
    add("--num_iters", type=positive_int, default=num_iters,
        help="optimizer steps of the run (the original counted images)")
    add("--batch_size", type=positive_int, default=1, help="images per optimizer step per process")
    add("--lr", type=positive_float, default=lr,
        help="learning rate: the peak of the schedule (StrategyCosineAnnel: its start)")
    add("--scheduler", default=scheduler, choices=list(LR_SCHEDULES),
        help="learning-rate schedule over --num_iters steps, with AdamW: constant; linear (to 0); cosine (half a "
             "cosine to 0); onecycle (up from lr/25 over 30%%, a cosine to 0). The original's names: "
             "StrategyConstantLR (= constant), StrategyLinearLR (= linear), and its SGD strategies, reproduced: "
             "StrategyOneCycle (torch's OneCycleLR), StrategyCosineAnnel (torch's CosineAnnealingWarmRestarts, "
             "T_0=100, T_mult=2, eta_min=0.01)")
    add("--warmup", type=nonnegative_int, default=0, help="linear learning-rate warm-up steps (AdamW schedules)")
    add("--weight_decay", type=nonnegative_float, default=0.0,
        help="AdamW's decoupled weight decay (the original's AdamW had torch's default, 0.01; its SGD strategies fix "
             "their own)")
    add("--grad_clip", type=nonnegative_float, default=1.0, help="clip the gradient norm to this value (0: no clipping)")
    add("--ema_decay", type=decay, default=ema_decay, help=ema_help)
    add("--log_interval", type=positive_float, default=15,
        help="minutes between sample grids in TensorBoard (fractions allowed)")
    add("--log_every", type=positive_int, default=50, help="steps between scalar logs (loss, lr, grad norm, ...)")
    add("--log_images", type=nonnegative_int, default=4, help="images in the TensorBoard sample grid (0: no sample grids)")
    add("--ckpt_interval", type=positive_float, default=30, help="minutes between checkpoints (fractions allowed)")
    add("--save_every", type=nonnegative_int, default=0, help="also save every N steps (0: by minutes only)")
    add("--keep_last", type=nonnegative_int, default=0,
        help="keep this many step-numbered checkpoints beside checkpoint.pt (0: none)")
    add("--keep_training_state", default="always", choices=["always", "until_done"],
        help="until_done: a finished run's checkpoint.pt keeps only what sampling and the next stage need (the "
             "weights and records), without the optimizer state (a third to a quarter of the size); always: keep it")
    add("--stop_at", type=nonnegative_int, default=0,
        help="stop with a checkpoint at this step, the schedule still planned for --num_iters (0: off)")
    add("--max_bad_steps", type=positive_int, default=20, help="stop after this many non-finite losses in a row")
    add("--num_workers", type=worker_count, default=-1,
        help="data loader workers (-1: 2 per image in the batch, at most 8)")
    add("--amp", default="no", choices=sorted(AMP_DTYPES), help="mixed precision for the network (schedule math stays float64)")
    add("--channels_last", type=str2bool, default=True,
        help="channels_last memory format: faster convolutions on GPUs and CPUs (90%% vs 83%% of the matmul rate on 2 cores)")
    add("--compile", type=str2bool, default=False, help="torch.compile the trained network")
    add("--grad_checkpoint", type=str2bool, default=False, help="recompute activations in the backward pass (less memory)")



BETA_START, BETA_END = 1e-4, 0.02  # DDPM's (Ho et al. Sec. 4)


def add_schedule_arguments(group, default):
    """The base schedule: a named one of diffusion.SCHEDULES or an explicit table (--schedule table --betas FILE)."""
    group.add_argument("--schedule", default=default, choices=list(SCHEDULES) + ["table"],
                       help="beta schedule: cosine (the original's), linear (DDPM's, --beta_start to --beta_end), "
                            "scaled_linear (linear in sqrt(beta)), table (the betas of --betas FILE)")
    group.add_argument("--beta_start", type=positive_float, default=None,
                       help=f"linear schedules: the first beta (unset: {BETA_START:g})")
    group.add_argument("--beta_end", type=positive_float, default=None,
                       help=f"linear schedules: the last beta (unset: {BETA_END:g})")
    group.add_argument("--betas", default="", help="--schedule table: a .npy, .pt or text file of one beta per step")


def read_beta_table(path):
    """The float64 betas of a .npy, .pt (a tensor) or text file, checked (diffusion.check_betas)."""
    if not os.path.isfile(path):
        raise UserError(f"--betas {path} does not exist")
    try:
        if path.endswith(".npy"):
            values = np.load(path, allow_pickle=False)
        elif path.endswith(".pt"):
            values = torch.load(path, map_location="cpu", weights_only=True)
        else:
            values = np.loadtxt(path, ndmin=1)
        return check_betas(torch.as_tensor(values))
    except (ValueError, TypeError, OSError, RuntimeError) as e:
        raise UserError(f"--betas {path}: {' '.join(str(e).split())[:200]}") from None


def schedule_from_args(args, n):
    """(name, float64 betas of n steps) of the schedule flags; UserError for inconsistent ones."""
    if args.schedule != "table" and args.betas:
        raise UserError(f"--betas gives the table of --schedule table, not of --schedule {args.schedule}")
    if args.schedule not in ("linear", "scaled_linear") and (args.beta_start, args.beta_end) != (None, None):
        raise UserError(f"--beta_start and --beta_end belong to the linear schedules, not to --schedule {args.schedule}")
    if args.schedule == "table":
        if not args.betas:
            raise UserError("--schedule table needs --betas FILE, the table of betas")
        betas = read_beta_table(args.betas)
        if n is not None and len(betas) != n:
            raise UserError(f"--betas {args.betas} holds {len(betas)} betas, but the model has {n} steps")
        return "table", betas
    try:
        return args.schedule, make_beta_schedule(args.schedule, n, args.beta_start or BETA_START,
                                                 args.beta_end or BETA_END)
    except ValueError as e:
        raise UserError(str(e).replace("beta_start", "--beta_start").replace("beta_end", "--beta_end")) from None


def train_argument_parser(description):
    parser = ArgumentParser(description=description)
    add_common_arguments(parser)
    parser.add_argument("--num_timesteps", type=positive_int, default=None,
                        help="diffusion steps N of the base model (unset: a continued file's, else 1024, or the length of --betas)")
    add_schedule_arguments(parser.add_argument_group("noise schedule (unset: a continued file's, else cosine)"), None)
    parser.add_argument("--zero_terminal_snr", type=str2bool, default=False,
                        help="rescale the schedule to zero SNR at the last step (Lin et al. 2023, Algorithm 1; "
                             "with --prediction v or x)")
    parser.add_argument("--prediction", default=None, choices=PREDICTIONS,
                        help="what the network predicts: eps (the noise, as DDPM), x (the clean image) or v (unset: a "
                             "continued file's, else v)")
    parser.add_argument("--weighting", default=None, choices=X_ERROR_WEIGHTINGS,
                        help="weight of the x error in the loss: snr+1 (the MSE of v), snr (the MSE of eps, DDPM's), "
                             "truncated_snr (max(SNR, 1)), constant (the MSE of x); unset: the MSE of what the "
                             "network predicts")
    parser.add_argument("--diffusion", default="GaussianDiffusion", choices=DIFFUSIONS,
                        help="the original's diffusion class: accepted for its command lines, both train alike")
    add_training_arguments(
        parser, lr=5e-5, scheduler="StrategyConstantLR", num_iters=100000, ema_decay=0.9999,
        dname_help="run name within the experiment; output goes to ./checkpoints/<name>/<dname>/",
        continue_help="checkpoint to continue: a file of train.py resumes exactly (model, EMA, optimizer, step); "
                      "a file of the original (weights only) starts at step 0 from its weights, keeping its "
                      "time-label convention and channel order; a diffusers pipeline folder starts at step 0 from "
                      "its UNet2DModel, schedule and prediction",
        ema_help="EMA decay of the weights saved as G (0: no EMA, the raw weights are G)")
    parser.add_argument("--cond_drop_prob", type=unit_interval, default=None,
                        help="conditional modules (NUM_CLASSES) only: probability that a label is replaced by the null "
                             "label, for classifier-free guidance (unset: 0.1)")
    return parser


def distill_argument_parser(description):
    parser = ArgumentParser(description=description)
    add_common_arguments(parser)
    parser.add_argument("--base_checkpoint", required=True, help="the teacher's checkpoint (of the first stage)")
    parser.add_argument("--diffusion", default="GaussianDiffusionDefault", choices=["GaussianDiffusionDefault"],
                        help="the teacher's diffusion class: accepted for the original's command lines, which name it")
    parser.add_argument("--weighting", default="snr+1", choices=DISTILL_WEIGHTINGS,
                        help="weight of the x error: snr+1 (the MSE of v); truncated_snr: max(SNR, 1) (the paper's); "
                             "snr (the MSE of eps); constant (the MSE of x); original: the original "
                             "implementation's clipped one-x target (not Algorithm 2)")
    parser.add_argument("--prediction", default="v", choices=PREDICTIONS,
                        help="what the students predict; a teacher that predicts otherwise is first turned into "
                             "one that predicts this (<dname>_<prediction>, its own steps: the teacher's prediction "
                             "matched at every noise level), then halved")
    parser.add_argument("--prediction_num_iters", type=positive_int, default=None,
                        help="optimizer steps of that change of prediction (unset: --num_iters)")
    parser.add_argument("--teacher_steps", type=positive_int, default=None,
                        help="the first halving of a teacher on its schedule's grid of S steps distils its DDIM on "
                             "P points of that grid (--halving_grid), P a power of two <= S (unset: the largest); "
                             "the student has P/2 steps")
    parser.add_argument("--halving_grid", default="cosine", choices=["cosine", "trailing"],
                        help="which P points of a teacher on its schedule's grid the first halving samples: cosine "
                             "(the levels of the cosine schedule's P steps, matched by log-SNR: the spacing of the "
                             "original's students on any schedule) or trailing (every N/P-th, DDIM's 'trailing' "
                             "spacing); later halvings take every other point, so the grids nest")
    parser.add_argument("--prediction_weighting", default=None, choices=X_ERROR_WEIGHTINGS,
                        help="weight of the x error in that change of prediction: snr+1 (the MSE of v), snr (the "
                             "MSE of eps), truncated_snr (max(SNR, 1)), constant (the MSE of x); unset: the MSE of "
                             "the teacher's own prediction (snr for an eps teacher)")
    group = parser.add_argument_group("a teacher file without records (e.g. the original's or another library's)")
    group.add_argument("--teacher_prediction", default=None, choices=PREDICTIONS,
                       help="what the teacher predicts (unset: its record, else v); refused if it contradicts the record")
    add_schedule_arguments(group, None)
    parser.add_argument("--gamma", type=finite_float, default=0.0,
                        help="the original's weight w = (1 + alpha/sigma)^gamma: the loss is "
                             "mse(w v_student, w v_target) (snr+1 and original weightings; 0: none)")
    parser.add_argument("--num_stages", type=nonnegative_int, default=1,
                        help="halvings to run: 1 writes <dname>, K > 1 writes <dname>_0 ... <dname>_(K-1); 0: only "
                             "the change of prediction or guidance stage one, into <dname>")
    add_training_arguments(
        parser, lr=0.3 * 5e-5, scheduler="StrategyLinearLR", num_iters=5000, ema_decay=0.0,
        dname_help="stage name: output goes to ./checkpoints/<name>/<dname>/ (<dname>_k with --num_stages); "
                   "a stage already there is continued if unfinished and skipped if finished",
        continue_help="checkpoint of the first stage's student to continue (model, optimizer, step); "
                      "by default a stage continues its own <dname> checkpoint when there is one",
        ema_help="EMA decay of the student's weights saved as G (0: no EMA, the raw weights are G and the next "
                 "teacher, as in the paper)")
    parser.add_argument("--guidance_distill", type=str2bool, default=False,
                        help="guidance distillation of a class-conditional teacher: stage one (a w-input student, "
                             "<dname>_w), then --num_stages halvings (<dname>_0 ...)")
    parser.add_argument("--w_min", type=nonnegative_float, default=None,
                        help="with --guidance_distill True: the smallest guidance weight the student learns (unset: 0)")
    parser.add_argument("--w_max", type=nonnegative_float, default=None,
                        help="with --guidance_distill True: the largest guidance weight the student learns (unset: 4)")
    parser.add_argument("--guidance_num_iters", type=positive_int, default=None,
                        help="with --guidance_distill True: optimizer steps of stage one (unset: --num_iters)")
    return parser
