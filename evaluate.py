#!/usr/bin/env python
"""Sample quality against network calls (NFE): a base model, its distilled stages and training-free samplers.

    python evaluate.py --module digits_u --checkpoints checkpoints/digits/original/checkpoint.pt \
        checkpoints/digits/base_*/checkpoint.pt --num_images 1000 --out checkpoints/digits/evaluation

Rows, each from the same noise (image i's start and step noise from --seed and i only):
- the base model (time scale 1) with deterministic DDIM through all its N steps: the reference of the
  paired measures;
- the base model with each of --samplers (DDIM, DPM-Solver++(2M), the stochastic sampler of Meng et al.
  2023, ancestral) at each NFE of --nfe, steps chosen by --step_schedule; ancestral also at all N steps
  (the original's default sampler);
- every distilled stage with each of --distilled_samplers through all its steps;
- the floor: --num_images real images, disjoint from the reference images, measured like a row (its paired
  measures pair real image i with real image i+1: the level of unrelated images).
Measures (metrics.py, fid.py), all in one feature space (the user module's make_feature_extractor(), or
Inception for RGB data): FID +- bootstrap standard deviation (the row's images resampled), KID +- standard
deviation over subsets, density and coverage (k = 5), and, paired with the reference sample of the same
noise, pixel RMSE and feature distance +- standard error (over the first --num_paired images). The real
images - make_test_dataset(), or the last --held_out images of make_dataset(), as the reference; the
floor images from the rest of make_dataset() - are read in batches and the samples generated in chunks:
only their features (and the first --num_paired images) are kept. Images enter the features in the
feature space's channel order (RGB for Inception, the data's CHANNEL_ORDER for the classifier): samples
of a BGR checkpoint are flipped.

Writes OUT.csv (one row per model, sampler and NFE), OUT.md (the table and the headline: the NFE each
training-free sampler needs to match the distilled --match_steps-step model), OUT.png (each measure
against NFE) and TensorBoard logs in OUT_tb/.
"""
import argparse
import csv
import os
import time

import torch
from torch.utils.data import DataLoader, Subset

import fid
import metrics
import samplers
import seeding
from cli import (ArgumentParser, UserError, int_list, main_guard, nonnegative_float, nonnegative_int,
                 positive_int, str2bool)
from sample_utils import ALIASES, SamplerSpec, generate, nfe
from script_utils import (add_common_arguments, checkpoint_channel_order, choose_device, data_channel_order,
                          extra_args_fn, load_checkpoint, load_model_from_checkpoint, load_user_module,
                          make_sampling_diffusion, make_user_dataset, to_channel_order)

KNN = 5  # k of density and coverage (Naeem et al. 2020)
ALL_STEPS_SAMPLERS = ("ddim", "ancestral")  # also run through all N steps of the base model
LABELS = {"ancestral": "ancestral", "ddim": "DDIM", "dpmpp_2m": "DPM-Solver++(2M)", "stochastic": "stochastic"}
COLUMNS = ["model", "steps", "sampler", "nfe", "n_samples", "n_reference", "n_paired", "fid", "fid_sd", "kid", "kid_sd",
           "density", "coverage", "paired_rmse", "paired_rmse_se", "paired_feature_distance",
           "paired_feature_distance_se", "seconds", "checkpoint"]
# (column, error column, axis label, y scale) of each panel of OUT.png
PANELS = [("fid", "fid_sd", "FID", "log"), ("kid", "kid_sd", "KID", "symlog"),
          ("density", None, "density", "linear"), ("coverage", None, "coverage", "linear"),
          ("paired_rmse", "paired_rmse_se", "paired RMSE (pixels, to the reference)", "linear"),
          ("paired_feature_distance", "paired_feature_distance_se", "paired feature distance", "linear")]


def sampler_list(value):
    """'ddim,dpmpp_2m' -> ['ddim', 'dpmpp_2m']: names of samplers.SAMPLERS ('ddpm' is 'ancestral')."""
    names = [ALIASES.get(name, name) for name in (part.strip() for part in str(value).split(",")) if name]
    unknown = [name for name in names if name not in samplers.SAMPLERS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown sampler {', '.join(unknown) or repr(value)}; "
                                         f"choose from {', '.join(samplers.SAMPLERS)}")
    return list(dict.fromkeys(names))


