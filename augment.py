"""Batched, on-device data augmentation: one set of tensor ops for the whole batch, random per sample.

The training data lives on the device as uint8 (see tensor_cache.build_cache); each step slices a batch and calls
`augment_batch`, so there is no per-item Python work, no DataLoader and no worker process in the hot loop.
Per-sample parameters are drawn from a CPU generator (a few numbers per image), which makes a run's
augmentation identical on CPU and GPU and lets a checkpoint save and restore it exactly.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    """Ranges of the random transforms; `scaled(s)` multiplies every range by s (0 = no augmentation)."""

    hflip: float = 0.5           # probability of a left-right flip (no up-down flip: skin is always on top)
    rotate_deg: float = 15.0     # rotation in [-r, r] degrees
    scale: float = 0.15          # zoom factor in [1-s, 1+s]
    translate: float = 0.08      # shift in [-t, t] of the image size, per axis
    brightness: float = 0.10     # additive, in [-b, b] (images scaled to [0, 1])
    contrast: float = 0.20       # multiplicative around 0.5, in [1-c, 1+c]
    gamma: float = 0.25          # exponent in [1/(1+g), 1+g], log-uniform
    noise: float = 0.03          # Gaussian noise sigma in [0, n]
    # What differs between scanners and hospitals (off unless asked for: see `scanner`)
    aspect: float = 0.0          # anisotropic zoom: x and y scaled apart by a factor in [1-a, 1+a]
    speckle: float = 0.0         # multiplicative, spatially correlated noise: x * exp(s * n), s in [0, a]
    blur: float = 0.0            # blend in [0, b] towards a 2x down/up-sampled copy (softer, lower-resolution)
    tgc: float = 0.0             # time-gain compensation: a vertical gain ramp of slope in [-t, t]

    def scaled(self, strength: float) -> "AugmentConfig":
        values = {k: v * strength for k, v in asdict(self).items()}
        values["hflip"] = min(self.hflip, 0.5) if strength > 0 else 0.0
        return AugmentConfig(**values)

    def with_scanner(self, strength: float) -> "AugmentConfig":
        """This config plus the scanner transforms at `strength` (1 = the ranges below, which keep a BUSI
        scan recognisable; 0 = none)."""
        return AugmentConfig(**{**asdict(self), "aspect": 0.15 * strength, "speckle": 0.25 * strength,
                                "blur": 0.8 * strength, "tgc": 0.3 * strength})


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,1,H,W] -> float32 in [0, 1]: the model's input convention."""
    return images.float().div_(255.0)


def augment_batch(images: torch.Tensor, masks: torch.Tensor, cfg: AugmentConfig, param_gen: torch.Generator,
                  noise_gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images and 0/1 masks [B,1,S,S] on any device -> (float image in [0,1], float 0/1 mask).

    Geometry is applied to image and mask by the same sampling grid, so they stay aligned; the mask is
    resampled bilinearly and thresholded at 0.5, so it stays binary.
    """
    b, device = images.shape[0], images.device
    x = to_unit_float(images)
    y = masks.float()
    scanner = bool(cfg.aspect or cfg.speckle or cfg.blur or cfg.tgc)

    # All per-sample random numbers in one CPU draw and ONE host-to-device copy (9 rows of B numbers, 4 more
    # with the scanner transforms: without them the stream is what it always was)
    draws = iter(torch.rand(13 if scanner else 9, b, generator=param_gen).to(device, non_blocking=True))

    def uniform(low, high):
        return next(draws) * (high - low) + low

    if cfg.rotate_deg or cfg.scale or cfg.translate or cfg.hflip:
        angle = uniform(-cfg.rotate_deg, cfg.rotate_deg) * (math.pi / 180)
        zoom = uniform(1 - cfg.scale, 1 + cfg.scale)
        tx, ty = uniform(-cfg.translate, cfg.translate) * 2, uniform(-cfg.translate, cfg.translate) * 2
        flip = torch.where(uniform(0, 1) < cfg.hflip, -1.0, 1.0)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        # theta maps output coords to input coords (normalised [-1, 1]); flip mirrors the x axis
        theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
        if scanner:  # aspect jitter: stretch x against y, as scanners with other pixel spacings do
            stretch = torch.exp(uniform(-1, 1) * math.log1p(cfg.aspect))
            theta = theta * torch.stack([stretch, 1 / stretch], 1).view(b, 2, 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        both = F.grid_sample(torch.cat([x, y], 1), grid, mode="bilinear", padding_mode="zeros",
                             align_corners=False)
        x, y = both[:, :1], (both[:, 1:] > 0.5).float()

    if scanner:
        x = _scanner_intensity(x, cfg, uniform, noise_gen)
    if cfg.gamma:
        log_g = math.log1p(cfg.gamma)
        x = x.clamp_min(0).pow(torch.exp(uniform(-log_g, log_g)).view(b, 1, 1, 1))
    if cfg.contrast or cfg.brightness:
        contrast = uniform(1 - cfg.contrast, 1 + cfg.contrast).view(b, 1, 1, 1)
        brightness = uniform(-cfg.brightness, cfg.brightness).view(b, 1, 1, 1)
        x = (x - 0.5) * contrast + 0.5 + brightness
    if cfg.noise:
        sigma = uniform(0, cfg.noise).view(b, 1, 1, 1)
        x = x + sigma * torch.randn(x.shape, generator=noise_gen, device=device)
    return x.clamp_(0, 1), y


def _scanner_intensity(x: torch.Tensor, cfg: AugmentConfig, uniform, noise_gen) -> torch.Tensor:
    """Resolution, speckle and gain differences between scanners, per sample, in batched ops."""
    b, _, h, w = x.shape
    soft = F.interpolate(F.avg_pool2d(x, 2), size=(h, w), mode="bilinear", align_corners=False)
    x = x + uniform(0, cfg.blur).view(b, 1, 1, 1) * (soft - x)
    # speckle: noise drawn at a quarter of the size and smoothed up, so it has a grain, not pixel noise
    grain = torch.randn((b, 1, max(1, h // 4), max(1, w // 4)), generator=noise_gen, device=x.device)
    grain = F.interpolate(grain, size=(h, w), mode="bilinear", align_corners=False)
    x = x * torch.exp(uniform(0, cfg.speckle).view(b, 1, 1, 1) * grain)
    ramp = torch.linspace(-0.5, 0.5, h, device=x.device).view(1, 1, h, 1)
    x = x * (1 + uniform(-cfg.tgc, cfg.tgc).view(b, 1, 1, 1) * ramp)
    return x.clamp(0, 1)
