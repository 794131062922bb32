"""The denoising network: a UNet with self-attention and sinusoidal time encoding, its
class-conditional variant, and an exponential moving average of the weights.

Parameter names and shapes at the default arguments equal the original repository's, so its
checkpoints load with `load_state_dict(..., strict=True)`.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

# In bf16 on CPUs the fused attention kernel loses to plain softmax(Q K^T / sqrt(d)) V for short
# sequences and wins for long ones; in fp32 it wins at every length (docs/performance.md, "What limits
# the speed"). Up to this many tokens bf16 attention runs plainly: its matrix is at most 128 x 128 a head.
CPU_PLAIN_ATTENTION_TOKENS = 128


class EMA:
    """Exponential moving average of a model's weights: ema = beta * ema + (1 - beta) * model.

    For the first `step_start_ema` updates the EMA model is a plain copy (early weights are
    noise; averaging them in would only slow the EMA down). `step` counts updates and is part of
    `state_dict()`, so a resumed run continues the same average.

    With `power` = gamma the decay instead follows the run's length (Karras et al. 2024, eq. 3):
    beta_t = (1 - 1/t)^(gamma + 1) at update t = 1, 2, ..., which keeps the average over a fixed
    fraction of the steps so far (its relative width sigma_rel is 0.10 at gamma = 6.94) and needs
    no start: the first update copies.
    """

    def __init__(self, beta: float = 0.995, step_start_ema: int = 2000, power: float | None = None):
        self.beta = beta
        self.step_start_ema = step_start_ema
        self.power = power
        self.step = 0

    @torch.no_grad()
    def step_ema(self, ema_model: nn.Module, model: nn.Module, step_start_ema: int | None = None) -> None:
        start = self.step_start_ema if step_start_ema is None else step_start_ema
        if self.power is None and self.step < start:
            self.reset_parameters(ema_model, model)
        else:
            self.update_model_average(ema_model, model)
        self.step += 1

    def decay(self) -> float:
        """beta of the next update."""
        if self.power is None:
            return self.beta
        return (1 - 1 / (self.step + 1)) ** (self.power + 1)

    @torch.no_grad()
    def update_model_average(self, ema_model: nn.Module, model: nn.Module) -> None:
        # One fused multi-tensor pass: ema += (1 - beta) * (model - ema).
        torch._foreach_lerp_(list(ema_model.parameters()), list(model.parameters()), 1.0 - self.decay())
        for ema_b, b in zip(ema_model.buffers(), model.buffers()):
            ema_b.copy_(b)

    @torch.no_grad()
    def reset_parameters(self, ema_model: nn.Module, model: nn.Module) -> None:
        ema_model.load_state_dict(model.state_dict())

    def state_dict(self) -> dict:
        return {"beta": self.beta, "step_start_ema": self.step_start_ema, "power": self.power, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.beta, self.step_start_ema, self.step = state["beta"], state["step_start_ema"], state["step"]
        self.power = state.get("power")

    @staticmethod
    def copy_of(model: nn.Module) -> nn.Module:
        """A frozen deep copy of `model` to hold the averaged weights."""
        return copy.deepcopy(model).eval().requires_grad_(False)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions, then a feed-forward block; both residual.

    The weights live in an `nn.MultiheadAttention` (for the original's parameter names) but the
    attention runs through `F.scaled_dot_product_attention`, which never materialises the
    (HW x HW) weight matrix (except for a few tokens in bf16 on a CPU, where the plain kernel is faster).
    Any spatial size works: H and W are read from the input.
    """

    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.mha = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.ln = nn.LayerNorm([channels])
        self.ff_self = nn.Sequential(
            nn.LayerNorm([channels]),
            nn.Linear(channels, channels),
            nn.GELU(),
            nn.Linear(channels, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = F.linear(self.ln(x), self.mha.in_proj_weight, self.mha.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (z.unflatten(-1, (self.heads, C // self.heads)).transpose(1, 2) for z in (q, k, v))
        if q.device.type == "cpu" and q.dtype == torch.bfloat16 and H * W <= CPU_PLAIN_ATTENTION_TOKENS:
            attn = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1) @ v
        else:
            attn = F.scaled_dot_product_attention(q, k, v)
        attn = attn.transpose(1, 2).flatten(2)
        x = x + self.mha.out_proj(attn)
        x = x + self.ff_self(x)
        return x.transpose(1, 2).unflatten(2, (H, W))


class DoubleConv(nn.Module):
    """(conv3x3 -> GroupNorm -> GELU -> conv3x3 -> GroupNorm), optionally residual."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None, residual: bool = False):
        super().__init__()
        self.residual = residual
        mid_channels = mid_channels or out_channels
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(1, mid_channels),
            nn.GELU(),
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(1, out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.residual:
            return F.gelu(x + self.double_conv(x))
        return self.double_conv(x)


class Down(nn.Module):
    """Halve the resolution, convolve, and add the projected time embedding to every pixel."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int = 256):
        super().__init__()
        self.maxpool_conv = nn.Sequential(
            nn.MaxPool2d(2),
            DoubleConv(in_channels, in_channels, residual=True),
            DoubleConv(in_channels, out_channels),
        )
        self.emb_layer = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x) + self.emb_layer(t)[:, :, None, None]


class Up(nn.Module):
    """Double the resolution, concatenate the skip connection, convolve, add the time embedding."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int = 256):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv = nn.Sequential(
            DoubleConv(in_channels, in_channels, residual=True),
            DoubleConv(in_channels, out_channels, in_channels // 2),
        )
        self.emb_layer = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))

    def forward(self, x: torch.Tensor, skip_x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = torch.cat([skip_x, self.up(x)], dim=1)
        return self.conv(x) + self.emb_layer(t)[:, :, None, None]


# The network's shape (the original's by default). Widths: `width` at full resolution, then channel_mult times it at
# 1/2, 1/4 and 1/8 of the side (and twice the last in the bottleneck). Attention after each block at the
# downsampling factors in `attention`: 1 (the last up block, at full resolution), 2 and 4 (a down and an up block
# each), 8 (the last down block). `heads` attention heads everywhere.
ORIGINAL_MULT, ORIGINAL_ATTENTION = (2, 4, 4), (1, 2, 4, 8)
ORIGINAL_SHAPE = dict(channel_mult=list(ORIGINAL_MULT), attention=list(ORIGINAL_ATTENTION), heads=4)  # as flags


def shape_problem(width: int, channel_mult, attention, heads: int) -> str | None:
    """What is wrong with a UNet shape, in one line, or None."""
    if len(channel_mult) != 3 or min(channel_mult) < 1:
        return f"channel_mult must be 3 positive multipliers (1/2, 1/4 and 1/8 of the side), got {list(channel_mult)}"
    if not set(attention) <= {1, 2, 4, 8}:
        return f"attention takes the downsampling factors 1, 2, 4 and 8, got {list(attention)}"
    if heads < 1:
        return f"heads must be at least 1, got {heads}"
    m1, m2, m3 = (m * width for m in channel_mult)
    widths = {1: [width], 2: [m1, width], 4: [m2, m1], 8: [m3]}  # sa6; sa1 and sa5; sa2 and sa4; sa3
    odd = sorted({c for factor in attention for c in widths[factor] if c % heads})
    if odd:
        return f"heads {heads} does not divide the channels of every attention layer ({', '.join(map(str, odd))})"
    return None


class UNet(nn.Module):
    """The noise predictor eps_theta(x_t, t).

    `width` is the base channel count (64 in the original); every layer scales with it. Image
    sides must be divisible by 8 (three 2x downsamplings). `device` is accepted for old notebooks
    and ignored: everything follows the device of the input. `channel_mult`, `attention` and `heads`
    shape the network (see ORIGINAL_MULT); their defaults are the original's, whose parameter names
    every shape keeps (a level without attention has no saN parameters).

    `input_skip` adds a 1x1 convolution from x_t to the first block's output. Without it (the
    original network) the first block, a bias-free convolution followed by GroupNorm(1), divides
    out the scale of x_t, so eps_theta(c * x_t, t) = eps_theta(x_t, t) for every c > 0: the
    network cannot tell how large x_t is, and deterministic (DDIM) sampling drifts unchecked.
    The training scripts turn it on; the default keeps the original's parameters and outputs.
    """

    def __init__(self, c_in: int = 3, c_out: int = 3, time_dim: int = 256, width: int = 64,
                 input_skip: bool = False, device=None, channel_mult: tuple[int, int, int] = ORIGINAL_MULT,
                 attention: tuple[int, ...] = ORIGINAL_ATTENTION, heads: int = 4):
        super().__init__()
        problem = shape_problem(width, channel_mult, attention, heads)
        if problem:
            raise ValueError(problem)
        w, (m1, m2, m3) = width, channel_mult
        self.time_dim = time_dim
        self.channel_mult, self.attention, self.heads = tuple(channel_mult), tuple(sorted(attention)), heads

        def attend(channels: int, factor: int) -> nn.Module:  # a level without attention: no parameters at all
            return SelfAttention(channels, heads) if factor in attention else nn.Identity()

        self.inc = DoubleConv(c_in, w)
        self.inc_skip = nn.Conv2d(c_in, w, kernel_size=1) if input_skip else None
        self.down1 = Down(w, m1 * w, time_dim)
        self.sa1 = attend(m1 * w, 2)
        self.down2 = Down(m1 * w, m2 * w, time_dim)
        self.sa2 = attend(m2 * w, 4)
        self.down3 = Down(m2 * w, m3 * w, time_dim)
        self.sa3 = attend(m3 * w, 8)

        self.bot1 = DoubleConv(m3 * w, 2 * m3 * w)
        self.bot2 = DoubleConv(2 * m3 * w, 2 * m3 * w)
        self.bot3 = DoubleConv(2 * m3 * w, m3 * w)

        self.up1 = Up((m3 + m2) * w, m1 * w, time_dim)
        self.sa4 = attend(m1 * w, 4)
        self.up2 = Up(2 * m1 * w, w, time_dim)
        self.sa5 = attend(w, 2)
        self.up3 = Up(2 * w, w, time_dim)
        self.sa6 = attend(w, 1)
        self.outc = nn.Conv2d(w, c_out, kernel_size=1)

    def pos_encoding(self, t: torch.Tensor, channels: int) -> torch.Tensor:
        """Sinusoidal encoding of the timestep: [sin(t * f), cos(t * f)], f = 10000^(-2i/channels)."""
        inv_freq = 1.0 / (10000 ** (torch.arange(0, channels, 2, device=t.device).float() / channels))
        angles = t[:, None].float() * inv_freq[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    def unet_forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x1 = self.inc(x) if self.inc_skip is None else self.inc(x) + self.inc_skip(x)
        x2 = self.sa1(self.down1(x1, t))
        x3 = self.sa2(self.down2(x2, t))
        x4 = self.sa3(self.down3(x3, t))

        x4 = self.bot3(self.bot2(self.bot1(x4)))

        x = self.sa4(self.up1(x4, x3, t))
        x = self.sa5(self.up2(x, x2, t))
        x = self.sa6(self.up3(x, x1, t))
        return self.outc(x)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet_forward(x, self.pos_encoding(t, self.time_dim))


class UNet_conditional(UNet):
    """The UNet with a learned class embedding added to the time encoding.

    Label -1 means "no label": nothing is added for that sample, exactly as the original's
    `y=None` path. This lets label dropout and classifier-free guidance mix conditional and
    unconditional samples in one batch while keeping the original's `label_emb` shape.
    """

    def __init__(self, c_in: int = 3, c_out: int = 3, time_dim: int = 256, num_classes: int | None = None,
                 width: int = 64, input_skip: bool = False, device=None, **shape):
        super().__init__(c_in, c_out, time_dim, width, input_skip, **shape)
        if num_classes is None:
            raise ValueError("UNet_conditional needs num_classes (the number of classes in the dataset)")
        self.num_classes = num_classes
        self.label_emb = nn.Embedding(num_classes, time_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.pos_encoding(t, self.time_dim)
        if y is not None:
            keep = (y >= 0).unsqueeze(-1)
            emb = emb + self.label_emb(y.clamp(min=0)) * keep
        return self.unet_forward(x, emb)
