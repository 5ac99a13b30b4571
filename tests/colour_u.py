"""A 3-channel user module whose network and data are not colour-symmetric (tests of channel orders).

The model is case "a" of the original's reference UNets (tests/reference/unet_tiny_cases.pt: random
weights, every layer active, so its output changes when the input's channels are swapped); the data set
is 32 fixed random 16x16 images in RGB (the default CHANNEL_ORDER) with a red cast.
"""
import torch

from unet import UNet

CONFIG = dict(in_channel=3, channel=32, channel_multiplier=[1, 2], n_res_blocks=1, attn_strides=[2],
              attn_heads=2, use_affine_time=True, dropout=0.0, fold=1)
IMAGE_SIZE = [1, 3, 16, 16]
N_IMAGES = 32
RED_CAST = torch.tensor([0.5, 0.0, -0.5]).reshape(3, 1, 1)  # added to every image: red bright, blue dark


def make_model():
    net = UNet(**CONFIG)
    net.image_size = list(IMAGE_SIZE)
    return net


def images():
    """[N_IMAGES, 3, 16, 16] in [-1, 1], RGB."""
    g = torch.Generator().manual_seed(7)
    return (0.4 * torch.randn([N_IMAGES] + IMAGE_SIZE[1:], generator=g) + RED_CAST).clamp(-1, 1)


def make_dataset():
    return [(x, 0) for x in images()]
