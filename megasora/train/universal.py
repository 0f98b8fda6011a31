"""Layout changes on resume: DeepSpeed universal checkpoints (the EMA reshards itself: train/ema.py).

A checkpoint saved under one layout (dp, tp, sp, ZeRO stage) is converted with DeepSpeed's
`ds_to_universal` into per-parameter fp32 + optimizer-state files, which `load_universal`
re-slices for any new layout. DeepSpeed needs to know how each tensor-parallel parameter was
split: `universal_checkpoint_info` records that from the `partition_dim` the TP layers set.
"""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from megasora.parallel.lora import lora_partition_dims
from megasora.parallel.tensor import tp_partition_dims

log = logging.getLogger("megasora")


def universal_checkpoint_info(model: nn.Module) -> dict[str, Any]:
    """Column-parallel params (split dim 0) are DeepSpeed's default; name the rest.

    Recorded from the model's TP plan, not from the current tp degree: a checkpoint saved at
    tp=1 must still tell DeepSpeed how to slice row-parallel weights for a tp=2 resume.
    """
    from deepspeed.checkpoint import constants as c  # lazy: DeepSpeed takes ~1 s; `megasora ckpt` imports this module
    split = tp_partition_dims(model) | lora_partition_dims(model)
    replicated, row_parallel = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:  # frozen (LoRA's base): not in the optimizer, so not in the conversion
            continue
        dim = split.get(name)
        if dim is None:
            replicated.append(f"^{re.escape(name)}$")
        elif dim == 1:
            row_parallel.append(f"^{re.escape(name)}$")
    return {c.TP_REPLICATED_PARAMETER_PATTERNS: replicated,
            c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: row_parallel,
            c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE}


def convert_to_universal(tag_dir: Path, out_dir: Path) -> None:
    """Run DeepSpeed's ds_to_universal (one process); atomic: written to a temp dir, then renamed."""
    from deepspeed.checkpoint import ds_to_universal  # lazy: DeepSpeed, ~1 s (see above)
    tmp = out_dir.with_name(out_dir.name + ".converting")
    shutil.rmtree(tmp, ignore_errors=True)
    args = ds_to_universal.argparse.Namespace(
        input_folder=str(tag_dir), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=False)
    log.info("converting %s to a universal checkpoint (layout changed)", tag_dir)
    ds_to_universal.main(args)
    tmp.rename(out_dir)
