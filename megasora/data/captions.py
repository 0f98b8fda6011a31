"""Caption tables: JSONL or CSV mapping a media path to its caption, with a file-name fallback."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

from megasora.errors import DataError, MissingPathError

_PATH_KEYS = ("path", "video", "file", "image", "filename")
_CAPTION_KEYS = ("caption", "text", "prompt")


def _pick(row: dict, keys: tuple[str, ...], where: str) -> str:
    for key in keys:
        if row.get(key):
            return str(row[key])
    raise DataError(f"{where}: no column among {keys} in {sorted(row)}", "name the columns path and caption")


def check_caption_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"caption file {path} does not exist", "fix data.captions / --captions")
    return path


def load_captions(path: str | Path) -> dict[str, str]:
    """Read `path` -> caption. Relative media paths are resolved against the caption file's folder."""
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
    table = {}
    for i, row in enumerate(rows):
        where = f"{path}:{i + 1}"
        media = Path(_pick(row, _PATH_KEYS, where))
        table[str((path.parent / media).resolve())] = _pick(row, _CAPTION_KEYS, where)
    return table


def caption_from_filename(path: str | Path) -> str:
    """`big_buck-bunny2.mp4` -> `big buck bunny2`: a weak caption, better than none."""
    return re.sub(r"[_\-.]+", " ", Path(path).stem).strip()


def caption_for(path: str | Path, table: dict[str, str]) -> str:
    return table.get(str(Path(path).resolve())) or caption_from_filename(path)
