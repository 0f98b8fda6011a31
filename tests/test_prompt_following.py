"""A tiny model trained on CPU follows its prompt: colour and direction of motion (docs/prompt_following.md).

Trains configs/tiny-prompt.yaml through the real CLI and DeepSpeed, then runs
`megasora eval-prompts` (24 prompts over all colours x directions) on its EMA weights.

OPEN: no recipe found so far passes (colour 100%, direction at chance; docs/prompt_following.md),
and the run takes ~6 min of CPU (18 min wall on the shared machine). So the test only runs with
MEGASORA_PROMPT_FOLLOWING=1, and is expected to fail until the recipe learns the direction word.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch_utils import REPO, run_torchrun

RECIPE = "configs/tiny-prompt.yaml"


def eval_prompts(run: Path, out: Path) -> str:
    cmd = [sys.executable, "-m", "megasora", "eval-prompts", "--run", str(run), "--prompts", "24", "--probe",
           "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MEGASORA_PROMPT_FOLLOWING"),
                    reason="open (docs/prompt_following.md): the tiny recipe ignores the direction word; "
                           "MEGASORA_PROMPT_FOLLOWING=1 runs it (~18 min)")
def test_tiny_prompt_recipe_follows_colour_and_direction(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_torchrun(1, ["train", "--config", RECIPE, "--set", f"run.dir={run}"], timeout=3600)
    report = eval_prompts(run, tmp_path / "scores.json")
    print(report)
    result = json.loads((tmp_path / "scores.json").read_text())
    assert len(result["scores"]) == 24
    assert result["match"] >= 0.9, f"only {result['match']:.0%} of 24 prompts matched colour and direction\n{report}"
    probe = result["probe"]
    # A model of motion: the real clip is likelier than the same clip played backwards or
    # frozen, and the right direction word likelier than its opposite.
    assert probe["real"] < probe["reversed"] and probe["real"] < probe["static"], probe
    assert probe["real"] < probe["opposite"], probe
