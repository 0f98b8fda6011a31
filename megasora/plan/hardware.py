"""The planner's hardware: a GPU of the table in megasora/hardware.py, this machine measured, or a
cluster file.

A cluster file overrides any figure of the table (YAML, every key optional except `base` or all figures):

    base: h100            # start from a table entry
    name: my-h100-cluster
    inter_bytes_per_s: 25.0e9     # network per GPU, e.g. 200 Gb/s
    efficiency: 0.45
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from megasora.errors import UserError
from megasora.hardware import GPUS, Hardware, measure_cpu

FIELDS = {f.name for f in dataclasses.fields(Hardware)}
NUMBERS = {f.name for f in dataclasses.fields(Hardware) if f.type in (float, "float")}


class PlanError(UserError, ValueError):
    """A planner input the user can fix (printed as `megasora: plan error: ...`, exit 2)."""

    kind = "plan"


class HardwareError(PlanError):
    """Unknown GPU name or a malformed cluster file; the message lists what is valid."""


def load_hardware(spec: str) -> Hardware:
    """`h100` | `h200` | `a100` | `b200` | `cpu` (measured here) | path to a cluster YAML file."""
    key = spec.lower()
    if key in GPUS:
        return GPUS[key]
    if key == "cpu":
        return measure_cpu()
    path = Path(spec)
    if not path.is_file():
        raise HardwareError(f"--gpu {spec!r} is neither one of {', '.join([*GPUS, 'cpu'])} nor a cluster "
                            f"YAML file; pass a name or a file (megasora/plan/hardware.py shows the format)")
    return hardware_from_file(path)


def hardware_from_file(path: Path) -> Hardware:
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise HardwareError(f"cluster file {path} must hold a mapping of hardware fields")
    base = data.pop("base", None)
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise HardwareError(f"cluster file {path}: unknown key `{unknown[0]}`; valid keys: base, "
                            f"{', '.join(sorted(FIELDS))}")
    data = {key: _number(path, key, value) if key in NUMBERS else value for key, value in data.items()}
    if base is not None:
        if str(base).lower() not in GPUS:
            raise HardwareError(f"cluster file {path}: base {base!r} is not one of {', '.join(GPUS)}")
        return dataclasses.replace(GPUS[str(base).lower()], **data)
    missing = sorted({"name", "peak_flops", "memory_bytes", "intra_bytes_per_s", "inter_bytes_per_s"} - set(data))
    if missing:
        raise HardwareError(f"cluster file {path} lacks {', '.join(missing)} (or set `base: h100`)")
    return Hardware(**data)


def _number(path: Path, key: str, value: object) -> float:
    """YAML 1.1 reads 12.5e9 (no exponent sign) as a string: accept it as a number."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise HardwareError(f"cluster file {path}: `{key}: {value!r}` must be a number, e.g. 50.0e9") from None
