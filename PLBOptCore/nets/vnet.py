"""DHC's VNet (``xmed-lab/DHC`` ``code/models/vnet.py``), batch-norm variant, with a feature output.

Layout for ``f = base_filters`` (stages = Conv3d k3 p1 → BatchNorm3d → ReLU)::

    x1 = block1(x)            1 stage,  f      full resolution
    x2 = block2(down(x1))     2 stages, 2f     /2
    x3 = block3(down(x2))     3 stages, 4f     /4
    x4 = block4(down(x3))     3 stages, 8f     /8
    x5 = block5(down(x4))     3 stages, 16f    /16   → Dropout3d(0.5)
    x6 = block6(up(x5) + x4)  3 stages, 8f
    x7 = block7(up(x6) + x3)  3 stages, 4f
    x8 = block8(up(x7) + x2)  2 stages, 2f
    x9 = block9(up(x8) + x1)  1 stage,  f            → Dropout3d(0.5) → 1×1×1 conv → logits

``down`` = Conv3d(k2, s2) → BN → ReLU, ``up`` = ConvTranspose3d(k2, s2) → BN → ReLU. Skips are
additive (V-Net style), not concatenated, so every decoder block keeps the width of its encoder
twin. Inputs must be divisible by 16 along each axis (4 poolings).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn


def _conv_block(n_stages: int, in_channels: int, out_channels: int) -> nn.Sequential:
    layers = []
    for i in range(n_stages):
        layers += [
            nn.Conv3d(in_channels if i == 0 else out_channels, out_channels, kernel_size=3, padding=1),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


def _down_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, kernel_size=2, stride=2),
        nn.BatchNorm3d(out_channels),
        nn.ReLU(inplace=True),
    )


def _up_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose3d(in_channels, out_channels, kernel_size=2, stride=2),
        nn.BatchNorm3d(out_channels),
        nn.ReLU(inplace=True),
    )


def _init_weights(module: nn.Module) -> None:
    """DHC's initialisation: Kaiming-normal convolution weights, batch norm at identity."""
    for m in module.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm3d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _projection_head(channels: int, dim: int) -> nn.Sequential:
    """1×1×1 conv ``channels→channels`` → ReLU → 1×1×1 conv ``channels→dim``, initialised like the trunk.

    Built from a copy of the random state: a head must not change the initial weights of the trunk or
    of the next subnet, or comparing runs with and without it compares two initialisations as well
    (one DHC seed scored 79.3 and 82.8 Dice with two initialisations).
    """
    with torch.random.fork_rng(devices=[]):
        head = nn.Sequential(nn.Conv3d(channels, channels, kernel_size=1), nn.ReLU(inplace=True),
                             nn.Conv3d(channels, dim, kernel_size=1))
        _init_weights(head)
    return head


class VNet(nn.Module):
    """DHC's VNet returning logits and last-decoder features.

    Args:
        in_channels: image channels (1 for CT).
        num_classes: output classes ``C`` including background.
        base_filters: width ``f`` of the first level (DHC: 32).
        dropout: ``Dropout3d(p=0.5)`` on the bottleneck ``x5`` and on ``x9`` before ``out_conv``;
            like any dropout it only acts in ``train()`` mode.
        projection_dim: if > 0, ``features`` are passed through a projection head
            (1×1×1 conv ``f→f`` → ReLU → 1×1×1 conv ``f→projection_dim``) for the triplet loss.

    ``forward(x)`` with ``x`` of shape ``(B, in_channels, Z, Y, X)`` returns

    - ``logits``: ``(B, C, Z, Y, X)``;
    - ``features``: ``(B, F, Z, Y, X)`` with ``F = base_filters`` (or ``projection_dim``). They are
      ``x9``, the output of the last decoder block taken **before** the final dropout (the
      triplet loss compares voxel embeddings, which channel dropout would zero at random; in
      train mode they still carry the bottleneck dropout); with a projection head, the head's
      output on that ``x9``.

    Initialisation follows DHC's ``kaiming_normal_init_weight``: every ``Conv3d`` weight is
    Kaiming-normal (fan-in, ReLU gain), BatchNorm weight 1 and bias 0; ConvTranspose3d layers and
    conv biases keep PyTorch's default initialisation, as in DHC.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, base_filters: int = 32,
                 dropout: bool = True, projection_dim: int = 0) -> None:
        super().__init__()
        f = int(base_filters)
        self.num_classes = int(num_classes)
        self.feature_dim = int(projection_dim) if projection_dim > 0 else f
        self.has_dropout = bool(dropout)

        self.block_one = _conv_block(1, in_channels, f)
        self.block_one_dw = _down_block(f, 2 * f)
        self.block_two = _conv_block(2, 2 * f, 2 * f)
        self.block_two_dw = _down_block(2 * f, 4 * f)
        self.block_three = _conv_block(3, 4 * f, 4 * f)
        self.block_three_dw = _down_block(4 * f, 8 * f)
        self.block_four = _conv_block(3, 8 * f, 8 * f)
        self.block_four_dw = _down_block(8 * f, 16 * f)
        self.block_five = _conv_block(3, 16 * f, 16 * f)

        self.block_five_up = _up_block(16 * f, 8 * f)
        self.block_six = _conv_block(3, 8 * f, 8 * f)
        self.block_six_up = _up_block(8 * f, 4 * f)
        self.block_seven = _conv_block(3, 4 * f, 4 * f)
        self.block_seven_up = _up_block(4 * f, 2 * f)
        self.block_eight = _conv_block(2, 2 * f, 2 * f)
        self.block_eight_up = _up_block(2 * f, f)
        self.block_nine = _conv_block(1, f, f)
        self.out_conv = nn.Conv3d(f, self.num_classes, kernel_size=1)

        # One module shared by both dropout sites, as in DHC (it has no parameters).
        self.dropout = nn.Dropout3d(p=0.5)
        _init_weights(self)
        self.projection = _projection_head(f, int(projection_dim)) if projection_dim > 0 else None

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``x (B, in_channels, Z, Y, X)`` → ``(logits (B, C, Z, Y, X), features (B, F, Z, Y, X))``."""
        if any(s % 16 for s in x.shape[2:]):
            raise ValueError(f"VNet input spatial size must be divisible by 16 (4 poolings), got {tuple(x.shape[2:])}")
        x1 = self.block_one(x)
        x2 = self.block_two(self.block_one_dw(x1))
        x3 = self.block_three(self.block_two_dw(x2))
        x4 = self.block_four(self.block_three_dw(x3))
        x5 = self.block_five(self.block_four_dw(x4))
        if self.has_dropout:
            x5 = self.dropout(x5)

        x6 = self.block_six(self.block_five_up(x5) + x4)
        x7 = self.block_seven(self.block_six_up(x6) + x3)
        x8 = self.block_eight(self.block_seven_up(x7) + x2)
        x9 = self.block_nine(self.block_eight_up(x8) + x1)

        logits = self.out_conv(self.dropout(x9) if self.has_dropout else x9)
        features = self.projection(x9) if self.projection is not None else x9
        return logits, features
