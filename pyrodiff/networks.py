r"""Denoising networks called as ``network(x_t, t)``: a U-Net for images and an MLP for vectors.

Both embed the math timestep t (1..T) with the sinusoidal embedding of Vaswani et al. (2017) as used
by Ho et al. (2020), and return a tensor of the shape of ``x_t``.  Both can also see Fourier features of their
input (``fourier_exponents``; Kingma et al. 2021, appendix C; docs/MATH.md, section 3, "Fourier features of the
input").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import checks

__all__ = ["UNet", "MLPDenoiser", "timestep_embedding", "fourier_features", "fourier_exponents_for_levels"]

#: The largest exponent n of a Fourier feature sin(2^n pi z): at n = 16 a float32 input in [-1, 1] already puts an
#: error of about 0.01 radians into the argument (2^16 pi 2^-24), so higher ones would be mostly rounding.
MAX_FOURIER_EXPONENT = 16


def _embedding_width(name: str, value: int) -> int:
    """A width the sinusoidal embedding is taken at: half cosines, half sines, so even and >= 2."""
    if not checks.is_integer(value) or value < 2 or value % 2:
        raise checks.CheckError.refuse(name, "an even integer >= 2 (the time embedding's width)", value)
    return value


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    r"""Sinusoidal embedding :math:`[\cos(t\,\omega_i), \sin(t\,\omega_i)]`, :math:`\omega_i = P^{-i/(d/2)}`,
    of integer timesteps ``t`` (shape ``(B,)``) into ``(B, dim)``; an odd ``dim`` is refused (it has no even split)."""
    half = _embedding_width("dim", dim) // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _fourier_exponents(value: tuple[int, ...]) -> tuple[int, ...]:
    """The exponents of the Fourier features: distinct integers in 0..MAX_FOURIER_EXPONENT (empty: none)."""
    expected = f"a list of distinct integers in 0..{MAX_FOURIER_EXPONENT}"
    if not isinstance(value, list | tuple):
        raise checks.CheckTypeError.refuse("fourier_exponents", expected, value)
    for n in value:
        if not checks.is_integer(n) or not 0 <= n <= MAX_FOURIER_EXPONENT:
            raise checks.CheckError.refuse("fourier_exponents", expected, value)
    if len(set(value)) != len(value):
        raise checks.CheckError.refuse("fourier_exponents", expected, value)
    return tuple(value)


def fourier_features(x: torch.Tensor, exponents: tuple[int, ...]) -> torch.Tensor:
    r"""``x`` with its Fourier features concatenated along dimension 1 (the channels, or a vector's entries):
    :math:`[x, \sin(2^{n_1}\pi x), \cos(2^{n_1}\pi x), \sin(2^{n_2}\pi x), \dots]`, elementwise, so ``C``
    channels become ``C (1 + 2 len(exponents))`` (Kingma et al. 2021, appendix C; docs/MATH.md, section 3,
    "Fourier features of the input").  Computed in ``x``'s dtype; no exponents returns ``x`` itself."""
    if not exponents:
        return x
    features = [x]
    for n in exponents:
        scaled = x * (2.0**n * math.pi)
        features += [torch.sin(scaled), torch.cos(scaled)]
    return torch.cat(features, dim=1)


def fourier_exponents_for_levels(levels: int) -> tuple[int, ...]:
    r"""The exponents of Fourier features for data on a grid of ``levels`` evenly spaced values in [-1, 1].

    The grid's spacing is :math:`\Delta = 2 / (L - 1)` and :math:`\sin(2^n \pi z)` has period :math:`2^{1-n}`.
    With :math:`n = \log_2(L - 1)` the period is :math:`\Delta`: the feature takes the same value at every level and
    measures how far ``z`` lies from the grid, the fine detail a small noise adds; with :math:`n - 1` the period is
    :math:`2\Delta`, and neighbouring levels have opposite signs.  So the proposal is
    :math:`\{\log_2((L-1)/2), \log_2(L-1)\}`, rounded (exponents below 0 dropped): ``(3, 4)`` for the digits' 17 levels,
    ``(7, 8)`` for 256 levels, Kingma et al.'s (2021, appendix C) choice for 8-bit data."""
    checks.int_in("levels", levels, 2, 2**MAX_FOURIER_EXPONENT + 1)
    top = round(math.log2(levels - 1))
    return tuple(n for n in (top - 1, top) if n >= 0)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels) if channels >= 32 else math.gcd(8, channels), channels)


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus the time embedding, then GroupNorm-SiLU-dropout-conv, with a skip."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = _group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class _Attention(nn.Module):
    """Multi-head self-attention over the spatial positions, with a residual connection."""

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = (
            self.qkv(self.norm(x).reshape(B, C, H * W))
            .reshape(B, 3, self.num_heads, C // self.num_heads, H * W)
            .unbind(1)
        )
        h = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H * W)).reshape(B, C, H, W)


