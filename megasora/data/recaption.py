"""Re-captioning (the Sora report's DALL-E 3 step): a local image/video-to-text model writes a
detailed caption for every clip `megasora preprocess` would cut (megasora/commands/caption.py).

The captioner is whatever `AutoModelForImageTextToText` + `AutoProcessor` load from a directory
(BLIP, LLaVA, Qwen2-VL, ...). A model whose processor takes videos gets `frames` evenly spaced
frames of the clip; an image model gets the middle frame, or a grid of frames (`image_frames`).
A processor with a chat template gets the instruction as a user turn; one without (BLIP) captions
unconditionally.

Work split and resume need no coordination: input file i belongs to rank i mod N; each rank
appends its finished rows to OUT.parts/rank{r}.jsonl (flushed per batch) and skips every
(path, clip) already in OUT or any part file; the rank that finds all N ranks' done markers
merges OUT (sorted by path, clip; merging twice writes the same file). The rows are what
`preprocess --captions` reads: {"path", "clip", "start_sec", "caption"}.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from megasora.data.captions import caption_from_filename
from megasora.data.preprocess import Progress, collect_inputs
from megasora.data.shards import write_json_atomic
from megasora.data.video_io import Clip, iter_clips
from megasora.errors import EnvironmentProblem, UserError
from megasora.models.prompt_extension import check_model_dir, check_template

log = logging.getLogger("megasora.caption")

DEFAULT_INSTRUCTION = ("Describe this video in detail: the subjects and what they look like, their actions and "
                       "motion, the camera angle and movement, the setting, the lighting and the visual style.")
INSTRUCTION_FIELDS = ("caption", "seconds")  # the clip's current caption (file name), its length
ImageFrames = Literal["middle", "grid"]


@dataclass
class CaptionSpec:
    inputs: list[str]
    out: str
    model: str
    instruction: str = DEFAULT_INSTRUCTION
    fps: float = 8.0
    clip_frames: int = 17
    max_area: int = 65536
    multiple: int = 16  # bucket sides, as preprocess cuts them (VAE spatial factor * DiT patch)
    temporal_factor: int = 4
    max_clips_per_video: int = 0
    frames: int = 8  # video models: frames per clip
    image_frames: ImageFrames = "middle"  # image models: the middle frame or a 2x2 grid
    batch_size: int = 4
    max_new_tokens: int = 120
    device: str = "cpu"
    rank: int = 0
    world_size: int = 1


@dataclass
class CaptionReport:
    inputs: int = 0
    clips: int = 0
    captioned: int = 0
    skipped: int = 0  # captioned by an earlier run
    empty: int = 0  # the model produced no text: the clip keeps its file-name caption
    failed: int = 0
    failures: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["clips_per_sec"] = self.captioned / self.seconds if self.seconds > 0 else 0.0
        return d


def check_captioner_dir(path: str) -> Any:
    """The model directory holds an image/video-to-text model; returns its config (seconds, no weights)."""
    from transformers import AutoConfig  # lazy: transformers takes seconds to import
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING  # lazy: as above

    directory = check_model_dir(path, "--model")
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    if type(config) not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
        raise UserError(f"--model {path!r} holds a {config.model_type!r} model, which is not an image/video "
                        "captioner", "pass --model a directory AutoModelForImageTextToText loads (BLIP, LLaVA, "
                        "Qwen2-VL ...)", kind="input")
    return config


def check_instruction(instruction: str) -> None:
    check_template(instruction, "--instruction", allowed=INSTRUCTION_FIELDS)


class Captioner:
    """Model + processor from a local directory; `caption(clips, instructions)` -> one text per clip."""

    def __init__(self, path: str, device: str = "cpu", frames: int = 8, image_frames: ImageFrames = "middle",
                 max_new_tokens: int = 120) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor  # lazy: seconds to import

        check_captioner_dir(path)
        self.device = torch.device(device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        try:
            self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        except ImportError as err:  # transformers' video processors need torchvision
            first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
            raise EnvironmentProblem(f"the processor of --model {path!r} cannot load: {first}",
                                     "install the package it names (e.g. `pip install torchvision` for video "
                                     "models)") from err
        except OSError as err:  # weights without the processor's files
            raise UserError(f"--model {path!r} has no processor files ({' '.join(str(err).split())[:200]})",
                            "save the processor into it too (processor.save_pretrained(DIR))", kind="input") from err
        model: Any = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=self.dtype)
        self.model = model.to(self.device).eval()
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"  # decoder-only models continue right after each prompt
        self.video = getattr(self.processor, "video_processor", None) is not None
        self.chat = bool(getattr(self.processor, "chat_template", None))
        self.frames, self.image_frames, self.max_new_tokens = frames, image_frames, max_new_tokens
        if not self.chat:
            log.info("%s has no chat template: it captions without the instruction", path)

    def visual(self, clip: Clip) -> Any:
        """What the processor gets for one clip: (T, H, W, 3) frames for a video model, else one image."""
        frames = clip.frames
        if self.video:
            picks = np.linspace(0, len(frames) - 1, min(self.frames, len(frames))).round().astype(int)
            return frames[picks]
        if self.image_frames == "grid" and len(frames) > 1:
            picks = np.linspace(0, len(frames) - 1, 4).round().astype(int)
            top, bottom = np.concatenate(frames[picks[:2]], 1), np.concatenate(frames[picks[2:]], 1)
            return Image.fromarray(np.concatenate([top, bottom], 0))
        return Image.fromarray(frames[len(frames) // 2])

    def prompt(self, instruction: str) -> str:
        kind = "video" if self.video else "image"
        messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": instruction}]}]
        return str(self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))

    @torch.no_grad()
    def caption(self, clips: list[Clip], instructions: list[str]) -> list[str]:
        visuals = [self.visual(c) for c in clips]
        kwargs: dict[str, Any] = {"videos" if self.video else "images": visuals}
        if self.chat:
            kwargs["text"] = [self.prompt(i) for i in instructions]
            kwargs["padding"] = True
        inputs = self.processor(**kwargs, return_tensors="pt").to(self.device)
        inputs = {k: v.to(self.dtype) if torch.is_floating_point(v) else v for k, v in inputs.items()}
        out = self.model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens)
        prompt_ids = inputs.get("input_ids")
        if prompt_ids is not None and out.shape[1] > prompt_ids.shape[1] and torch.equal(
                out[:, :prompt_ids.shape[1]], prompt_ids):
            out = out[:, prompt_ids.shape[1]:]  # decoder-only: the prompt comes back first
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def read_rows(path: Path) -> list[dict]:
    """Rows of a caption JSONL; a line cut by a kill is dropped (its clip is captioned again)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def row_key(row: dict) -> tuple[str, int]:
    return str(row["path"]), int(row["clip"])


