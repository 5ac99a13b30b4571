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
Inception for RGB data): FID +- bootstrap standard deviation (the row's images and the reference images
resampled), KID +- standard deviation over subsets drawn from both, density and coverage (k = 5), and,
paired with the reference sample of the same noise, pixel RMSE and feature distance +- standard error (over
the first --num_paired images). Every row meets the same resamples, so its FID and KID minus the reference
row's come with a paired error bar (the spread of the difference over the shared resamples), as does the
headline's NFE to match a distilled stage. The real
images - make_test_dataset(), or the last --held_out images of make_dataset(), as the reference; the
floor images from the rest of make_dataset() - are read in batches and the samples generated in chunks:
only their features (and the first --num_paired images) are kept. Images enter the features in the
feature space's channel order (RGB for Inception, the data's CHANNEL_ORDER for the classifier): samples
of a BGR checkpoint are flipped.

Writes OUT.csv (one row per model, sampler and NFE), OUT.md (the table and the headline: the NFE each
training-free sampler needs to match the distilled --match_steps-step model), OUT.png (each measure
against NFE) and TensorBoard logs in OUT_tb/.

Sets sampled elsewhere (sample.py --out_dir on many GPUs, say) are scored with --samples instead of
--checkpoints: sample folders or npz files against --reference, one row per set, under torchrun if wanted
(set_evaluation.py; the FID-50k protocol is in the README):

    torchrun --nproc_per_node 8 evaluate.py --module celeba_u --samples samples/base_6 samples/base_5 \
        --reference train --features inception --inception_weights pt_inception-2015-12-05-6726825d.pth --out fid50k

A class-conditional set (a base trained for classifier-free guidance, stage one of guidance distillation
and its halvings; distillate.py --guidance_distill True) is measured at every guidance weight of --guidance:

    python evaluate.py --module digits_cond_u --checkpoints checkpoints/digits_cond/original/checkpoint.pt \
        checkpoints/digits_cond/guided_*/checkpoint.pt --out checkpoints/digits_cond/evaluation

