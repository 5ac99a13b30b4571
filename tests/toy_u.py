"""A user module that is not the UNet: a small MLP on 2-D points from a mixture of two Gaussians.

Each "image" has shape [2, 1, 1]. Used by the end-to-end tests of the scripts.
"""
import math

import torch
from torch import nn

CENTERS = torch.tensor([[0.6, -0.4], [-0.6, 0.4]])  # the two modes
CLUSTER_STD = 0.1  # standard deviation of each mode
N_POINTS = 4096  # size of the data set
BASE_STEPS = 64  # time labels run over 0..BASE_STEPS-1 (base indices)


class MLP(nn.Module):
    def __init__(self, hidden=128, n_freq=16):
        super().__init__()
        self.register_buffer("freq", torch.arange(1, n_freq + 1, dtype=torch.float32) * math.pi)
        self.net = nn.Sequential(nn.Linear(2 + 2 * n_freq, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2))
        self.image_size = [1, 2, 1, 1]

    def forward(self, x, t):
        u = (t.float().reshape(-1, 1) + 1) / BASE_STEPS  # continuous time of the label
        features = torch.cat([x.flatten(1), torch.sin(u * self.freq), torch.cos(u * self.freq)], dim=1)
        return self.net(features).reshape(x.shape)


def make_model():
    return MLP()


def sample_points(n, seed):
    g = torch.Generator().manual_seed(seed)
    which = torch.randint(0, 2, (n,), generator=g)
    return CENTERS[which] + CLUSTER_STD * torch.randn(n, 2, generator=g)


def make_dataset():
    points = sample_points(N_POINTS, seed=1234).reshape(N_POINTS, 2, 1, 1)
    return torch.utils.data.TensorDataset(points, torch.zeros(N_POINTS, dtype=torch.long))
