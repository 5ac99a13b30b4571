"""Fréchet distance between Gaussian fits of two feature sets (FID), in float64 without scipy.

FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2)), with
tr(sqrtm(S1 S2)) = sum_k sqrt(lambda_k) over the eigenvalues of the symmetric PSD matrix
sqrt(S1) S2 sqrt(S1) (similar to S1 S2), so only symmetric eigendecompositions are needed.

Features come from any extractor: the digits classifier (`digits_u.make_feature_extractor()`)
for the built-in data set, or the FID InceptionV3 (`inception_features`, pytorch-fid's network and weights) for RGB images.
"""
import os

import torch

from sample_shards import file_fingerprint

INCEPTION_DIM = 2048  # pool3 features of the FID InceptionV3


def _as_float64(x):
    """A float64 CPU tensor from a tensor or array."""
    return torch.as_tensor(x).detach().to("cpu", torch.float64)


def feature_statistics(features):
    """Mean [D] and covariance [D, D] (unbiased, as numpy.cov) of features [N, D], in float64."""
    features = _as_float64(features)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got shape {tuple(features.shape)}")
    mu = features.mean(dim=0)
    centred = features - mu
    sigma = centred.T @ centred / (features.shape[0] - 1)
    return mu, sigma


def _sqrt_psd(matrix):
    """Symmetric square root of a symmetric positive semi-definite matrix."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), as a float."""
    mu1, sigma1, mu2, sigma2 = (_as_float64(x) for x in (mu1, sigma1, mu2, sigma2))
    sqrt_sigma1 = _sqrt_psd(sigma1)
    middle = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    middle = (middle + middle.T) / 2  # remove round-off asymmetry
    trace_sqrt_product = torch.linalg.eigvalsh(middle).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt_product)


def fid_from_features(a, b):
    """FID between two feature sets [N, D] and [M, D]."""
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


FID_WEIGHTS_SHA256_PREFIX = "6726825d"  # pytorch-fid's pt_inception-2015-12-05-6726825d.pth (torch hub's naming)


class FIDInception(torch.nn.Module):
    """The FID InceptionV3 (the TensorFlow graph of Heusel et al. 2017 as pytorch-fid ports it: torchvision's
    Inception3 with 1008 classes and the FID Mixed blocks), up to its 2048-d pool3 features.

    forward(images in [0, 1], [B, 3, H, W]) -> [B, 2048]: images resized to 299x299 (bilinear, no corner
    alignment) and mapped to [-1, 1] inside, as pytorch-fid does.
    """

    def __init__(self):
        super().__init__()
        import torchvision
        from pytorch_fid import inception as pf
        net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
        for name, block in [("Mixed_5b", pf.FIDInceptionA(192, pool_features=32)),
                            ("Mixed_5c", pf.FIDInceptionA(256, pool_features=64)),
                            ("Mixed_5d", pf.FIDInceptionA(288, pool_features=64)),
                            ("Mixed_6b", pf.FIDInceptionC(768, channels_7x7=128)),
                            ("Mixed_6c", pf.FIDInceptionC(768, channels_7x7=160)),
                            ("Mixed_6d", pf.FIDInceptionC(768, channels_7x7=160)),
                            ("Mixed_6e", pf.FIDInceptionC(768, channels_7x7=192)),
                            ("Mixed_7b", pf.FIDInceptionE_1(1280)), ("Mixed_7c", pf.FIDInceptionE_2(2048))]:
            setattr(net, name, block)
        self.net = net
        pool = torch.nn.MaxPool2d(kernel_size=3, stride=2)
        self.layers = torch.nn.Sequential(
            net.Conv2d_1a_3x3, net.Conv2d_2a_3x3, net.Conv2d_2b_3x3, pool, net.Conv2d_3b_1x1, net.Conv2d_4a_3x3, pool,
            net.Mixed_5b, net.Mixed_5c, net.Mixed_5d, net.Mixed_6a, net.Mixed_6b, net.Mixed_6c, net.Mixed_6d,
            net.Mixed_6e, net.Mixed_7a, net.Mixed_7b, net.Mixed_7c, torch.nn.AdaptiveAvgPool2d(1))

    def forward(self, images):
        x = torch.nn.functional.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        return self.layers(2 * x - 1).flatten(1)


def random_inception_weights(seed=0, resolution=64):
    """A state dict of FIDInception's network with random weights: PyTorch's default initialisation, each batch
    norm's running statistics then set from two batches of uniform noise images (so features stay of order one
    through the 94 layers). A stand-in for the FID weights where they cannot be downloaded (tests, benchmarks)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = FIDInception()
    for layer in model.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.momentum = None  # a cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(8, 3, resolution, resolution, generator=generator))
    return model.net.state_dict()


def load_inception(device, weights=None):
    """(FIDInception with the FID weights in eval mode, a line naming the weights). weights: the path of
    pytorch-fid's weights file (pt_inception-2015-12-05-6726825d.pth), or None to download it (torch hub's cache).
    Raises RuntimeError with a one-line reason when pytorch-fid, the file or its contents are wrong or missing."""
    try:
        model = FIDInception()
    except ImportError:
        raise RuntimeError("Inception features need pytorch-fid: pip install pytorch-fid") from None
    if weights is None:
        from pytorch_fid.inception import FID_WEIGHTS_URL
        try:
            state = torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, progress=False, weights_only=True)
        except Exception as err:
            raise RuntimeError("could not download the FID InceptionV3 weights; download "
                               f"{FID_WEIGHTS_URL} elsewhere and give its path as --inception_weights ({err})") from None
        described = f"pytorch-fid's weights ({os.path.basename(FID_WEIGHTS_URL)})"
    else:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as err:
            raise RuntimeError(f"cannot read the Inception weights {weights} ({str(err).splitlines()[0]})") from None
        digest = file_fingerprint(weights)["sha256"]
        published = digest.startswith(FID_WEIGHTS_SHA256_PREFIX)
        described = (f"{os.path.basename(weights)} (SHA-256 {digest[:16]}…, "
                     + ("the published FID weights)" if published else
                        "not the published FID weights: these FIDs are not comparable with published ones)"))
    try:
        model.net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        source = weights or "the downloaded file"
        raise RuntimeError(f"{source} does not hold the FID InceptionV3 weights ({str(err).splitlines()[0]}); "
                           "use pytorch-fid's pt_inception-2015-12-05-6726825d.pth") from None
    return model.to(device).eval(), described


def _batches(images, batch_size):
    """Yield image batches from a tensor [N, 3, H, W] or an iterable of batches or (images, labels)."""
    if torch.is_tensor(images):
        yield from images.split(batch_size)
        return
    for batch in images:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def inception_features(images, device, batch_size=50, model=None):
    """InceptionV3 pool3 features [N, 2048] (float64, CPU) of RGB images in [-1, 1].

    `images` is a tensor [N, 3, H, W] or an iterable of batches (e.g. a DataLoader of
    (image, label)); images are resized to 299x299 inside the network. model: the network of
    load_inception(device), to load it once for many calls (None: loaded here).
    """
    model = load_inception(device)[0] if model is None else model
    features = []
    for batch in _batches(images, batch_size):
        batch = (batch.to(device, torch.float32) + 1) / 2  # the network takes [0, 1]
        features.append(model(batch).double().cpu())
    return torch.cat(features)
