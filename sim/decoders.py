"""CEM's inversion network (``res_normN8C64``), generalised to any feature and image size.

CEM's decoder for 8x8x8 CIFAR features is ResBlock(8->64, BN), 8 ResBlock(64), two stride-2
transposed-conv upsamplers (+BN+ReLU) and ResBlock(64->3) with a Sigmoid, so reconstructions lie
in [0, 1] like the images they are scored against. Here the number of upsamplers follows from the
sizes: as many exact doublings as fit (7->14->28 for Fashion-MNIST, 8->16->32 for CIFAR); when
the image is not a power-of-two multiple of the feature map (a 3x3 map for a 28x28 image), a
bilinear resize to the image size closes the gap before the last block, so the last convolutions
still see (and can sharpen) the full-resolution map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ResBlock(nn.Module):
    """Pre-activation residual block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 + shortcut.

    The shortcut is a 1x1 conv when the channel count changes (CEM's ``ResBlock``).
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_ch), nn.ReLU(True), nn.Conv2d(in_ch, out_ch, 3, padding=1),
            nn.BatchNorm2d(out_ch), nn.ReLU(True), nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


def upsample_plan(feature_hw: Sequence[int], image_hw: Sequence[int]) -> tuple[int, bool]:
    """(number of exact 2x upsamplers, whether a final resize is needed) for these sizes."""
    (fh, fw), (ih, iw) = feature_hw, image_hw
    if fh > ih or fw > iw:
        raise ValueError(f"feature map {fh}x{fw} is larger than the image {ih}x{iw}")
    doublings = int(math.floor(math.log2(min(ih / fh, iw / fw)) + 1e-9))
    return doublings, (fh << doublings, fw << doublings) != (ih, iw)


class Decoder(nn.Module):
    """z (C_z, h, w) -> image (C, H, W) in [0, 1]."""

    def __init__(self, feature_shape: Sequence[int], image_shape: Sequence[int],
                 width: int = 64, blocks: int = 8) -> None:
        super().__init__()
        doublings, self.resize = upsample_plan(tuple(feature_shape[1:]), tuple(image_shape[1:]))
        self.image_hw = tuple(image_shape[1:])
        layers: list[nn.Module] = [ResBlock(feature_shape[0], width)]
        layers += [ResBlock(width, width) for _ in range(blocks)]
        for _ in range(doublings):
            layers += [nn.ConvTranspose2d(width, width, 3, stride=2, padding=1, output_padding=1),
                       nn.BatchNorm2d(width), nn.ReLU(True)]
        self.body = nn.Sequential(*layers)
        self.out = nn.Sequential(ResBlock(width, image_shape[0]), nn.Sigmoid())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.body(z)
        if self.resize:
            h = F.interpolate(h, size=self.image_hw, mode="bilinear", align_corners=False)
        return self.out(h)


def build_decoder(feature_shape: Sequence[int], image_shape: Sequence[int],
                  width: int = 64, blocks: int = 8) -> Decoder:
    """CEM's ``res_normN8C64`` by default (``blocks`` residual blocks of ``width`` channels)."""
    if width < 1 or blocks < 0:
        raise ValueError(f"decoder needs width >= 1 and blocks >= 0, got {width}, {blocks}")
    return Decoder(tuple(feature_shape), tuple(image_shape), width, blocks)
