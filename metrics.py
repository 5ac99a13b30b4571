"""Yardsticks of sample quality beside FID (`fid.py`), all computed from feature sets [N, D] in float64.

- KID (Bińkowski et al., "Demystifying MMD GANs", ICLR 2018): the unbiased estimate of the squared
  maximum mean discrepancy (Gretton et al., "A Kernel Two-Sample Test", JMLR 2012, Lemma 6) with the
  cubic polynomial kernel k(a, b) = (a.b/d + 1)^3, averaged over random subsets drawn from both sets;
  its standard deviation over the subsets is the error bar.
- Density and coverage (Naeem et al., "Reliable Fidelity and Diversity Metrics for Generative
  Models", ICML 2020, Sec. 3): balls around each real feature reaching its k-th nearest real
  neighbour; density counts how many balls each sample falls in (divided by k), coverage the share of
  real balls that hold at least one sample. For two samples of one distribution E[density] = 1 and
  E[coverage] = 1 - prod_{j=1..k} (N - j)/(N + M - j) (their Lemma 2), about 1 - 2^-k for M = N.
- Paired agreement: per-item distances between two aligned sets (a sample and the reference sample
  drawn from the same noise), reported as mean and standard error.
- Measures: all of these for one row of an evaluation, and paired_columns, a row against its reference row.
- Error bars by the bootstrap, both sets resampled; the resamples depend only on the seed and the set sizes,
  so the difference between two rows generated from the same noise has a paired error bar; and the NFE at
  which a curve reaches a target.
"""
import math

import torch

import fid
import seeding

KNN = 5  # k of density and coverage in the evaluation (Naeem et al. 2020)


def _as_float64(x):
    return torch.as_tensor(x).detach().to("cpu", torch.float64)


# -- KID ---------------------------------------------------------------------------------------

def polynomial_kernel(a, b):
    """k(a, b) = (a.b / d + 1)^3 for all pairs of rows: [N, D] x [M, D] -> [N, M] (Bińkowski et al. 2018)."""
    return (a @ b.T / a.shape[1] + 1) ** 3


def mmd2_unbiased(a, b, a_ids=None, b_ids=None):
    """Unbiased MMD^2 between the rows of a [m, D] and b [n, D] (Gretton et al. 2012, Lemma 6):
    sum_{i!=j} k(a_i, a_j)/(m(m-1)) + sum_{i!=j} k(b_i, b_j)/(n(n-1)) - 2 sum_{i,j} k(a_i, b_j)/(mn).
    a_ids, b_ids: where the rows are a resample with repeats, the original row of each: the within-set sums
    then run over the pairs of distinct original rows only (a repeated row paired with itself is no sample of
    k(x, x') for independent x, x')."""
    a, b = _as_float64(a), _as_float64(b)
    m, n = a.shape[0], b.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"MMD^2 needs at least 2 rows in each set, got {m} and {n}")

    def within(x, ids):
        k = polynomial_kernel(x, x)
        if ids is None:
            return (k.sum() - k.diagonal().sum()) / (len(x) * (len(x) - 1))
        distinct = ids[:, None] != ids[None, :]
        return (k * distinct).sum() / distinct.sum()

    return float(within(a, a_ids) + within(b, b_ids) - 2 * polynomial_kernel(a, b).mean())


def kid(a, b, subset_size=1000, n_subsets=100, seed=0):
    """KID between feature sets a [N, D] and b [M, D]: (mean, standard deviation, the values [n_subsets]) of
    the unbiased MMD^2 over `n_subsets` subsets of min(subset_size, N, M) rows of each set, drawn with
    replacement from both sets (so that both vary however large the subset), repeated rows excluded from
    the within-set pairs. The draws depend only on (seed, N, M): sets of one evaluation meet the same
    subsets, and their values compared subset by subset are paired (paired_std)."""
    a, b = _as_float64(a), _as_float64(b)
    size = min(subset_size, a.shape[0], b.shape[0])
    g = seeding.generator(seed, "kid-subsets", a.shape[0], b.shape[0])
    values = []
    for _ in range(n_subsets):
        i, j = torch.randint(a.shape[0], (size,), generator=g), torch.randint(b.shape[0], (size,), generator=g)
        values.append(mmd2_unbiased(a[i], b[j], i, j))
    values = torch.tensor(values, dtype=torch.float64)
    return float(values.mean()), spread(values), values


# -- density and coverage ----------------------------------------------------------------------

