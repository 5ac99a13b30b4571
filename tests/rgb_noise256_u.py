"""rgb_noise_u's images at 256x256 (the shape of CelebA-HQ 256)."""
from rgb_noise_u import make_model, random_images  # noqa: F401 (make_model: the protocol's, never called)

RESOLUTION = 256


def make_dataset():
    return random_images(RESOLUTION, n=2)
