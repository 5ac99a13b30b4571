"""The feature spaces and the classifier of evaluate.py: InceptionV3 (fid.py) for RGB data, or the user module's
make_feature_extractor() and make_classifier(), each seeing images in the channel order it expects."""
import torch

import fid
from cli import UserError
from user_modules import to_channel_order


class FeatureSpace:
    """Maps images in [-1, 1], stored in channel order `self.order`, to features [N, D] (float64, CPU);
    `self.described` names the network and its weights."""

    def __init__(self, module, kind, device, data_order, batch_size, inception_weights=None):
        if kind == "inception":
            self.order = "RGB"  # InceptionV3 compares RGB with RGB
            try:
                net, self.described = fid.load_inception(device, inception_weights)
            except RuntimeError as e:
                raise UserError(str(e)) from None
            self.extract = lambda images: fid.inception_features(images, device, batch_size, model=net)
            return
        make = getattr(module, "make_feature_extractor", None)
        if make is None:
            raise UserError(f"user module {module.__name__!r} has no make_feature_extractor(); use --features inception")
        self.order = data_order  # a classifier of the data sees images as the data stores them
        self.described = f"{module.__name__}.make_feature_extractor()"
        net = make().to(device).eval()
        self.extract = lambda images: torch.cat([net(chunk.to(device)).double().cpu() for chunk in images.split(batch_size)])

    @torch.no_grad()
    def __call__(self, images):
        return self.extract(images)


class Classifier:
    """The user module's make_classifier() (class-conditional evaluation): counts the images, in [-1, 1] and
    stored in channel order `order`, that it assigns their requested labels."""

    def __init__(self, net, device, data_order, batch_size):
        self.net = net.to(device).eval()
        self.device, self.data_order, self.batch_size = device, data_order, batch_size

    @classmethod
    def of(cls, module, device, data_order, batch_size):
        """The module's classifier, or None when it has no make_classifier() (no accuracy columns then)."""
        make = getattr(module, "make_classifier", None)
        return cls(make(), device, data_order, batch_size) if callable(make) else None

    @torch.no_grad()
    def correct(self, images, labels, order):
        """Per image, whether the classifier assigns it its label (a bool tensor [N])."""
        images = to_channel_order(images, order, self.data_order)  # the classifier sees images as the data stores them
        predicted = torch.cat([self.net(chunk.to(self.device)).argmax(1).cpu() for chunk in images.split(self.batch_size)])
        return predicted == torch.as_tensor(labels).long()
