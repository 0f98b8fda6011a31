"""model.pretrained: a run's initial weights from a diffusers checkpoint instead of the seeded init.

Like materialize (parallel/materialize.py), it fills a model built on the meta device, already
parallelized and cut to this rank's pipeline stage, so no rank ever holds the whole model: each
parameter reads only its tp part from the safetensors files (models/convert.py read_pretrained),
and under ZeRO-3 is handed to the partitioner before the next is read.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from megasora.config import Config
from megasora.models import wan_arch
from megasora.models.convert import read_pretrained
from megasora.parallel.materialize import adopt, real_parameter


def load_pretrained(local: nn.Module, cfg: Config, tp_rank: int,
                    partition: Callable[[nn.Parameter], None] | None = None) -> None:
    """Give `local` this rank's part of cfg.model.pretrained (whose shape config.apply_pretrained set)."""
    held = dict(local.named_parameters())
    values = {}
    for name, value in read_pretrained(local, wan_arch(cfg), cfg.model.pretrained, tp_rank):
        values[name] = real_parameter(held[name], value)
        if partition is not None:
            partition(values[name])
    adopt(local, values)
