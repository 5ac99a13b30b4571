"""The DDPM UNet (Ho et al. 2020) in the layout of the original implementation.

Parameter names and shapes match the original's `unet_ddpm.py`, so its published
checkpoints load with `strict=True`: GroupNorm residual blocks with a sinusoidal
time embedding (optionally as an affine scale/shift, "use_affine_time"),
multi-head self-attention at chosen resolutions, strided-conv downsampling and
nearest-neighbour upsampling, and an optional spatial fold (space-to-depth).

Optional conditioning (SPEC "Conditioning and classifier-free guidance"), added to the time embedding:
- `num_classes=K`: a learned embedding of K + 1 rows for the class label y; row K is the null label
  (the unconditional model of classifier-free guidance, Ho & Salimans 2022), used when y is None;
- `guidance_embedding=True`: the guidance weight w as an input (the students of Meng et al. 2023,
  "On Distillation of Guided Diffusion Models"): a sinusoidal embedding of the label
  GUIDANCE_LABEL_SCALE * w through a small MLP whose last layer starts at zero, so a freshly added
  w-input leaves the network's output unchanged; w is 0 when not given.
Without them no parameter is added: the state dict is exactly the original's. Their parameters are
registered after the original's, so a conditional state dict is the original's followed by `label.*`
and `guidance.*`.

The network knows nothing of diffusion: `forward(x, t, y=None, w=None)` takes a float time label.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _init_(module, scale=1.0):
    """Variance-scaling init (fan_avg, uniform); scale 0 gives zero weights."""
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(module.weight)
    bound = math.sqrt(3 * scale / ((fan_in + fan_out) / 2))
    nn.init.uniform_(module.weight, -bound, bound)
    nn.init.zeros_(module.bias)
    return module


def conv2d(in_channel, out_channel, kernel_size, stride=1, scale=1.0):
    padding = kernel_size // 2
    return _init_(nn.Conv2d(in_channel, out_channel, kernel_size, stride, padding), scale)


def linear(in_features, out_features, scale=1.0):
    return _init_(nn.Linear(in_features, out_features), scale)


# The guidance weight enters the sinusoidal embedding as the label GUIDANCE_LABEL_SCALE * w, so that the
# weights of interest (w in [0, 10]) span labels [0, 1000], the range of a 1024-step model's time labels.
GUIDANCE_LABEL_SCALE = 100.0


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding: [sin(t w_k), cos(t w_k)], w_k = 10000^(-2k/dim). The frequencies are a buffer, so the
    state dict is the original's, but they are a function of dim: loading keeps the computed ones and ignores a file's
    copy (float16 exports before they were kept in float32 rounded it, up to 4e-4 relative: 0.2 rad at label 1000)."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000) / dim))
        self.register_buffer("inv_freq", inv_freq)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "inv_freq" in state_dict:  # torch's load_state_dict passes its own copy of the caller's dict
            state_dict[prefix + "inv_freq"] = self.inv_freq.clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, t):
        angles = t.reshape(-1, 1).float() * self.inv_freq
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class Downsample(nn.Sequential):
    def __init__(self, channel):
        super().__init__(conv2d(channel, channel, 3, stride=2))


class Upsample(nn.Sequential):
    def __init__(self, channel):
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"), conv2d(channel, channel, 3))


class ResBlock(nn.Module):
    """GN-SiLU-conv, time conditioning, GN-SiLU-dropout-conv, plus a skip path.

    With `use_affine_time` the time projection gives (gamma, beta) and the second
    GroupNorm has no parameters: h = (1 + gamma) * GN(h) + beta. Otherwise the
    projection is added before an affine GroupNorm.
    """

    def __init__(self, in_channel, out_channel, time_dim, use_affine_time, dropout, groups):
        super().__init__()
        self.use_affine_time = use_affine_time
        self.norm1 = nn.GroupNorm(groups, in_channel)
        self.conv1 = conv2d(in_channel, out_channel, 3)
        time_out = 2 * out_channel if use_affine_time else out_channel
        self.time = nn.Sequential(nn.SiLU(), linear(time_dim, time_out, scale=1e-10 if use_affine_time else 1.0))
        self.norm2 = nn.GroupNorm(groups, out_channel, affine=not use_affine_time)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv2d(out_channel, out_channel, 3, scale=1e-10)
        self.skip = conv2d(in_channel, out_channel, 1) if in_channel != out_channel else None

    def forward(self, x, time_embed):
        h = self.conv1(F.silu(self.norm1(x)))
        t = self.time(time_embed)[:, :, None, None]
        if self.use_affine_time:
            gamma, beta = t.chunk(2, dim=1)
            h = (1 + gamma) * self.norm2(h) + beta
        else:
            h = self.norm2(h + t)
        h = self.conv2(self.dropout(F.silu(h)))
        return h + (x if self.skip is None else self.skip(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention over all positions.

    The qkv projection is laid out per head as [q, k, v]; logits are scaled by
    1/sqrt(C) with C the full channel count (the original's choice, not the head
    width). Runs through `scaled_dot_product_attention`, so flash or
    memory-efficient kernels are used where the device has them.
    """

    def __init__(self, channel, n_head, groups):
        super().__init__()
        self.n_head = n_head
        self.norm = nn.GroupNorm(groups, channel)
        self.qkv = conv2d(channel, 3 * channel, 1)
        self.out = conv2d(channel, channel, 1, scale=1e-10)

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, self.n_head, 3 * c // self.n_head, h * w)
        q, k, v = (part.transpose(-1, -2) for part in qkv.chunk(3, dim=2))  # [b, heads, hw, head_dim]
        out = F.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(c))
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.out(out)


