"""BCE + Dice loss for binary segmentation, always computed in float32."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice, pooled over the whole batch.

    Pooling (rather than a mean of per-image Dice) keeps the loss sensible on empty masks: an empty
    ground truth (a normal image) contributes its predicted mass to the denominator, so false positives are
    penalised in proportion to their size, instead of a per-image Dice that is all-or-nothing there.
    """
    probs = torch.sigmoid(logits.float())
    target = target.float()
    intersection = (probs * target).sum()
    return 1.0 - (2.0 * intersection + smooth) / (probs.sum() + target.sum() + smooth)


class BCEDiceLoss(nn.Module):
    """bce_weight * BCE-with-logits + dice_weight * (1 - soft Dice); inputs may be bf16/fp16, math is fp32."""

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1.0):
        super().__init__()
        self.bce_weight, self.dice_weight, self.smooth = bce_weight, dice_weight, smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        target = target.float()
        loss = logits.new_zeros(())
        if self.bce_weight:
            loss = loss + self.bce_weight * F.binary_cross_entropy_with_logits(logits, target)
        if self.dice_weight:
            loss = loss + self.dice_weight * soft_dice_loss(logits, target, self.smooth)
        return loss


def deep_supervision_loss(seg_loss, aux_logits, target: torch.Tensor) -> torch.Tensor:
    """Mean of `seg_loss` over the coarser decoder outputs, each against the mask average-pooled to its size."""
    return torch.stack([seg_loss(a, F.avg_pool2d(target, target.shape[-1] // a.shape[-1])) for a in aux_logits]).mean()
