"""Regenerate data/digits.npz from scikit-learn's copy of the UCI handwritten digits.

Development only: scikit-learn is not a runtime dependency of this project. Run from the repo root:

    pip install --target /tmp/sk scikit-learn
    PYTHONPATH=/tmp/sk python data/make_digits.py

The npz holds `images` uint8 [1797, 8, 8] (grey levels 0..16), `labels` uint8 [1797], and a fixed
split: `test_index` (500 indices) and `train_index` (the other 1297), both int64 and sorted.
"""
import os

import numpy as np

N_TEST = 500  # size of the held-out test split
SPLIT_SEED = 0  # seed of numpy.random.default_rng for the split permutation
OUT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.npz")


def load_digits_arrays():
    """Images uint8 [N, 8, 8] in 0..16 and labels uint8 [N], from scikit-learn."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.uint8)
    assert np.array_equal(images, digits.images), "grey levels are not integers"
    return images, digits.target.astype(np.uint8)


def make_split(n, n_test, seed):
    """Sorted (train_index, test_index) from a seeded permutation of range(n)."""
    perm = np.random.default_rng(seed).permutation(n)
    test_index = np.sort(perm[:n_test]).astype(np.int64)
    train_index = np.sort(perm[n_test:]).astype(np.int64)
    return train_index, test_index


def main():
    images, labels = load_digits_arrays()
    train_index, test_index = make_split(len(images), N_TEST, SPLIT_SEED)
    np.savez_compressed(OUT_PATH, images=images, labels=labels,
                        train_index=train_index, test_index=test_index)
    print(f"wrote {OUT_PATH}: {len(train_index)} train, {len(test_index)} test images")


if __name__ == "__main__":
    main()
