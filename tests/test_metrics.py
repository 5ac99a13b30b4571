"""metrics.py: KID, density and coverage, paired agreement, bootstrap error bars, NFE to reach a target,
each against an independent computation (a direct loop, a closed form, or a hand-worked case)."""
import math

import numpy as np
import pytest
import torch

import metrics


def _mmd2_unbiased_loops(a, b):
    """The unbiased MMD^2 written out term by term in numpy, with k(x, y) = (x.y/d + 1)^3."""
    d = a.shape[1]
    k = lambda x, y: (np.dot(x, y) / d + 1) ** 3
    m, n = len(a), len(b)
    aa = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    bb = sum(k(b[i], b[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    ab = sum(k(a[i], b[j]) for i in range(m) for j in range(n)) / (m * n)
    return aa + bb - 2 * ab


def test_mmd2_matches_a_direct_numpy_computation():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(30, 4)), rng.normal(0.3, 1.2, size=(25, 4))
    assert metrics.mmd2_unbiased(a, b) == pytest.approx(_mmd2_unbiased_loops(a, b), rel=1e-12)


def test_mmd2_of_a_resample_runs_over_pairs_of_distinct_original_rows():
    """With the original row of each resampled row given, the within-set sums skip every pair of copies of one
    row (loops here); with distinct ids it is the plain unbiased estimate."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(12, 3)), rng.normal(0.5, 1.0, size=(9, 3))
    i, j = torch.tensor([0, 3, 3, 5, 7, 7, 7, 11]), torch.tensor([1, 1, 2, 8, 4])
    k = lambda x, y: (x @ y / len(x) + 1) ** 3

    def within(x, ids):
        pairs = [(p, q) for p in range(len(ids)) for q in range(len(ids)) if ids[p] != ids[q]]
        return sum(k(x[ids[p]], x[ids[q]]) for p, q in pairs) / len(pairs)

    cross = np.mean([k(a[p], b[q]) for p in i.tolist() for q in j.tolist()])
    expected = within(a, i.tolist()) + within(b, j.tolist()) - 2 * cross
    assert metrics.mmd2_unbiased(a[i.numpy()], b[j.numpy()], i, j) == pytest.approx(expected, rel=1e-10)
    assert metrics.mmd2_unbiased(a, b, torch.arange(12), torch.arange(9)) == pytest.approx(_mmd2_unbiased_loops(a, b), rel=1e-10)


def test_kid_expectation_closed_form_in_one_dimension():
    """For d = 1, k(x, y) = (xy + 1)^3 = x^3 y^3 + 3 x^2 y^2 + 3 xy + 1, so
    MMD^2(P, Q) = (m3P - m3Q)^2 + 3 (m2P - m2Q)^2 + 3 (m1P - m1Q)^2 with m_r the r-th raw moment.
    P = U(-1, 1): m1 = 0, m2 = 1/3, m3 = 0; Q = P shifted by c: m1 = c, m2 = 1/3 + c^2, m3 = c^3 + c.
    The unbiased estimate averages to it over many small samples (within 3 standard errors)."""
    c = 0.3
    expected = (c ** 3 + c) ** 2 + 3 * c ** 4 + 3 * c ** 2
    g = torch.Generator().manual_seed(2)
    values = [metrics.mmd2_unbiased(torch.rand(20, 1, generator=g) * 2 - 1, torch.rand(20, 1, generator=g) * 2 - 1 + c)
              for _ in range(400)]
    mean, se = metrics.mean_and_standard_error(values)
    assert abs(mean - expected) < 3 * se and se < 0.1 * expected


def test_kid_is_unbiased_for_one_distribution():
    """Over many pairs of small samples of one distribution the unbiased MMD^2 averages to 0 within its
    standard error, while the biased (V-statistic) estimate, with the diagonal terms kept, stays clearly above 0."""
    g = torch.Generator().manual_seed(4)
    unbiased, biased = [], []
    for _ in range(400):
        a, b = torch.randn(15, 4, generator=g).double() + 1, torch.randn(15, 4, generator=g).double() + 1
        unbiased.append(metrics.mmd2_unbiased(a, b))
        k = metrics.polynomial_kernel
        biased.append(float(k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean()))
    mean, se = metrics.mean_and_standard_error(unbiased)
    assert abs(mean) < 3 * se
    biased_mean, biased_se = metrics.mean_and_standard_error(biased)
    assert biased_mean > 10 * biased_se


def test_kid_standard_deviation_is_the_spread_over_subsets_drawn_from_both_sets():
    """KID's error bar is the standard deviation of the unbiased MMD^2 over random subsets drawn with replacement
    from both sets: compare it with the spread over subsets drawn here with numpy (two estimates of one quantity,
    300 subsets each), and its mean with the MMD^2 of the whole sets. Subsets as large as a set still vary."""
    rng = np.random.default_rng(10)
    a, b = rng.normal(size=(2000, 2)), rng.normal(0.2, 1.0, size=(2000, 2))
    mean, std, values = metrics.kid(a, b, subset_size=40, n_subsets=300, seed=4)
    assert values.shape == (300,) and std == pytest.approx(float(values.std()))
    spread = np.std([_mmd2_of_resamples(a, b, rng.choice(2000, 40), rng.choice(2000, 40)) for _ in range(300)], ddof=1)
    assert std == pytest.approx(spread, rel=0.2)
    assert abs(mean - _mmd2_unbiased_vectorised(a, b)) < 3 * std / math.sqrt(300)
    small_a, small_b = a[:30], b[:30]
    assert metrics.kid(small_a, small_b, subset_size=1000, n_subsets=20)[1] > 0


def _mmd2_of_resamples(a, b, i, j):
    k = lambda x, y: (x @ y.T / x.shape[1] + 1) ** 3
    distinct_i, distinct_j = i[:, None] != i[None, :], j[:, None] != j[None, :]
    return ((k(a[i], a[i]) * distinct_i).sum() / distinct_i.sum() + (k(b[j], b[j]) * distinct_j).sum() / distinct_j.sum()
            - 2 * k(a[i], b[j]).mean())


def _mmd2_unbiased_vectorised(a, b):
    k = lambda x, y: (x @ y.T / x.shape[1] + 1) ** 3
    m, n = len(a), len(b)
    return ((k(a, a).sum() - np.trace(k(a, a))) / (m * (m - 1)) + (k(b, b).sum() - np.trace(k(b, b))) / (n * (n - 1))
            - 2 * k(a, b).mean())


def test_kid_subsets_are_seeded():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(60, 3)), rng.normal(size=(50, 3))
    first, again, other = (metrics.kid(a, b, subset_size=20, n_subsets=7, seed=s)[2] for s in (1, 1, 2))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_density_and_coverage_hand_worked_case():
    """Real points 0, 1, 3 with k = 1: radii 1, 1, 2. Samples 0.5 and 0.9 each fall in the balls of 0 and 1,
    10 in none: density = 4/(1*3); the balls of 0 and 1 hold a sample, that of 3 does not: coverage = 2/3."""
    real = torch.tensor([[0.0], [1.0], [3.0]])
    fake = torch.tensor([[0.5], [0.9], [10.0]])
    assert metrics.kth_neighbour_distances(real, 1).tolist() == [1.0, 1.0, 2.0]
    for block in (1, 2, 1024):
        density, coverage = metrics.density_coverage(real, fake, k=1, block=block)
        assert density == pytest.approx(4 / 3) and coverage == pytest.approx(2 / 3)


def test_coverage_of_identical_sets_is_one():
    real = torch.randn(100, 5, generator=torch.Generator().manual_seed(6))
    assert metrics.density_coverage(real, real.clone(), k=5)[1] == 1.0


def test_expected_coverage_tends_to_one_minus_two_to_the_minus_k():
    assert metrics.expected_coverage(10 ** 7, 10 ** 7, k=5) == pytest.approx(1 - 2 ** -5, abs=1e-6)
    assert metrics.expected_coverage(6, 6, k=1) == pytest.approx(1 - 5 / 11)  # by hand: 1 - (N-1)/(N+M-1)


def test_density_and_coverage_of_two_samples_of_one_distribution():
    """E[density] = 1 and E[coverage] = 1 - prod_j (N - j)/(N + M - j) (Naeem et al. 2020, Lemma 2)."""
    g = torch.Generator().manual_seed(7)
    n_real, n_fake, k = 40, 60, 5
    densities, coverages = [], []
    for _ in range(300):
        density, coverage = metrics.density_coverage(torch.randn(n_real, 3, generator=g),
                                                     torch.randn(n_fake, 3, generator=g), k=k, block=16)
        densities.append(density)
        coverages.append(coverage)
    mean, se = metrics.mean_and_standard_error(densities)
    assert abs(mean - 1) < 3 * se
    mean, se = metrics.mean_and_standard_error(coverages)
    assert abs(mean - metrics.expected_coverage(n_real, n_fake, k)) < 3 * se


def test_density_drops_for_a_shifted_distribution():
    g = torch.Generator().manual_seed(8)
    real = torch.randn(300, 3, generator=g)
    density, coverage = metrics.density_coverage(real, torch.randn(300, 3, generator=g) + 3)
    assert density < 0.2 and coverage < 0.3


def test_paired_rmse_and_standard_error_by_hand():
    """Image 0 differs by 1 everywhere (RMSE 1); image 1 by 3 in one of its 4 pixels (RMSE sqrt(9/4) = 1.5).
    Mean 1.25; sample standard deviation of (1, 1.5) is sqrt(0.125), over sqrt(2): 0.25."""
    a = torch.zeros(2, 1, 2, 2)
    b = torch.stack([torch.ones(1, 2, 2), torch.tensor([[[3.0, 0.0], [0.0, 0.0]]])])
    rmse = metrics.paired_rmse(a, b)
    assert rmse.tolist() == pytest.approx([1.0, 1.5])
    assert metrics.mean_and_standard_error(rmse) == pytest.approx((1.25, 0.25))
    assert metrics.paired_distances(a, b).tolist() == pytest.approx([2.0, 3.0])
    with pytest.raises(ValueError):
        metrics.paired_rmse(a, b[:1])


def test_bootstrap_resamples_both_sets():
    """The bootstrap standard deviation of mean(a) - mean(b), both sets resampled, is about
    sqrt(var_a / N + var_b / M)."""
    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(400, 1, generator=g), 2 * torch.randn(100, 1, generator=g)
    expected = math.sqrt(float(a.var()) / 400 + float(b.var()) / 100)
    draws = metrics.bootstrap_draws(lambda x, y: float(x.mean() - y.mean()), a, b, n_draws=2000, seed=1)
    assert draws.shape == (2000,) and metrics.spread(draws) == pytest.approx(expected, rel=0.06)


def test_paired_bootstrap_of_two_sets_of_the_same_items():
    """Two sets of one evaluation meet the same resamples: for a' = a + e (item by item), the paired spread of
    mean(a') - mean(a), against one reference b, is sd(e)/sqrt(N), the reference and a's own spread cancelling;
    the unpaired spread is far wider. Means of per-item values pair the same way."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(500, 1, generator=g), torch.randn(300, 1, generator=g)
    e = 0.1 * torch.randn(500, 1, generator=g)
    statistic = lambda x, y: float(x.mean() - y.mean())
    draws_a = metrics.bootstrap_draws(statistic, a, b, n_draws=1500, seed=2)
    draws_shifted = metrics.bootstrap_draws(statistic, a + e, b, n_draws=1500, seed=2)
    assert metrics.paired_std(draws_shifted, draws_a) == pytest.approx(float(e.std()) / math.sqrt(500), rel=0.08)
    assert math.hypot(metrics.spread(draws_a), metrics.spread(draws_shifted)) > 8 * metrics.paired_std(draws_shifted, draws_a)
    means, shifted_means = metrics.bootstrap_means(a, 1500, 2), metrics.bootstrap_means(a + e, 1500, 2)
    assert metrics.spread(means) == pytest.approx(float(a.std()) / math.sqrt(500), rel=0.08)
    assert metrics.paired_std(shifted_means, means) == pytest.approx(float(e.std()) / math.sqrt(500), rel=0.08)


def test_quantiles_by_nearest_rank():
    values = [5, 1, 4, 2, 3, math.inf, 0, 7, 6, 8]
    assert metrics.quantiles(values, (0.16, 0.5, 0.84, 1.0)) == [1, 4, 8, math.inf]  # ranks ceil(p n): 2, 5, 9, 10


def test_nfe_to_reach_interpolates_on_log_nfe():
    curve = [(4, 2.0), (1, 10.0), (2, 5.0)]
    nfe, relation = metrics.nfe_to_reach(curve, 3.5)  # halfway from 5 (2 NFE) to 2 (4 NFE): 2^1.5
    assert relation == "=" and nfe == pytest.approx(2 ** 1.5)
    assert metrics.nfe_to_reach(curve, 5.0) == (2, "=")
    assert metrics.nfe_to_reach(curve, 11.0) == (1, "<=")
    assert metrics.nfe_to_reach(curve, 1.0) == (4, ">")
