"""Fréchet distance between Gaussian fits of two feature sets (FID), in float64 without scipy.

FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2)), with
tr(sqrtm(S1 S2)) = sum_k sqrt(lambda_k) over the eigenvalues of the symmetric PSD matrix
sqrt(S1) S2 sqrt(S1) (similar to S1 S2), so only symmetric eigendecompositions are needed.

Features come from any extractor: the digits classifier (`digits_u.make_feature_extractor()`)
for the built-in data set, or InceptionV3 (`inception_features`, needs pytorch-fid) for RGB images.
"""
import torch

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


def load_inception(device):
    """pytorch-fid's InceptionV3 with the FID weights (downloaded on first use), in eval mode.
    Raises RuntimeError with a one-line reason when pytorch-fid or its weights are missing."""
    try:
        from pytorch_fid.inception import InceptionV3
    except ImportError:
        raise RuntimeError("Inception features need pytorch-fid: pip install pytorch-fid") from None
    try:
        model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[INCEPTION_DIM]])
    except OSError as err:
        raise RuntimeError("could not load the FID InceptionV3 weights: pytorch-fid downloads them on "
                           f"first use, which needs network access ({err})") from None
    return model.to(device).eval()


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
    model = load_inception(device) if model is None else model
    features = []
    for batch in _batches(images, batch_size):
        batch = (batch.to(device, torch.float32) + 1) / 2  # pytorch-fid expects [0, 1]
        features.append(model(batch)[0].flatten(1).double().cpu())
    return torch.cat(features)