def make_argument_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--checkpoints", nargs="+", required=True, help="the base checkpoint and its distilled stages")
    parser.add_argument("--out", required=True, help="output prefix: OUT.md, OUT.csv, OUT.png, OUT_tb/")
    parser.add_argument("--num_images", "--num_samples", dest="num_images", type=positive_int, default=1000,
                        help="generated images per row (at least 2), and real images of the floor")
    parser.add_argument("--chunk_size", type=positive_int, default=256,
                        help="images per network call (and per batch of real images)")
    parser.add_argument("--num_paired", type=positive_int, default=1000,
                        help="images of the paired measures: the first N of --num_images (the reference samples "
                             "of these stay in memory; all others are reduced to features chunk by chunk)")
    parser.add_argument("--nfe", "--ddim_steps", dest="nfe", type=int_list, default="1,2,4,8,16,32",
                        help="network calls per image at which the base model is sampled (at most its steps)")
    parser.add_argument("--samplers", type=sampler_list, default="ancestral,ddim,dpmpp_2m,stochastic",
                        help="training-free samplers of the base model")
    parser.add_argument("--distilled_samplers", type=sampler_list, default="ddim,stochastic",
                        help="samplers of the distilled stages (through all their steps)")
    parser.add_argument("--step_schedule", default="time", choices=samplers.STEP_SCHEDULES,
                        help="which indices the base model visits at fewer NFE: time-uniform or uniform in log-SNR")
    parser.add_argument("--clipping_value", "--ddim_clip", dest="clipping_value", type=nonnegative_float, default=0.0,
                        help="clip DDIM's x and eps predictions at +-value (0: no clipping)")
    parser.add_argument("--features", default="classifier", choices=["classifier", "inception"],
                        help="feature space: the user module's make_feature_extractor(), or InceptionV3 (RGB images)")
    parser.add_argument("--held_out", type=nonnegative_int, default=0,
                        help="use the last N images of make_dataset() as the reference (0: make_test_dataset())")
    parser.add_argument("--num_workers", type=nonnegative_int, default=0, help="DataLoader workers reading real images")
    parser.add_argument("--kid_subset_size", type=positive_int, default=1000,
                        help="images per KID subset (at least 2; at most the sizes of the compared sets)")
    parser.add_argument("--kid_subsets", type=positive_int, default=100, help="random subsets of KID (at least 2)")
    parser.add_argument("--fid_bootstrap", type=positive_int, default=50,
                        help="bootstrap resamples for FID's standard deviation (at least 2)")
    parser.add_argument("--match_steps", type=positive_int, default=4,
                        help="the distilled stage the headline matches, by its number of steps")
    parser.add_argument("--channels_last", type=str2bool, default=True, help="channels_last memory format (faster convolutions)")
    return parser


