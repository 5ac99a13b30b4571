"""What evaluate.py writes: OUT.csv, OUT.md (the headline and every row) and OUT.png, for an unconditional set
(every measure against NFE, the NFE each training-free sampler needs to match a distilled stage) and for a
class-conditional one (every row at each guidance weight: the headline per w, accuracy and KID against w as
Table 1 of Meng et al. 2023, the guidance trade-off plot). Rows are dicts with the keys of COLUMNS; this
module only formats and draws them.
"""
import csv
import os

import torch

import metrics
from metrics import KNN
from samplers import LABELS

COLUMNS = ["model", "steps", "sampler", "nfe", "w", "accuracy", "accuracy_se", "n_samples", "n_reference", "n_paired", "fid", "fid_sd", "kid", "kid_sd",
           "fid_diff", "fid_diff_sd", "kid_diff", "kid_diff_sd", "density", "coverage", "paired_rmse", "paired_rmse_se", "paired_feature_distance",
           "paired_feature_distance_se", "seconds", "checkpoint"]
# (column, error column, axis label, y scale) of each panel of OUT.png
PANELS = [("fid", "fid_sd", "FID", "log"), ("kid", "kid_sd", "KID", "symlog"),
          ("density", None, "density", "linear"), ("coverage", None, "coverage", "linear"),
          ("paired_rmse", "paired_rmse_se", "paired RMSE (pixels, to the reference)", "linear"),
          ("paired_feature_distance", "paired_feature_distance_se", "paired feature distance", "linear")]


# -- the headline ----------------------------------------------------------------------------------

def headline(rows, match_steps, n_draws=50, seed=0):
    """Lines of OUT.md: the NFE at which each training-free sampler of the base model reaches the FID and
    the paired RMSE of the distilled `match_steps`-step model (deterministic DDIM), interpolated in log
    NFE (metrics.nfe_to_reach), and the speed-up NFE/match_steps, each with its paired bootstrap range: the
    crossing found again in every resample that all rows share (FID: the rows' fid_draws; RMSE: the means of
    their per-image RMSE over `n_draws` resamples of the images, seeded by `seed`), its 16th to 84th percentile."""
    targets = [r for r in rows if r["model"] == "distilled" and r["steps"] == match_steps]
    if not targets:
        return [f"No distilled {match_steps}-step stage among --checkpoints: no headline (see --match_steps)."]
    target = next((r for r in targets if r["sampler"] == "ddim"), targets[0])
    lines = [f"NFE each training-free sampler of the base model needs to match the distilled {match_steps}-step model "
             f"({LABELS[target['sampler']]}): FID {target['fid']:.3f} ± {target['fid_sd']:.3f}, paired RMSE "
             f"{target['paired_rmse']:.4f} ± {target['paired_rmse_se']:.4f}. The NFE at which the sampler's curve reaches "
             "that value, interpolated linearly in log NFE; in brackets the 16th–84th percentile of the same crossing "
             "in each paired bootstrap resample (every row and the target resampled with the same image indices); "
             f"speed-up = NFE / {match_steps}; > and ≤: beyond the measured NFE. DDIM's paired curve ends at the "
             "reference itself (RMSE 0 at all steps).", "",
             "| sampler | NFE to match FID | speed-up | NFE to match paired RMSE | speed-up |", "|---|---:|---:|---:|---:|"]
    rmse_draws = {id(r): metrics.bootstrap_means(r["pixel_rmse"], n_draws, seed)
                  for r in rows if r["model"] == "base" or r is target}
    base_samplers = list(dict.fromkeys(r["sampler"] for r in rows if r["model"] == "base"))
    for name in base_samplers:
        curve_rows = [r for r in rows if r["model"] == "base" and r["sampler"] == name]
        cells = []
        for column, draws_of in (("fid", lambda r: r["fid_draws"]), ("paired_rmse", lambda r: rmse_draws[id(r)])):
            reach = metrics.nfe_to_reach([(r["nfe"], r[column]) for r in curve_rows], target[column])
            resampled = [metrics.nfe_to_reach([(r["nfe"], float(draws_of(r)[d])) for r in curve_rows],
                                              float(draws_of(target)[d])) for d in range(len(draws_of(target)))]
            cells += [_nfe_text(reach, resampled, 1), _nfe_text(reach, resampled, match_steps, suffix="×")]
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    return lines


