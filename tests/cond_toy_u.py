"""A tiny class-conditional user module: a small UNet on 4x4 grey images of three classes.

Class c's images are a fixed pattern MEANS[c] plus a little noise. Used by the tests of conditioning,
classifier-free guidance and guidance distillation through the scripts (tests/test_guidance.py).
"""
import torch

from unet import UNet

NUM_CLASSES = 3
IMAGE_SIZE = [1, 1, 4, 4]
N_IMAGES = 96
NOISE_STD = 0.1
MEANS = torch.linspace(-0.6, 0.6, NUM_CLASSES).reshape(NUM_CLASSES, 1, 1, 1) * torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(2, 2)


def make_model(guidance_embedding=False):
    net = UNet(in_channel=1, channel=8, channel_multiplier=[1], n_res_blocks=1, attn_strides=[], use_affine_time=True,
               num_classes=NUM_CLASSES, guidance_embedding=guidance_embedding)
    net.image_size = list(IMAGE_SIZE)
    return net


def make_dataset():
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(N_IMAGES) % NUM_CLASSES
    images = (MEANS[labels] + NOISE_STD * torch.randn([N_IMAGES] + IMAGE_SIZE[1:], generator=g)).clamp(-1, 1)
    return list(zip(images, labels.tolist()))


def make_extra_args(images, labels, device):
    return {} if labels is None else {"y": torch.as_tensor(labels, device=device).long()}
