"""A user-written attack: invert recorded features by nearest neighbour in the auxiliary data.

With query access to the client's head (``--attacker-knowledge query`` or ``whitebox``), the
cloud has its own public images processed, then answers every recorded feature with the
auxiliary image whose features lie closest (L2). No training: a floor every learned inversion
should beat, and a strong one when the auxiliary data resembles the clients'.

Use it from the simulator with the ``module:Class(kwargs)`` form, from the folder that holds
this file (or with that folder on ``PYTHONPATH``), next to the built-in attacks::

    python -m sim.run --clients 10 --attacks "decoder,custom_attack:NearestNeighbour(chunk=256)"

Its rows appear in leakage.csv under its name, ``nearest``, and it takes part in the worst case.
"""

from __future__ import annotations

import torch

from attacks import Attack, Knowledge


class NearestNeighbour(Attack):
    """Answer each feature with the auxiliary image whose (defended) features are nearest."""

    name = "nearest"  # the name its rows and reports carry
    needs = "query"  # the least knowledge it works with: it must have images processed

    def __init__(self, chunk: int = 256) -> None:
        super().__init__()
        if chunk < 1:
            raise ValueError(f"chunk must be positive, got {chunk}")
        self.chunk = chunk

    def _fit(self, knowledge: Knowledge, aux01: torch.Tensor, aux_labels: torch.Tensor | None) -> None:
        assert knowledge.query is not None  # guaranteed by needs = "query"
        self.images = aux01
        self.keys = knowledge.query(aux01).flatten(1)

    def _run(self, features: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, len(features), self.chunk):
            z = features[start:start + self.chunk].flatten(1)
            out.append(self.images[torch.cdist(z, self.keys).argmin(1)])
        return torch.cat(out)