def kth_neighbour_distances(x, k, block=1024):
    """Distance from each row of x [N, D] to its k-th nearest other row, in blocks of rows (memory N x block)."""
    x = _as_float64(x)
    if x.shape[0] <= k:
        raise ValueError(f"the k = {k}-th nearest neighbour needs more than {k} rows, got {x.shape[0]}")
    # each row is at distance 0 from itself, the smallest value: the (k+1)-th smallest is the k-th other row
    return torch.cat([torch.cdist(rows, x).kthvalue(k + 1, dim=1).values for rows in x.split(block)])


def density_coverage(real, fake, k=5, block=1024, radii=None):
    """(density, coverage) of the samples `fake` [M, D] against `real` [N, D] (Naeem et al. 2020, Sec. 3).

    With B_i the ball around real_i of radius the distance to its k-th nearest real neighbour:
    density = sum_j #{i: fake_j in B_i} / (k M), coverage = #{i: some fake_j in B_i} / N ("in": strictly
    inside, as the authors' code). Computed in blocks of `block` samples; `radii`: the real set's
    kth_neighbour_distances(real, k) when already known (they depend on the real set only)."""
    real, fake = _as_float64(real), _as_float64(fake)
    radii = kth_neighbour_distances(real, k, block) if radii is None else _as_float64(radii)
    inside = 0
    nearest = torch.full_like(radii, math.inf)
    for rows in fake.split(block):
        distances = torch.cdist(rows, real)  # [block, N]
        inside += int((distances < radii).sum())
        nearest = torch.minimum(nearest, distances.min(dim=0).values)
    return inside / (k * fake.shape[0]), float((nearest < radii).double().mean())


def expected_coverage(n_real, n_fake, k=5):
    """E[coverage] for two samples of one continuous distribution (Naeem et al. 2020, Lemma 2):
    1 - prod_{j=1..k} (N - j)/(N + M - j)."""
    return 1 - math.prod((n_real - j) / (n_real + n_fake - j) for j in range(1, k + 1))


# -- paired agreement ----------------------------------------------------------------------------

