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

import torch
from torch import nn

from megasora.parallel.lora import lora_partition_dims
from megasora.parallel.tensor import tp_partition_dims

log = logging.getLogger("megasora")


def split_dims(model: nn.Module) -> dict[str, int]:
    """Parameter name -> the dim tp splits it along: the TP layers' weights and LoRA's split factors."""
    return tp_partition_dims(model) | lora_partition_dims(model)


def universal_checkpoint_info(model: nn.Module) -> dict[str, Any]:
    """Column-parallel params (split dim 0) are DeepSpeed's default; name the rest.

    Recorded from the model's TP plan, not from the current tp degree: a checkpoint saved at
    tp=1 must still tell DeepSpeed how to slice row-parallel weights for a tp=2 resume.
    """
    from deepspeed.checkpoint import constants as c  # lazy: DeepSpeed takes ~1 s; `megasora ckpt` imports this module
    split = split_dims(model)
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
    _loadable_by_every_zero_stage(tmp)
    tmp.rename(out_dir)


# A ZeRO-3 engine looks for zero_pp_rank_0_mp_rank_XX_model_states.pt, a ZeRO-1/2 engine for
# mp_rank_XX_model_states.pt; a universal load reads only metadata from them (client state, LR
# scheduler), the weights come from zero/.
_ZERO3_STATES = re.compile(r"^zero_pp_rank_0_(mp_rank_\d+_model_states\.pt)$")
_ZERO12_STATES = re.compile(r"^(mp_rank_\d+_model_states\.pt)$")


def _loadable_by_every_zero_stage(uni: Path) -> None:
    """Complete what ds_to_universal writes for one ZeRO stage so the other stage's loader reads it too.

    DeepSpeed 0.19.8 writes a ZeRO-3 checkpoint's Adam step once, in optimizer_state.pt's
    optimizer_state_dict (what stage3.py reads), a ZeRO-1/2 one per parameter as zero/NAME/step.pt
    (what ZeRO-1/2 read, with the ds_version they check); and the model-states files under the
    saving stage's names. Each is added in the other's form, so ZeRO-3 <-> ZeRO-1/2 resumes.
    """
    import deepspeed  # lazy: DeepSpeed, ~1 s (see above)
    from deepspeed.checkpoint import constants as c  # lazy: as above
    zero = uni / "zero"
    global_state = torch.load(zero / "optimizer_state.pt", weights_only=False)
    param_dirs = [d for d in zero.iterdir() if d.is_dir()]
    if c.OPTIMIZER_STATE_DICT in global_state:  # saved under ZeRO-3
        step = global_state[c.OPTIMIZER_STATE_DICT]["state"][0]["step"]
        shapes = _zero3_param_shapes(uni)
        for param_dir in param_dirs:
            if not (param_dir / "step.pt").exists():
                torch.save(step, param_dir / "step.pt")
            for key in ("fp32", "exp_avg", "exp_avg_sq"):  # flat tensors; ZeRO-1/2 want {"param": shaped}
                saved = torch.load(param_dir / f"{key}.pt", weights_only=False)
                if isinstance(saved, torch.Tensor):
                    torch.save({c.PARAM: saved.view(shapes[param_dir.name])}, param_dir / f"{key}.pt")
        global_state.setdefault(c.DS_VERSION, deepspeed.__version__)
    else:  # saved under ZeRO-1/2: the step.pt of every parameter the optimizer holds is the same
        steps = [d / "step.pt" for d in param_dirs if (d / "step.pt").exists()]
        if steps:  # none: the optimizer holds nothing yet, no step to carry
            step = torch.load(steps[0], weights_only=False)
            global_state[c.OPTIMIZER_STATE_DICT] = {"state": {0: {"step": step}},
                                                    c.PARAM_GROUPS: global_state[c.PARAM_GROUPS]}
    torch.save(global_state, zero / "optimizer_state.pt")
    for states in sorted(uni.glob("*model_states.pt")):
        zero3, zero12 = _ZERO3_STATES.match(states.name), _ZERO12_STATES.match(states.name)
        twin = uni / zero3.group(1) if zero3 else uni / f"zero_pp_rank_0_{states.name}" if zero12 else None
        if twin is not None and not twin.exists():
            shutil.copyfile(states, twin)


