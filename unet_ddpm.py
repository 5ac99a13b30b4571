"""The original implementation's name for the UNet module: its user modules say `from unet_ddpm import UNet`.

The network is `unet.UNet` (same parameter names and shapes, so the original's weights load unchanged).
"""
from unet import UNet

__all__ = ["UNet"]
