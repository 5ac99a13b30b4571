"""User module for CelebA-HQ 256x256: the original's UNet configuration and its LMDB data set.

Prepare the data first:  python prepare_data.py --size 256 --out data/celeba_256 PATH_TO_CELEBA_HQ_IMAGES
"""
import os

from unet import UNet

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "celeba_256")  # made by prepare_data.py
RESOLUTION = 256
BASE_NUM_STEPS = 1024  # the base model's diffusion steps
CHANNEL_ORDER = "RGB"  # lmdb_data decodes with PIL (the original's CelebaWrapper decoded BGR with OpenCV)


def make_model():
    net = UNet(in_channel=3, channel=112, channel_multiplier=[1, 2, 2, 4, 4], n_res_blocks=2,
               attn_strides=[8, 16], attn_heads=4, use_affine_time=True, dropout=0.0, fold=1)
    net.image_size = [1, 3, RESOLUTION, RESOLUTION]
    return net


def make_dataset():
    """RGB images in [-1, 1] with random horizontal flips; the LMDB is opened lazily in each worker."""
    from lmdb_data import LMDBImageDataset  # here, so that scripts that read no LMDB never import lmdb

    return LMDBImageDataset(DATA_DIR, RESOLUTION, flip=True)
