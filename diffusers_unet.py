"""diffusers' UNet2DModel and this project's UNet: the UNet (unet.py) as a UNet2DModel through its configuration and
an exact weight mapping (for export_checkpoint.py --for_diffusers True), and a UNet2DModel as this project's
network (DiffusersUNet: the network of a model imported from a diffusers folder, and of its students).

The two networks are the same DDPM UNet (Ho et al. 2020) in two layouts:
- the sinusoidal time embedding [sin, cos] with frequencies 10000^(-2k/dim): flip_sin_to_cos False, freq_shift 0;
- a residual block's time projection added before the second GroupNorm ("default"), or use_affine_time's
  (1 + gamma) GN(h) + beta: resnet_time_scale_shift "scale_shift", whose second GroupNorm is affine in diffusers
  and gets a unit weight and zero bias;
- the fused 1x1 qkv convolution, laid out per head as [q, k, v], split into to_q, to_k, to_v; this project's
  logits are scaled by 1/sqrt(C) (the original's choice) and diffusers' by 1/sqrt(head width), so q is multiplied
  by 1/sqrt(heads) (nothing changes for one head);
- the class embedding of K + 1 rows (row K the null label) as num_class_embeds K + 1.
A network diffusers cannot express is refused (NotExpressible): a spatial fold, a guidance-weight input, or
attention at levels whose head widths differ (UNet2DModel has one attention_head_dim).
"""
import torch
from torch import nn

from unet import ResBlockWithAttention, UNet

NETWORK_CLASS = "UNet2DModel"  # the one network class a checkpoint's "network" record names


class NotExpressible(Exception):
    """A network that UNet2DModel cannot express: one line saying what and why."""


def _levels(net):
    """[(channels, blocks [ResBlockWithAttention], has Downsample)] of the down path, level by level."""
    levels, current = [], []
    for layer in list(net.down)[1:]:
        if isinstance(layer, ResBlockWithAttention):
            current.append(layer)
        else:
            levels.append(current)
            current = []
    levels.append(current)
    return levels


