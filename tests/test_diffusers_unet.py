"""This project's UNet as diffusers' UNet2DModel: the same outputs through the weight mapping, and the refusals."""
import re

import pytest
import torch
from diffusers import UNet2DModel

import digits_u
from diffusers_unet import NotExpressible, unet2d_config, unet2d_state_dict
from unet import UNet


def as_unet2d(net, sample_size):
    model = UNet2DModel(**unet2d_config(net, sample_size)).eval()
    model.load_state_dict(unet2d_state_dict(net), strict=True)
    return model


def random_unet(**kwargs):
    torch.manual_seed(0)
    net = UNet(in_channel=3, channel=16, channel_multiplier=[1, 2, 2], n_res_blocks=2, attn_strides=[2], **kwargs)
    for p in net.parameters():  # every layer active (the zero-initialised outputs too)
        p.data.normal_(0, 0.2)
    return net.eval()


@pytest.mark.parametrize("kwargs", [
    dict(attn_heads=1, use_affine_time=True),
    dict(attn_heads=2, use_affine_time=False),
    dict(attn_heads=4, use_affine_time=True, num_classes=3),
], ids=["one-head-affine", "two-heads-additive", "four-heads-classes"])
def test_unet2d_gives_the_unets_outputs(kwargs):
    net = random_unet(**kwargs)
    model = as_unet2d(net, 16)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.0, 17.0, 999.0])  # the sinusoidal embedding at small and large labels
    y = torch.tensor([0, 2, 3]) if "num_classes" in kwargs else None  # 3: the null label
    with torch.no_grad():
        expected, got = net(x, t, y), model(x, t, class_labels=y).sample
    assert expected.abs().mean() > 0.1
    assert (got - expected).abs().max() < 1e-5


def test_the_digits_network_saved_as_a_diffusers_folder_reloads_with_its_outputs(tmp_path):
    torch.manual_seed(3)
    net = digits_u.make_model()
    for p in net.parameters():
        p.data.normal_(0, 0.1)
    net.eval()
    as_unet2d(net, 8).save_pretrained(tmp_path / "unet")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").exists()
    model = UNet2DModel.from_pretrained(tmp_path / "unet").eval()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([1.0, 250.0, 600.0, 1023.0])
    with torch.no_grad():
        expected = net(x, t)
        assert (model(x, t).sample - expected).abs().max() < 1e-5 * expected.abs().max()


@pytest.mark.parametrize("kwargs, said", [
    (dict(fold=2), "folds space into channels"),
    (dict(guidance_embedding=True), "guidance weight w as an input"),
    (dict(attn_strides=[1, 4]), re.escape("attention heads of widths [16, 32]")),
])
def test_networks_unet2d_cannot_express_are_refused(kwargs, said):
    base = dict(in_channel=3, channel=16, channel_multiplier=[1, 2, 2], n_res_blocks=1, attn_strides=[2], attn_heads=1)
    net = UNet(**{**base, **kwargs})
    with pytest.raises(NotExpressible, match=said):
        unet2d_config(net)
    with pytest.raises(NotExpressible, match=said):
        unet2d_state_dict(net)
