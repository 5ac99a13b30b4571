"""seeding.image_randn, the per-image noise: the formula its docstring gives, recomputed here in plain Python,
its independence of batch, block and order, and the statistics of a standard normal."""
import math

import numpy as np
import pytest
import torch

import seeding

WORD = (1 << 32) - 1


def lowbias32(x, first_shift=True):
    """Wellons' lowbias32 on a Python int (arbitrary precision, reduced modulo 2^32 by hand)."""
    if first_shift:
        x ^= x >> 16
    x = (x * 0x7FEB352D) & WORD
    x ^= x >> 15
    x = (x * 0x846CA68B) & WORD
    return x ^ (x >> 16)


def reference_value(seed, keys, image, j, numel):
    """Value j of image `image`'s noise, from the docstring of seeding.image_randn, in float64."""
    s0, s1, s2 = (int(w) for w in np.random.SeedSequence([seeding._key(k) for k in (seed, *keys)])
                  .generate_state(3, np.uint32))
    m = (numel + 1) // 2
    image_key = lowbias32(lowbias32(image ^ s0) ^ s1)

    def uniform(counter):
        return (lowbias32(lowbias32(counter ^ s2) ^ image_key, first_shift=False) >> 8) / 2 ** 24

    pair = j % m
    u, u_prime = uniform(pair), uniform(pair + m)
    radius = math.sqrt(-2 * math.log(1 - u))
    return radius * (math.cos if j < m else math.sin)(2 * math.pi * u_prime)


def test_the_hash_is_lowbias32_modulo_2_to_the_32():
    words = np.random.default_rng(0).integers(0, 1 << 32, size=2000, dtype=np.uint64).tolist() + [0, 1, WORD, 1 << 31]
    x = torch.tensor([seeding._signed32(w) for w in words], dtype=torch.int32)
    got = [w & WORD for w in seeding._hash32(x).tolist()]
    assert got == [lowbias32(w) for w in words]


@pytest.mark.parametrize("shape", [[1, 3, 3], [2, 5, 4], [3, 64, 64]])
def test_values_follow_the_documented_formula(shape):
    numel = math.prod(shape)
    images = [0, 7, 123456, (1 << 31) - 1]
    noise = seeding.image_randn(images, shape, 11, "step", 3).flatten(1)
    rng = np.random.default_rng(1)
    for row, image in enumerate(images):
        for j in sorted(set(rng.integers(0, numel, size=6).tolist()) | {0, numel - 1, (numel + 1) // 2 - 1}):
            assert float(noise[row, j]) == pytest.approx(reference_value(11, ("step", 3), image, j, numel), abs=2e-5)


def test_an_image_gets_its_noise_whatever_the_batch_block_or_order():
    shape = [3, 64, 64]  # 6144 pairs: blocks of 5 images on the CPU
    together = seeding.image_randn(range(12), shape, 5, "start")
    alone = torch.cat([seeding.image_randn([i], shape, 5, "start") for i in range(12)])
    shuffled = seeding.image_randn([9, 0, 4], shape, 5, "start")
    assert torch.equal(together, alone)
    assert torch.equal(shuffled, together[[9, 0, 4]])
    assert seeding.image_randn([], shape, 5, "start").shape == (0, 3, 64, 64)
    assert seeding.image_randn([2], shape, 5, "start", dtype=torch.float64).dtype == torch.float64


def test_streams_differ_by_seed_key_and_image():
    base = seeding.image_randn(range(4), [1, 8, 8], 0, "step", 1)
    for other in (seeding.image_randn(range(4), [1, 8, 8], 1, "step", 1),
                  seeding.image_randn(range(4), [1, 8, 8], 0, "step", 2),
                  seeding.image_randn(range(4), [1, 8, 8], 0, "start")):
        assert (base - other).abs().min() > 0
    assert len({tuple(row.tolist()) for row in base.flatten(1)}) == 4


def test_indices_outside_the_supported_range_are_refused():
    for bad in ([-1], [1 << 31]):
        with pytest.raises(ValueError, match="image indices"):
            seeding.image_randn(bad, [1, 2, 2], 0, "start")


def test_standard_normal_statistics_and_no_correlation_between_images_steps_or_neighbours():
    n_images, shape = 2000, [3, 16, 16]
    z = seeding.image_randn(range(n_images), shape, 3, "step", 0).double().flatten(1)
    values = z.flatten()
    n = values.numel()  # 1.5 million
    assert abs(float(values.mean())) < 4 / math.sqrt(n)
    assert abs(float(values.var()) - 1) < 4 * math.sqrt(2 / n)
    assert abs(float((values ** 3).mean())) < 4 * math.sqrt(15 / n)  # skewness 0; Var(z^3) = 15
    assert abs(float((values ** 4).mean()) - 3) < 4 * math.sqrt(96 / n)  # kurtosis 3; Var(z^4) = 105 - 9
    # Kolmogorov-Smirnov distance to the normal CDF on a subsample (critical value at 1e-4: 2.0/sqrt(n))
    sample = values[::15].sort().values
    cdf = 0.5 * (1 + torch.erf(sample / math.sqrt(2)))
    k = torch.arange(1, sample.numel() + 1, dtype=torch.float64) / sample.numel()
    assert float((cdf - k).abs().max()) < 2.0 / math.sqrt(sample.numel())
    bound = 5 / math.sqrt(z.shape[1])  # per pair of rows: correlation of independent normals ~ N(0, 1/d)

    def max_corr(a, b):
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).abs().max())

    assert max_corr(z[:200], z[1:201]) < bound  # image i and image i + 1
    later = seeding.image_randn(range(200), shape, 3, "step", 1).double().flatten(1)
    assert max_corr(z[:200], later) < bound  # one image at two steps
    assert abs(float((z[:, 1:] * z[:, :-1]).mean())) < 5 / math.sqrt(z[:, 1:].numel())  # neighbouring values
    m = z.shape[1] // 2
    assert abs(float((z[:, :m] * z[:, m:]).mean())) < 5 / math.sqrt(z[:, :m].numel())  # the cos and sin halves
