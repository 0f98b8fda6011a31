"""`megasora submit`: sbatch rendering and the checks that run before anything is queued."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from megasora.commands.submit import (
    DEFAULT_TEMPLATE,
    JobSpec,
    SubmitError,
    check_layout,
    check_spec,
    register,
    render,
)
from megasora.config import load_config
from megasora.errors import PREEMPTED_EXIT_CODE

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def submit(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["submit", *argv])
    return args.func(args)


def spec(**kw: object) -> JobSpec:
    base = dict(config=TINY, nodes=2, tasks_per_node=2, log_dir=Path("/tmp/logs"), workdir=REPO,
                python="/usr/bin/python3")
    return JobSpec(**{**base, **kw})


def test_render_has_the_whole_job() -> None:
    script = render(spec(gpus_per_node=2, partition="gpu", account="proj", time="12:00:00",
                         overrides=["train.steps=10", "run.dir=runs/a b"], env=["NCCL_DEBUG=INFO"]),
                    DEFAULT_TEMPLATE.read_text())
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=2", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --time=12:00:00",
                 "#SBATCH --signal=USR1@300", "#SBATCH --requeue", "#SBATCH --output=/tmp/logs/%x-%j.out",
                 f'if [ "$rc" -eq {PREEMPTED_EXIT_CODE} ] && [ "$got_term" -eq 0 ]; then', 'scontrol requeue "${SLURM_JOB_ID}"',
                 "export NCCL_DEBUG=INFO", "# export NCCL_SOCKET_IFNAME=ib0"]:
        assert line in script.splitlines() or line in script, line
    assert (f"/usr/bin/python3 -m megasora train --config {TINY} --resume auto "
            "--set train.steps=10 --set 'run.dir=runs/a b'") in script
    assert "{{" not in script


def test_rendered_script_is_valid_bash(tmp_path: Path) -> None:
    path = tmp_path / "job.sbatch"
    path.write_text(render(spec(overrides=["train.steps=5"]), DEFAULT_TEMPLATE.read_text()))
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_cpu_job_has_no_gpu_partition_or_account_lines() -> None:
    script = render(spec(), DEFAULT_TEMPLATE.read_text())
    assert "--gpus-per-node" not in script.replace("# ", "")
    assert "#SBATCH --partition" not in script and "#SBATCH --account" not in script


def test_world_not_divisible_by_layout_names_valid_node_counts() -> None:
    cfg = load_config(TINY, ["parallel.tp=2", "parallel.ulysses=2"])  # model parallel 4
    with pytest.raises(SubmitError, match=r"3 nodes x 2 tasks = 6 is not divisible .* = 4; .* multiple of 2 nodes"):
        check_layout(spec(nodes=3), cfg)
    notes = check_layout(spec(nodes=4), cfg)
    assert any("dp 2 x tp 2 x ulysses 2" in n for n in notes)


def test_model_dependent_layout_errors_surface_at_submit_time() -> None:
    cfg = load_config(TINY, ["model.heads=2", "parallel.tp=2", "parallel.ulysses=2"])
    with pytest.raises(SubmitError, match=r"model.heads=2 is not divisible by parallel.tp\*parallel.ulysses"):
        check_layout(spec(nodes=2), cfg)
    cfg = load_config(TINY, ["model.heads=2", "parallel.ulysses=4"])
    with pytest.raises(SubmitError, match=r"model.heads=2 is not divisible by parallel.tp\*parallel.ulysses = 1\*4"):
        check_layout(spec(nodes=2), cfg)


def test_tp_across_nodes_is_a_warning() -> None:
    cfg = load_config(TINY, ["parallel.tp=4"])
    notes = check_layout(spec(nodes=2, tasks_per_node=2), cfg)
    assert any("cross the network" in n for n in notes)


@pytest.mark.parametrize("kw,match", [
    (dict(time="tomorrow"), "not a Slurm time"),
    (dict(gpus_per_node=8, tasks_per_node=4), "one rank per GPU"),
    (dict(signal_seconds=0), "signal-seconds"),
])
def test_bad_spec(kw: dict, match: str) -> None:
    with pytest.raises(SubmitError, match=match):
        check_spec(spec(**kw))


def test_unknown_placeholder_in_template() -> None:
    with pytest.raises(SubmitError, match=r"unknown placeholders \['nodez'\]"):
        render(spec(), "#SBATCH --nodes={{nodez}}\n")


def test_dry_run_prints_script(capsys: pytest.CaptureFixture) -> None:
    assert submit(["--config", str(TINY), "--nodes", "2", "--tasks-per-node", "2", "--dry-run",
                   "--set", "train.steps=7"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("#!/bin/bash") and "--set train.steps=7" in out.out
    assert "world 4 = dp 4" in out.err


@pytest.mark.parametrize("argv,match", [
    (["--nodes", "3", "--tasks-per-node", "1", "--set", "parallel.tp=2"], "multiple of 2 nodes"),
    (["--nodes", "1", "--set", "train.stepz=3"], "unknown config key `train.stepz`"),
    (["--nodes", "1", "--env", "1BAD=x"], "must look like NAME=value"),
])
def test_submit_refuses_before_queueing(argv: list[str], match: str, capsys: pytest.CaptureFixture) -> None:
    assert submit(["--config", str(TINY), "--dry-run", *argv]) == 2
    assert match in capsys.readouterr().err


def test_missing_sbatch_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert submit(["--config", str(TINY), "--nodes", "1", "--log-dir", str(tmp_path / "logs")]) == 2
    assert "`sbatch` not found" in capsys.readouterr().err


def test_cli_dry_run() -> None:
    proc = subprocess.run([sys.executable, "-m", "megasora", "submit", "--config", str(TINY), "--nodes", "1",
                           "--gpus-per-node", "8", "--dry-run"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --gpus-per-node=8" in proc.stdout and "#SBATCH --ntasks-per-node=8" in proc.stdout
