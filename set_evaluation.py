"""evaluate.py --samples: the measures of sample sets written elsewhere (image_sets.py), for FID-50k runs where
sampling runs on many GPUs and evaluation on others, or after.

Each set and the reference are read block by block (a sample folder's shards); under torchrun, block b is read
and passed through the feature network by rank b mod W, and every round of W blocks is gathered to rank 0, which
alone holds the features (50,000 x 2048 in float64 is 0.8 GB) and computes the measures once the other ranks have
left. Image i of every set is kept only while its block is read, but for the first --num_paired images of each
set (the paired measures).

Rows are the sets in the order given; the first is the reference row of the paired measures. Every row meets the
same FID bootstrap resamples and KID subsets when the sets have equal sizes, so its FID and KID minus the first
row's come with the paired spread; pixel RMSE and feature distance to the first row, image by image, are given
for sets of sample.py drawn with the same seed, image count and image shape (the same noise), and left blank
otherwise. With a classifier (a class-conditional set, the module's make_classifier()), the accuracy on the
labels each set records.
"""
import csv
import io
import os
import time

import torch
import torch.distributed as dist

import metrics
import sample_shards
from cli import UserError
from features import Classifier, FeatureSpace
from image_sets import DatasetSet, ImageSetError, open_set
from runtime import RunContext
from user_modules import data_channel_order, make_user_dataset, reference_data, to_channel_order

COLUMNS = ["set", "checkpoint", "sampler", "steps", "seed", "guidance", "n_samples", "n_reference", "n_paired",
           "fid", "fid_sd", "fid_diff", "fid_diff_sd", "kid", "kid_sd", "kid_diff", "kid_diff_sd", "density",
           "coverage", "paired_rmse", "paired_rmse_se", "paired_feature_distance", "paired_feature_distance_se",
           "accuracy", "accuracy_se", "accuracy_diff", "accuracy_diff_se"]


def reference_set(module, args, data_order):
    """The real images every set is measured against: --reference (a sample folder or npz; 'train' for the whole of
    make_dataset()), or as evaluate.py --checkpoints takes them (make_test_dataset(), or the last --held_out images
    of make_dataset())."""
    if args.reference not in (None, "train"):
        return open_set(args.reference, args.chunk_size)
    if args.reference == "train":
        dataset = make_user_dataset(module)
        return DatasetSet(dataset, f"{module.__name__}.make_dataset()", args.chunk_size, data_order, args.num_workers)
    reference, name, _ = reference_data(module, args.held_out)
    return DatasetSet(reference, name, args.chunk_size, data_order, args.num_workers)


@torch.no_grad()
def gathered_features(image_set, features, ctx, classifier=None):
    """On rank 0, (features [N, D] float64 in image order, per image whether the classifier assigns it its label
    [N] or None); None on the other ranks. Block b is extracted by rank b mod W; each round of W blocks is padded
    to the largest and all-gathered."""
    blocks, width = image_set.blocks(), ctx.world_size
    scored = classifier is not None and image_set.has_labels
    parts = []
    for first in range(0, len(blocks), width):
        local = None
        if first + ctx.rank < len(blocks):
            start, end = blocks[first + ctx.rank]
            images = to_channel_order(image_set.images(start, end), image_set.channel_order, features.order)
            local = features(images)
            if scored:
                hits = classifier.correct(images, image_set.labels(start, end), features.order)
                local = torch.cat([local, hits.double()[:, None]], 1)
        if not ctx.distributed:
            parts.append(local)
            continue
        rows, cols = (int(v) for v in ctx.all_max([0 if local is None else len(local), 0 if local is None else local.shape[1]]))
        counts = [end - start for start, end in blocks[first:first + width]]
        padded = torch.zeros(rows, cols, dtype=torch.float64, device=ctx.device)
        if local is not None:
            padded[:len(local)] = local.to(ctx.device)
        gathered = [torch.empty_like(padded) for _ in range(width)]
        dist.all_gather(gathered, padded)
        if ctx.is_main:
            parts += [g[:n].cpu() for g, n in zip(gathered, counts)]
    if not ctx.is_main:
        return None
    values = torch.cat(parts)
    return (values[:, :-1], values[:, -1].bool()) if scored else (values, None)


def first_images(image_set, n, order):
    """The first n images of a set, in channel order `order`, read block by block."""
    kept = []
    for start, end in image_set.blocks():
        if start >= n:
            break
        kept.append(to_channel_order(image_set.images(start, end)[:n - start], image_set.channel_order, order))
    return torch.cat(kept)


def same_noise(a, b):
    """Whether two sets were drawn from the same noise: sample folders of one seed, image count and shape."""
    keys = ("seed", "num_images", "image_shape")
    return bool(a.info) and bool(b.info) and all(a.info.get(k) == b.info.get(k) for k in keys)


def describe(image_set):
    """The CSV columns saying what a set is, from its manifest (blank for an npz or a data set)."""
    info = image_set.info
    checkpoint = info.get("checkpoint") or {}
    return dict(set=image_set.name, checkpoint=checkpoint.get("sha256", "")[:12], sampler=info.get("sampler", ""),
                steps=len(info["time_labels"]) if "time_labels" in info else "", seed=info.get("seed", ""),
                guidance="" if info.get("guidance") is None else info["guidance"])


