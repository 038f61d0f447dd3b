"""A user-written defense: quantize the features the client sends to a few levels per sample.

Coarse features carry fewer bits about the input; the cloud's tail trains on them through a
straight-through gradient (the head is trained as if the rounding were the identity).

Use it from the simulator with the ``module:Class(kwargs)`` form, from the folder that holds
this file (or with that folder on ``PYTHONPATH``); Ray ships the module to every worker::

    python -m sim.run --clients 10 --defense "custom_defense:Quantize(levels=4)"

It composes with the built-in defenses like any other: ``"custom_defense:Quantize(levels=4)+noise(sigma=0.05)"``.
"""

from __future__ import annotations

import torch

from defenses import Defense


class Quantize(Defense):
    """Round each sample's features to ``levels`` evenly spaced values between its min and max."""

    name = "quantize"  # the name its rows and reports carry

    def __init__(self, levels: int = 4) -> None:
        super().__init__()
        if levels < 2:
            raise ValueError(f"levels must be at least 2, got {levels}")
        self.levels = levels
        self._error = 0.0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        flat = z.flatten(1)
        low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
        step = (high - low).clamp_min(1e-8) / (self.levels - 1)
        q = (torch.round((flat - low) / step) * step + low).view_as(z)
        self._error = float((q - z).pow(2).mean())
        return z + (q - z).detach()  # straight-through: rounded forward, identity backward

    def report(self) -> dict[str, float]:
        return {"mse": self._error}  # the last batch's quantization error, in metrics.jsonl

    def public_params(self) -> dict[str, int]:
        return {"levels": self.levels}