def _nfe_text(reach, resampled, divisor, suffix=""):
    """'9.5 (8.7–10.4)' from the crossing (nfe, relation) and the 16th and 84th percentile of its resamples."""
    def one(nfe, relation):
        sign = {"=": "", "<=": "≤", ">": ">"}[relation]
        return f"{sign}{nfe / divisor:.3g}{suffix}"
    order = {"<=": 0, "=": 1, ">": 2}  # at one NFE, "≤ n" ranks below a crossing at n and "> n" above it
    low, high = metrics.quantiles([(nfe, order[relation], relation) for nfe, relation in resampled])
    value, low, high = one(*reach), one(low[0], low[2]), one(high[0], high[2])
    return value if value == low == high else f"{value} ({low}–{high})"


# -- outputs ---------------------------------------------------------------------------------------

def write_outputs(rows, args, elapsed, device, guided=None):
    """OUT.csv, OUT.md and OUT.png, each written beside its place and renamed into it when complete.
    elapsed: (wall-clock seconds, CPU seconds) of the whole evaluation; guided: None for an unconditional set,
    else {"reference_accuracy": the classifier's accuracy on the reference images or None} (the per-w report)."""
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    written = []
    try:
        with open(_tmp(args.out + ".csv", written), "w", newline="") as f:
            out = csv.DictWriter(f, fieldnames=COLUMNS)
            out.writeheader()
            out.writerows({c: r[c] for c in COLUMNS} for r in rows)
        with open(_tmp(args.out + ".md", written), "w") as f:
            lines = (markdown(rows, args, elapsed, device) if guided is None else
                     guided_markdown(rows, args, elapsed, device, guided["reference_accuracy"]))
            f.write("\n".join(lines) + "\n")
        if guided is None:
            plot(rows, _tmp(args.out + ".png", written), args.match_steps)
        else:
            guided_plot(rows, _tmp(args.out + ".png", written), args.match_steps, guided["reference_accuracy"])
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


def _diff(row, column, digits=None):
    """'+0.412 ± 0.051': a row's measure minus its reference row's, ± the paired bootstrap spread, to `digits`
    decimals (None: three significant digits and two for the spread, as KID is shown); '' for the floor."""
    if row[column + "_diff"] == "":
        return ""
    if digits is None:
        return f"{row[column + '_diff']:+.3g} ± {row[column + '_diff_sd']:.2g}"
    return f"{row[column + '_diff']:+.{digits}f} ± {row[column + '_diff_sd']:.{digits}f}"


def _error_bars(args, floor):
    """The sentence on FID's and KID's error bars (both sets resampled, the same resamples for every row)."""
    size = min(args.kid_subset_size, args.num_images, floor["n_reference"])
    return (f"FID ± the standard deviation over {args.fid_bootstrap} bootstrap resamples of the row's images and of "
            f"the reference images; KID ± the standard deviation over {args.kid_subsets} subsets of {size} images "
            "drawn with replacement from both; every row meets the same resamples and subsets, so a row's FID and KID "
            "minus its reference row's come ± the spread of that difference over them (the paired bootstrap: the "
            f"noise the rows share cancels); density and coverage with k = {KNN};")


def _threads():
    n = torch.get_num_threads()
    return f"{n} thread{'s' if n > 1 else ''}"