Image i is asked for class i mod K. The base model samples with CFG, two network calls per step, so its
training-free rows run k/2 steps at NFE k (the reference: all its steps, 2N calls); the w-input model of
stage one and the distilled stages take w themselves, one call per step. Each row adds the accuracy of the
user module's make_classifier() on the requested classes, and pairs its samples with the CFG teacher's of
the same w. OUT.md holds the headline (teacher, w-input model, the --match_steps-step student, the smallest
student and the best training-free CFG sampler at 2 x --match_steps calls, at each w), a table of accuracy
and KID against w as Table 1 of Meng et al. 2023 and all rows; OUT.png the guidance trade-off, accuracy
against KID and FID as w grows.
"""
import argparse
import os
import time

import torch
from torch.utils.data import DataLoader, Subset

import metrics
import samplers
import seeding
import set_evaluation
from checkpoints import (check_guidance_weight, checkpoint_channel_order, checkpoint_conditioning, checkpoint_prediction,
                         load_checkpoint)
from cli import (ArgumentParser, UserError, add_common_arguments, int_list, main_guard, nonnegative_float,
                 nonnegative_int, positive_int, str2bool, weight_list)
from evaluation_report import write_outputs
from features import Classifier, FeatureSpace
from guidance import cfg_calls
from metrics import KNN
from runtime import choose_device
from sample_utils import SamplerSpec, generate, nfe, spec_grid
from samplers import LABELS
from user_modules import (data_channel_order, extra_args_fn, guided_network, load_model_from_checkpoint,
                          load_user_module, reference_data, to_channel_order)

ALL_STEPS_SAMPLERS = ("ddim", "ancestral")  # also run through all N steps of the base model
BASE_SAMPLERS = ["ancestral", "ddim", "dpmpp_2m", "stochastic"]  # unset --samplers, unconditional base
DISTILLED_SAMPLERS = ["ddim", "stochastic"]  # unset --distilled_samplers, unconditional stages
GUIDED_SAMPLERS = ["ddim", "dpmpp_2m"]  # unset --samplers, class-conditional base (classifier-free guidance)
GUIDED_DISTILLED_SAMPLERS = ["ddim"]  # unset --distilled_samplers, guidance-distilled stages


def sampler_list(value):
    """'ddim,dpmpp_2m' -> ['ddim', 'dpmpp_2m']: names of samplers.SAMPLERS ('ddpm' is 'ancestral')."""
    names = [name for name in (part.strip() for part in str(value).split(",")) if name]
    if not names:
        raise argparse.ArgumentTypeError(f"expected sampler names separated by commas, got {value!r}")
    try:
        return list(dict.fromkeys(samplers.sampler_name(name) for name in names))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def make_argument_parser():
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoints", nargs="+", help="the base checkpoint and its distilled stages (one process)")
    what.add_argument("--samples", nargs="+",
                      help="sample folders of sample.py (or npz files of uint8 images) to score instead of sampling; "
                           "the first is the paired reference row (set_evaluation.py; runs under torchrun)")
    parser.add_argument("--reference", default=None,
                        help="--samples: the real images, a sample folder or npz, or 'train' for all of make_dataset() "
                             "(unset: as --held_out says)")
    parser.add_argument("--inception_weights", default=None,
                        help="--features inception: pytorch-fid's FID weights file pt_inception-2015-12-05-6726825d.pth "
                             "(unset: downloaded into torch hub's cache)")
    parser.add_argument("--out", required=True, help="output prefix: OUT.md, OUT.csv, OUT.png, OUT_tb/")
    parser.add_argument("--num_images", "--num_samples", dest="num_images", type=positive_int, default=1000,
                        help="--checkpoints: generated images per row (at least 2), and real images of the floor "
                             "(--samples scores every image of each set)")
    parser.add_argument("--chunk_size", type=positive_int, default=256,
                        help="images per network call (and per batch of real images)")
    parser.add_argument("--num_paired", type=positive_int, default=1000,
                        help="images of the paired measures: the first N of --num_images (the reference samples "
                             "of these stay in memory; all others are reduced to features chunk by chunk)")
    parser.add_argument("--nfe", "--ddim_steps", dest="nfe", type=int_list, default="1,2,4,8,16,32",
                        help="network calls per image at which the base model is sampled (at most its steps)")
    parser.add_argument("--samplers", type=sampler_list, default=None,
                        help="training-free samplers of the base model (unset: " + ",".join(BASE_SAMPLERS) +
                             "; for a class-conditional base " + ",".join(GUIDED_SAMPLERS) + ")")
    parser.add_argument("--distilled_samplers", type=sampler_list, default=None,
                        help="samplers of the distilled stages, through all their steps (unset: " +
                             ",".join(DISTILLED_SAMPLERS) + "; guidance-distilled " + ",".join(GUIDED_DISTILLED_SAMPLERS) + ")")
    parser.add_argument("--guidance", type=weight_list, default="0,0.5,1,2,4",
                        help="class-conditional models: the guidance weights w; every row is measured at each")
    parser.add_argument("--step_schedule", default="time", choices=samplers.STEP_SCHEDULES,
                        help="which indices the base model visits at fewer NFE: time-uniform, uniform in log-SNR or "
                             "the cosine schedule's levels")
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
    """(base path, {path: (steps, time scale, conditioning record, stage)}, [the other paths by decreasing steps]).
    Exactly one base: time scale 1 and no guidance-weight input (stage one of guidance distillation, a
    w-input model of the base's steps, is one of the others, as is a change of prediction); all
    class-conditional or none."""
    info = {}
    for path in paths:
        ckpt = load_checkpoint(path)  # read once here to check the set; the weights are loaded row by row
        info[path] = (int(ckpt["n_timesteps"]), ckpt["time_scale"], checkpoint_conditioning(ckpt), ckpt.get("stage"))
    bases = [p for p, (_, scale, record, stage) in info.items()
             if scale == 1 and "guidance_range" not in record and stage != "prediction"]
    if len(bases) != 1:
        raise UserError(f"--checkpoints must hold exactly one base model (time scale 1, no guidance-weight input, "
                        f"not a change of prediction); "
                        f"found {len(bases)}")
    base = bases[0]
    conditional = "num_classes" in info[base][2]
    mixed = [p for p in info if ("num_classes" in info[p][2]) != conditional]
    if mixed:
        raise UserError(f"{mixed[0]} is {'unconditional' if conditional else 'class-conditional'}, but the base model "
                        f"{base} is {'class-conditional' if conditional else 'unconditional'}; evaluate one family")
    return base, info, sorted((p for p in info if p != base), key=lambda p: -info[p][0])


def model_kind(info, path, base):
    """'base', 'w-input' (stage one of guidance distillation: the base's steps, w as an input),
    'reparameterised' (the base's steps, another prediction) or 'distilled'."""
    steps, scale, record, stage = info[path]
    if path == base:
        return "base"
    if stage == "prediction":
        return "reparameterised"
    return "w-input" if scale == 1 and "guidance_range" in record else "distilled"


def evaluation_plan(base, info, others, args):
    """[(checkpoint path, model kind, SamplerSpec, guidance weight w or None)], the reference (the base
    model's all-steps DDIM) first; for a class-conditional set the whole list once per w of --guidance,
    each w's reference first. --nfe counts network calls: the base model under classifier-free guidance
    makes two per step at w > 0 (guidance.cfg_calls), so it runs k/2 steps there for an even k (an odd k is
    skipped), and k steps at w = 0, where one conditional call is the guided result."""
    n, _, record, _ = info[base]
    conditional = "num_classes" in record
    weights = args.guidance if conditional else [None]
    calls_at = {w: cfg_calls(w) if conditional else 1 for w in weights}
    too_many = [k for k in args.nfe if k > n * max(calls_at.values())]
    if too_many:
        raise UserError(f"--nfe {','.join(map(str, too_many))} exceeds the base model's {n} steps"
                        + (f" ({2 * n} network calls with classifier-free guidance)" if conditional else ""))
    for path in others:
        for w in weights:
            if w is not None:
                check_guidance_weight(info[path][2], w, path)
    base_samplers = args.samplers or (GUIDED_SAMPLERS if conditional else BASE_SAMPLERS)
    stage_samplers = args.distilled_samplers or (GUIDED_DISTILLED_SAMPLERS if conditional else DISTILLED_SAMPLERS)
    ddim = {"eta": 0.0, "clip_value": args.clipping_value or None}
    options = lambda name: ddim if name == "ddim" else {}
    plan = []
    for w in weights:
        calls = calls_at[w]
        plan.append((base, "base", SamplerSpec("ddim", ddim, 0), w))
        for name in base_samplers:
            grid = {k // calls for k in args.nfe if k % calls == 0 and k <= n * calls} | ({n} if name in ALL_STEPS_SAMPLERS else set())
            for k in sorted(grid - ({n} if name == "ddim" else set())):
                plan.append((base, "base", SamplerSpec(name, options(name), 0 if k == n else k, args.step_schedule), w))
        for path in others:
            plan += [(path, model_kind(info, path, base), SamplerSpec(name, options(name), 0), w)
                     for name in stage_samplers]
    return plan


def requested_labels(indices, num_classes):
    """The label image i is asked for: i mod K, so any K consecutive images hold every class once."""
    return torch.as_tensor(list(indices), dtype=torch.long) % num_classes


def conditioning_for(module, record, w, device):
    """indices -> the network's extra_args for those images: the module's unconditional arguments for an
    unconditional model (w None); for a class-conditional one the requested labels and the guidance weight w."""
    make = extra_args_fn(module)
    if w is None:
        fixed = make(None, None, device)
        return lambda indices: fixed
    return lambda indices: {**make(None, requested_labels(indices, record["num_classes"]), device), "w": w}


def real_datasets(module, args):
    """(reference data set, floor data set of --num_images images disjoint from it)."""
    reference, _, pool = reference_data(module, args.held_out)
    if len(reference) <= KNN:
        raise UserError(f"the reference set has {len(reference)} images; density and coverage need more than {KNN}")
    if len(pool) < args.num_images:
        raise UserError(f"the floor needs --num_images {args.num_images} real images outside the reference set; "
                        f"there are {len(pool)} (lower --num_images)")
    chosen = torch.randperm(len(pool), generator=seeding.generator(args.seed, "floor-images"))[:args.num_images]
    return reference, Subset(pool, chosen.tolist())


@torch.no_grad()
def read_real(dataset, features, data_order, args, classifier=None):
    """(features [N, D] of a data set, read in batches, its first n_paired(args) images, and the fraction of
    its images the classifier assigns their labels, or None): the other images are not kept, so a large
    data set never sits in memory at once."""
    loader = DataLoader(dataset, batch_size=args.chunk_size, num_workers=args.num_workers)
    parts, kept, correct, count = [], [], 0, 0
    for batch in loader:
        labelled = isinstance(batch, (tuple, list))
        images = to_channel_order(batch[0] if labelled else batch, data_order, features.order)
        room = n_paired(args) - sum(len(k) for k in kept)
        kept.append(images[:max(room, 0)])
        parts.append(features(images))
        if classifier is not None and labelled:
            correct, count = correct + int(classifier.correct(images, batch[1], features.order).sum()), count + len(images)
    return torch.cat(parts), torch.cat(kept), (correct / count if count else None)


@torch.no_grad()
def read_samples(net, grid, spec, model, ckpt, features, args, conditioning, device, classifier=None):
    """(features [N, D] of a row's --num_images samples, its first n_paired(args) samples, and per sample whether
    the classifier assigns it its requested label [N], or None), generated chunk by chunk in the feature
    space's channel order (image i from (seed, i) only, so chunking changes nothing). conditioning: indices ->
    the network's extra_args (conditioning_for)."""
    parts, kept, hits = [], [], []
    for start in range(0, args.num_images, args.chunk_size):
        indices = range(start, min(start + args.chunk_size, args.num_images))
        extra_args = conditioning(indices)
        images = generate(net, grid, spec, indices, list(model.image_size[1:]), args.seed, extra_args=extra_args,
                          device=device, chunk_size=args.chunk_size, channels_last=args.channels_last,
                          prediction=checkpoint_prediction(ckpt))
        images = to_channel_order(images.clamp(-1, 1), checkpoint_channel_order(ckpt), features.order)
        kept.append(images[:max(n_paired(args) - start, 0)])
        parts.append(features(images))
        if classifier is not None and "y" in extra_args:
            hits.append(classifier.correct(images, extra_args["y"].cpu(), features.order))
    return torch.cat(parts), torch.cat(kept), torch.cat(hits) if hits else None


def n_paired(args):
    return min(args.num_paired, args.num_images)


@main_guard
def main(argv=None):
    started, cpu_started = time.perf_counter(), time.process_time()
    args = make_argument_parser().parse_args(argv)
    check_arguments(args)
    module = load_user_module(args.module)
    if args.samples:
        return set_evaluation.main(args, module)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("evaluate.py --checkpoints runs in one process; under torchrun, write the sample sets with "
                        "sample.py --out_dir and score them with evaluate.py --samples")
    if args.reference is not None:
        raise UserError("--reference is for --samples; with --checkpoints the reference is make_test_dataset() or "
                        "--held_out N")
    device = choose_device(args.device)
    base, info, others = checkpoint_set(args.checkpoints)
    plan = evaluation_plan(base, info, others, args)
    conditional = "num_classes" in info[base][2]
    reference_set, floor_set = real_datasets(module, args)
    data_order = data_channel_order(module)
    features = FeatureSpace(module, args.features, device, data_order, args.chunk_size, args.inception_weights)
    classifier = Classifier.of(module, device, data_order, args.chunk_size) if conditional else None

    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(args.out + "_tb")  # the first thing written: every check above has passed
    reference_features, _, reference_accuracy = read_real(reference_set, features, data_order, args, classifier)
    measures = metrics.Measures(reference_features, args.kid_subset_size, args.kid_subsets, args.fid_bootstrap, args.seed)
    floor_features, floor_images, floor_accuracy = read_real(floor_set, features, data_order, args, classifier)
    paired_features = floor_features[:n_paired(args)]  # real image i against real image i+1: unrelated pairs
    floor = dict(model="floor", steps="", sampler="real", nfe="", w="", seconds="", checkpoint="",
                 fid_diff="", fid_diff_sd="", kid_diff="", kid_diff_sd="", **accuracy_columns(floor_accuracy, len(floor_set)),
                 **measures(floor_features, metrics.paired_rmse(floor_images, floor_images.roll(-1, 0)),
                              metrics.paired_distances(paired_features, paired_features.roll(-1, 0))))
    print(f"floor (real vs real): FID {floor['fid']:.3f}")
    rows = [floor] + sample_rows(plan, module, info, features, classifier, measures, writer, args, device)
    writer.close()
    elapsed = time.perf_counter() - started, time.process_time() - cpu_started
    write_outputs(rows, args, elapsed, device, guided=dict(reference_accuracy=reference_accuracy) if conditional else None)
    print(f"Wrote {args.out}.md, {args.out}.csv and {args.out}.png ({elapsed[0] / 60:.1f} minutes)")


def accuracy_columns(accuracy, n):
    """The accuracy columns of a row: the fraction and its binomial standard error ('' without a classifier)."""
    if accuracy is None:
        return dict(accuracy="", accuracy_se="")
    return dict(accuracy=accuracy, accuracy_se=(accuracy * (1 - accuracy) / n) ** 0.5)


def sample_rows(plan, module, info, features, classifier, measures, writer, args, device):
    """One row per entry of the plan; each guidance weight's reference (the first entry of its part) first."""
    rows, current, references, reference_rows = [], None, {}, {}
    for path, model_kind, spec, w in plan:
        if current is None or current[0] != path:
            model, ckpt = load_model_from_checkpoint(module, path, device)
            if args.channels_last:
                model.to(memory_format=torch.channels_last)
            current = (path, model, ckpt, guided_network(model, ckpt))
        _, model, ckpt, net = current
        grid = spec_grid(spec, ckpt)
        started = time.perf_counter()
        torch.manual_seed(args.seed)
        conditioning = conditioning_for(module, info[path][2], w, device)
        sample_features, samples, hits = read_samples(net, grid, spec, model, ckpt, features, args, conditioning,
                                                      device, classifier)
        accuracy = None if hits is None else float(hits.double().mean())
        paired_features = sample_features[:n_paired(args)]
        reference = references.setdefault(w, (samples, paired_features))
        row = dict(model=model_kind, steps=int(ckpt["n_timesteps"]), sampler=spec.name, nfe=nfe(grid, net, w),
                   w="" if w is None else w, checkpoint=path, **accuracy_columns(accuracy, args.num_images),
                   **measures(sample_features, metrics.paired_rmse(samples, reference[0]),
                                metrics.paired_distances(paired_features, reference[1])))
        row["hits"] = hits
        row.update(metrics.paired_columns(row, reference_rows.setdefault(w, row)))
        row["seconds"] = round(time.perf_counter() - started, 2)
        rows.append(row)
        guided = "" if w is None else f"w {w:g}, " + (f"accuracy {accuracy:.3f}, " if accuracy is not None else "")
        print(f"{row['model']} ({row['steps']} steps), {LABELS[row['sampler']]}, NFE {row['nfe']}: {guided}"
              f"FID {row['fid']:.3f}, KID {row['kid']:.4g}, paired RMSE {row['paired_rmse']:.4f} ({row['seconds']:.1f} s)")
        tag = f"{model_kind}_{spec.name}" + ("" if w is None else f"_w{w:g}")
        for column in ("fid", "kid", "density", "coverage", "paired_rmse", "paired_feature_distance") + (
                ("accuracy",) if accuracy is not None else ()):
            writer.add_scalar(f"{column}/{tag}", row[column], row["nfe"])
        if samples.shape[1] in (1, 3):  # pictures
            writer.add_images(f"samples/{tag}_nfe{row['nfe']}", (to_channel_order(samples[:64], features.order, "RGB") + 1) / 2, 0)
    return rows


if __name__ == "__main__":
    main()
