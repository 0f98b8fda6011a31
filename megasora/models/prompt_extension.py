"""Prompt extension (the Sora report's DALL-E 3 trick): a local causal language model rewrites a
short user prompt into the long, detailed kind of caption the model was trained on.

Deterministic (greedy decoding) and capped in length, so a prompt always extends to the same
text; `megasora sample --extend-prompt DIR` and train.sample_extend_prompt use it before the
text encoder sees the prompt. Also home of the instruction-template check the captioner shares.
"""
from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch

from megasora.errors import MissingPathError, UserError

DEFAULT_EXTENSION_TEMPLATE = (
    "Rewrite this short video prompt as one detailed paragraph describing the subjects, their motion, "
    "the camera, the setting, the lighting and the style. Prompt: {prompt}")


def check_template(template: str, key: str, required: tuple[str, ...] = (),
                   allowed: tuple[str, ...] = ()) -> None:
    """A `str.format` template names every placeholder in `required` and none outside `allowed`."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise UserError(f"{key} {template!r} is not a valid template ({err})",
                        "write placeholders as {name} and literal braces as {{ }}") from err
    known = set(required) | set(allowed)
    missing = [n for n in required if n not in names]
    if missing:
        raise UserError(f"{key} {template!r} has no {{{missing[0]}}} placeholder",
                        f"put {{{missing[0]}}} where the text should go, e.g. \"... Prompt: {{{missing[0]}}}\"")
    unknown = sorted(names - known)
    if unknown:
        raise UserError(f"{key} {template!r} names the unknown placeholder {{{unknown[0]}}}",
                        f"use only {', '.join('{' + n + '}' for n in sorted(known)) or 'no placeholders'} "
                        "(write a literal brace as {{ or }})")


def check_model_dir(path: str, key: str) -> Path:
    """A local transformers model directory (one line if not: nothing is downloaded)."""
    if not path:
        raise UserError(f"{key} needs a model directory", f"pass {key} DIR, a local transformers model directory",
                        kind="input")
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise MissingPathError(f"{key} {path!r} is not a transformers model directory (no config.json)",
                               f"pass {key} a directory saved with save_pretrained", kind="input")
    return directory


class PromptExtender:
    """Tokenizer + causal LM from a local directory; `extend(prompts)` -> detailed prompts."""

    def __init__(self, path: str, device: str = "cpu", max_new_tokens: int = 120,
                 template: str = DEFAULT_EXTENSION_TEMPLATE, key: str = "--extend-prompt") -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # lazy: seconds to import
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING  # lazy: as above

        check_template(template, "the extension template", required=("prompt",))
        directory = check_model_dir(path, key)
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
            raise UserError(f"{key} {path!r} holds a {config.model_type!r} model, which is not a causal language model",
                            f"pass {key} a directory AutoModelForCausalLM loads (Qwen2, Llama, GPT-2 ...)", kind="input")
        self.device = torch.device(device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        self.tokenizer.padding_side = "left"  # generated tokens follow every prompt directly
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model: Any = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=dtype)
        self.model = model.to(self.device).eval()
        self.template, self.max_new_tokens = template, max_new_tokens

    def chat_text(self, prompt: str) -> str:
        """The model's input for one prompt: its chat template when it has one, else the plain request."""
        request = self.template.format(prompt=prompt)
        if getattr(self.tokenizer, "chat_template", None):
            return str(self.tokenizer.apply_chat_template([{"role": "user", "content": request}], tokenize=False,
                                                          add_generation_prompt=True))
        return request + "\n"

    @torch.no_grad()
    def extend(self, prompts: list[str]) -> list[str]:
        """Greedy, at most max_new_tokens new tokens each; an empty answer keeps the user's prompt."""
        tokens = self.tokenizer([self.chat_text(p) for p in prompts], return_tensors="pt", padding=True,
                                add_special_tokens=False).to(self.device)
        # Only ids and mask: a BERT-style tokenizer's token_type_ids mean nothing to a causal LM.
        out = self.model.generate(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                  do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens,
                                  pad_token_id=self.tokenizer.pad_token_id)
        texts = self.tokenizer.batch_decode(out[:, tokens["input_ids"].shape[1]:], skip_special_tokens=True)
        return [" ".join(t.split()) or p for t, p in zip(texts, prompts)]
