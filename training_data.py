"""The training data: an endless, resumable, per-rank sharded stream of seeded samples.

Sample k of the run is a function of (seed, epoch, index) alone: epoch e is a permutation of the data set
seeded by (seed, e), rank r takes every world_size-th index of it, and each item is made with every random
generator seeded from (seed, e, index) - so neither workers, ranks nor a resume change a batch.
"""
import random

import numpy as np
import torch

import seeding


class InfiniteShardSampler(torch.utils.data.Sampler):
    """Endless shuffled keys (index, sample seed) for a SeededDataset: epoch e is a permutation of the
    indices seeded by (seed, e), rank r takes every world_size-th index of it, and the first `start`
    keys of this rank are skipped (resume). The sample seed is derive_seed(seed, "sample", e, index):
    an image's random augmentation depends on (seed, epoch, index) alone, not on the worker that
    loads it, the number of workers or ranks, or where the run was resumed."""

    def __init__(self, n, seed, rank=0, world_size=1, start=0, seeded=True):
        self.n, self.seed, self.rank, self.world_size, self.start = n, seed, rank, world_size, start
        self.seeded = seeded  # False: the sample seed is None (for data that draw no randomness)

    def __iter__(self):
        skip, epoch = self.start, 0
        while True:
            generator = seeding.generator(self.seed, "epoch", epoch)
            shard = torch.randperm(self.n, generator=generator)[self.rank::self.world_size]
            for index in shard[skip:].tolist():
                yield index, seeding.derive_seed(self.seed, "sample", epoch, index) if self.seeded else None
            skip = max(0, skip - len(shard))
            epoch += 1


class SeededDataset(torch.utils.data.Dataset):
    """`dataset` indexed by keys (index, sample seed): item `index` made with torch's CPU random
    generator, Python's `random` and NumPy's global generator all seeded by the sample seed, and the
    caller's generator states restored afterwards. Random augmentations that draw from any of them
    (LMDBImageDataset's flips, torchvision's transforms, a user's own NumPy or `random` code) thus repeat
    exactly with the key, in a DataLoader worker or in the main process. A TensorDataset draws nothing, and
    its items are read without the seeding (about 0.2 ms an item, the whole cost of a small model's step)."""

    def __init__(self, dataset, flip_channels=False):
        self.dataset = dataset
        self.flip_channels = flip_channels  # reverse the channels of 3-channel images (RGB <-> BGR)
        self.draws_randomness = not isinstance(dataset, torch.utils.data.TensorDataset)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, sample_seed = key
        if not self.draws_randomness:
            return self._oriented(*self.dataset[index])
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            random.seed(sample_seed)
            np.random.seed([sample_seed & 0xFFFFFFFF, sample_seed >> 32 & 0xFFFFFFFF])  # NumPy takes 32-bit words
            with torch.random.fork_rng(devices=[], device_type="cpu"):
                torch.default_generator.manual_seed(sample_seed)  # the CPU's alone: a GPU's generator is not touched
                image, label = self.dataset[index]
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
        return self._oriented(image, label)

    def _oriented(self, image, label):
        if self.flip_channels and image.shape[0] == 3:
            image = image.flip(0)
        return image, label


def make_loader(dataset, args, rank, world_size, step, device, flip_channels=False):
    """Batches of args.batch_size from optimizer step `step` on (a resumed run skips what it has seen);
    flip_channels reverses 3-channel images (the data's channel order into the network's)."""
    workers = min(2 * args.batch_size, 8) if args.num_workers < 0 else args.num_workers
    seeded = SeededDataset(dataset, flip_channels)
    sampler = InfiniteShardSampler(len(dataset), args.seed, rank, world_size, start=step * args.batch_size,
                                   seeded=seeded.draws_randomness)
    return torch.utils.data.DataLoader(
        seeded, batch_size=args.batch_size, sampler=sampler, num_workers=workers,
        drop_last=True, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        generator=seeding.generator(args.seed, "loader", rank))
