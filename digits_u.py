"""User module for the built-in UCI handwritten digits (8x8 grayscale, 17 grey levels).

`python train.py --module digits_u ...` trains on the fixed training split of `data/digits.npz`
(1,297 images); the 500 held-out test images and a small CNN classifier, whose penultimate layer
serves as the feature space for FID (`fid.py`), come with it.
"""
import os

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_PATH = os.path.join(HERE, "data", "digits.npz")
CLASSIFIER_PATH = os.path.join(HERE, "checkpoints", "digits", "classifier.pt")

# UNet configuration (may be tuned later)
UNET_CHANNEL = 32  # base number of channels
UNET_CHANNEL_MULTIPLIER = [1, 2]  # two levels: 8x8 and 4x4
UNET_N_RES_BLOCKS = 2  # residual blocks per level
UNET_ATTN_STRIDES = [2]  # self-attention at the 4x4 level
UNET_ATTN_HEADS = 1  # heads per attention layer
UNET_USE_AFFINE_TIME = True  # time embedding as a scale/shift of the normalised activations
UNET_DROPOUT = 0.0  # dropout inside the residual blocks

IMAGE_SIZE = [1, 1, 8, 8]  # [1, C, H, W]
CHANNEL_ORDER = "RGB"  # recorded in the checkpoints; one grey channel is never flipped
MAX_GREY = 16  # grey levels run 0..MAX_GREY

# Classifier for the FID feature space
CLASSIFIER_FEATURE_DIM = 128  # size of the penultimate layer (the FID features)
CLASSIFIER_DROPOUT = 0.3  # dropout before the last layer, training only
N_CLASSES = 10


def make_model():
    """The UNet for 8x8 grayscale digits, with `image_size` set."""
    from unet import UNet

    net = UNet(in_channel=1, channel=UNET_CHANNEL, channel_multiplier=UNET_CHANNEL_MULTIPLIER,
               n_res_blocks=UNET_N_RES_BLOCKS, attn_strides=UNET_ATTN_STRIDES,
               attn_heads=UNET_ATTN_HEADS, use_affine_time=UNET_USE_AFFINE_TIME,
               dropout=UNET_DROPOUT, fold=1)
    net.image_size = list(IMAGE_SIZE)
    return net


def load_digits():
    """The arrays of `data/digits.npz` as a dict (images, labels, train_index, test_index)."""
    if not os.path.exists(DATA_PATH):
        raise FileNotFoundError(f"{DATA_PATH} not found; regenerate it with "
                                "`python data/make_digits.py` (needs scikit-learn)")
    with np.load(DATA_PATH) as f:
        return {key: f[key] for key in f.files}


def to_float_images(images):
    """uint8 grey levels [N, 8, 8] in 0..16 -> float32 tensor [N, 1, 8, 8] in [-1, 1]."""
    grey = torch.from_numpy(images.astype(np.float32))
    return (grey / (MAX_GREY / 2) - 1).unsqueeze(1)


def _split_dataset(split):
    digits = load_digits()
    index = digits[f"{split}_index"]
    images = to_float_images(digits["images"][index])
    labels = torch.from_numpy(digits["labels"][index].astype(np.int64))
    return TensorDataset(images, labels)


def make_dataset():
    """The training split (1,297 images) as a Dataset of (image [1, 8, 8] in [-1, 1], label)."""
    return _split_dataset("train")


def make_test_dataset():
    """The held-out test split (500 images), in the format of `make_dataset()`."""
    return _split_dataset("test")


class DigitsClassifier(nn.Module):
    """Small CNN: `features` maps [B, 1, 8, 8] to [B, feature_dim]; `head` gives the 10 logits."""

    def __init__(self, feature_dim=CLASSIFIER_FEATURE_DIM, dropout=CLASSIFIER_DROPOUT):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, feature_dim), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, N_CLASSES))

    def forward(self, x):
        return self.head(self.features(x))


def load_classifier(path=CLASSIFIER_PATH):
    """The trained classifier from `checkpoints/digits/classifier.pt`, in eval mode, on the CPU."""
    state = torch.load(path, weights_only=True, map_location="cpu")
    classifier = DigitsClassifier(feature_dim=state["feature_dim"])
    classifier.load_state_dict(state["model"])
    return classifier.eval()


def make_feature_extractor():
    """An eval-mode module mapping images [B, 1, 8, 8] in [-1, 1] to FID features [B, D]."""
    return load_classifier().features