def main(args, module):
    """Score the sets of --samples against the reference and write OUT.csv and OUT.md (rank 0)."""
    started = time.perf_counter()
    ctx = RunContext(args)
    try:
        data_order = data_channel_order(module)
        reference = reference_set(module, args, data_order)
        sets = [open_set(path, args.chunk_size) for path in args.samples]
    except ImageSetError as e:
        raise UserError(str(e)) from None
    if reference.num_images <= metrics.KNN:
        raise UserError(f"the reference {reference.name} has {reference.num_images} images; density and coverage "
                        f"need more than {metrics.KNN}")
    for s in sets:
        if s.num_images < 2:
            raise UserError(f"{s.name} holds {s.num_images} image; FID and KID need at least 2")
        if s.image_shape != reference.image_shape:
            raise UserError(f"{s.name} holds images of shape {s.image_shape}, the reference {reference.name} "
                            f"{reference.image_shape}: they cannot be compared")
    features = FeatureSpace(module, args.features, ctx.device, data_order, args.chunk_size, args.inception_weights)
    conditional = any(s.has_labels for s in sets)
    classifier = Classifier.of(module, ctx.device, data_order, args.chunk_size) if conditional else None

    reference_features, _ = gathered_features(reference, features, ctx) or (None, None)
    sample_features = [gathered_features(s, features, ctx, classifier) for s in sets]
    ctx.close()  # the measures are rank 0's alone: no process waits on it
    if not ctx.is_main:
        return
    measures = metrics.Measures(reference_features, args.kid_subset_size, args.kid_subsets, args.fid_bootstrap, args.seed)
    n = min(args.num_paired, sets[0].num_images)  # sets paired with the first have its size
    first = first_images(sets[0], n, features.order)
    rows = []
    for s, (row_features, hits) in zip(sets, sample_features):
        if same_noise(s, sets[0]):
            images = first if s is sets[0] else first_images(s, n, features.order)
            paired = metrics.paired_rmse(images, first), metrics.paired_distances(row_features[:n], sample_features[0][0][:n])
        else:
            paired = None, None
        row = dict(**describe(s), **measures(row_features, *paired), hits=hits)
        if hits is not None:
            row.update(accuracy=float(hits.double().mean()), accuracy_se=metrics.mean_and_standard_error(hits)[1])
        first_row = rows[0] if rows else row
        if row["n_samples"] == first_row["n_samples"]:  # the same resamples: paired differences
            row.update(metrics.paired_columns(row, first_row))
        rows.append(row)
        print(f"{s.name}: FID {row['fid']:.3f} ± {row['fid_sd']:.3f}, KID {row['kid']:.4g} ({row['n_samples']} images)")
    write_report(rows, args, reference, features, time.perf_counter() - started, ctx)
    print(f"Wrote {args.out}.csv and {args.out}.md")


def _cell(row, column, digits, error=None):
    value = row.get(column, "")
    if value == "" or value is None:
        return ""
    text = f"{value:+.{digits}f}" if column.endswith("_diff") else f"{value:.{digits}f}"
    return text + (f" ± {row[error]:.{digits}f}" if error and row.get(error, "") != "" else "")


def write_report(rows, args, reference, features, seconds, ctx):
    """OUT.csv (every column of COLUMNS) and OUT.md (the table and how it was measured), each written whole."""
    table = io.StringIO()
    out = csv.DictWriter(table, fieldnames=COLUMNS, extrasaction="ignore")
    out.writeheader()
    out.writerows({c: ("" if r.get(c) is None else r.get(c, "")) for c in COLUMNS} for r in rows)
    accuracy = any(r.get("accuracy", "") != "" for r in rows)
    lines = [f"{len(rows)} sample sets against {rows[0]['n_reference']} reference images ({reference.name}), in the "
             f"features of {features.described}; read by {ctx.world_size} process{'es' if ctx.world_size > 1 else ''} "
             f"on {ctx.device}, {seconds / 60:.1f} minutes.", "",
             "| set | sampler | steps | images | FID | FID − first | KID | KID − first | density | coverage | paired RMSE |"
             + (" accuracy | accuracy − first |" if accuracy else ""),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if accuracy else "")]
    for r in rows:
        lines.append(f"| {r['set']} | {r['sampler']} | {r['steps']} | {r['n_samples']} | {_cell(r, 'fid', 3, 'fid_sd')} | "
                     f"{_cell(r, 'fid_diff', 3, 'fid_diff_sd')} | {_cell(r, 'kid', 5, 'kid_sd')} | "
                     f"{_cell(r, 'kid_diff', 5, 'kid_diff_sd')} | {r['density']:.3f} | {r['coverage']:.3f} | "
                     f"{_cell(r, 'paired_rmse', 4, 'paired_rmse_se')} |"
                     + (f" {_cell(r, 'accuracy', 3, 'accuracy_se')} | {_cell(r, 'accuracy_diff', 3, 'accuracy_diff_se')} |"
                        if accuracy else ""))
    lines += ["", f"FID ± the standard deviation over {args.fid_bootstrap} bootstrap resamples of the set and of the "
              f"reference; KID ± the standard deviation over {args.kid_subsets} subsets of up to {args.kid_subset_size} "
              "images drawn with replacement from both; a set of the first set's size meets the same resamples, so its "
              "differences to the first come ± their paired spread (blank for sets of other sizes). Paired RMSE: "
              f"pixel RMSE to the first set's image of the same index over the first {rows[0]['n_paired'] or 'no'} "
              "images, for sets of sample.py with the first set's seed, count and shape (the same noise)."]
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        for suffix, text in ((".csv", table.getvalue()), (".md", "\n".join(lines) + "\n")):
            sample_shards.write_atomically(args.out + suffix, lambda f: f.write(text.encode()))
    except OSError as e:
        raise UserError(f"cannot write {args.out}.* ({e.strerror or e})") from None
