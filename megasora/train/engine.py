"""DeepSpeed engine construction: optimizer, LR schedule and the DeepSpeed config from ours.

`train.optimizer` picks the implementation of one and the same AdamW update (decoupled weight
decay, eps 1e-8), so a run can switch between them without changing its checkpoint layout:

- `adamw`: torch.optim.AdamW, the fused multi-tensor kernel on CUDA (default);
- `fused_adam`: DeepSpeed's FusedAdam (a CUDA op DeepSpeed builds);
- `apex_adam`: NVIDIA apex's FusedAdam, when apex is already installed (never PyPI's `apex`);
- `cpu_adam`: DeepSpeed's CPUAdam (a JIT-built C++ op), for `train.offload_optimizer=cpu`,
  i.e. ZeRO-Offload: optimizer state and step on the host, parameters on the device.

`check_optimizer` tells, before any process group exists, whether this machine can run the
choice; config.validate() has already rejected contradictory combinations.

Gradient reduction: DeepSpeed sums gradients over dp x sp in `train.grad_reduce_dtype`, fp32 by
default (as Megatron and torchtitan do): a bf16 run casts each bucket to fp32 for the
all-reduce / reduce-scatter and back, so sums over hundreds of ranks do not round at every
step of the ring, for twice the bytes (measured: bench/bench_grad_reduce.py, docs/benchmarks.md).
`bf16` halves the bytes. On CUDA the reduction overlaps backward (`overlap_comm`, ZeRO 1-3).
"""
from __future__ import annotations

import importlib
from functools import partial
from typing import Any, Callable

import torch
from torch import nn

from megasora.config import Config, ConfigError
from megasora.train.schedule import warmup_cosine

EPS = 1e-8


def deepspeed_config(cfg: Config, dp_size: int, load_universal: bool = False) -> dict[str, Any]:
    t = cfg.train
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage > 0:  # ZeRO-0 has no reduction to overlap
        zero["overlap_comm"] = overlap_comm()
    if t.zero_stage == 3:  # the path zero3_partitioner's sequence-parallel gradient scaling is written for
        zero["reduce_scatter"] = True
    if t.offload_optimizer == "cpu":  # ZeRO-Offload: fp32 master weights + Adam state live on the host
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        # Gradients are summed over dp x sp in this dtype whatever the model's (engine.py module
        # docstring); DeepSpeed reads the second key instead of the first when sp > 1.
        "communication_data_type": t.grad_reduce_dtype,
        "seq_parallel_communication_data_type": t.grad_reduce_dtype,
        # Resuming under a different layout reads a universal checkpoint (see train/universal.py).
        "checkpoint": {"load_universal": load_universal},
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * dp_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        # We pass our own optimizer (torch's AdamW by default); DeepSpeed calls that "untested".
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def overlap_comm() -> bool:
    """Whether DeepSpeed overlaps the gradient reduction with backward: on CUDA, where it has a
    side stream to run it on. Its CPU accelerator has no streams to overlap with, and ZeRO-1/2
    would keep a second reduce bucket (5e8 elements) for nothing."""
    return torch.cuda.is_available()


def check_optimizer(cfg: Config) -> None:
    """Raise a ConfigError naming train.optimizer when this machine cannot run it (no CUDA, no apex,
    DeepSpeed's op cannot be built). Called at train start, before any process group."""
    name = cfg.train.optimizer
    if name in ("fused_adam", "apex_adam") and not torch.cuda.is_available():
        raise ConfigError(f"train.optimizer={name} is a CUDA kernel but no CUDA device is visible "
                          f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use train.optimizer=adamw, "
                          "or train.optimizer=cpu_adam with train.offload_optimizer=cpu")
    if name == "apex_adam" and apex_fused_adam() is None:
        raise ConfigError("train.optimizer=apex_adam needs NVIDIA apex (apex.optimizers.FusedAdam), which is not "
                          "importable; build it from NVIDIA's apex repository (the PyPI package named apex is "
                          "unrelated) or use train.optimizer=fused_adam or adamw")
    if name in ("fused_adam", "cpu_adam"):
        builder = "FusedAdamBuilder" if name == "fused_adam" else "CPUAdamBuilder"
        try:
            load_deepspeed_op(builder)
        except Exception as err:  # a compiler error, missing headers, incompatible CPU/GPU: say which
            reason = " ".join(str(err).split())[:300]
            raise ConfigError(f"train.optimizer={name}: DeepSpeed could not build or load its {builder} op "
                              f"({type(err).__name__}: {reason}); use train.optimizer=adamw (see "
                              "`megasora env`)") from err