def paired_distances(a, b):
    """Euclidean distance between row i of a and row i of b, for images or features [N, ...] -> [N]."""
    a, b = _as_float64(a), _as_float64(b)
    if a.shape != b.shape:
        raise ValueError(f"paired sets must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return (a - b).flatten(1).norm(dim=1)


def paired_rmse(a, b):
    """Root mean squared difference per item: ||a_i - b_i|| / sqrt(number of values per item) -> [N]."""
    return paired_distances(a, b) / math.sqrt(_as_float64(a)[0].numel())


def mean_and_standard_error(values):
    """(mean, standard error = sample standard deviation / sqrt(n)) of a 1-D set of values."""
    values = _as_float64(values).flatten()
    if values.numel() < 2:
        raise ValueError(f"a standard error needs at least 2 values, got {values.numel()}")
    return float(values.mean()), float(values.std() / math.sqrt(values.numel()))


# -- error bars and curves -----------------------------------------------------------------------

def bootstrap_draws(statistic, a, b, n_draws=50, seed=0):
    """statistic(a*, b*) over `n_draws` bootstrap resamples [n_draws] (Efron & Tibshirani 1993, Sec. 6.2): a* the
    N rows of a [N, D] drawn with replacement, b* likewise from b [M, D]. The draws depend only on (seed, N, M),
    so every set of one evaluation meets the same resamples: row i of two sets generated from the same noise
    stays paired, and the spread of their difference draw by draw (paired_std) is the paired bootstrap."""
    a, b = _as_float64(a), _as_float64(b)
    g = seeding.generator(seed, "bootstrap", a.shape[0], b.shape[0])
    draws = []
    for _ in range(n_draws):
        i, j = torch.randint(a.shape[0], (a.shape[0],), generator=g), torch.randint(b.shape[0], (b.shape[0],), generator=g)
        draws.append(statistic(a[i], b[j]))
    return torch.tensor(draws, dtype=torch.float64)


def bootstrap_means(values, n_draws=50, seed=0):
    """The mean of `values` [N] over `n_draws` bootstrap resamples of its N items [n_draws]; the draws depend only
    on (seed, N), so per-item values of two sets over the same items (paired RMSE to one reference) stay paired."""
    values = _as_float64(values).flatten()
    g = seeding.generator(seed, "bootstrap-means", values.numel())
    return torch.stack([values[torch.randint(values.numel(), (values.numel(),), generator=g)].mean()
                        for _ in range(n_draws)])


def spread(draws):
    """The standard deviation of a statistic's draws [n] (0 for a single draw)."""
    draws = _as_float64(draws)
    return float(draws.std()) if draws.numel() > 1 else 0.0


def paired_std(draws, reference_draws):
    """The standard deviation of statistic - reference statistic over paired draws (the same resamples)."""
    return spread(_as_float64(draws) - _as_float64(reference_draws))


def quantiles(values, probabilities=(0.16, 0.84)):
    """Empirical quantiles of a list of numbers (the nearest-rank rule on the sorted values; inf allowed)."""
    ordered = sorted(values)
    return [ordered[min(len(ordered) - 1, max(0, math.ceil(p * len(ordered)) - 1))] for p in probabilities]


def nfe_to_reach(curve, target):
    """The NFE at which a curve [(nfe, value), ...] (lower is better) first reaches `target`,
    interpolated linearly in log NFE between the last point above and the first point at or below it.
    Returns (nfe, relation): "=" for an interpolated crossing, "<=" when the curve's first point is
    already at or below the target (nfe: that point's NFE), ">" when no point reaches it (nfe: the
    largest NFE of the curve)."""
    points = sorted(curve)
    if not points:
        raise ValueError("an empty curve reaches nothing")
    if points[0][1] <= target:
        return points[0][0], "<="
    for (n0, v0), (n1, v1) in zip(points, points[1:]):
        if v1 <= target:
            fraction = (v0 - target) / (v0 - v1)
            return math.exp(math.log(n0) + fraction * (math.log(n1) - math.log(n0))), "="
    return points[-1][0], ">"


# -- the measures of one row of an evaluation ---------------------------------------------------------

class Measures:
    """Every measure of evaluate.py's rows against one set of reference features: FID (fid.py) and its bootstrap
    draws, KID and its subsets, density and coverage, and the paired values' means and standard errors."""

    def __init__(self, reference, kid_subset_size=1000, kid_subsets=100, fid_bootstrap=50, seed=0):
        self.reference = reference
        self.kid_subset_size, self.kid_subsets, self.fid_bootstrap, self.seed = kid_subset_size, kid_subsets, fid_bootstrap, seed
        self.radii = kth_neighbour_distances(reference, KNN)

    def __call__(self, features, pixel_rmse, feature_distance):
        """A row's measures from its features [N, D] and the per-image paired values [n_paired] (None, None: no
        paired columns, blank); beside the
        columns, the draws behind its error bars (fid_draws, kid_draws, the per-image pixel_rmse), which depend
        only on (seed, N, reference size): rows of one evaluation compared draw by draw are paired."""
        kid_mean, kid_sd, kid_draws = kid(features, self.reference, self.kid_subset_size, self.kid_subsets, self.seed)
        fid_draws = bootstrap_draws(fid.fid_from_features, features, self.reference, self.fid_bootstrap, self.seed)
        density, coverage = density_coverage(self.reference, features, KNN, radii=self.radii)
        unpaired = ("", "") if pixel_rmse is None else None  # no images of the same noise to pair with
        rmse, rmse_se = unpaired or mean_and_standard_error(pixel_rmse)
        distance, distance_se = unpaired or mean_and_standard_error(feature_distance)
        return dict(fid=fid.fid_from_features(features, self.reference), fid_sd=spread(fid_draws),
                    kid=kid_mean, kid_sd=kid_sd, density=density, coverage=coverage, paired_rmse=rmse,
                    paired_rmse_se=rmse_se, paired_feature_distance=distance, paired_feature_distance_se=distance_se,
                    n_samples=features.shape[0], n_reference=self.reference.shape[0], n_paired=0 if unpaired else pixel_rmse.shape[0],
                    fid_draws=fid_draws, kid_draws=kid_draws, pixel_rmse=None if unpaired else _as_float64(pixel_rmse))


def paired_columns(row, reference):
    """FID and KID of a row minus those of its reference row (the all-steps DDIM of the same noise and w), each
    ± the standard deviation of the difference over the shared resamples (the paired bootstrap); with a
    classifier, the accuracy minus the reference's ± the standard error of the per-image difference."""
    accuracy = {}
    if row.get("hits") is not None and reference.get("hits") is not None:
        diff, diff_se = mean_and_standard_error(row["hits"].double() - reference["hits"].double())
        accuracy = dict(accuracy_diff=diff, accuracy_diff_se=diff_se)
    return dict(**accuracy, fid_diff=row["fid"] - reference["fid"],
                fid_diff_sd=paired_std(row["fid_draws"], reference["fid_draws"]), kid_diff=row["kid"] - reference["kid"],
                kid_diff_sd=paired_std(row["kid_draws"], reference["kid_draws"]))
