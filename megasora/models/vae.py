"""Causal 3-D convolutional video VAE (4x temporal, 8x spatial) and a diffusers-VAE adapter.

Pixels are (B, 3, T, H, W) in [-1, 1]; latents are (B, C, 1 + (T-1)/4, H/8, W/8).
Causal means latent frame k depends only on pixel frames 0..4k, so the first frame is
encoded alone and an image is simply a one-frame video (T=1 -> one latent frame).

Both `VideoVAE` (ours, trainable with `megasora train-vae`) and `DiffusersVAE` (pretrained
CogVideoX / Wan weights from a local directory) expose the same interface:
    encode(x) -> (mean, logvar)      raw latent distribution
    decode(z) -> x                   raw latents -> pixels
    normalize(z) / denormalize(z)    raw <-> diffusion-space latents (shift + scale)
    latent_channels, temporal_factor, spatial_factor
The diffusion model only ever sees normalized latents: use `pixels_to_latents` and
`latents_to_pixels`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from megasora.config import ConfigError, VAEConfig
from megasora.errors import MissingPathError


@dataclass
class VAEArch:
    """Shape of our VideoVAE. The number of stages is fixed at 4 (3 spatial + 2 temporal downsamples)."""

    latent_channels: int = 4
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 1
    norm_groups: int = 8
    scaling_factor: float = 1.0
    shift_factor: float = 0.0


# Which of the 3 downsampling transitions also halve time: the last two -> 4x temporal.
_TEMPORAL_DOWN = (False, True, True)


class CausalConv3d(nn.Module):
    """3-D conv whose output frame t sees input frames <= t (left pad in time by replicating frame 0)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3) -> None:
        super().__init__()
        self.time_pad = kernel - 1
        self.space_pad = kernel // 2
        self.conv = nn.Conv3d(cin, cout, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.space_pad
        x = F.pad(x, (p, p, p, p, 0, 0))  # zero pad H, W
        # Replicate the first frame into the past so an image (T=1) sees only itself.
        x = torch.cat([x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1), x], dim=2)
        if x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled():
            # PyTorch's CPU heuristic sends batch-1 inference 3-D convs to its slow native kernel
            # (3-4x slower than oneDNN here); preprocessing encodes one clip at a time.
            c = self.conv
            return torch.mkldnn_convolution(x, c.weight, c.bias, (0, 0, 0), c.stride, c.dilation, c.groups)  # padded above
        return self.conv(x)


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm with statistics per frame: normalising over time would leak future frames."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = super().forward(x.transpose(1, 2).reshape(b * t, c, h, w))
        return y.reshape(b, t, c, h, w).transpose(1, 2)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.norm1 = FrameGroupNorm(min(groups, cin), cin, eps=1e-6)
        self.conv1 = CausalConv3d(cin, cout)
        self.norm2 = FrameGroupNorm(min(groups, cout), cout, eps=1e-6)
        self.conv2 = CausalConv3d(cout, cout)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