def unet2d_config(net, sample_size=None):
    """The UNet2DModel configuration (a dict for UNet2DModel(**config) or its config.json) of a UNet."""
    if not isinstance(net, UNet):
        raise NotExpressible(f"only this project's UNet maps onto UNet2DModel, not {type(net).__name__}")
    if net.fold != 1:
        raise NotExpressible(f"the network folds space into channels (fold {net.fold}); UNet2DModel has no fold")
    if net.guidance is not None:
        raise NotExpressible("the network takes the guidance weight w as an input; UNet2DModel has no such input")
    levels = _levels(net)
    channels = [blocks[0].resblocks.conv1.out_channels for blocks in levels]
    attention = [blocks[0].attention is not None for blocks in levels]
    first = net.mid[0].resblocks
    head_widths = {a.attention.qkv.out_channels // 3 // a.attention.n_head
                   for blocks in levels for a in blocks if a.attention is not None}
    head_widths.add(net.mid[0].attention.qkv.out_channels // 3 // net.mid[0].attention.n_head)
    if len(head_widths) > 1:
        raise NotExpressible(f"attention heads of widths {sorted(head_widths)} at different levels; UNet2DModel has one "
                             "attention_head_dim")
    return dict(
        sample_size=sample_size, in_channels=net.in_channel, out_channels=net.in_channel, center_input_sample=False,
        time_embedding_type="positional", freq_shift=0, flip_sin_to_cos=False,
        down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        block_out_channels=channels, layers_per_block=len(levels[0]), mid_block_scale_factor=1, downsample_padding=1,
        downsample_type="conv", upsample_type="conv", dropout=first.dropout.p, act_fn="silu",
        attention_head_dim=head_widths.pop(), norm_num_groups=first.norm1.num_groups,
        attn_norm_num_groups=first.norm1.num_groups,  # else the middle attention of "scale_shift" has no GroupNorm
        norm_eps=first.norm1.eps, resnet_time_scale_shift="scale_shift" if first.use_affine_time else "default",
        add_attention=True, class_embed_type=None,
        num_class_embeds=None if net.label is None else net.label.num_embeddings)


def _resnet(prefix, block, out):
    res = block.resblocks
    out.update({f"{prefix}.norm1.weight": res.norm1.weight, f"{prefix}.norm1.bias": res.norm1.bias,
                f"{prefix}.conv1.weight": res.conv1.weight, f"{prefix}.conv1.bias": res.conv1.bias,
                f"{prefix}.time_emb_proj.weight": res.time[1].weight, f"{prefix}.time_emb_proj.bias": res.time[1].bias,
                f"{prefix}.conv2.weight": res.conv2.weight, f"{prefix}.conv2.bias": res.conv2.bias})
    if res.use_affine_time:  # diffusers' second GroupNorm is affine: the identity affine map
        out[f"{prefix}.norm2.weight"] = torch.ones(res.conv1.out_channels)
        out[f"{prefix}.norm2.bias"] = torch.zeros(res.conv1.out_channels)
    else:
        out[f"{prefix}.norm2.weight"], out[f"{prefix}.norm2.bias"] = res.norm2.weight, res.norm2.bias
    if res.skip is not None:
        out[f"{prefix}.conv_shortcut.weight"], out[f"{prefix}.conv_shortcut.bias"] = res.skip.weight, res.skip.bias


def _attention(prefix, block, out):
    att = block.attention
    c, heads = att.qkv.in_channels, att.n_head
    width = c // heads
    weight = att.qkv.weight.reshape(heads, 3, width, c)  # per head [q, k, v] (unet.SelfAttention)
    bias = att.qkv.bias.reshape(heads, 3, width)
    q_scale = heads ** -0.5  # 1/sqrt(C) here, 1/sqrt(width) in diffusers: the ratio folded into q
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        scale = q_scale if name == "to_q" else 1.0
        out[f"{prefix}.{name}.weight"] = scale * weight[:, i].reshape(c, c)
        out[f"{prefix}.{name}.bias"] = scale * bias[:, i].reshape(c)
    out.update({f"{prefix}.group_norm.weight": att.norm.weight, f"{prefix}.group_norm.bias": att.norm.bias,
                f"{prefix}.to_out.0.weight": att.out.weight.reshape(c, c), f"{prefix}.to_out.0.bias": att.out.bias})


def unet2d_state_dict(net):
    """The weights of a UNet under UNet2DModel's names (float tensors detached, on the CPU), for unet2d_config(net)."""
    unet2d_config(net)  # refuses what cannot be expressed
    out = {"time_embedding.linear_1.weight": net.time[1].weight, "time_embedding.linear_1.bias": net.time[1].bias,
           "time_embedding.linear_2.weight": net.time[3].weight, "time_embedding.linear_2.bias": net.time[3].bias,
           "conv_in.weight": net.down[0].weight, "conv_in.bias": net.down[0].bias}
    down = list(net.down)[1:]
    levels = _levels(net)
    position = 0
    for i, blocks in enumerate(levels):
        for j, block in enumerate(blocks):
            _resnet(f"down_blocks.{i}.resnets.{j}", block, out)
            if block.attention is not None:
                _attention(f"down_blocks.{i}.attentions.{j}", block, out)
        position += len(blocks)
        if i < len(levels) - 1:
            conv = down[position][0]
            out[f"down_blocks.{i}.downsamplers.0.conv.weight"], out[f"down_blocks.{i}.downsamplers.0.conv.bias"] = conv.weight, conv.bias
            position += 1
    _resnet("mid_block.resnets.0", net.mid[0], out)
    _attention("mid_block.attentions.0", net.mid[0], out)
    _resnet("mid_block.resnets.1", net.mid[1], out)
    i, j = 0, 0
    for layer in net.up:
        if isinstance(layer, ResBlockWithAttention):
            _resnet(f"up_blocks.{i}.resnets.{j}", layer, out)
            if layer.attention is not None:
                _attention(f"up_blocks.{i}.attentions.{j}", layer, out)
            j += 1
        else:  # Upsample: nearest, then a convolution; it closes its level
            out[f"up_blocks.{i}.upsamplers.0.conv.weight"], out[f"up_blocks.{i}.upsamplers.0.conv.bias"] = layer[1].weight, layer[1].bias
            i, j = i + 1, 0
    norm, conv = net.out[0], net.out[2]
    out.update({"conv_norm_out.weight": norm.weight, "conv_norm_out.bias": norm.bias,
                "conv_out.weight": conv.weight, "conv_out.bias": conv.bias})
    if net.label is not None:
        out["class_embedding.weight"] = net.label.weight
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in out.items()}




# -- UNet2DModel as this project's network ------------------------------------------------------------

class DiffusersUNet(nn.Module):
    """diffusers' UNet2DModel with this project's network protocol: forward(x, t, y=None) gives the prediction at
    time labels t (the timesteps diffusers passes), y the class labels of a class-conditional model; image_size
    [1, C, H, W]. Its weights are the UNet2DModel's under the prefix "unet."; record() is the checkpoint's
    "network" entry that rebuilds it (DiffusersUNet.from_record)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        size = unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        self.image_size = [1, unet.config.in_channels, height, width]

    @classmethod
    def from_record(cls, record):
        """The network of a checkpoint's "network" record, with UNet2DModel's initial weights."""
        from diffusers import UNet2DModel
        if record.get("class") != NETWORK_CLASS:
            raise ValueError(f"the network record names {record.get('class')!r}; this version builds {NETWORK_CLASS}")
        return cls(UNet2DModel.from_config(record["config"]))

    def record(self):
        """{"class": "UNet2DModel", "config": its configuration as plain values}."""
        config = {key: list(value) if isinstance(value, tuple) else value
                  for key, value in self.unet.config.items() if not key.startswith("_")}
        return {"class": NETWORK_CLASS, "config": config}

    @property
    def grad_checkpoint(self):
        return self.unet.is_gradient_checkpointing

    @grad_checkpoint.setter
    def grad_checkpoint(self, enabled):
        if enabled:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()

    def forward(self, x, t, y=None):
        return self.unet(x, t, class_labels=y).sample