def unshare_step_counters(optimizer: Any) -> None:
    """Give every optimizer state its own `step` tensor after a universal load.

    DeepSpeed 0.19.8's ZeRO-3 universal load (stage3.py load_hp_checkpoint_state_from_checkpoint_dir_stage3)
    assigns one and the same `step` tensor to the state of every sub-group; torch's Adam increments
    `step` in place once per sub-group, so with our two parameter groups (decay / no decay) it
    advanced twice per optimizer step and every group after the first took the bias corrections of
    a later step (measured: ZeRO-3 dp2 -> ring2, the loss 2e-4 off one step after the resume, the
    exp_avg / exp_avg_sq exact, the no-decay weights 2.6e-4 off). `optimizer`: DeepSpeed's ZeRO
    optimizer or the torch optimizer it wraps.
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    seen: set[int] = set()
    for state in inner.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            if id(step) in seen:
                state["step"] = step.clone()
            seen.add(id(state["step"]))


def _zero3_param_shapes(uni: Path) -> dict[str, torch.Size]:
    """Each parameter's shape as a ZeRO-3 checkpoint recorded it (tp rank 0's: the whole tensor at tp 1)."""
    from deepspeed.checkpoint import constants as c  # lazy: DeepSpeed, ~1 s (see above)
    states = sorted(uni.glob("zero_pp_rank_0_mp_rank_*_model_states.pt"))[0]
    groups = torch.load(states, map_location="cpu", weights_only=False)[c.PARAM_SHAPES]
    return {name: torch.Size(shape) for group in groups for name, shape in group.items()}


def tp_rank_view(uni: Path, model: nn.Module, tp_rank: int, tp: int) -> Path:
    """A universal checkpoint as DeepSpeed's ZeRO-3 loader must see it on tensor-parallel rank
    `tp_rank` of `tp`: each tp-split tensor cut to that rank's slice, everything else linked.

    stage3.py load_hp_checkpoint_state partitions whatever tensor it reads over dp x sp and cuts
    tp slices only for DeepSpeed's AutoTP layers, so a whole weight would put the head of the
    tensor on every tp rank. Written once per tp rank (beside `uni`, atomic like the conversion);
    the slices are the contiguous dim-0 / dim-1 chunks the TP layers hold (parallel/tensor.py).
    """
    from deepspeed.checkpoint import constants as c  # lazy: DeepSpeed, ~1 s (see above)
    out = uni.with_name(f"{uni.name}.tp{tp}_{tp_rank:02d}")
    if out.is_dir():
        return out
    tmp = out.with_name(out.name + ".writing")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "zero").mkdir(parents=True)
    for states in uni.glob("*model_states.pt"):
        (tmp / states.name).symlink_to(states.resolve())
    (tmp / "zero" / "optimizer_state.pt").symlink_to((uni / "zero" / "optimizer_state.pt").resolve())
    split = split_dims(model)
    for param_dir in (d for d in (uni / "zero").iterdir() if d.is_dir()):
        dim = split.get(param_dir.name)
        if dim is None:  # replicated over tp: the whole tensor on every rank
            (tmp / "zero" / param_dir.name).symlink_to(param_dir.resolve())
            continue
        (tmp / "zero" / param_dir.name).mkdir()
        for f in param_dir.glob("*.pt"):
            saved = torch.load(f, weights_only=False)
            if f.stem == "step" or not isinstance(saved, dict):  # the step; _loadable_by_every_zero_stage shapes the rest
                (tmp / "zero" / param_dir.name / f.name).symlink_to(f.resolve())
                continue
            part = saved[c.PARAM].chunk(tp, dim=dim)[tp_rank].contiguous()
            torch.save({c.PARAM: part}, tmp / "zero" / param_dir.name / f.name)
    tmp.rename(out)
    return out
