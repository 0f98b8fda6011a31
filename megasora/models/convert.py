"""diffusers <-> MegaSora weights for the model families MegaSora can load (docs/wan.md).

One name table (WAN_NAMES) says which diffusers tensor is which MegaSora parameter and how it
is transformed on the way: `conv3d` flattens the Conv3d patch embedding (D, C, pt, ph, pw)
into the linear over patchify's (C, pt, ph, pw) features; `rope_rows` reorders the rows of
self-attention's q/k projections and qk-norm weights within each head from Wan's adjacent
RoPE pairs (2i, 2i+1) to rotate-half pairs (i, i + Dh/2), attention scores unchanged because q
and k get the same order; `out_rows` reorders proj_out's rows from Wan's (pt, ph, pw, C) to
patchify's (C, pt, ph, pw). All are exact and invertible.

A diffusers directory is read with safetensors alone (no accelerate, no hub): config.json, and
diffusion_pytorch_model.safetensors or its sharded form with the .index.json weight map.
`load_pretrained` gives a parallelized (meta) model this rank's part of every parameter,
reading only the rows or columns it holds (safe_open + get_slice).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from megasora.config import (
    DIFFUSERS_CONFIG,
    DIFFUSERS_INDEX,
    DIFFUSERS_WEIGHTS,
    PretrainedError,
    pretrained_settings,
    read_pretrained_config,
)
from megasora.models.wan import WanArch, WanModel

CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE = DIFFUSERS_CONFIG, DIFFUSERS_WEIGHTS, DIFFUSERS_INDEX


def _linear(diffusers: str, megasora: str, transform: str = "") -> list[tuple[str, str, str]]:
    return [(f"{diffusers}.{p}", f"{megasora}.{p}", transform) for p in ("weight", "bias")]


# (diffusers name, MegaSora name, transform); {i} is a block index.
WAN_NAMES: list[tuple[str, str, str]] = [
    ("patch_embedding.weight", "patch_embed.proj.weight", "conv3d"),
    ("patch_embedding.bias", "patch_embed.proj.bias", ""),
    *_linear("condition_embedder.time_embedder.linear_1", "t_embed.mlp.0"),
    *_linear("condition_embedder.time_embedder.linear_2", "t_embed.mlp.2"),
    *_linear("condition_embedder.time_proj", "t_embed.modulation.1"),
    *_linear("condition_embedder.text_embedder.linear_1", "caption.proj.0"),
    *_linear("condition_embedder.text_embedder.linear_2", "caption.proj.2"),
    *_linear("blocks.{i}.attn1.to_q", "blocks.{i}.attn.q", "rope_rows"),
    *_linear("blocks.{i}.attn1.to_k", "blocks.{i}.attn.k", "rope_rows"),
    *_linear("blocks.{i}.attn1.to_v", "blocks.{i}.attn.v"),
    *_linear("blocks.{i}.attn1.to_out.0", "blocks.{i}.attn.out"),
    ("blocks.{i}.attn1.norm_q.weight", "blocks.{i}.attn.q_norm.weight", "rope_rows"),
    ("blocks.{i}.attn1.norm_k.weight", "blocks.{i}.attn.k_norm.weight", "rope_rows"),
    *_linear("blocks.{i}.attn2.to_q", "blocks.{i}.cross_attn.q"),
    *_linear("blocks.{i}.attn2.to_k", "blocks.{i}.cross_attn.k"),
    *_linear("blocks.{i}.attn2.to_v", "blocks.{i}.cross_attn.v"),
    *_linear("blocks.{i}.attn2.to_out.0", "blocks.{i}.cross_attn.out"),
    ("blocks.{i}.attn2.norm_q.weight", "blocks.{i}.cross_attn.q_norm.weight", ""),
    ("blocks.{i}.attn2.norm_k.weight", "blocks.{i}.cross_attn.k_norm.weight", ""),
    *_linear("blocks.{i}.norm2", "blocks.{i}.cross_norm"),
    *_linear("blocks.{i}.ffn.net.0.proj", "blocks.{i}.mlp.fc1"),
    *_linear("blocks.{i}.ffn.net.2", "blocks.{i}.mlp.fc2"),
    ("blocks.{i}.scale_shift_table", "blocks.{i}.scale_shift_table", ""),
    *_linear("proj_out", "final.linear", "out_rows"),
    ("scale_shift_table", "final.scale_shift_table", ""),
]


def name_pairs(arch: WanArch) -> Iterator[tuple[str, str, str]]:
    """WAN_NAMES expanded over the blocks (cross_norm only if the model has it)."""
    for diffusers, megasora, transform in WAN_NAMES:
        if ".norm2." in diffusers and not arch.cross_attn_norm:
            continue
        for i in range(arch.depth) if "{i}" in diffusers else [None]:
            yield diffusers.format(i=i), megasora.format(i=i), transform


def rope_row_order(head_dim: int) -> torch.Tensor:
    """Within one head: MegaSora row j holds Wan row order[j] (evens, then odds)."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def _permute_head_rows(tensor: torch.Tensor, head_dim: int, order: torch.Tensor) -> torch.Tensor:
    """Reorder dim 0 within each head: rows (H*Dh, ...) -> the same, head by head (any whole heads)."""
    heads = tensor.shape[0] // head_dim
    return tensor.reshape(heads, head_dim, *tensor.shape[1:])[:, order].reshape(tensor.shape).contiguous()


