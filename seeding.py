"""Every random draw of the project, derived from a tuple of keys.

A seed is never built by arithmetic (seed * K + rank * M + step collides: rank r at step s would
replay rank 0 at step s + r*M/K). Instead the keys - the user's --seed, a purpose tag, and the
integers that locate the draw (rank, step, epoch, image index, sampling step, ...) - go through
numpy's SeedSequence, whose hash mixes them without collisions in practice.

    derive_seed(seed, "train-step", rank, step)      the global RNG of one optimizer step
    derive_seed(seed, "epoch", epoch)                 the shuffle of one epoch
    image_randn(indices, shape, seed, "start")        image i's starting noise, whatever the batch
    image_randn(indices, shape, seed, "step", k)      image i's noise at sampling step k
"""
import zlib

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


def _key(value):
    """A non-negative integer for SeedSequence: ints as themselves (two's complement for negatives),
    strings through CRC-32 (stable across runs and machines, unlike hash())."""
    if isinstance(value, str):
        return zlib.crc32(value.encode("utf-8")) | (1 << 32)  # bit 32 keeps tags apart from small ints
    return int(value) & _MASK64


def derive_seed(*keys):
    """A 63-bit seed determined by `keys` (ints and strings) alone."""
    state = np.random.SeedSequence([_key(k) for k in keys]).generate_state(1, np.uint64)[0]
    return int(state) >> 1


def generator(*keys, device="cpu"):
    """A torch.Generator seeded with derive_seed(*keys)."""
    return torch.Generator(device=device).manual_seed(derive_seed(*keys))


def image_randn(indices, shape, seed, *keys, dtype=torch.float32):
    """Standard normal noise [len(indices), *shape] on the CPU; row r depends only on
    (seed, indices[r], *keys), so an image's noise does not change with batch or chunk size, or with
    the number of processes that share the images out."""
    shape = list(shape)
    if len(indices) == 0:
        return torch.zeros([0] + shape, dtype=dtype)
    return torch.stack([torch.randn(shape, generator=generator(seed, *keys, int(i)), dtype=dtype) for i in indices])
