"""A user module of 8 fixed random RGB images at 32x32 (the shape of CIFAR-10), for models brought from diffusers
folders: its make_model() is never used by them (their network is the folder's UNet2DModel)."""
import torch
from torch.utils.data import TensorDataset

RESOLUTION = 32
N_IMAGES = 8


def random_images(resolution, n=N_IMAGES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset((0.5 * torch.randn(n, 3, resolution, resolution, generator=g)).clamp(-1, 1),
                         torch.zeros(n, dtype=torch.long))


def make_model():
    raise RuntimeError("this module's data are for a model read from a diffusers folder, whose network it records")


def make_dataset():
    return random_images(RESOLUTION)