def check_arguments(args):
    """The checks of numbers that need more than their type, and of the outputs, before any work."""
    for flag, value in (("--num_images", args.num_images), ("--num_paired", args.num_paired),
                        ("--kid_subset_size", args.kid_subset_size),
                        ("--kid_subsets", args.kid_subsets), ("--fid_bootstrap", args.fid_bootstrap)):
        if value < 2:
            raise UserError(f"{flag} must be at least 2 (a standard deviation needs two values), got {value}")
    parent = os.path.dirname(os.path.abspath(args.out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"cannot write {args.out}.*: {parent} is a file, not a folder")
    for path in (args.out + ".md", args.out + ".csv", args.out + ".png"):
        if os.path.isdir(path):
            raise UserError(f"cannot write {path}: it is a folder")


def checkpoint_set(paths):
    """(base path, its steps, [distilled paths by decreasing steps]); exactly one base (time scale 1)."""
    steps, scales = {}, {}
    for path in paths:
        ckpt = load_checkpoint(path)  # read once here to check the set; the weights are loaded row by row
        steps[path], scales[path] = int(ckpt["n_timesteps"]), ckpt["time_scale"]
    bases = [p for p in steps if scales[p] == 1]
    if len(bases) != 1:
        raise UserError(f"--checkpoints must hold exactly one base model (time scale 1); found {len(bases)}")
    return bases[0], steps[bases[0]], sorted((p for p in steps if p != bases[0]), key=lambda p: -steps[p])


def evaluation_plan(base, n, stages, args):
    """[(checkpoint path, model, SamplerSpec)], the reference (the base model's all-steps DDIM) first."""
    too_many = [k for k in args.nfe if k > n]
    if too_many:
        raise UserError(f"--nfe {','.join(map(str, too_many))} exceeds the base model's {n} steps")
    ddim = {"eta": 0.0, "clip_value": args.clipping_value or None}
    options = lambda name: ddim if name == "ddim" else {}
    plan = [(base, "base", SamplerSpec("ddim", ddim, 0))]
    for name in args.samplers:
        grid = set(args.nfe) | ({n} if name in ALL_STEPS_SAMPLERS else set())
        for k in sorted(grid - ({n} if name == "ddim" else set())):
            plan.append((base, "base", SamplerSpec(name, options(name), 0 if k == n else k, args.step_schedule)))
    for path in stages:
        plan += [(path, "distilled", SamplerSpec(name, options(name), 0)) for name in args.distilled_samplers]
    return plan


def real_datasets(module, args):
    """(reference data set, floor data set of --num_images images disjoint from it)."""
    dataset = make_user_dataset(module)
    if args.held_out:
        if args.held_out >= len(dataset):
            raise UserError(f"--held_out {args.held_out} leaves no images of the {len(dataset)} in make_dataset()")
        reference = Subset(dataset, range(len(dataset) - args.held_out, len(dataset)))
        pool = Subset(dataset, range(len(dataset) - args.held_out))
    else:
        make_test = getattr(module, "make_test_dataset", None)
        if make_test is None:
            raise UserError(f"user module {module.__name__!r} has no make_test_dataset(); give --held_out N to "
                            "hold out the last N images of make_dataset() as the reference")
        reference, pool = make_test(), dataset
    if len(reference) <= KNN:
        raise UserError(f"the reference set has {len(reference)} images; density and coverage need more than {KNN}")
    if len(pool) < args.num_images:
        raise UserError(f"the floor needs --num_images {args.num_images} real images outside the reference set; "
                        f"there are {len(pool)} (lower --num_images)")
    chosen = torch.randperm(len(pool), generator=seeding.generator(args.seed, "floor-images"))[:args.num_images]
    return reference, Subset(pool, chosen.tolist())


class FeatureSpace:
    """Maps images in [-1, 1], stored in channel order `self.order`, to features [N, D] (float64, CPU)."""

    def __init__(self, module, kind, device, data_order, batch_size):
        if kind == "inception":
            self.order = "RGB"  # InceptionV3 compares RGB with RGB
            try:
                net = fid.load_inception(device)
            except RuntimeError as e:
                raise UserError(str(e)) from None
            self.extract = lambda images: fid.inception_features(images, device, batch_size, model=net)
            return
        make = getattr(module, "make_feature_extractor", None)
        if make is None:
            raise UserError(f"user module {module.__name__!r} has no make_feature_extractor(); use --features inception")
        self.order = data_order  # a classifier of the data sees images as the data stores them
        net = make().to(device).eval()
        self.extract = lambda images: torch.cat([net(chunk.to(device)).double().cpu() for chunk in images.split(batch_size)])

    @torch.no_grad()
    def __call__(self, images):
        return self.extract(images)


@torch.no_grad()
def read_real(dataset, features, data_order, args):
    """(features [N, D] of a data set, read in batches, and its first n_paired(args) images): the other
    images are not kept, so a large data set never sits in memory at once."""
    loader = DataLoader(dataset, batch_size=args.chunk_size, num_workers=args.num_workers)
    parts, kept = [], []
    for batch in loader:
        images = to_channel_order(batch[0] if isinstance(batch, (tuple, list)) else batch, data_order, features.order)
        room = n_paired(args) - sum(len(k) for k in kept)
        kept.append(images[:max(room, 0)])
        parts.append(features(images))
    return torch.cat(parts), torch.cat(kept)


@torch.no_grad()
def read_samples(diffusion, spec, model, ckpt, features, args, extra_args, device):
    """(features [N, D] of a row's --num_images samples, its first n_paired(args) samples), generated chunk by
    chunk in the feature space's channel order (image i from (seed, i) only, so chunking changes nothing)."""
    parts, kept = [], []
    for start in range(0, args.num_images, args.chunk_size):
        indices = range(start, min(start + args.chunk_size, args.num_images))
        images = generate(diffusion, spec, indices, list(model.image_size[1:]), args.seed, extra_args=extra_args,
                          device=device, chunk_size=args.chunk_size, channels_last=args.channels_last)
        images = to_channel_order(images.clamp(-1, 1), checkpoint_channel_order(ckpt), features.order)
        kept.append(images[:max(n_paired(args) - start, 0)])
        parts.append(features(images))
    return torch.cat(parts), torch.cat(kept)


def n_paired(args):
    return min(args.num_paired, args.num_images)


class Yardsticks:
    """Every measure of a set of images against the reference features (metrics.py, fid.py)."""

    def __init__(self, reference, args):
        self.reference, self.args = reference, args
        self.radii = metrics.kth_neighbour_distances(reference, KNN)

    def __call__(self, features, pixel_rmse, feature_distance):
        """A row's measures from its features [N, D] and the per-image paired values [n_paired]."""
        args = self.args
        kid, kid_sd = metrics.kid(features, self.reference, args.kid_subset_size, args.kid_subsets, args.seed)
        density, coverage = metrics.density_coverage(self.reference, features, KNN, radii=self.radii)
        rmse, rmse_se = metrics.mean_and_standard_error(pixel_rmse)
        distance, distance_se = metrics.mean_and_standard_error(feature_distance)
        return dict(fid=fid.fid_from_features(features, self.reference),
                    fid_sd=metrics.bootstrap_std(fid.fid_from_features, features, self.reference, args.fid_bootstrap, args.seed),
                    kid=kid, kid_sd=kid_sd, density=density, coverage=coverage, paired_rmse=rmse,
                    paired_rmse_se=rmse_se, paired_feature_distance=distance, paired_feature_distance_se=distance_se,
                    n_samples=features.shape[0], n_reference=self.reference.shape[0], n_paired=pixel_rmse.shape[0])


@main_guard
def main(argv=None):
    started, cpu_started = time.perf_counter(), time.process_time()
    args = make_argument_parser().parse_args(argv)
    check_arguments(args)
    device = choose_device(args.device)
    module = load_user_module(args.module)
    plan = evaluation_plan(*checkpoint_set(args.checkpoints), args)
    reference_set, floor_set = real_datasets(module, args)
    data_order = data_channel_order(module)
    features = FeatureSpace(module, args.features, device, data_order, args.chunk_size)

    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(args.out + "_tb")  # the first thing written: every check above has passed
    yardsticks = Yardsticks(read_real(reference_set, features, data_order, args)[0], args)
    floor_features, floor_images = read_real(floor_set, features, data_order, args)
    paired_features = floor_features[:n_paired(args)]  # real image i against real image i+1: unrelated pairs
    floor = dict(model="floor", steps="", sampler="real", nfe="", seconds="", checkpoint="",
                 **yardsticks(floor_features, metrics.paired_rmse(floor_images, floor_images.roll(-1, 0)),
                              metrics.paired_distances(paired_features, paired_features.roll(-1, 0))))
    print(f"floor (real vs real): FID {floor['fid']:.3f}")
    rows = [floor] + sample_rows(plan, module, features, yardsticks, writer, args, device)
    writer.close()
    elapsed = time.perf_counter() - started, time.process_time() - cpu_started
    write_outputs(rows, args, elapsed, device)
    print(f"Wrote {args.out}.md, {args.out}.csv and {args.out}.png ({elapsed[0] / 60:.1f} minutes)")


def sample_rows(plan, module, features, yardsticks, writer, args, device):
    """One row per entry of the plan; the first (the reference) is sampled first."""
    rows, loaded, reference = [], None, None
    extra_args = extra_args_fn(module)(None, None, device)
    for path, model_kind, spec in plan:
        if loaded is None or loaded[0] != path:
            model, ckpt = load_model_from_checkpoint(module, path, device)
            if args.channels_last:
                model.to(memory_format=torch.channels_last)
            loaded = (path, model, ckpt, make_sampling_diffusion(model, ckpt, device=device))
        _, model, ckpt, diffusion = loaded
        started = time.perf_counter()
        torch.manual_seed(args.seed)
        sample_features, samples = read_samples(diffusion, spec, model, ckpt, features, args, extra_args, device)
        paired_features = sample_features[:n_paired(args)]
        if reference is None:
            reference = samples, paired_features
        row = dict(model=model_kind, steps=int(ckpt["n_timesteps"]), sampler=spec.name, nfe=nfe(spec, diffusion),
                   checkpoint=path, **yardsticks(sample_features, metrics.paired_rmse(samples, reference[0]),
                                                 metrics.paired_distances(paired_features, reference[1])))
        row["seconds"] = round(time.perf_counter() - started, 2)
        rows.append(row)
        print(f"{row['model']} ({row['steps']} steps), {LABELS[row['sampler']]}, NFE {row['nfe']}: FID {row['fid']:.3f}, "
              f"KID {row['kid']:.4g}, paired RMSE {row['paired_rmse']:.4f} ({row['seconds']:.1f} s)")
        tag = f"{model_kind}_{spec.name}"
        for column in ("fid", "kid", "density", "coverage", "paired_rmse", "paired_feature_distance"):
            writer.add_scalar(f"{column}/{tag}", row[column], row["nfe"])
        if samples.shape[1] in (1, 3):  # pictures
            writer.add_images(f"samples/{tag}_nfe{row['nfe']}", (to_channel_order(samples[:64], features.order, "RGB") + 1) / 2, 0)
    return rows


# -- the headline ----------------------------------------------------------------------------------

def headline(rows, match_steps):
    """Lines of OUT.md: the NFE at which each training-free sampler of the base model reaches the FID and
    the paired RMSE of the distilled `match_steps`-step model (deterministic DDIM), interpolated in log
    NFE (metrics.nfe_to_reach), with the range over that value's error bar, and the speed-up NFE/match_steps."""
    targets = [r for r in rows if r["model"] == "distilled" and r["steps"] == match_steps]
    if not targets:
        return [f"No distilled {match_steps}-step stage among --checkpoints: no headline (see --match_steps)."]
    target = next((r for r in targets if r["sampler"] == "ddim"), targets[0])
    lines = [f"NFE each training-free sampler of the base model needs to match the distilled {match_steps}-step model "
             f"({LABELS[target['sampler']]}): FID {target['fid']:.3f} ± {target['fid_sd']:.3f}, paired RMSE "
             f"{target['paired_rmse']:.4f} ± {target['paired_rmse_se']:.4f}. The NFE at which the sampler's curve reaches "
             "that value, interpolated linearly in log NFE; in brackets where it reaches the upper and lower end of "
             "the value's error bar (FID: bootstrap standard deviation; RMSE: standard error); speed-up = NFE / "
             f"{match_steps}; > and ≤: beyond the measured NFE. DDIM's paired curve ends at the reference itself "
             "(RMSE 0 at all steps).", "",
             "| sampler | NFE to match FID | speed-up | NFE to match paired RMSE | speed-up |", "|---|---:|---:|---:|---:|"]
    base_samplers = list(dict.fromkeys(r["sampler"] for r in rows if r["model"] == "base"))
    for name in base_samplers:
        cells = []
        for column, error in (("fid", "fid_sd"), ("paired_rmse", "paired_rmse_se")):
            curve = [(r["nfe"], r[column]) for r in rows if r["model"] == "base" and r["sampler"] == name]
            reach = [metrics.nfe_to_reach(curve, target[column] + sign * target[error]) for sign in (0, 1, -1)]
            cells += [_nfe_text(reach, 1), _nfe_text(reach, match_steps, suffix="×")]
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    return lines


def _nfe_text(reach, divisor, suffix=""):
    """'9.5 (8.7–10.4)' from [(nfe, relation)] at the value, its upper end and its lower end."""
    def one(nfe, relation):
        sign = {"=": "", "<=": "≤", ">": ">"}[relation]
        return f"{sign}{nfe / divisor:.3g}{suffix}"
    value, upper, lower = (one(*r) for r in reach)
    return value if value == upper == lower else f"{value} ({upper}–{lower})"


# -- outputs ---------------------------------------------------------------------------------------

def write_outputs(rows, args, elapsed, device):
    """OUT.csv, OUT.md and OUT.png, each written beside its place and renamed into it when complete.
    elapsed: (wall-clock seconds, CPU seconds) of the whole evaluation."""
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    written = []
    try:
        with open(_tmp(args.out + ".csv", written), "w", newline="") as f:
            out = csv.DictWriter(f, fieldnames=COLUMNS)
            out.writeheader()
            out.writerows({c: r[c] for c in COLUMNS} for r in rows)
        with open(_tmp(args.out + ".md", written), "w") as f:
            f.write("\n".join(markdown(rows, args, elapsed, device)) + "\n")
        plot(rows, _tmp(args.out + ".png", written), args.match_steps)
    except BaseException:
        for tmp, _ in written:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    for tmp, path in written:
        os.replace(tmp, path)


def _tmp(path, written):
    tmp = f"{path}.tmp-{os.getpid()}"
    written.append((tmp, path))
    return tmp


def _pm(row, column, error, digits):
    return f"{row[column]:.{digits}f} ± {row[error]:.{digits}f}"


def _threads():
    n = torch.get_num_threads()
    return f"{n} thread{'s' if n > 1 else ''}"


def markdown(rows, args, elapsed, device):
    floor = rows[0]
    lines = [f"Measured in {args.features} features against {floor['n_reference']} reference images; "
             f"{args.num_images} samples per row, seed {args.seed}, {args.step_schedule}-uniform steps below "
             f"all steps. Evaluated in {elapsed[0] / 60:.1f} minutes (wall clock; {elapsed[1] / 60:.1f} minutes of CPU time) "
             f"on {device} ({_threads()}).", "",
             "## Headline", ""] + headline(rows, args.match_steps) + [
             "", "## All rows", "",
             "| model | sampler | NFE | FID | KID | density | coverage | paired RMSE | paired feature distance |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        steps = f"{r['steps']} step{'s' if r['steps'] != 1 else ''}"
        model = ("floor: real vs real" if r["model"] == "floor" else
                 f"base ({steps})" if r["model"] == "base" else f"distilled, {steps}")
        reference = r is rows[1]
        lines.append(f"| {model} | {LABELS.get(r['sampler'], r['sampler'])}{' (reference)' if reference else ''} | "
                     f"{r['nfe']} | {_pm(r, 'fid', 'fid_sd', 3)} | {r['kid']:.4g} ± {r['kid_sd']:.2g} | "
                     f"{r['density']:.3f} | {r['coverage']:.3f} | {_pm(r, 'paired_rmse', 'paired_rmse_se', 4)} | "
                     f"{_pm(r, 'paired_feature_distance', 'paired_feature_distance_se', 3)} |")
    lines += ["", f"FID ± the standard deviation over {args.fid_bootstrap} bootstrap resamples of the row's images (the "
              "reference images, which every row meets, fixed); KID ± the standard "
              f"deviation over {args.kid_subsets} subsets of {min(args.kid_subset_size, args.num_images, floor['n_reference'])} "
              f"images; density and coverage with k = {KNN}; paired measures ± their standard error over the first "
              f"{floor['n_paired']} images, each sample against the base model's all-steps DDIM sample from the same "
              "noise (the reference row, 0 by definition). The floor compares "
              f"{floor['n_samples']} real images, disjoint from the reference images, with them, as the rows compare "
              "their samples; its paired measures pair real image i with real image i+1: the distance between "
              "unrelated images, the level of a sampler that keeps nothing of its noise."]
    return lines


def plot(rows, path, match_steps):
    """Each measure against NFE on a log axis, one curve per model and sampler, the floor dotted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor, curves = rows[0], {}
    for r in rows[1:]:
        curves.setdefault((r["model"], r["sampler"]), []).append(r)
    colours = {name: f"C{k}" for k, name in enumerate(LABELS)}  # one colour per sampler, one line style per model
    fig, axes = plt.subplots(2, 3, figsize=(14, 8), dpi=110)
    for ax, (column, error, label, scale) in zip(axes.flat, PANELS):
        for (model, name), points in curves.items():
            points = sorted(points, key=lambda r: r["nfe"])
            ax.errorbar([r["nfe"] for r in points], [r[column] for r in points],
                        yerr=[r[error] for r in points] if error else None, capsize=2, color=colours[name],
                        marker="o" if model == "distilled" else "s", ls="-" if model == "distilled" else "--",
                        ms=4, label=f"{model}, {LABELS[name]}")
        ax.axhline(floor[column], color="grey", lw=1, ls=":",
                   label="unrelated real images" if column.startswith("paired") else "floor: real vs real")
        ax.set_xscale("log", base=2)
        if scale == "symlog":
            ax.set_yscale("symlog", linthresh=max(abs(floor[column]), 1e-6))
        else:
            ax.set_yscale(scale)
        ax.set_xlabel("network calls per image (NFE)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"Sampling quality against NFE (reference: the base model's all-steps DDIM; headline stage: "
                 f"{match_steps} steps)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


if __name__ == "__main__":
    main()