def load_deepspeed_op(builder_name: str) -> Any:
    """Build (JIT, into TORCH_EXTENSIONS_DIR, cached) and load one of DeepSpeed's ops for this accelerator."""
    from deepspeed.accelerator import get_accelerator  # lazy: DeepSpeed takes ~1 s; every command imports this
    builder = get_accelerator().create_op_builder(builder_name)
    if builder is None:
        raise RuntimeError(f"accelerator {get_accelerator().device_name()} has no {builder_name}")
    return builder.load()


def apex_fused_adam() -> type | None:
    """NVIDIA apex's FusedAdam class when apex is installed, else None (the PyPI `apex` has no optimizers)."""
    try:
        return importlib.import_module("apex.optimizers").FusedAdam
    except Exception:  # ImportError, or an apex built against another torch failing at import
        return None


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW over two groups (no weight decay for biases, norms and the null caption embedding)."""
    t = cfg.train
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:  # frozen: the base model under LoRA (parallel/lora.py)
            continue
        shape = getattr(p, "ds_shape", p.shape)  # a ZeRO-3 parameter's own tensor is empty (zero3_partitioner)
        (no_decay if len(shape) < 2 or "null_embedding" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [group for group in groups if group["params"]]  # LoRA's adapters are all matrices: no no_decay
    betas = (t.betas[0], t.betas[1])
    if t.optimizer == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # lazy: DeepSpeed, ~1 s (see load_deepspeed_op)
        return DeepSpeedCPUAdam(groups, lr=t.lr, betas=betas, eps=EPS, adamw_mode=True)
    if t.optimizer == "fused_adam":
        from deepspeed.ops.adam import FusedAdam  # lazy: DeepSpeed, ~1 s (see load_deepspeed_op)
        return FusedAdam(groups, lr=t.lr, betas=betas, eps=EPS, adam_w_mode=True)
    if t.optimizer == "apex_adam":
        apex_adam = apex_fused_adam()
        assert apex_adam is not None, "check_optimizer refuses apex_adam without NVIDIA apex"
        return apex_adam(groups, lr=t.lr, betas=betas, eps=EPS, adam_w_mode=True)
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=t.lr, betas=betas, eps=EPS, fused=on_cuda or None)


def zero3_partitioner(cfg: Config, mpu: Any) -> Callable[[nn.Parameter], None]:
    """ZeRO-3 at initialisation: a function that turns one parameter into DeepSpeed's ZeRO-3
    parameter holding only this rank's partition over dp x sp (`mpu`'s sequence-data-parallel
    group), for parallel/materialize.py to call as each value is drawn.

    Why not let the engine partition: DeepSpeed 0.19 converts a plain module's parameters over
    mpu.get_data_parallel_group() (dp; runtime/zero/parameter_offload.py) but reduces and
    partitions their gradients over dp x sp (engine.seq_data_parallel_group), which disagree
    when sp > 1; and it would need the whole tp shard on the rank first. Parameters converted
    here keep their group (engine._resolve_zero3_param_placement honours ds_process_group), so
    weights, gradients and optimizer state are all split over dp x sp; gradients are summed
    over sp and averaged over dp as under ZeRO-1/2 (stage3.py divides by dp*sp / sp).
    The parameter is cast to the engine's dtype first, as the engine would cast the module."""
    import deepspeed  # lazy: DeepSpeed, ~1 s (see load_deepspeed_op)
    init = deepspeed.zero.Init(data_parallel_group=mpu.get_sequence_data_parallel_group(), mpu=mpu,
                               config_dict_or_path=deepspeed_config(cfg, mpu.get_data_parallel_world_size()))
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    sp = mpu.get_sequence_parallel_world_size()

    def partition(param: nn.Parameter) -> None:
        param.data = param.data.to(dtype)
        if sp > 1:
            param.register_hook(partial(torch.mul, other=sp))  # see _SP_SUM
        init._convert_to_zero_parameters([param])  # broadcast over dp x sp (same values), keep 1/(dp*sp)
    return partition


# ZeRO-3 reduce-scatters a gradient over dp x sp and divides by dp*sp (stage3.py __avg_scatter_grads;
# only its all-reduce path, reduce_scatter=false, divides by dp*sp / sp). A sequence rank's gradient
# is its chunk's part of the sample's, so the ranks of one sample must be summed, not averaged:
# each gradient is multiplied by sp before the reduction (exact: a power-of-two sp scales the
# exponent only). deepspeed_config keeps reduce_scatter on so the two do not both apply.
_SP_SUM = "ZeRO-3 sums sequence-parallel gradients through a x sp gradient hook"


def build_engine(cfg: Config, model: nn.Module, dp_size: int, mpu: Any = None, load_universal: bool = False) -> Any:
    import deepspeed  # lazy: DeepSpeed, ~1 s (see load_deepspeed_op)
    t = cfg.train
    optimizer = build_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, t.steps, t.warmup_steps, t.min_lr_ratio))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, dp_size, load_universal), mpu=mpu)
    return engine
