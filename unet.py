"""U-Net for binary lesion segmentation, with an optional image-level classification head on the bottleneck."""
from __future__ import annotations

import torch
import torch.nn as nn


class DoubleConv(nn.Module):
    """(3x3 conv -> BatchNorm -> ReLU) twice; the basic U-Net stage."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),  # BN supplies the bias
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
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
                 num_classes: int = 0, deep_supervision: bool = False):
        super().__init__()
        if depth < 1 or base_channels < 1:
            raise ValueError(f"UNet needs depth >= 1 and base_channels >= 1, got {depth} and {base_channels}")
        self.config = dict(in_channels=in_channels, out_channels=out_channels, base_channels=base_channels,
                           depth=depth, num_classes=num_classes)
        if deep_supervision:  # only when on, so that older checkpoints' configs still match exactly
            self.config["deep_supervision"] = True
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
        m = self.size_multiple
        if height % m or width % m or height < m or width < m:
            raise ValueError(f"input size {height}x{width} is not a positive multiple of {m} "
                             f"(2**depth for depth={self.config['depth']})")

    def forward(self, x: torch.Tensor, with_aux: bool = False):
        self.check_size(x.shape[-2], x.shape[-1])
        skips = [self.stem(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()  # bottleneck
        class_logits = self.classifier(x) if self.classifier is not None else None
        aux_logits = []
        for i, up in enumerate(self.ups):
            x = up(x, skips.pop())
            if with_aux and self.aux_heads is not None and i < len(self.aux_heads):
                aux_logits.append(self.aux_heads[i](x))
        if with_aux:
            return self.head(x), class_logits, aux_logits
        return self.head(x), class_logits


class UNetEnsemble(nn.Module):
    """Several UNets of one architecture for inference: the mean of their mask logits and class logits.

    `config` is the members' config plus `members` (their number), which is how a checkpoint says "ensemble".
    """

    def __init__(self, members: list[UNet]):
        super().__init__()
        if not members or any(m.config != members[0].config for m in members):
            raise ValueError("an ensemble needs one or more UNets with the same config, got "
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
