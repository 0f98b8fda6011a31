"""Caption tables: JSONL or CSV mapping a media path (and optionally a clip of it) to its caption,
with a file-name fallback.

A row may name the clip it describes (`"clip": j`, the j-th clip `preprocess` cuts from the file,
as `megasora caption` writes): that caption follows the clip; a row without one covers every clip
of the file. Several tables give a clip several captions (original, descriptive), which training
mixes (data.caption_mix, megasora/data/shard_stream.py).
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megasora.errors import DataError, MissingPathError

_PATH_KEYS = ("path", "video", "file", "image", "filename")
_CAPTION_KEYS = ("caption", "text", "prompt")


def _pick(row: dict, keys: tuple[str, ...], where: str) -> str:
    for key in keys:
        if row.get(key):
            return str(row[key])
    raise DataError(f"{where}: no column among {keys} in {sorted(row)}", "name the columns path and caption")


@dataclass
class CaptionTable:
    """Captions by resolved media path, and by (resolved path, clip index)."""
    files: dict[str, str] = field(default_factory=dict)
    clips: dict[tuple[str, int], str] = field(default_factory=dict)

    def media(self) -> set[str]:
        return set(self.files) | {path for path, _ in self.clips}

    def lookup(self, path: str | Path, clip: int | None = None) -> str | None:
        resolved = str(Path(path).resolve())
        if clip is not None and (resolved, clip) in self.clips:
            return self.clips[resolved, clip]
        return self.files.get(resolved)

    def __len__(self) -> int:
        return len(self.files) + len(self.clips)


def check_caption_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"caption file {path} does not exist", "fix data.captions / --captions")
    return path


def load_captions(path: str | Path) -> CaptionTable:
    """Read one table. Relative media paths are resolved against the caption file's folder."""
    path = check_caption_file(path)
    if path.suffix.lower() in (".jsonl", ".json"):
        try:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise DataError(f"caption file {path} is not JSON lines ({err})", "write one JSON object per line") from err
    elif path.suffix.lower() in (".csv", ".tsv"):
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    else:
        raise DataError(f"caption file {path} is neither .jsonl nor .csv/.tsv", "convert it to one of those")
    table = CaptionTable()
    for i, row in enumerate(rows):
        where = f"{path}:{i + 1}"
        media = str((path.parent / Path(_pick(row, _PATH_KEYS, where))).resolve())
        caption = _pick(row, _CAPTION_KEYS, where)
        if row.get("clip") not in (None, ""):
            table.clips[media, int(row["clip"])] = caption
        else:
            table.files[media] = caption
    return table


def caption_from_filename(path: str | Path) -> str:
    """`big_buck-bunny2.mp4` -> `big buck bunny2`: a weak caption, better than none."""
    return re.sub(r"[_\-.]+", " ", Path(path).stem).strip()


def caption_for(path: str | Path, table: CaptionTable, clip: int | None = None) -> str:
    return table.lookup(path, clip) or caption_from_filename(path)


def captions_for(path: str | Path, tables: list[CaptionTable], clip: int | None = None) -> list[str]:
    """A clip's captions, one per table that has it (the first table falls back to the file name),
    duplicates dropped: [0] is the primary caption, the rest what data.caption_mix draws among."""
    first = caption_for(path, tables[0], clip) if tables else caption_from_filename(path)
    found = [first] + [c for t in tables[1:] if (c := t.lookup(path, clip))]
    return list(dict.fromkeys(found))


def caption_choice(seed: int, sample_id: int, step: int, weights: list[float], available: int) -> int:
    """Which of a sample's `available` captions it trains with at `step` (data.caption_mix).

    The draw depends only on (seed, sample id, step), so every rank of every layout that holds
    the sample picks the same caption. Weights beyond `available` are dropped and the rest
    renormalised; no weights (or one caption) means the first caption.
    """
    if available <= 1 or not weights:
        return 0
    w = np.asarray(weights[:available], dtype=np.float64)
    if w.sum() <= 0:
        return 0
    u = np.random.default_rng([seed, 4391, sample_id, step]).random()
    drawn = int(np.searchsorted(np.cumsum(w / w.sum()), u, side="right"))
    return min(drawn, available - 1)  # u can round past the last edge
