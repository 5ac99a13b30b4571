"""Every random draw of the project, derived from a tuple of keys.

A seed is never built by arithmetic (seed * K + rank * M + step collides: rank r at step s would
replay rank 0 at step s + r*M/K). Instead the keys - the user's --seed, a purpose tag, and the
integers that locate the draw (rank, step, epoch, image index, sampling step, ...) - go through
numpy's SeedSequence, whose hash mixes them without collisions in practice.

    derive_seed(seed, "train-step", rank, step)      the global RNG of one optimizer step
    derive_seed(seed, "epoch", epoch)                 the shuffle of one epoch
    image_randn(indices, shape, seed, "start")        image i's starting noise, whatever the batch
    image_randn(indices, shape, seed, "step", k)      image i's noise at sampling step k

Per-image noise is counter-based (the idea of Salmon et al., "Parallel Random Numbers: As Easy as 1, 2, 3",
SC 2011): value j of image i is a hash of (stream, i, j), so a whole batch is drawn on the model's device
in a few elementwise operations, and image i's noise is the same at any batch, chunk or process count,
on any device.
"""
import math
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


def _signed32(word):
    """A 32-bit word as the int32 value of the same bits."""
    return word - (1 << 32) if word >= 1 << 31 else word


_BLOCK = 1 << 15  # words of u (and of u') per block on the CPU
_ROUNDS = ((16, 0x7FEB352D), (15, 0x846CA68B), (16, None))  # (right shift, then multiplier) of lowbias32


def _hash32(x, scratch=None, rounds=_ROUNDS):
    """Wellons' "lowbias32" (github.com/skeeto/hash-prospector), a bijection of 32-bit words, on an int32
    tensor in place: x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16, the products
    wrapping modulo 2^32 and each right shift made logical by a mask. scratch: a tensor like x for the shifted
    copies (default: a new one); rounds: a tail of _ROUNDS, where the input is already well mixed."""
    scratch = torch.empty_like(x) if scratch is None else scratch
    for shift, multiplier in rounds:
        if shift:
            torch.bitwise_right_shift(x, shift, out=scratch)
            x.bitwise_xor_(scratch.bitwise_and_((1 << (32 - shift)) - 1))
        if multiplier is not None:
            x.mul_(_signed32(multiplier))
    return x


def image_randn(indices, shape, seed, *keys, dtype=torch.float32, device="cpu"):
    """Standard normal noise [len(indices), *shape] on `device`; row r depends only on (seed, indices[r], *keys),
    so an image's noise does not change with batch or chunk size, with the number of processes that share
    the images out, or with the device.

    The stream (seed, *keys) gives three 32-bit words s0, s1, s2 (derive_seed's hash). Image i's key is
    a_i = h(h(i ^ s0) ^ s1) and its word at counter c is g(h(c ^ s2) ^ a_i), h the bijection _hash32 and g the
    same without its first xorshift (both of its inputs are hashes already): for a fixed counter, distinct images
    get distinct words, and for a fixed image, distinct counters do. With
    m = ceil(numel / 2), the top 24 bits of words j and j + m become uniforms u, u' in [0, 1), and values j and
    j + m of the image are r cos(2 pi u') and r sin(2 pi u') with r = sqrt(-2 ln(1 - u)) (Box & Muller, 1958),
    in float32: |values| stay below sqrt(48 ln 2) = 5.8, as with torch.randn's 24-bit uniforms on the CPU.
    On the CPU the images go in blocks of about 2^15 pairs, which stay in cache."""
    shape = list(shape)
    count = math.prod(shape)
    half = (count + 1) // 2
    indices = [int(i) for i in indices]
    if indices and not 0 <= min(indices) <= max(indices) < 1 << 31:
        raise ValueError(f"image indices must lie in 0..{(1 << 31) - 1}")
    words = [_signed32(w) for w in np.random.SeedSequence([_key(k) for k in (seed, *keys)]).generate_state(3, np.uint32).tolist()]
    index = torch.tensor(indices, dtype=torch.int32, device=device)
    image_key = _hash32(_hash32(index ^ words[0]) ^ words[1])
    counter = _hash32(torch.arange(2 * half, dtype=torch.int32, device=device).view(2, 1, half) ^ words[2])
    noise = torch.empty(len(indices), 2, half, device=device)
    rows = max(1, _BLOCK // half) if index.device.type == "cpu" else len(indices)  # CPU: blocks that stay in cache
    word = scratch = None
    for start in range(0, len(indices), rows):
        block_keys = image_key[start:start + rows]
        if word is None or word.shape[1] != len(block_keys):
            word, scratch = (torch.empty(2, len(block_keys), half, dtype=torch.int32, device=device) for _ in range(2))
        torch.bitwise_xor(counter, block_keys.view(1, -1, 1), out=word)  # [2, rows, m]: the words of u and of u'
        _hash32(word, scratch, ((0, 0x7FEB352D),) + _ROUNDS[1:])  # both inputs are hashes: no first shift
        torch.bitwise_right_shift(word, 8, out=scratch).bitwise_and_(0xFFFFFF)
        uniform = word.view(torch.float32).copy_(scratch).mul_(2.0 ** -24)  # the top 24 bits, exact in float32
        radius = uniform[0].neg_().log1p_().mul_(-2.0).sqrt_()  # of 1 - u, in (0, 1]
        angle = uniform[1].mul_(2 * math.pi)
        out = noise[start:start + rows]
        torch.mul(radius, torch.cos(angle, out=scratch[0].view(torch.float32)), out=out[:, 0])
        torch.mul(radius, angle.sin_(), out=out[:, 1])
    noise = noise.view(len(indices), 2 * half)[:, :count]
    return noise.reshape([len(indices)] + shape).to(dtype)
