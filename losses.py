"""BCE + Dice loss for binary segmentation (always computed in float32), deep supervision, and the whole training
objective."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0,
                   per_image: bool = False) -> torch.Tensor:
    """1 - soft Dice, pooled over the whole batch, or (`per_image`) the mean of each image's own.

    Pooling keeps the loss sensible on empty masks: an empty ground truth (a normal image) contributes its
    predicted mass to the denominator, so false positives are penalised in proportion to their size, and a
    large lesion weighs more than a small one. `per_image` gives every image the same weight, as the reported
    metric (the mean of per-image Dice) does, so a missed lesion costs a whole image's Dice whatever its size;
    on an empty ground truth each image's term is mass / (mass + smooth), which saturates at 1.
    """
    probs = torch.sigmoid(logits.float())
    target = target.float()
    if per_image:
        probs, target = probs.flatten(1), target.flatten(1)
        intersection, total = (probs * target).sum(1), probs.sum(1) + target.sum(1)
    else:
        intersection, total = (probs * target).sum(), probs.sum() + target.sum()
    return (1.0 - (2.0 * intersection + smooth) / (total + smooth)).mean()


class BCEDiceLoss(nn.Module):
    """bce_weight * BCE-with-logits + dice_weight * (1 - soft Dice); inputs may be bf16/fp16, math is fp32.
    `dice_per_image`: see `soft_dice_loss`."""

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1.0,
                 dice_per_image: bool = False):
        super().__init__()
        self.bce_weight, self.dice_weight, self.smooth = bce_weight, dice_weight, smooth
        self.dice_per_image = dice_per_image

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        target = target.float()
        loss = logits.new_zeros(())
        if self.bce_weight:
            loss = loss + self.bce_weight * F.binary_cross_entropy_with_logits(logits, target)
        if self.dice_weight:
            loss = loss + self.dice_weight * soft_dice_loss(logits, target, self.smooth, self.dice_per_image)
        return loss


def deep_supervision_loss(seg_loss, aux_logits, target: torch.Tensor) -> torch.Tensor:
    """Mean of `seg_loss` over the coarser decoder outputs, each against the mask average-pooled to its size."""
    target = target.float()  # (validation passes the uint8 masks as they are stored)
    return torch.stack([seg_loss(a, F.avg_pool2d(target, target.shape[-1] // a.shape[-1])) for a in aux_logits]).mean()


def presence_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE of each mask's largest logit against whether its target has any lesion pixel: the image-level
    question that a false positive on a normal scan and a missed lesion both get wrong."""
    peak = logits.float().flatten(1).amax(1)
    return F.binary_cross_entropy_with_logits(peak, (target.flatten(1).amax(1) > 0).float())


def total_loss(seg_loss, outputs, masks: torch.Tensor, labels: torch.Tensor, cls_weight: float = 0.0,
               ds_weight: float = 0.0, presence_weight: float = 0.0) -> torch.Tensor:
    """The training objective of one forward pass, `outputs` = (mask logits, class logits or None[, aux logits]):
    seg loss + ds_weight * deep-supervision loss + cls_weight * cross-entropy of the class head
    + presence_weight * presence loss."""
    seg_logits, cls_logits, *aux = outputs
    aux_logits = aux[0] if aux else []
    loss = seg_loss(seg_logits, masks)
    if aux_logits and ds_weight:  # each coarser output vs the mask average-pooled to it
        loss = loss + ds_weight * deep_supervision_loss(seg_loss, aux_logits, masks)
    if cls_logits is not None and cls_weight:
        loss = loss + cls_weight * F.cross_entropy(cls_logits.float(), labels)
    if presence_weight:
        loss = loss + presence_weight * presence_loss(seg_logits, masks)
    return loss
