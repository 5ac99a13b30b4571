"""Class-conditional user module for the built-in UCI handwritten digits (10 classes, 8x8 grayscale).

The UNet of `digits_u` (same size) with a label embedding of 10 + 1 rows (row 10 the null label), trained
for classifier-free guidance (`train.py --module digits_cond_u`, labels dropped with --cond_drop_prob,
0.1 by default); `make_model(guidance_embedding=True)` adds the guidance-weight input of guidance
distillation (`distillate.py --guidance_distill True`). The data, the held-out test split and the
classifier (its penultimate layer the feature space of the metrics, its logits the accuracy of samples
against their requested labels) are those of `digits_u`.
"""
import torch

import digits_u

NUM_CLASSES = digits_u.N_CLASSES  # the null label is NUM_CLASSES
IMAGE_SIZE = digits_u.IMAGE_SIZE
CHANNEL_ORDER = digits_u.CHANNEL_ORDER


def make_model(guidance_embedding=False):
    """digits_u's UNet with class conditioning (and a guidance-weight input if asked), `image_size` set."""
    from unet import UNet

    net = UNet(in_channel=1, channel=digits_u.UNET_CHANNEL, channel_multiplier=digits_u.UNET_CHANNEL_MULTIPLIER,
               n_res_blocks=digits_u.UNET_N_RES_BLOCKS, attn_strides=digits_u.UNET_ATTN_STRIDES,
               attn_heads=digits_u.UNET_ATTN_HEADS, use_affine_time=digits_u.UNET_USE_AFFINE_TIME,
               dropout=digits_u.UNET_DROPOUT, fold=1, num_classes=NUM_CLASSES, guidance_embedding=guidance_embedding)
    net.image_size = list(IMAGE_SIZE)
    return net


def make_dataset():
    """The training split (1,297 images) as (image [1, 8, 8] in [-1, 1], label 0..9)."""
    return digits_u.make_dataset()


def make_test_dataset():
    """The held-out test split (500 images), in the format of `make_dataset()`."""
    return digits_u.make_test_dataset()


def make_extra_args(images, labels, device):
    """The network's keyword arguments: the labels as `y` ({} without labels: the null label)."""
    return {} if labels is None else {"y": torch.as_tensor(labels, device=device).long()}


def make_feature_extractor():
    """digits_u's feature extractor: images [B, 1, 8, 8] in [-1, 1] -> the classifier's features [B, D]."""
    return digits_u.make_feature_extractor()


def make_classifier():
    """digits_u's classifier (eval mode): images [B, 1, 8, 8] in [-1, 1] -> 10 logits."""
    return digits_u.load_classifier()