def finished_rows(out: Path) -> dict[tuple[str, int], dict]:
    """Every row any run or rank has written so far, by (path, clip)."""
    rows = read_rows(out) + [r for part in sorted(parts_dir(out).glob("rank*.jsonl")) for r in read_rows(part)]
    return {row_key(r): r for r in rows}


def merge_if_complete(out: Path, world_size: int) -> bool:
    """Write OUT from all rows once every rank of this run is done (any rank may; the result is the same)."""
    markers = [parts_dir(out) / f"rank{r}-of-{world_size}.done" for r in range(world_size)]
    if not all(m.is_file() for m in markers):
        return False
    rows = finished_rows(out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(rows[k], sort_keys=True) + "\n" for k in sorted(rows)))
    tmp.replace(out)
    return True


def instruction_for(template: str, path: str, clip: Clip) -> str:
    seconds = round(len(clip.frames) / clip.fps, 2) if clip.fps else 0
    return template.format(caption=caption_from_filename(path), seconds=seconds)


def run_caption(spec: CaptionSpec, captioner: Captioner) -> CaptionReport:
    """Caption this rank's clips into its part file; returns (and writes) the report."""
    start = time.time()
    out = Path(spec.out)
    parts_dir(out).mkdir(parents=True, exist_ok=True)
    inputs = collect_inputs(spec.inputs)
    mine = inputs[spec.rank::spec.world_size]
    done = finished_rows(out)
    report = CaptionReport(inputs=len(mine))
    progress = Progress(len(mine), f"caption rank {spec.rank}/{spec.world_size}")
    part = parts_dir(out) / f"rank{spec.rank}.jsonl"
    (parts_dir(out) / f"rank{spec.rank}-of-{spec.world_size}.done").unlink(missing_ok=True)
    pending: list[tuple[str, int, Clip]] = []
    with part.open("a") as sink:
        def flush() -> None:
            texts = captioner.caption([c for _, _, c in pending],
                                      [instruction_for(spec.instruction, p, c) for p, _, c in pending])
            for (path, j, clip), text in zip(pending, texts):
                if not text:
                    report.empty += 1
                    continue
                row = {"path": path, "clip": j, "start_sec": round(clip.start_sec, 4), "caption": text}
                sink.write(json.dumps(row, sort_keys=True) + "\n")
                report.captioned += 1
            sink.flush()
            pending.clear()

        for path in mine:
            try:
                for j, clip in enumerate(iter_clips(path, spec.fps, spec.clip_frames, spec.max_area, spec.multiple,
                                                    spec.temporal_factor, spec.max_clips_per_video)):
                    report.clips += 1
                    if (path, j) in done:
                        report.skipped += 1
                        continue
                    pending.append((path, j, clip))
                    if len(pending) >= spec.batch_size:
                        flush()
            except Exception as err:  # corrupt or unreadable media: skip it, keep the run going
                report.failed += 1
                report.failures.append({"path": path, "error": f"{type(err).__name__}: {err}"})
                log.warning("skipping %s: %s: %s", path, type(err).__name__, err)
            progress.update(1, report.clips, report.failed)
        if pending:
            flush()
    progress.close()
    report.seconds = time.time() - start
    write_json_atomic(parts_dir(out) / f"report-rank{spec.rank}.json", report.as_dict())
    (parts_dir(out) / f"rank{spec.rank}-of-{spec.world_size}.done").touch()
    merged = merge_if_complete(out, spec.world_size)
    log.info("caption rank %d done: %d clips captioned, %d already done, %d empty, %d inputs failed (%.1f s)%s",
             spec.rank, report.captioned, report.skipped, report.empty, report.failed, report.seconds,
             f"; wrote {out}" if merged else "; the last rank to finish writes the merged file")
    return report
