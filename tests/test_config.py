"""Config loading, overrides, validation messages and the generated reference."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from megasora.config import Config, ConfigError, load_config, render_config_docs

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def test_tiny_preset_and_overrides() -> None:
    cfg = load_config(TINY, ["train.steps=7", "train.lr=1e-4", "model.patch=[1,1,1]", "run.dir=/tmp/x"])
    assert cfg.train.steps == 7 and cfg.train.lr == 1e-4 and cfg.model.patch == [1, 1, 1]
    assert cfg.run.dir == "/tmp/x" and cfg.model.hidden == 64


@pytest.mark.parametrize("override,message", [
    ("model.heads=5", "model.hidden=64 is not divisible by model.heads=5"),
    ("data.height=15", "data.height=15 is not divisible by the patch size 2"),
    ("train.nonsense=1", "unknown config key `train.nonsense`; valid keys in `train`: ac_every, "),  # sorted list
    ("train.activation_checkpointing=some", "train.activation_checkpointing='some' must be none, full or "
                                            "selective; choose one of those (the default is none"),
    ("train.ac_every=0", "train.ac_every=0 must be >= 1"),
    ("nosection.x=1", "unknown config key `nosection`"),
    ("train.precision=fp8", "train.precision='fp8' must be fp32 or bf16"),
    ("train.zero_stage=4", "train.zero_stage=4 must be 0, 1, 2 or 3"),
    ("train.steps=abc", "`train.steps` must be an integer"),
    ("parallel.tp=0", "parallel.tp=0 must be >= 1"),
    ("train.zero_stage=true", "train.zero_stage` must be an integer"),
    ("train.precision=16", "train.precision='16' must be fp32 or bf16"),
])
def test_bad_configs_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(TINY, [override])


def _literal_keys(cls: type, prefix: str) -> list[tuple[str, tuple]]:
    out = []
    for f in dataclasses.fields(cls):
        annotation = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(annotation):
            out += _literal_keys(annotation, f"{prefix}{f.name}.")
        elif typing.get_origin(annotation) is typing.Literal:
            out.append((prefix + f.name, typing.get_args(annotation)))
    return out


LITERAL_KEYS = _literal_keys(Config, "")


def test_every_choice_key_is_checked_against_its_literal() -> None:
    """The accepted values of a choice key are exactly its Literal's arguments, and the one-line
    error lists them all."""
    assert {key for key, _ in LITERAL_KEYS} >= {"model.kernels", "model.rope_layout", "data.kind", "train.precision",
                                                "train.zero_stage", "train.optimizer", "train.offload_optimizer",
                                                "train.activation_checkpointing"}
    for key, choices in LITERAL_KEYS:
        bogus = 7 if isinstance(choices[0], int) else "bogus"
        with pytest.raises(ConfigError) as err:
            load_config(TINY, [f"{key}={bogus}"])
        listed = ", ".join(map(str, choices[:-1])) + " or " + str(choices[-1])
        assert str(err.value).startswith(f"{key}={bogus!r} must be {listed}; choose one of those"), str(err.value)
        for choice in choices:  # each choice passes the choice check (a later rule may still object)
            try:
                load_config(TINY, [f"{key}={choice}"])
            except ConfigError as other:
                assert "choose one of those" not in str(other), str(other)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(REPO / "configs" / "nope.yaml")


def test_inherit_merges_parent(tmp_path: Path) -> None:
    child = tmp_path / "child.yaml"
    child.write_text(f"inherit: {TINY}\ntrain:\n  steps: 3\n")
    cfg = load_config(child)
    assert cfg.train.steps == 3 and cfg.model.hidden == 64


def test_cli_reports_one_clear_line_and_starts_nothing() -> None:
    proc = subprocess.run([sys.executable, "-m", "megasora", "train", "--config", str(TINY),
                           "--set", "model.heads=7"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("megasora: config error: model.hidden=64")
    assert "init_distributed" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("override,message", [
    ("parallel.tp=3", "world size 1 is not divisible by parallel.tp=3"),
    ("parallel.ring=2", "world size 1 is not divisible by parallel.tp=1 * parallel.ulysses=1 * parallel.ring=2"),
])
def test_cli_rejects_a_layout_the_world_cannot_hold(override: str, message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "megasora", "train", "--config", str(TINY), "--set", override],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("megasora: parallel layout error:") and message in last, last
    assert "Traceback" not in proc.stderr


def test_docs_reference_is_in_sync() -> None:
    assert (REPO / "docs" / "config.md").read_text() == render_config_docs() + "\n", \
        "docs/config.md is stale: run `megasora config-docs --out docs/config.md`"


@pytest.mark.parametrize("preset", sorted((REPO / "configs").glob("*.yaml")))
def test_every_preset_validates(preset: Path) -> None:
    load_config(preset)