def markdown(rows, args, elapsed, device):
    floor = rows[0]
    lines = [f"Measured in {args.features} features against {floor['n_reference']} reference images; "
             f"{args.num_images} samples per row, seed {args.seed}, {args.step_schedule}-uniform steps below "
             f"all steps. Evaluated in {elapsed[0] / 60:.1f} minutes (wall clock; {elapsed[1] / 60:.1f} minutes of CPU time) "
             f"on {device} ({_threads()}).", "",
             "## Headline", ""] + headline(rows, args.match_steps, args.fid_bootstrap, args.seed) + [
             "", "## All rows", "",
             "| model | sampler | NFE | FID | FID − reference | KID | KID − reference | density | coverage | "
             "paired RMSE | paired feature distance |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        steps = f"{r['steps']} step{'s' if r['steps'] != 1 else ''}"
        model = ("floor: real vs real" if r["model"] == "floor" else
                 f"base ({steps})" if r["model"] == "base" else
                 f"re-parameterised base ({steps})" if r["model"] == "reparameterised" else f"distilled, {steps}")
        reference = r is rows[1]
        lines.append(f"| {model} | {LABELS.get(r['sampler'], r['sampler'])}{' (reference)' if reference else ''} | "
                     f"{r['nfe']} | {_pm(r, 'fid', 'fid_sd', 3)} | {_diff(r, 'fid', 3)} | {r['kid']:.4g} ± {r['kid_sd']:.2g} | "
                     f"{_diff(r, 'kid')} | {r['density']:.3f} | {r['coverage']:.3f} | "
                     f"{_pm(r, 'paired_rmse', 'paired_rmse_se', 4)} | "
                     f"{_pm(r, 'paired_feature_distance', 'paired_feature_distance_se', 3)} |")
    lines += ["", _error_bars(args, floor) + " paired measures ± their standard error over the first "
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



# -- the class-conditional report (per guidance weight) ------------------------------------------------

def _curve_name(r):
    """The label of a row's curve across w: model, sampler and NFE."""
    if r["model"] == "base":
        return f"CFG teacher, {LABELS[r['sampler']]}, NFE {r['nfe']}"
    if r["model"] == "w-input":
        return f"w-input model ({r['steps']} steps), {LABELS[r['sampler']]}"
    return f"distilled, {r['steps']} step{'s' if r['steps'] != 1 else ''}, {LABELS[r['sampler']]}"


def _references(rows):
    """ids of the reference rows: each guidance weight's first row (the CFG teacher through all its steps)."""
    first = {}
    for r in rows[1:]:
        first.setdefault(r["w"], id(r))
    return set(first.values())


def _acc(r):
    return "–" if r["accuracy"] == "" else f"{100 * r['accuracy']:.1f} ± {100 * r['accuracy_se']:.1f}"


def _acc_kid(r):
    accuracy = "" if r["accuracy"] == "" else f"{100 * r['accuracy']:.1f}% · "
    return f"{accuracy}{r['kid']:.3g}"


def guided_headline(rows, match_steps):
    """Lines of OUT.md: at each w, the CFG teacher through all its steps against the w-input model, the
    distilled match_steps-step model, the smallest distilled model and the training-free sampler of the CFG
    teacher closest to the teacher (lowest paired RMSE) at 2 x match_steps network calls."""
    weights = list(dict.fromkeys(r["w"] for r in rows[1:]))
    lines = [f"Accuracy (%), KID and paired RMSE to the CFG teacher's all-steps sample at each guidance weight w; "
             f"its {match_steps}-step student is the distilled {match_steps}-step model (--match_steps); the last "
             f"column is the training-free sampler of the CFG teacher closest to it (lowest paired RMSE) at "
             f"{2 * match_steps} network calls ({match_steps} guided steps).", "",
             "| w | CFG teacher | w-input model | distilled, " + f"{match_steps} steps | Δ accuracy (points) | Δ KID "
             "| smallest distilled | best training-free CFG |", "|---:|---|---|---|---:|---:|---|---|"]
    for w in weights:
        at_w = [r for r in rows[1:] if r["w"] == w]
        teacher = at_w[0]
        w_input = next((r for r in at_w if r["model"] == "w-input"), None)
        distilled = [r for r in at_w if r["model"] == "distilled"]
        student = next((r for r in distilled if r["steps"] == match_steps and r["sampler"] == "ddim"),
                       next((r for r in distilled if r["steps"] == match_steps), None))
        smallest = min(distilled, key=lambda r: (r["steps"], r["sampler"] != "ddim"), default=None)
        cfg = [r for r in at_w if r["model"] == "base" and r["nfe"] == 2 * match_steps]
        best = min(cfg, key=lambda r: r["paired_rmse"], default=None)

        def cell(r, name=False):
            if r is None:
                return "–"
            rmse = "" if r is teacher else f", RMSE {r['paired_rmse']:.3f}"
            return (f"{LABELS[r['sampler']]}: " if name else "") + (
                f"{_acc(r)}, KID {r['kid']:.3g} ± {r['kid_sd']:.2g}{rmse} (NFE {r['nfe']})")
        gap = (f"{100 * student['accuracy_diff']:+.1f} ± {100 * student['accuracy_diff_se']:.1f}"
               if student is not None and "accuracy_diff" in student else "–")
        kid_gap = _diff(student, "kid") if student is not None else "–"
        lines.append(f"| {w:g} | {cell(teacher)} | {cell(w_input)} | {cell(student)} | {gap} | {kid_gap} | "
                     f"{cell(smallest)} | {cell(best, name=True)} |")
    lines += ["", f"Δ accuracy: the distilled {match_steps}-step model's minus the CFG teacher's, ± the standard error of "
              "the per-image difference (both rows classify the images of the same noise and label); Δ KID: its KID "
              "minus the teacher's, ± the spread of that difference over the shared subsets. KID measures the "
              "distance to the real images, not to the guided teacher: a sampler that guides less than asked moves "
              "towards the data at large w and gains KID; the paired RMSE measures the distance to the teacher."]
    return lines


def guided_markdown(rows, args, elapsed, device, reference_accuracy):
    floor = rows[0]
    weights = list(dict.fromkeys(r["w"] for r in rows[1:]))
    real = ("" if reference_accuracy is None else
            f" The classifier's accuracy on the {floor['n_reference']} reference images: {100 * reference_accuracy:.1f}%.")
    lines = [f"Measured in {args.features} features against {floor['n_reference']} reference images; "
             f"{args.num_images} samples per row, image i asked for class i mod K (balanced), each row at every "
             f"guidance weight w, seed {args.seed} (the same noise at every w), {args.step_schedule}-uniform steps "
             f"below all steps. NFE counts network calls per image: classifier-free guidance (CFG) makes two per step "
             f"(one batched call), a w-input model one. Accuracy: the fraction of samples that the user module's "
             f"classifier assigns their requested class ± its binomial standard error.{real} Evaluated in "
             f"{elapsed[0] / 60:.1f} minutes (wall clock; {elapsed[1] / 60:.1f} minutes of CPU time) on {device} "
             f"({_threads()}).", "", "## Headline", ""] + guided_headline(rows, args.match_steps) + [
             "", "## Accuracy and KID against w (as Table 1 of Meng et al. 2023)", "",
             "Each cell: accuracy · KID.", "",
             "| model | " + " | ".join(f"w = {w:g}" for w in weights) + " |", "|---|" + "---:|" * len(weights)]
    curves = {}
    for r in rows[1:]:
        curves.setdefault(_curve_name(r), {})[r["w"]] = r
    for name, by_w in curves.items():
        lines.append(f"| {name} | " + " | ".join(_acc_kid(by_w[w]) if w in by_w else "–" for w in weights) + " |")
    lines += ["", "## All rows", "",
              "| model | sampler | NFE | w | accuracy (%) | FID | FID − reference | KID | KID − reference | density | "
              "coverage | paired RMSE | paired feature distance |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    references = _references(rows)
    for r in rows:
        steps = f"{r['steps']} step{'s' if r['steps'] != 1 else ''}"
        model = {"floor": "floor: real vs real", "base": f"CFG teacher ({steps})",
                 "w-input": f"w-input model ({steps})"}.get(r["model"], f"distilled, {steps}")
        w = "" if r["w"] == "" else f"{r['w']:g}"
        reference = id(r) in references
        lines.append(f"| {model} | {LABELS.get(r['sampler'], r['sampler'])}{' (reference)' if reference else ''} | "
                     f"{r['nfe']} | {w} | {_acc(r)} | {_pm(r, 'fid', 'fid_sd', 3)} | {_diff(r, 'fid', 3)} | "
                     f"{r['kid']:.4g} ± {r['kid_sd']:.2g} | {_diff(r, 'kid')} | "
                     f"{r['density']:.3f} | {r['coverage']:.3f} | {_pm(r, 'paired_rmse', 'paired_rmse_se', 4)} | "
                     f"{_pm(r, 'paired_feature_distance', 'paired_feature_distance_se', 3)} |")
    lines += ["", _error_bars(args, floor) + f" paired measures ± their standard error over the first {floor['n_paired']} images, each "
              "sample against the CFG teacher's all-steps DDIM sample of the same noise, label and w (the reference "
              f"row of that w). The floor compares {floor['n_samples']} real images, disjoint from the reference "
              "images, with them (its accuracy: the classifier on those images and their own labels); its paired "
              "measures pair real image i with real image i+1, the level of unrelated images."]
    return lines


def guided_plot(rows, path, match_steps, reference_accuracy):
    """The guidance trade-off: accuracy against KID and against FID, one curve per model and sampler through
    the guidance weights (each point labelled with its w on the teacher's curve), and the paired RMSE to the
    teacher against w. Drawn: the CFG teacher
    through all its steps, the w-input model, and the rows of at most 2 x match_steps network calls; dotted
    the floor, dash-dotted the classifier's accuracy on the reference images. KID's axis is linear up to the
    largest negative KID's size (KID is unbiased: it dips below 0), logarithmic beyond."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor, curves = rows[0], {}
    references = _references(rows)
    for r in rows[1:]:
        if r["accuracy"] != "" and (r["nfe"] <= 2 * match_steps or r["model"] == "w-input" or id(r) in references):
            curves.setdefault(_curve_name(r), []).append(r)
    colours = plt.get_cmap("tab20").colors
    fig, axes = plt.subplots(1, 3, figsize=(20, 6.5), dpi=100)
    for ax, (column, error, label) in zip(axes, (("kid", "kid_sd", "KID"), ("fid", "fid_sd", "FID"))):
        for k, (name, points) in enumerate(curves.items()):
            points = sorted(points, key=lambda r: r["w"])
            distilled = points[0]["model"] != "base"
            line = ax.errorbar([r[column] for r in points], [100 * r["accuracy"] for r in points],
                               xerr=[r[error] for r in points], yerr=[100 * r["accuracy_se"] for r in points],
                               capsize=2, color=colours[k % len(colours)], marker="o" if distilled else "s",
                               ls="-" if distilled else "--", ms=4, label=name)
            if k == 0:  # the teacher: label its points with their w
                for r in points:
                    ax.annotate(f"w={r['w']:g}", (r[column], 100 * r["accuracy"]), fontsize=7,
                                textcoords="offset points", xytext=(4, -10), color=line[0].get_color())
        ax.axvline(floor[column], color="grey", lw=1, ls=":", label="floor: real vs real")
        if reference_accuracy is not None:
            ax.axhline(100 * reference_accuracy, color="grey", lw=1, ls="-.", label="accuracy on the reference images")
        if column == "kid":
            lowest = min([floor["kid"]] + [r["kid"] for points in curves.values() for r in points])
            ax.set_xscale("symlog", linthresh=max(-lowest, 0.1))
        else:
            ax.set_xscale("log")
        ax.set_xlabel(f"{label} (lower is better)")
        ax.set_ylabel("accuracy on the requested class (%)")
        ax.grid(alpha=0.3)
    ax = axes[2]  # how far each sampler lands from the guided teacher's own sample, as w grows
    for k, (name, points) in enumerate(curves.items()):
        points = sorted(points, key=lambda r: r["w"])
        distilled = points[0]["model"] != "base"
        ax.errorbar([r["w"] for r in points], [r["paired_rmse"] for r in points],
                    yerr=[r["paired_rmse_se"] for r in points], capsize=2, color=colours[k % len(colours)],
                    marker="o" if distilled else "s", ls="-" if distilled else "--", ms=4)
    ax.set_yscale("symlog", linthresh=0.01)
    ax.set_xlabel("guidance weight w")
    ax.set_ylabel("paired RMSE to the CFG teacher's all-steps sample")
    ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("The guidance trade-off: accuracy against sample quality as w grows, and the distance to the "
                 "guided teacher, one curve per model and sampler", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
