"""Splittable networks: a client head ending in a bottleneck + Sigmoid, and the cloud's tail.

Both papers split a VGG-style network early and squeeze the cut with a narrow convolution and a
Sigmoid, so the transmitted feature z lies in [0, 1] and noise levels are comparable across
runs (CEM's ``vgg11_bn_sgm``, cut after layer 4, 8 channels). The architecture is a VGG config
list (an int is conv3x3-BN-ReLU with that many channels, ``"M"`` a 2x2 max-pool); the cut layer
counts entries of that list. The tail starts with an "un-bottleneck" conv back to the width the
head had at the cut, then the rest of the list, then the classifier.

In the U-shaped split (``split="ushaped"``) the classifier's last Linear layer stays on the
client (:func:`build_last`), so the cloud's tail ends at the penultimate activations ``h`` and
neither labels nor predictions are sent to the cloud (the setting of model-completion attacks);
the gradients dL/dh the client returns still reveal the labels (:mod:`attacks.gradlabel`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

# Architectures by name: the VGG config list and the classifier's hidden widths.
ARCHS: dict[str, tuple[list[int | str], tuple[int, ...]]] = {
    # CEM's VGG-11 (cfg "A") with BN, for 32x32 RGB inputs.
    "vgg11_bn": ([64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"], (512, 512)),
    # A scaled-down VGG for 28x28 gray inputs (the calibration's model, docs/calibration.md).
    "small": ([32, "M", 64, "M", 128, "M"], (256,)),
}

DEFAULT_ARCH = {1: "small", 3: "vgg11_bn"}  # by input channels
DEFAULT_CUT = 4
SPLITS = ("vanilla", "ushaped")
LAST_PREFIX = "last."  # the client's last layer inside a U-shaped head state


@dataclass(frozen=True)
class SplitSpec:
    """Where and how a network is split; everything needed to rebuild head and tail."""

    arch: str
    in_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    cut: int = DEFAULT_CUT
    bottleneck: int = 8
    split: str = "vanilla"  # "ushaped": the client keeps the classifier's last layer

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch '{self.arch}'; known: {', '.join(ARCHS)}")
        cfg = ARCHS[self.arch][0]
        if not 1 <= self.cut <= len(cfg):
            raise ValueError(f"cut layer must be in 1..{len(cfg)} for {self.arch}, got {self.cut}")
        if self.split not in SPLITS:
            raise ValueError(f"unknown split '{self.split}'; known: {', '.join(SPLITS)}")
        if self.bottleneck < 1:
            raise ValueError(f"bottleneck width must be >= 1, got {self.bottleneck}")
        pools = sum(1 for v in cfg if v == "M")
        if min(self.in_shape[1:]) < 2**pools:
            raise ValueError(f"{self.arch} needs inputs of at least {2**pools} pixels per side")

    def _channels_at_cut(self) -> int:
        convs = [v for v in ARCHS[self.arch][0][: self.cut] if v != "M"]
        return int(convs[-1]) if convs else self.in_shape[0]

    @property
    def ushaped(self) -> bool:
        return self.split == "ushaped"

    @property
    def hidden_width(self) -> int:
        """Width of ``h``, the penultimate activations (the U-shaped tail's output)."""
        return ARCHS[self.arch][1][-1]

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        """Shape of z for one sample."""
        pools = sum(1 for v in ARCHS[self.arch][0][: self.cut] if v == "M")
        return (self.bottleneck, self.in_shape[1] >> pools, self.in_shape[2] >> pools)


def _vgg_layers(cfg: list[int | str], in_ch: int) -> tuple[list[nn.Module], int]:
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(in_ch, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU(True)]
            in_ch = int(v)
    return layers, in_ch


def normalise(x01: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """[0, 1] images -> the per-channel standardised inputs heads are trained on."""
    m = torch.tensor(mean, dtype=x01.dtype, device=x01.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x01.dtype, device=x01.device).view(1, -1, 1, 1)
    return (x01 - m) / s


def build_head(spec: SplitSpec) -> nn.Sequential:
    """Client head: the first ``cut`` entries, then a 3x3 bottleneck conv and a Sigmoid."""
    layers, ch = _vgg_layers(ARCHS[spec.arch][0][: spec.cut], spec.in_shape[0])
    layers += [nn.Conv2d(ch, spec.bottleneck, 3, padding=1), nn.Sigmoid()]
    return nn.Sequential(*layers)


def build_tail(spec: SplitSpec) -> nn.Sequential:
    """Cloud tail: un-bottleneck conv, the rest of the VGG list, then the classifier; without
    the classifier's last Linear layer in the U-shaped split (the client has it)."""
    cfg, hidden = ARCHS[spec.arch]
    width = spec._channels_at_cut()
    layers: list[nn.Module] = [
        nn.Conv2d(spec.bottleneck, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(True),
    ]
    rest, ch = _vgg_layers(cfg[spec.cut :], width)
    layers += rest
    pools = sum(1 for v in cfg if v == "M")
    flat = ch * (spec.in_shape[1] >> pools) * (spec.in_shape[2] >> pools)
    layers.append(nn.Flatten())
    for h in hidden:
        # VGG's classifier puts dropout before each hidden layer; the small net after the first.
        if spec.arch == "vgg11_bn":
            layers += [nn.Dropout(0.5), nn.Linear(flat, h), nn.ReLU(True)]
        else:
            layers += [nn.Linear(flat, h), nn.ReLU(True), nn.Dropout(0.5)]
        flat = h
    if not spec.ushaped:
        layers.append(build_last(spec))
    return nn.Sequential(*layers)


def build_last(spec: SplitSpec) -> nn.Linear:
    """The classifier's last layer, ``h -> logits``: the tail's end, or the U-shaped client's."""
    return nn.Linear(spec.hidden_width, spec.num_classes)


def state_to_numpy(module: nn.Module) -> dict[str, np.ndarray]:
    """The floating-point state of a module as numpy arrays (for Flower records and averaging).

    Integer buffers (BatchNorm's ``num_batches_tracked``) are left out: they cannot be averaged
    and are not used with a momentum-based running mean.
    """
    return {
        k: v.detach().cpu().numpy().copy()
        for k, v in module.state_dict().items()
        if v.is_floating_point()
    }


def load_numpy_state(module: nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Load a state produced by :func:`state_to_numpy`; every float entry must be present."""
    tensors = {k: torch.tensor(v) for k, v in state.items()}  # copies: inputs may be read-only
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"state mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