def _per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D op to every frame of (B, C, T, H, W)."""
    b, c, t, h, w = x.shape
    y = fn(x.transpose(1, 2).reshape(b * t, c, h, w))
    return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)


class Downsample(nn.Module):
    """Halve H, W with a strided conv; optionally halve time as 1 + (T-1)/2 keeping frame 0 alone."""

    def __init__(self, channels: int, temporal: bool) -> None:
        super().__init__()
        self.temporal = temporal
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.temporal and x.shape[2] > 1:
            first, rest = x[:, :, :1], x[:, :, 1:]
            b, c, t, h, w = rest.shape
            # Average frame pairs (1,2), (3,4), ...: output frame j sees inputs <= 2j.
            rest = rest.reshape(b, c, t // 2, 2, h, w).mean(dim=3)
            x = torch.cat([first, rest], dim=2)
        # Asymmetric pad (right/bottom) so H/2 is exact for even H, as in SD's VAE.
        return _per_frame(lambda f: self.conv(F.pad(f, (0, 1, 0, 1))), x)


class Upsample(nn.Module):
    """Double H, W (nearest + conv); optionally time as T -> 1 + 2(T-1), the inverse of Downsample."""

    def __init__(self, channels: int, temporal: bool) -> None:
        super().__init__()
        self.temporal = temporal
        self.conv = CausalConv3d(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.temporal and x.shape[2] > 1:
            first, rest = x[:, :, :1], x[:, :, 1:]
            x = torch.cat([first, rest.repeat_interleave(2, dim=2)], dim=2)
        x = _per_frame(lambda f: F.interpolate(f, scale_factor=2.0, mode="nearest"), x)
        return self.conv(x)


class Encoder(nn.Module):
    def __init__(self, arch: VAEArch) -> None:
        super().__init__()
        widths = [arch.base_channels * m for m in arch.channel_mult]
        self.conv_in = CausalConv3d(3, widths[0])
        blocks: list[nn.Module] = []
        cin = widths[0]
        for i, cout in enumerate(widths):
            for _ in range(arch.num_res_blocks):
                blocks.append(ResBlock(cin, cout, arch.norm_groups))
                cin = cout
            if i < len(widths) - 1:
                blocks.append(Downsample(cout, _TEMPORAL_DOWN[i]))
        self.blocks = nn.Sequential(*blocks)
        self.mid = ResBlock(cin, cin, arch.norm_groups)
        self.norm_out = FrameGroupNorm(min(arch.norm_groups, cin), cin, eps=1e-6)
        self.conv_out = CausalConv3d(cin, 2 * arch.latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.blocks(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, arch: VAEArch) -> None:
        super().__init__()
        widths = [arch.base_channels * m for m in reversed(arch.channel_mult)]
        self.conv_in = CausalConv3d(arch.latent_channels, widths[0])
        self.mid = ResBlock(widths[0], widths[0], arch.norm_groups)
        blocks: list[nn.Module] = []
        cin = widths[0]
        temporal_up = tuple(reversed(_TEMPORAL_DOWN))
        for i, cout in enumerate(widths):
            for _ in range(arch.num_res_blocks):
                blocks.append(ResBlock(cin, cout, arch.norm_groups))
                cin = cout
            if i < len(widths) - 1:
                blocks.append(Upsample(cout, temporal_up[i]))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = FrameGroupNorm(min(arch.norm_groups, cin), cin, eps=1e-6)
        self.conv_out = CausalConv3d(cin, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


class VideoVAE(nn.Module):
    """Causal video VAE: (B, 3, 1+4k, 8h, 8w) pixels <-> (B, C, 1+k, h, w) latents."""

    temporal_factor = 4
    spatial_factor = 8

    def __init__(self, arch: VAEArch) -> None:
        super().__init__()
        if len(arch.channel_mult) != 4:
            raise ValueError(f"VAEArch.channel_mult needs 4 entries (3 downsamples -> 8x), got {arch.channel_mult}")
        self.arch = arch
        self.latent_channels = arch.latent_channels
        self.encoder = Encoder(arch)
        self.decoder = Decoder(arch)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_pixel_shape(x.shape, self.temporal_factor, self.spatial_factor)
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.arch.shift_factor) * self.arch.scaling_factor

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.arch.scaling_factor + self.arch.shift_factor

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """Reconstruct x through a sampled latent; returns (recon, mean, logvar)."""
        mean, logvar = self.encode(x)
        return self.decode(sample_latent(mean, logvar, generator)), mean, logvar


def check_pixel_shape(shape: torch.Size, temporal_factor: int, spatial_factor: int) -> None:
    _, c, t, h, w = shape
    if c != 3 or (t - 1) % temporal_factor or h % spatial_factor or w % spatial_factor:
        raise ValueError(f"VAE input must be (B, 3, 1+{temporal_factor}k, H, W) with H, W divisible by "
                         f"{spatial_factor}; got {tuple(shape)}")


def sample_latent(mean: torch.Tensor, logvar: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    return mean + torch.exp(0.5 * logvar) * noise


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, var) || N(0, 1)) summed over latent dims, averaged over the batch."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1).mean()


def latent_shape(frames: int, height: int, width: int, vae) -> tuple[int, int, int]:
    """(T', H', W') of the latent grid for a (frames, height, width) pixel clip."""
    return 1 + (frames - 1) // vae.temporal_factor, height // vae.spatial_factor, width // vae.spatial_factor


@torch.no_grad()
def pixels_to_latents(vae, pixels: torch.Tensor, sample: bool = False,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 3, T, H, W) in [-1, 1] -> normalized latents (B, C, T', H', W') for the diffusion model."""
    mean, logvar = vae.encode(pixels)
    z = sample_latent(mean, logvar, generator) if sample else mean
    return vae.normalize(z)


@torch.no_grad()
def latents_to_pixels(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalized latents (B, C, T', H', W') -> pixels (B, 3, T, H, W) clamped to [-1, 1]."""
    return vae.decode(vae.denormalize(latents)).clamp(-1.0, 1.0)


class DiffusersVAE(nn.Module):
    """Pretrained diffusers video VAE (AutoencoderKLCogVideoX / AutoencoderKLWan) behind our interface."""

    model: Any  # a diffusers AutoencoderKL*: untyped (its config and outputs are read by attribute)
    shift: torch.Tensor
    scale: torch.Tensor

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        cfg = self.model.config
        self.latent_channels = int(getattr(cfg, "latent_channels", None) or cfg.z_dim)
        self.temporal_factor = int(getattr(cfg, "temporal_compression_ratio", None)
                                   or getattr(cfg, "scale_factor_temporal", None) or 4)
        self.spatial_factor = int(getattr(cfg, "scale_factor_spatial", None) or 2 ** (len(_block_widths(cfg)) - 1))
        shift, scale = _diffusers_latent_stats(cfg, self.latent_channels)
        self.register_buffer("shift", shift, persistent=False)
        self.register_buffer("scale", scale, persistent=False)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_pixel_shape(x.shape, self.temporal_factor, self.spatial_factor)
        dist = self.model.encode(x.to(self.model.dtype)).latent_dist
        return dist.mean.float(), dist.logvar.float()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z.to(self.model.dtype)).sample.float()

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.shift.to(z)) * self.scale.to(z)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.scale.to(z) + self.shift.to(z)


def _block_widths(cfg) -> list:
    return list(getattr(cfg, "block_out_channels", None) or cfg.dim_mult)


def _diffusers_latent_stats(cfg, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (shift, scale), shaped (C, 1, 1, 1), so normalize(z) = (z - shift) * scale."""
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:  # Wan: z_norm = (z - mean) / std
        shift, scale = torch.tensor(mean), 1.0 / torch.tensor(std)
    else:  # CogVideoX: z_norm = (z - shift_factor) * scaling_factor
        shift = torch.full((channels,), float(getattr(cfg, "shift_factor", None) or 0.0))
        scale = torch.full((channels,), float(getattr(cfg, "scaling_factor", None) or 1.0))
    return shift.float().view(-1, 1, 1, 1), scale.float().view(-1, 1, 1, 1)


GET_A_VAE = ("train one first with `megasora train-vae --config CONFIG --set data.inputs=[VIDEOS]`, which writes "
             "run.dir/vae.safetensors (for the quickstart: configs/quickstart-vae.yaml), or point vae.path at a "
             "diffusers VAE directory")


def check_vae_path(path: str) -> None:
    """vae.path is empty (a fresh VideoVAE) or exists; cheap, so commands call it before heavy work."""
    if path and not Path(path).exists():
        raise MissingPathError(f"vae.path={path!r} does not exist", GET_A_VAE, kind="config")


_DIFFUSERS_CLASSES = ("AutoencoderKLCogVideoX", "AutoencoderKLWan")
_KIND_CLASSES = {"cogvideox": "AutoencoderKLCogVideoX", "wan": "AutoencoderKLWan"}  # vae.kind -> diffusers class


def load_diffusers_vae(path: str, dtype: torch.dtype = torch.float32, kind: str = "auto") -> DiffusersVAE:
    """Load a diffusers video VAE from a local directory holding config.json + weights."""
    import diffusers  # lazy: seconds to import; only a pretrained diffusers VAE needs it

    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise MissingPathError(f"vae.path={path!r} is a directory without config.json, not a diffusers VAE",
                               GET_A_VAE, kind="config")
    class_name = json.loads(config_file.read_text()).get("_class_name")
    if class_name not in _DIFFUSERS_CLASSES:
        raise ConfigError(f"vae.path: {config_file} has _class_name={class_name!r}",
                          f"supported diffusers VAEs: {', '.join(_DIFFUSERS_CLASSES)}")
    if kind in _KIND_CLASSES and class_name != _KIND_CLASSES[kind]:
        raise ConfigError(f"vae.kind={kind} but vae.path={path!r} holds a {class_name}",
                          f"point vae.path at a diffusers {_KIND_CLASSES[kind]} directory, or set vae.kind=auto")
    model = getattr(diffusers, class_name).from_pretrained(path, torch_dtype=dtype, local_files_only=True)
    return DiffusersVAE(model.eval().requires_grad_(False))


def save_vae(vae: VideoVAE, path: str) -> None:
    """Write a VideoVAE as one safetensors file with its VAEArch in the metadata."""
    state = {k: v.detach().contiguous() for k, v in vae.state_dict().items()}
    save_file(state, path, metadata={"megasora_vae_arch": json.dumps(asdict(vae.arch))})


def load_vae_file(path: str) -> VideoVAE:
    """Inverse of save_vae: the architecture is read from the file, not from the config."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"vae.path={path!r} is not a readable .safetensors file ({err})", GET_A_VAE) from err
    if "megasora_vae_arch" not in meta:
        raise ConfigError(f"vae.path={path!r} is not a MegaSora VAE file (no megasora_vae_arch metadata)", GET_A_VAE)
    fields = json.loads(meta["megasora_vae_arch"])
    fields["channel_mult"] = tuple(fields["channel_mult"])
    vae = VideoVAE(VAEArch(**fields))
    vae.load_state_dict(load_file(path))
    return vae.eval()


def load_vae(path: str, arch: VAEArch | None = None, kind: str = "auto") -> VideoVAE | DiffusersVAE:
    """One entry point: a diffusers directory, a MegaSora .safetensors file, or (no path) a fresh VideoVAE;
    `kind` (vae.kind) names which of them the path must be."""
    check_vae_path(path)
    if not path:
        return VideoVAE(arch or VAEArch()).eval()
    if Path(path).is_dir():
        if kind == "megasora":
            raise ConfigError(f"vae.kind=megasora but vae.path={path!r} is a directory (a diffusers VAE)",
                              "point vae.path at a `megasora train-vae` .safetensors file, or set vae.kind=auto")
        return load_diffusers_vae(path, kind=kind)
    if kind in _KIND_CLASSES:
        raise ConfigError(f"vae.kind={kind} but vae.path={path!r} is a file, not a diffusers directory",
                          f"point vae.path at a diffusers {_KIND_CLASSES[kind]} directory, or set vae.kind=auto")
    return load_vae_file(path)


def arch_from_config(cfg: VAEConfig) -> VAEArch:
    """VAEArch from a `megasora.config.VAEConfig`."""
    return VAEArch(latent_channels=cfg.latent_channels, base_channels=cfg.base_channels,
                   channel_mult=tuple(cfg.channel_mult), num_res_blocks=cfg.num_res_blocks,
                   scaling_factor=cfg.scaling_factor, shift_factor=cfg.shift_factor)


def vae_from_config(cfg: VAEConfig) -> VideoVAE | DiffusersVAE:
    """The VAE a `VAEConfig` names: loaded from `cfg.path`, or a fresh VideoVAE when it is empty."""
    return load_vae(cfg.path, arch_from_config(cfg), cfg.kind)
