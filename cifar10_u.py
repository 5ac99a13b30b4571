"""User module for CIFAR-10 32x32 with diffusers' UNet2DModel in the configuration of google/ddpm-cifar10-32
(Ho et al. 2020's CIFAR-10 model: 35.7 M parameters, attention at 16x16, DDPM's linear schedule, eps, 1000 steps).

Distilling the published model reads its network from the downloaded folder (see the README, "Distil
google/ddpm-cifar10-32 to 4 steps"); make_model() builds the same network with fresh weights for training one
here. make_dataset() is torchvision's CIFAR-10 training split, downloaded into data/cifar10 on first use.
"""
import os

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "cifar10")
BASE_NUM_STEPS = 1000  # DDPM's steps
CHANNEL_ORDER = "RGB"

# google/ddpm-cifar10-32's unet/config.json (the keys that shape the network)
UNET_CONFIG = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=[128, 256, 256, 256],
                   layers_per_block=2, down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
                   up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], attention_head_dim=None,
                   downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32,
                   mid_block_scale_factor=1, center_input_sample=False, act_fn="silu", time_embedding_type="positional")


def make_model():
    """A UNet2DModel of UNET_CONFIG with fresh weights, wrapped as the project's networks are called."""
    from diffusers import UNet2DModel

    from diffusers_unet import DiffusersUNet

    return DiffusersUNet(UNet2DModel(**UNET_CONFIG))


def make_dataset():
    """The 50,000 training images as (image [3, 32, 32] in [-1, 1], label), randomly flipped left-right."""
    from torchvision import datasets, transforms

    from cli import UserError

    transform = transforms.Compose([transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                    transforms.Normalize([0.5] * 3, [0.5] * 3)])
    try:
        return datasets.CIFAR10(DATA_DIR, train=True, download=True, transform=transform)
    except (OSError, RuntimeError) as e:  # no network, or a damaged archive
        raise UserError(f"CIFAR-10 is not in {DATA_DIR} and could not be downloaded ({' '.join(str(e).split())[:120]}); "
                        "put cifar-10-python.tar.gz there, or run where the download works") from None
