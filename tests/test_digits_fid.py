"""The built-in digits data set, its user module and classifier, and the FID computation."""
import numpy as np
import pytest
import torch

import digits_u
import fid

N_IMAGES, N_TRAIN, N_TEST = 1797, 1297, 500


@pytest.fixture(scope="module")
def digits():
    return digits_u.load_digits()


def test_npz_arrays(digits):
    assert digits["images"].shape == (N_IMAGES, 8, 8) and digits["images"].dtype == np.uint8
    assert digits["images"].min() == 0 and digits["images"].max() == 16
    assert digits["labels"].shape == (N_IMAGES,) and digits["labels"].dtype == np.uint8
    assert set(digits["labels"].tolist()) == set(range(10))


def test_npz_split(digits):
    train, test = digits["train_index"], digits["test_index"]
    assert train.dtype == test.dtype == np.int64
    assert len(train) == N_TRAIN and len(test) == N_TEST
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)  # sorted, no repeats
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(N_IMAGES))


@pytest.mark.parametrize("make, length", [(digits_u.make_dataset, N_TRAIN), (digits_u.make_test_dataset, N_TEST)])
def test_datasets(make, length):
    dataset = make()
    assert len(dataset) == length
    image, label = dataset[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32
    images = dataset.tensors[0]
    assert images.min() == -1 and images.max() == 1
    assert torch.allclose((images + 1) * 8, ((images + 1) * 8).round())  # 17 grey levels
    assert 0 <= int(label) <= 9


def test_missing_data_file(monkeypatch, tmp_path):
    monkeypatch.setattr(digits_u, "DATA_PATH", str(tmp_path / "digits.npz"))
    with pytest.raises(FileNotFoundError):
        digits_u.make_dataset()


def test_make_model():
    pytest.importorskip("unet")
    net = digits_u.make_model()
    assert net.image_size == [1, 1, 8, 8]
    x = torch.randn(2, 1, 8, 8)
    assert net(x, torch.tensor([0.0, 500.0])).shape == x.shape


def test_fid_zero_for_identical_statistics():
    features = torch.randn(200, 6, generator=torch.Generator().manual_seed(0))
    mu, sigma = fid.feature_statistics(features)
    assert mu.dtype == sigma.dtype == torch.float64
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def test_fid_diagonal_gaussians_closed_form():
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]).double(), torch.tensor([1.0, 1.0, 0.5]).double()
    var1, var2 = torch.tensor([1.0, 4.0, 0.25]).double(), torch.tensor([2.0, 1.0, 0.25]).double()
    expected = ((mu1 - mu2) ** 2).sum() + (var1 + var2 - 2 * (var1 * var2).sqrt()).sum()
    got = fid.frechet_distance(mu1, torch.diag(var1), mu2, torch.diag(var2))
    assert got == pytest.approx(float(expected), rel=1e-12)


def _reference_fid(a, b):
    """FID via the eigenvalues of the non-symmetric product S1 S2 (numpy, float64)."""
    mu1, mu2 = a.mean(axis=0), b.mean(axis=0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    return ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt


def test_fid_random_features_match_reference_and_are_symmetric():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 8))
    b = rng.normal(size=(250, 8)) @ rng.normal(size=(8, 8)) * 0.5 + 0.3
    got = fid.fid_from_features(a, b)
    assert got == pytest.approx(_reference_fid(a, b), rel=1e-9)
    assert fid.fid_from_features(b, a) == pytest.approx(got, rel=1e-9)


def test_inception_features_data_flow(monkeypatch):
    """Batching, the [-1, 1] -> [0, 1] mapping and the output layout, with a stand-in network."""
    def fake_inception(device, weights=None):
        return lambda x: x.mean(dim=(1, 2, 3))[:, None].expand(-1, fid.INCEPTION_DIM), "a stand-in"

    monkeypatch.setattr(fid, "load_inception", fake_inception)
    images = torch.linspace(-1, 1, 7).reshape(7, 1, 1, 1).expand(7, 3, 4, 4)
    features = fid.inception_features(images, "cpu", batch_size=3)
    assert features.shape == (7, fid.INCEPTION_DIM) and features.dtype == torch.float64
    assert torch.allclose(features[:, 0], torch.linspace(0, 1, 7, dtype=torch.float64), atol=1e-6)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(7)), batch_size=4)
    assert torch.equal(fid.inception_features(loader, "cpu"), features)


@pytest.fixture(scope="module")
def classifier():
    return digits_u.load_classifier()


def test_feature_extractor_shape():
    extractor = digits_u.make_feature_extractor()
    assert not extractor.training
    with torch.no_grad():
        features = extractor(digits_u.make_test_dataset().tensors[0][:5])
    assert features.shape == (5, digits_u.CLASSIFIER_FEATURE_DIM)


def test_classifier_test_accuracy(classifier):
    images, labels = digits_u.make_test_dataset().tensors
    with torch.no_grad():
        accuracy = (classifier(images).argmax(dim=1) == labels).float().mean().item()
    assert accuracy >= 0.95