def _out_rows(tensor: torch.Tensor, arch: WanArch, to_megasora: bool) -> torch.Tensor:
    """proj_out rows (pt, ph, pw, C) <-> (C, pt, ph, pw), trailing dims (the weight's input) kept."""
    rest = tensor.shape[1:]
    if to_megasora:
        grouped = tensor.reshape(*arch.patch, arch.in_channels, *rest)
        return grouped.permute(3, 0, 1, 2, *range(4, grouped.dim())).reshape(tensor.shape).contiguous()
    grouped = tensor.reshape(arch.in_channels, *arch.patch, *rest)
    return grouped.permute(1, 2, 3, 0, *range(4, grouped.dim())).reshape(tensor.shape).contiguous()


def to_megasora_tensor(tensor: torch.Tensor, transform: str, arch: WanArch) -> torch.Tensor:
    if transform == "out_rows":
        return _out_rows(tensor, arch, to_megasora=True)
    if transform == "conv3d":
        return tensor.reshape(tensor.shape[0], -1)
    if transform == "rope_rows":
        return _permute_head_rows(tensor, arch.hidden // arch.heads, rope_row_order(arch.hidden // arch.heads))
    return tensor


def to_diffusers_tensor(tensor: torch.Tensor, transform: str, arch: WanArch) -> torch.Tensor:
    if transform == "out_rows":
        return _out_rows(tensor, arch, to_megasora=False)
    if transform == "conv3d":
        return tensor.reshape(tensor.shape[0], arch.in_channels, *arch.patch).contiguous()
    if transform == "rope_rows":
        head_dim = arch.hidden // arch.heads
        return _permute_head_rows(tensor, head_dim, torch.argsort(rope_row_order(head_dim)))
    return tensor


def _convert(source: Mapping[str, torch.Tensor], pairs: list[tuple[str, str, str]],
             fn: Callable[[torch.Tensor, str, WanArch], torch.Tensor], arch: WanArch, what: str
             ) -> dict[str, torch.Tensor]:
    """Every name of `pairs` from `source`, each source key consumed exactly once."""
    missing = [src for src, _, _ in pairs if src not in source]
    extra = sorted(set(source) - {src for src, _, _ in pairs})
    if missing or extra:
        raise PretrainedError(f"{what}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                              f"{extra[:5]}{'...' if len(extra) > 5 else ''}",
                              "pass weights of the model the config describes (a WanTransformer3DModel T2V)")
    return {dst: fn(source[src], transform, arch) for src, dst, transform in pairs}


def wan_to_megasora(state: Mapping[str, torch.Tensor], arch: WanArch) -> dict[str, torch.Tensor]:
    """diffusers WanTransformer3DModel state dict -> WanModel state dict."""
    return _convert(state, list(name_pairs(arch)), to_megasora_tensor, arch, "diffusers weights")


def megasora_to_wan(state: Mapping[str, torch.Tensor], arch: WanArch) -> dict[str, torch.Tensor]:
    """WanModel state dict -> diffusers WanTransformer3DModel state dict."""
    pairs = [(dst, src, transform) for src, dst, transform in name_pairs(arch)]
    return _convert(state, pairs, to_diffusers_tensor, arch, "MegaSora weights")


# ---------------------------------------------------------------- configs


def read_config(path: str | Path) -> dict[str, Any]:
    """config.json of a diffusers transformer directory MegaSora can load (config.read_pretrained_config)."""
    return read_pretrained_config(path)


def wan_arch_from_config(config: dict[str, Any]) -> WanArch:
    s = {key.split(".")[-1]: value for key, value in pretrained_settings(config).items()}
    pt, ph, pw = s["patch"]
    return WanArch(in_channels=s["in_channels"], hidden=s["hidden"], depth=s["depth"], heads=s["heads"],
                   text_dim=s["dim"], patch=(pt, ph, pw), mlp_ratio=s["ffn_dim"] / s["hidden"],
                   ffn_dim=s["ffn_dim"], freq_dim=s["freq_dim"], eps=s["norm_eps"],
                   cross_attn_norm=s["cross_attn_norm"])


def diffusers_config(arch: WanArch) -> dict[str, Any]:
    """config.json of WanTransformer3DModel for `arch` (T2V)."""
    import diffusers  # lazy: only export writes the version it targets

    return {"_class_name": "WanTransformer3DModel", "_diffusers_version": diffusers.__version__,
            "patch_size": list(arch.patch), "num_attention_heads": arch.heads,
            "attention_head_dim": arch.hidden // arch.heads, "in_channels": arch.in_channels,
            "out_channels": arch.in_channels, "text_dim": arch.text_dim, "freq_dim": arch.freq_dim,
            "ffn_dim": arch.ffn_width, "num_layers": arch.depth, "cross_attn_norm": arch.cross_attn_norm,
            "qk_norm": "rms_norm_across_heads", "eps": arch.eps, "image_dim": None, "added_kv_proj_dim": None,
            "rope_max_seq_len": 1024, "pos_embed_seq_len": None}


# ---------------------------------------------------------------- files


def weight_files(path: str | Path) -> dict[str, Path]:
    """diffusers tensor name -> the safetensors file holding it (sharded or not)."""
    root = Path(path)
    if (root / INDEX_FILE).is_file():
        weight_map = json.loads((root / INDEX_FILE).read_text())["weight_map"]
        return {name: root / file for name, file in weight_map.items()}
    with safe_open(root / WEIGHTS_FILE, framework="pt") as f:
        return {name: root / WEIGHTS_FILE for name in f.keys()}


def read_diffusers(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, every tensor) of a diffusers transformer directory."""
    config, tensors = read_config(path), {}
    by_file: dict[Path, list[str]] = {}
    for name, file in weight_files(path).items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in names})
    return config, tensors


def from_diffusers(path: str | Path, dtype: torch.dtype | None = None) -> WanModel:
    """The WanModel of a diffusers WanTransformer3DModel directory; model(latents, t, text, mask) equals
    diffusers' forward at timestep = 1000 t (text zero-padded to 512 tokens)."""
    config, tensors = read_diffusers(path)
    arch = wan_arch_from_config(config)
    with torch.device("meta"):
        model = WanModel(arch)
    state = wan_to_megasora(tensors, arch)
    if dtype is not None:
        state = {name: t.to(dtype) for name, t in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model


def write_diffusers(path: str | Path, state: Mapping[str, torch.Tensor], arch: WanArch) -> Path:
    """A directory WanTransformer3DModel.from_pretrained loads: config.json + one safetensors file."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = megasora_to_wan(state, arch)
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(out / WEIGHTS_FILE),
              metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(diffusers_config(arch), indent=2))
    return out


def check_shapes(arch: WanArch, path: str | Path) -> None:
    """The checkpoint's tensors have the shapes its config (and so the model) says; one line if not."""
    with torch.device("meta"):
        expected = {name: tuple(p.shape) for name, p in WanModel(arch).named_parameters()}
    files = weight_files(path)
    for src, dst, transform in name_pairs(arch):
        if src not in files:
            raise PretrainedError(f"{path}: tensor {src} is missing", "pass a complete WanTransformer3DModel "
                                  "directory (every shard of its index present)")
        with safe_open(files[src], framework="pt") as f:
            shape = tuple(f.get_slice(src).get_shape())
        want = expected[dst]
        if math.prod(shape) != math.prod(want) or (transform != "conv3d" and shape != want):
            raise PretrainedError(f"{path}: {src} has shape {list(shape)} but its config.json "
                                  f"(hidden={arch.hidden}, depth={arch.depth}, ffn_dim={arch.ffn_width}, "
                                  f"text_dim={arch.text_dim}) makes it {list(want)}",
                                  "the weights and config.json are from different models; re-download")


def read_pretrained(local: nn.Module, arch: WanArch, path: str | Path, tp_rank: int
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, this rank's part) of every parameter of `local` (built on meta, parallelized, possibly
    one pipeline stage) from the checkpoint at `path`, reading only the rows / columns it holds.

    Parameters come one at a time, so the caller can hand each to ZeRO-3 before the next is read.
    """
    read_config(path)
    check_shapes(arch, path)  # the run's shapes (config.apply_pretrained set them from the same config.json)
    files = weight_files(path)
    to_source = {dst: (src, transform) for src, dst, transform in name_pairs(arch)}
    for name, param in local.named_parameters():
        if not param.is_meta:  # made real after the meta build (LoRA adapters): not in the checkpoint
            continue
        src, transform = to_source[name]
        with safe_open(files[src], framework="pt") as f:
            yield name, _read_part(f.get_slice(src), param, transform, arch, tp_rank).to(param.dtype)


def _read_part(piece: Any, param: torch.Tensor, transform: str, arch: WanArch, tp_rank: int) -> torch.Tensor:
    """This rank's part of one stored tensor (a safetensors slice), in MegaSora's layout."""
    dim = getattr(param, "partition_dim", None) if getattr(param, "tensor_model_parallel", False) else None
    shape = piece.get_shape()
    if dim is None or transform in ("conv3d", "out_rows"):
        whole = piece[:]
        return to_megasora_tensor(whole, transform, arch)
    width = param.shape[dim]
    index = tuple(slice(tp_rank * width, (tp_rank + 1) * width) if d == dim else slice(None)
                  for d in range(len(shape)))
    # rope_rows permutes within heads and a tp part is whole heads, so the part permutes alone
    return to_megasora_tensor(piece[index], transform, arch)
