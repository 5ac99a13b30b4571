"""Random flips that repeat exactly: each image's flip depends on (seed, epoch, index) alone, so a
loader restarted at step k, a loader with DataLoader workers and one without, and a resumed
training run all see the same images."""
import numpy as np
import pytest
import torch
from PIL import Image

import seeding
from lmdb_data import LMDBImageDataset, LMDBWriter, encode_image, image_key
from test_resume import assert_same_tensors, load
from train_flags import train_argument_parser
from training_data import InfiniteShardSampler, SeededDataset, make_loader

N_IMAGES, SIZE, BATCH, SEED = 7, 8, 3, 3  # 7 images in batches of 3: batches straddle epochs


@pytest.fixture(scope="module")
def lmdb_path(tmp_path_factory):
    """N_IMAGES pictures of SIZE x SIZE, each a different colour on its left half only: every
    picture and every mirror image is distinct, so a loaded image tells its index and its flip."""
    path = tmp_path_factory.mktemp("data") / "flips"
    with LMDBWriter(path) as writer:
        for index in range(N_IMAGES):
            pixels = np.zeros((SIZE, SIZE, 3), np.uint8)
            pixels[:, :SIZE // 2] = [40 * index, 255 - 30 * index, 100]
            writer.put(image_key(SIZE, index), encode_image(Image.fromarray(pixels), SIZE))
        writer.finish(N_IMAGES)
    return path


def batches(lmdb_path, num_workers, start_step, num_steps, seed=SEED):
    """The images of steps start_step .. start_step + num_steps - 1 from training_data.make_loader."""
    args = train_argument_parser("").parse_args(
        ["--module", "toy_u", "--name", "n", "--dname", "d", "--device", "cpu", "--seed", str(seed),
         "--batch_size", str(BATCH), "--num_workers", str(num_workers)])
    loader = iter(make_loader(LMDBImageDataset(lmdb_path, SIZE, flip=True), args, 0, 1, start_step,
                              torch.device("cpu")))
    return [next(loader)[0] for _ in range(num_steps)]


def identify(images, lmdb_path):
    """(index, flipped) of each image, found by comparing with the stored pictures."""
    plain = LMDBImageDataset(lmdb_path, SIZE, flip=False)
    candidates = {(i, f): plain[i][0].flip(-1) if f else plain[i][0] for i in range(N_IMAGES) for f in (False, True)}
    found = []
    for image in images:
        matches = [key for key, candidate in candidates.items() if torch.equal(image, candidate)]
        assert len(matches) == 1
        found.append(matches[0])
    return found


def expected_flip(seed, epoch, index):
    """The contract: the first draw of a generator seeded by derive_seed(seed, "sample", epoch, index)."""
    generator = torch.Generator().manual_seed(seeding.derive_seed(seed, "sample", epoch, index))
    return bool(torch.rand((), generator=generator) < 0.5)


def test_a_loader_restarted_at_step_k_gives_the_uninterrupted_images_with_two_workers(lmdb_path):
    k, n = 5, 12
    whole = batches(lmdb_path, num_workers=2, start_step=0, num_steps=n)
    resumed = batches(lmdb_path, num_workers=2, start_step=k, num_steps=n - k)
    assert all(torch.equal(a, b) for a, b in zip(whole[k:], resumed))
    flips = {flipped for _, flipped in identify(torch.cat(resumed), lmdb_path)}
    assert flips == {False, True}  # the compared steps hold flipped and unflipped images


def test_flips_vary_and_depend_on_seed_epoch_and_index_only(lmdb_path):
    steps = 12
    in_process = identify(torch.cat(batches(lmdb_path, num_workers=0, start_step=0, num_steps=steps)), lmdb_path)
    assert identify(torch.cat(batches(lmdb_path, num_workers=2, start_step=0, num_steps=steps)), lmdb_path) == in_process
    flips = {}
    for position, (index, flipped) in enumerate(in_process):
        epoch = position // N_IMAGES
        flips[epoch, index] = flipped
        assert flipped == expected_flip(SEED, epoch, index)
    assert sorted(index for epoch, index in flips if epoch == 0) == list(range(N_IMAGES))  # epochs are permutations
    assert 0 < sum(flips.values()) < len(flips)
    assert any(flips[0, i] != flips[1, i] for i in range(N_IMAGES))  # an image's flip changes with the epoch
    other_seed = identify(torch.cat(batches(lmdb_path, num_workers=0, start_step=0, num_steps=steps, seed=4)), lmdb_path)
    observed = [flipped for _, flipped in other_seed]
    assert observed == [expected_flip(4, p // N_IMAGES, i) for p, (i, _) in enumerate(other_seed)]
    assert observed != [expected_flip(SEED, p // N_IMAGES, i) for p, (i, _) in enumerate(other_seed)]
    # Rank 1 of 2 sees the flips that one process sees for the same (epoch, index).
    dataset = SeededDataset(LMDBImageDataset(lmdb_path, SIZE, flip=True))
    shard = len(range(1, N_IMAGES, 2))
    keys = iter(InfiniteShardSampler(N_IMAGES, SEED, rank=1, world_size=2))
    rng_before = torch.get_rng_state()
    for position in range(2 * shard):
        [(index, flipped)] = identify([dataset[next(keys)][0]], lmdb_path)
        assert flipped == flips[position // shard, index]
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's generator is left as it was


FLIPS_MODULE = """
import torch
from torch import nn

from lmdb_data import LMDBImageDataset


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3 * {size} * {size} + 1, 16), nn.SiLU(), nn.Linear(16, 3 * {size} * {size}))
        self.image_size = [1, 3, {size}, {size}]

    def forward(self, x, t):
        features = torch.cat([x.flatten(1), t.float().reshape(-1, 1) / 16], dim=1)
        return self.net(features).reshape(x.shape)


def make_model():
    return TinyNet()


def make_dataset():
    return LMDBImageDataset({path!r}, {size}, flip=True)
"""


def test_training_resumed_with_two_workers_and_flips_is_bit_exact(run, tmp_path, lmdb_path):
    (tmp_path / "flips_u.py").write_text(FLIPS_MODULE.format(size=SIZE, path=str(lmdb_path)))
    common = ["train.py", "--module", "flips_u", "--name", "flips", "--num_timesteps", 16, "--num_iters", 12,
              "--batch_size", 4, "--seed", SEED, "--ema_decay", 0.9, "--device", "cpu", "--log_images", 1]
    run(*common, "--dname", "whole", "--num_workers", 2)
    run(*common, "--dname", "halves", "--num_workers", 2, "--stop_at", 6)
    assert load(tmp_path / "checkpoints/flips/halves/checkpoint.pt")["step"] == 6
    run(*common, "--dname", "halves", "--num_workers", 2,
        "--checkpoint_to_continue", "checkpoints/flips/halves/checkpoint.pt")
    run(*common, "--dname", "no_workers", "--num_workers", 0)
    whole = load(tmp_path / "checkpoints/flips/whole/checkpoint.pt")
    for other in ("halves", "no_workers"):
        saved = load(tmp_path / f"checkpoints/flips/{other}/checkpoint.pt")
        for key in ("G", "model", "optimizer", "step"):
            assert_same_tensors(whole[key], saved[key])


class ThreeGenerators(torch.utils.data.Dataset):
    """Each item draws from torch's, Python's and NumPy's global generators, as user augmentations do: the
    "image" holds the three draws (the label is the index)."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        import random
        return torch.tensor([torch.rand(()).item(), random.random(), float(np.random.rand())], dtype=torch.float64), index


def test_seeded_dataset_seeds_torch_python_and_numpy_per_sample_and_restores_them():
    import random
    dataset = SeededDataset(ThreeGenerators())
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    before = (random.random(), float(np.random.rand()), torch.rand(()).item())
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    first, label = dataset[(2, 2 ** 40 + 7)]
    assert label == 2
    assert torch.equal(dataset[(2, 2 ** 40 + 7)][0], first)  # the key alone decides every draw
    other, _ = dataset[(2, 2 ** 40 + 8)]
    assert (first != other).all()  # each generator follows the seed
    flipped, _ = SeededDataset(ThreeGenerators(), flip_channels=True)[(2, 2 ** 40 + 7)]
    assert torch.equal(flipped, first.flip(0))  # flip_channels reverses the 3 channels of the same draws
    assert (random.random(), float(np.random.rand()), torch.rand(()).item()) == before  # the caller's draws unchanged


class Indexed(torch.utils.data.Dataset):
    """The items of a TensorDataset behind a plain Dataset: read with the full per-sample seeding."""

    def __init__(self, tensors):
        self.tensors = tensors

    def __len__(self):
        return len(self.tensors)

    def __getitem__(self, index):
        return self.tensors[index]


def test_a_tensor_dataset_is_read_without_seeding_and_gives_the_same_batches():
    images = torch.randn(11, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    tensors = torch.utils.data.TensorDataset(images, torch.arange(11))
    assert not SeededDataset(tensors).draws_randomness and SeededDataset(Indexed(tensors)).draws_randomness
    args = train_argument_parser("").parse_args(
        ["--module", "toy_u", "--name", "n", "--dname", "d", "--device", "cpu", "--seed", "5", "--batch_size", "4",
         "--num_workers", "0"])
    for flip in (False, True):
        fast = iter(make_loader(tensors, args, 0, 1, 2, torch.device("cpu"), flip))
        seeded = iter(make_loader(Indexed(tensors), args, 0, 1, 2, torch.device("cpu"), flip))
        for _ in range(6):  # across epochs
            (a, labels_a), (b, labels_b) = next(fast), next(seeded)
            assert torch.equal(a, b) and torch.equal(labels_a, labels_b)
