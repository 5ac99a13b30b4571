"""Train the digits classifier whose penultimate layer is the FID feature space of `digits_u`.

Development only; run from anywhere (CPU, about a minute):

    python data/train_digits_classifier.py

Trains on the training split of data/digits.npz only (with random shifts of up to 1 pixel),
reports the accuracy on the held-out test split and the FID between the two splits in the
classifier's features (the floor of that metric), and writes checkpoints/digits/classifier.pt.
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import digits_u  # noqa: E402
from fid import fid_from_features  # noqa: E402

SEED = 0  # seeds the initialisation, the shuffling and the augmentation
EPOCHS = 40  # passes over the 1,297 training images
BATCH_SIZE = 64
LEARNING_RATE = 1e-3  # Adam, decayed to 0 on a cosine over the run
MAX_SHIFT = 1  # random translation in pixels, each axis
N_THREADS = 2  # CPU threads (the machine is shared)


def random_shift(images, max_shift, generator):
    """Translate each image [B, 1, H, W] by up to max_shift pixels, filling with background (-1)."""
    _, _, height, width = images.shape
    padded = F.pad(images, [max_shift] * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator)
    return torch.stack([p[:, dy:dy + height, dx:dx + width] for p, (dy, dx) in zip(padded, offsets.tolist())])


@torch.no_grad()
def accuracy(classifier, dataset):
    """Fraction of the dataset's images the classifier labels correctly."""
    images, labels = dataset.tensors
    return (classifier.eval()(images).argmax(dim=1) == labels).float().mean().item()


def train(classifier, dataset, generator):
    """Adam with cosine-decayed learning rate on cross-entropy, over shuffled, shifted batches."""
    images, labels = dataset.tensors
    n_batches = -(-len(images) // BATCH_SIZE)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS * n_batches)
    for epoch in range(EPOCHS):
        classifier.train()
        order = torch.randperm(len(images), generator=generator)
        total_loss = 0.0
        for batch in order.split(BATCH_SIZE):
            x = random_shift(images[batch], MAX_SHIFT, generator)
            loss = F.cross_entropy(classifier(x), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(batch)
        if (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1}: train loss {total_loss / len(images):.4f}")


@torch.no_grad()
def train_test_fid(classifier, train_set, test_set):
    """FID between the training and test splits in the classifier's features."""
    classifier.eval()
    return fid_from_features(classifier.features(train_set.tensors[0]), classifier.features(test_set.tensors[0]))


def main():
    torch.set_num_threads(N_THREADS)
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    train_set, test_set = digits_u.make_dataset(), digits_u.make_test_dataset()
    classifier = digits_u.DigitsClassifier()
    start = time.time()
    train(classifier, train_set, generator)
    test_accuracy = accuracy(classifier, test_set)
    floor = train_test_fid(classifier, train_set, test_set)
    print(f"trained in {time.time() - start:.0f} s; test accuracy {test_accuracy:.4f}; "
          f"FID(train, test) {floor:.4f}")
    os.makedirs(os.path.dirname(digits_u.CLASSIFIER_PATH), exist_ok=True)
    torch.save({
        "model": classifier.state_dict(),
        "test_accuracy": test_accuracy,
        "feature_dim": digits_u.CLASSIFIER_FEATURE_DIM,
        "train_test_fid": floor,
        "train_args": {"seed": SEED, "epochs": EPOCHS, "batch_size": BATCH_SIZE, "learning_rate": LEARNING_RATE,
                       "max_shift": MAX_SHIFT, "dropout": digits_u.CLASSIFIER_DROPOUT},
    }, digits_u.CLASSIFIER_PATH)
    print(f"wrote {digits_u.CLASSIFIER_PATH}")


if __name__ == "__main__":
    main()