class ResBlockWithAttention(nn.Module):
    def __init__(self, in_channel, out_channel, time_dim, dropout, use_attention, attn_heads, use_affine_time, groups):
        super().__init__()
        self.resblocks = ResBlock(in_channel, out_channel, time_dim, use_affine_time, dropout, groups)
        self.attention = SelfAttention(out_channel, attn_heads, groups) if use_attention else None

    def forward(self, x, time_embed):
        out = self.resblocks(x, time_embed)
        return out if self.attention is None else self.attention(out)


def spatial_fold(x, fold):
    """(B, C, H, W) -> (B, C*f*f, H/f, W/f); channel c*f*f + dy*f + dx holds pixel (Y*f+dy, X*f+dx)."""
    if fold == 1:
        return x
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // fold, fold, w // fold, fold).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * fold * fold, h // fold, w // fold)


def spatial_unfold(x, fold):
    """The inverse of `spatial_fold`."""
    if fold == 1:
        return x
    b, c, h, w = x.shape
    x = x.reshape(b, c // (fold * fold), fold, fold, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // (fold * fold), h * fold, w * fold)


class UNet(nn.Module):
    """DDPM UNet predicting a tensor of the input's shape (v, for this project).

    Level i (after folding) runs at 1/2^i of the input resolution with
    `channel * channel_multiplier[i]` channels and uses attention when 2^i is in
    `attn_strides`. Set `grad_checkpoint = True` to recompute block activations
    in the backward pass (less memory, about a third more compute).

    num_classes: class-conditional with labels 0..num_classes-1 and the null label num_classes (None:
    unconditional); guidance_embedding: the guidance weight w as an input (see the module docstring).
    """

    def __init__(self, in_channel, channel, channel_multiplier, n_res_blocks, attn_strides,
                 attn_heads=1, use_affine_time=False, dropout=0.0, fold=1, num_classes=None, guidance_embedding=False):
        super().__init__()
        assert channel % 4 == 0, f"channel must be a multiple of 4 (GroupNorm uses channel//4 groups), got {channel}"
        self.in_channel = in_channel
        self.fold = fold
        self.grad_checkpoint = False
        time_dim = 4 * channel
        groups = channel // 4
        n_levels = len(channel_multiplier)

        def block(cin, cout, attention):
            return ResBlockWithAttention(cin, cout, time_dim, dropout, attention, attn_heads, use_affine_time, groups)

        self.time = nn.Sequential(TimeEmbedding(channel), linear(channel, time_dim), nn.SiLU(), linear(time_dim, time_dim))

        down = [conv2d(in_channel * fold ** 2, channel, 3)]
        skip_channels = [channel]
        cur = channel
        for level, mult in enumerate(channel_multiplier):
            for _ in range(n_res_blocks):
                down.append(block(cur, channel * mult, 2 ** level in attn_strides))
                cur = channel * mult
                skip_channels.append(cur)
            if level != n_levels - 1:
                down.append(Downsample(cur))
                skip_channels.append(cur)
        self.down = nn.ModuleList(down)

        self.mid = nn.ModuleList([block(cur, cur, True), block(cur, cur, False)])

        up = []
        for level in reversed(range(n_levels)):
            for _ in range(n_res_blocks + 1):
                up.append(block(cur + skip_channels.pop(), channel * channel_multiplier[level], 2 ** level in attn_strides))
                cur = channel * channel_multiplier[level]
            if level != 0:
                up.append(Upsample(cur))
        self.up = nn.ModuleList(up)

        self.out = nn.Sequential(nn.GroupNorm(groups, cur), nn.SiLU(), conv2d(cur, in_channel * fold ** 2, 3, scale=1e-10))

        # Conditioning, registered last so that the original's parameters keep their order.
        self.num_classes = num_classes
        self.label = nn.Embedding(num_classes + 1, time_dim) if num_classes else None
        self.guidance = nn.Sequential(TimeEmbedding(channel), linear(channel, time_dim), nn.SiLU(),
                                      linear(time_dim, time_dim, scale=0.0)) if guidance_embedding else None

    @property
    def null_label(self):
        """The label of the unconditional model (row num_classes of the embedding); None if unconditional."""
        return self.num_classes if self.label is not None else None

    def embed(self, x, t, y=None, w=None):
        """The time embedding plus the label and guidance-weight embeddings (y None: the null label;
        w None: 0). y and w are one value for the batch or one per image."""
        time_embed = self.time(t)
        batch = x.shape[0]
        if self.label is not None:
            y = torch.full((batch,), self.num_classes, device=x.device) if y is None else y
            time_embed = time_embed + self.label(torch.as_tensor(y, device=x.device).long().expand(batch))
        elif y is not None:
            raise ValueError("this UNet is unconditional (built without num_classes) but was given labels y")
        if self.guidance is not None:
            w = torch.zeros(batch, device=x.device) if w is None else w
            w = torch.as_tensor(w, device=x.device, dtype=torch.float32).expand(batch)
            time_embed = time_embed + self.guidance(GUIDANCE_LABEL_SCALE * w)
        elif w is not None:
            raise ValueError("this UNet has no guidance-weight input (built without guidance_embedding) but was given w")
        return time_embed

    def _block(self, layer, x, time_embed):
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(layer, x, time_embed, use_reentrant=False)
        return layer(x, time_embed)

    def forward(self, x, t, y=None, w=None):
        time_embed = self.embed(x, t, y, w)
        h = spatial_fold(x, self.fold)
        skips = []
        for layer in self.down:
            h = self._block(layer, h, time_embed) if isinstance(layer, ResBlockWithAttention) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = self._block(layer, h, time_embed)
        for layer in self.up:
            if isinstance(layer, ResBlockWithAttention):
                h = self._block(layer, torch.cat([h, skips.pop()], dim=1), time_embed)
            else:
                h = layer(h)
        return spatial_unfold(self.out(h), self.fold)