class UNet(nn.Module):
    r"""The DDPM U-Net (Ho et al. 2020, appendix B) in a configurable size.

    :param in_channels: channels of the data (the only required argument).
    :param channels: base width; level i has ``channels * channel_mult[i]`` channels.
    :param channel_mult: width multipliers, one per resolution (the image is halved between levels,
        so its side must be divisible by ``2 ** (len(channel_mult) - 1)``).
    :param num_res_blocks: residual blocks per level (depth).
    :param attention_levels: levels (indices into ``channel_mult``) with self-attention; by default the
        lowest resolution.
    :param num_heads: attention heads.
    :param dropout: dropout in the residual blocks.
    :param out_channels: output channels, by default ``in_channels``; twice that for learned variances.
    :param fourier_exponents: exponents n of Fourier features :math:`\sin(2^n\pi x)`, :math:`\cos(2^n\pi x)` of
        the input (:func:`fourier_features`), which the first convolution sees besides ``x``; empty (the default):
        none, and the network is exactly the one without the option.  See :func:`fourier_exponents_for_levels`.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int = 64,
        channel_mult: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_levels: tuple[int, ...] | None = None,
        num_heads: int = 4,
        dropout: float = 0.0,
        out_channels: int | None = None,
        fourier_exponents: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        self.check_arguments(
            channels, channel_mult, num_res_blocks, attention_levels, num_heads, dropout, fourier_exponents
        )
        self.fourier_exponents = tuple(fourier_exponents)
        if attention_levels is None:
            attention_levels = (len(channel_mult) - 1,)
        self.in_channels = in_channels
        self.num_levels = len(channel_mult)
        emb_dim = 4 * channels
        self.base = channels
        self.time_embed = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.stem = nn.Conv2d(in_channels * (1 + 2 * len(fourier_exponents)), channels, 3, padding=1)

        self.down = nn.ModuleList()
        skips, ch = [channels], channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                block = nn.ModuleList([_ResBlock(ch, channels * mult, emb_dim, dropout)])
                ch = channels * mult
                if level in attention_levels:
                    block.append(_Attention(ch, num_heads))
                self.down.append(block)
                skips.append(ch)
            if level < len(channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skips.append(ch)

        self.middle = nn.ModuleList(
            [_ResBlock(ch, ch, emb_dim, dropout), _Attention(ch, num_heads), _ResBlock(ch, ch, emb_dim, dropout)]
        )

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                block = nn.ModuleList([_ResBlock(ch + skips.pop(), channels * mult, emb_dim, dropout)])
                ch = channels * mult
                if level in attention_levels:
                    block.append(_Attention(ch, num_heads))
                if level > 0 and i == num_res_blocks:
                    block.append(nn.Upsample(scale_factor=2, mode="nearest"))
                    block.append(nn.Conv2d(ch, ch, 3, padding=1))
                self.up.append(block)

        self.out = nn.Sequential(_group_norm(ch), nn.SiLU(), nn.Conv2d(ch, out_channels or in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    @staticmethod
    def check_arguments(
        channels: int = 64,
        channel_mult: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_levels: tuple[int, ...] | None = None,
        num_heads: int = 4,
        dropout: float = 0.0,
        fourier_exponents: tuple[int, ...] = (),
    ) -> None:
        """Refuse (:class:`~pyrodiff.checks.CheckError`, naming the argument) a size the U-Net cannot be built
        with: ``channels`` even (the time embedding), at least one level with multipliers >= 1, levels with
        attention among them, heads that divide the width of every level with attention and of the middle,
        dropout in [0, 1), Fourier exponents distinct integers in 0..16.  The image side is the data's question, checked when the network first sees them."""
        _embedding_width("channels", channels)
        if not isinstance(channel_mult, list | tuple) or not channel_mult:
            raise checks.CheckError.refuse("channel_mult", "at least one multiplier (one per level)", channel_mult)
        for mult in channel_mult:
            checks.integer("channel_mult", mult, 1)
        checks.integer("num_res_blocks", num_res_blocks, 0)
        levels = len(channel_mult)
        attended = (levels - 1,) if attention_levels is None else tuple(attention_levels)
        for level in attended:
            checks.int_in("attention_levels", level, 0, levels - 1)
        checks.integer("num_heads", num_heads, 1)
        for width in sorted({channels * channel_mult[level] for level in (*attended, levels - 1)}):
            if width % num_heads:
                raise checks.CheckError.refuse(
                    "num_heads",
                    f"a number of heads that divides the width {width} of a level with attention",
                    num_heads,
                )
        checks.number("dropout", dropout, 0, 1, hi_open=True)
        _fourier_exponents(fourier_exponents)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNet(in_channels={self.in_channels}) needs input (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        factor = 2 ** (self.num_levels - 1)
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"the image side must be divisible by {factor} for this UNet, got {tuple(x.shape[-2:])}")
        emb = self.time_embed(timestep_embedding(t, self.base).to(x.dtype))
        h = self.stem(fourier_features(x, self.fourier_exponents))
        hs = [h]
        for block in self.down:
            h = _apply(block, h, emb)
            hs.append(h)
        h = _apply(self.middle, h, emb)
        for block in self.up:
            h = _apply(block, torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


def _apply(block: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    for layer in block:
        h = layer(h, emb) if isinstance(layer, _ResBlock) else layer(h)
    return h


class MLPDenoiser(nn.Module):
    """A residual MLP for vector data of dimension ``dim``: the input and the time embedding are
    projected to ``hidden`` units and passed through ``depth`` SiLU residual layers.

    :param dim: data dimension D (input size).
    :param hidden: width.
    :param depth: number of residual layers.
    :param out_dim: output size, by default ``dim``; twice that for learned variances.
    :param fourier_exponents: exponents n of Fourier features of the input (:func:`fourier_features`), which the
        input projection sees besides ``x``; empty (the default): none, as :class:`UNet`'s.
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 128,
        depth: int = 3,
        out_dim: int | None = None,
        fourier_exponents: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        self.check_arguments(hidden, depth, fourier_exponents)
        self.dim = dim
        self.hidden = hidden
        self.fourier_exponents = tuple(fourier_exponents)
        self.inp = nn.Linear(dim * (1 + 2 * len(fourier_exponents)), hidden)
        self.time = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.layers = nn.ModuleList(
            [
                nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
                for _ in range(depth)
            ]
        )
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, out_dim or dim))

    @staticmethod
    def check_arguments(hidden: int = 128, depth: int = 3, fourier_exponents: tuple[int, ...] = ()) -> None:
        """Refuse (:class:`~pyrodiff.checks.CheckError`, naming the argument) a width or depth the MLP cannot have:
        ``hidden`` even and >= 2 (the time embedding), ``depth`` >= 0; and Fourier exponents as :class:`UNet`'s."""
        _embedding_width("hidden", hidden)
        checks.integer("depth", depth, 0)
        _fourier_exponents(fourier_exponents)

    @property
    def data_shape(self) -> tuple[int]:
        """The shape of one example, ``(dim,)`` (a :class:`~pyrodiff.chain.reverse.DiffusionModel` of this network
        can sample before it has seen data)."""
        return (self.dim,)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"MLPDenoiser(dim={self.dim}) needs input (B, {self.dim}), got {tuple(x.shape)}")
        h = self.inp(fourier_features(x, self.fourier_exponents)) + self.time(
            timestep_embedding(t, self.hidden).to(x.dtype)
        )
        for layer in self.layers:
            h = h + layer(h)
        return self.out(h)
