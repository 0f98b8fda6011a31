"""`megasora scale`: study planning (weak/strong batch arithmetic, per-point layouts, errors) and
the report (from metrics.jsonl files written here, including a failed point), plus one real
local study through torchrun."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from megasora.cli import main
from megasora.scale.report import report
from megasora.scale.status import point_status
from megasora.scale.study import EXIT_FILE, LOCAL_LOG, Study, StudyError, plan_study, solve_grad_accum

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")  # micro_batch_size 2, grad_accum 1


def plan(tmp_path: Path, sizes: list[int], mode: str, *sets: str, global_batch: int | None = None,
         launcher: str = "local", per_node: int = 1) -> Study:
    return plan_study(TINY, sizes, per_node, mode, steps=5, warmup=2, out=str(tmp_path / "study"),
                      overrides=list(sets), launcher=launcher, global_batch=global_batch)


def batches(study: Study) -> list[tuple[int, int, int]]:
    return [(p.world_size, p.global_batch, p.grad_accum) for p in study.points]


def test_weak_scaling_keeps_the_batch_per_gpu(tmp_path: Path) -> None:
    study = plan(tmp_path, [4, 1, 2], "weak")
    assert [p.name for p in study.points] == ["p1", "p2", "p4"]  # smallest first
    assert batches(study) == [(1, 2, 1), (2, 4, 1), (4, 8, 1)]
    assert "train.grad_accum=1" in study.points[2].overrides
    assert f"run.dir={tmp_path / 'study' / 'points' / 'p4'}" in study.points[2].overrides


def test_strong_scaling_keeps_the_global_batch(tmp_path: Path) -> None:
    study = plan(tmp_path, [1, 2, 4], "strong", global_batch=8)
    assert batches(study) == [(1, 8, 4), (2, 8, 2), (4, 8, 1)]


def test_strong_scaling_that_cannot_keep_the_batch_names_the_fix(tmp_path: Path) -> None:
    # the config's global batch at 1 process is 2 = micro_batch_size 2: dp 2 would need grad_accum 1/2
    with pytest.raises(StudyError, match=r"2 samples at p2 \(dp 2\).*--global-batch with a multiple of 8"):
        plan(tmp_path, [1, 2, 4], "strong")
    # and the fix it names works
    assert batches(plan(tmp_path, [1, 2, 4], "strong", global_batch=8))[-1] == (4, 8, 1)


def test_weak_scaling_that_cannot_grow_the_batch_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(StudyError, match=r"global batch 3 at 2 GPUs gives 4.5 samples at 3 GPUs; use --global-batch 6"):
        plan(tmp_path, [2, 3], "weak", global_batch=3)


def test_per_point_layout_and_slurm_shapes(tmp_path: Path) -> None:
    # 2 nodes x 2 ranks; tp 2 only at 2 nodes: dp 2 there, and the weak batch (2 per GPU) needs
    # grad_accum 8 / (2 x dp 2) = 2
    study = plan(tmp_path, [1, 2], "weak", "2:parallel.tp=2", launcher="slurm", per_node=2)
    n1, n2 = study.points
    assert (n1.name, n1.nodes, n1.procs_per_node, n1.layout["dp"], n1.layout["tp"]) == ("n1", 1, 2, 2, 1)
    assert (n2.name, n2.nodes, n2.world_size, n2.layout["dp"], n2.layout["tp"]) == ("n2", 2, 4, 2, 2)
    assert batches(study) == [(2, 4, 1), (4, 8, 2)]
    assert "parallel.tp=2" in n2.overrides and "parallel.tp=2" not in n1.overrides


def test_planner_layouts_apply_and_explicit_point_overrides_win(tmp_path: Path) -> None:
    layouts = {1: ["train.zero_stage=1"], 2: ["parallel.tp=2", "train.zero_stage=1"]}
    study = plan_study(TINY, [1, 2], 1, "weak", 5, 2, str(tmp_path / "s"), ["2:train.zero_stage=3"], "local",
                       layouts=layouts)
    assert [(p.layout["tp"], p.layout["zero_stage"]) for p in study.points] == [(1, 1), (2, 3)]
    assert study.planned_layouts


@pytest.mark.parametrize("sets, match", [
    (["8:parallel.tp=2"], r"names size 8, which is not in the study \[1, 2\]"),
    (["2:parallel.tp=3"], r"point p2 \(world 2\).*parallel.tp"),
    (["2:parallel.pp=2"], r"point p2: .*grad_accum=1 .*parallel.pp=2"),
    (["train.nonsense=1"], r"point p1: .*nonsense"),
])
def test_bad_points_are_one_error_naming_the_point(tmp_path: Path, sets: list[str], match: str) -> None:
    with pytest.raises(StudyError, match=match):
        plan(tmp_path, [1, 2], "weak", *sets)


def test_solve_grad_accum() -> None:
    assert solve_grad_accum(16, 2, 4) == 2
    assert solve_grad_accum(6, 2, 4) is None and solve_grad_accum(12, 2, 4) is None


def test_cli_reports_study_errors_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["scale", "run", "--config", TINY, "--procs", "1", "2", "--steps", "2", "--warmup", "2",
              "--out", str(tmp_path / "s")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["megasora: study error: --steps 2 must exceed --warmup 2: warm-up steps are not measured"]


# --- report, from metrics.jsonl written here ---------------------------------------------------

def write_metrics(run_dir: Path, steps: int, step_time: float, samples_per_step: int, comm: dict[str, float]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            t = 10.0 if step <= 2 else step_time  # warm-up steps are slow and must not count
            f.write(json.dumps({"step": step, "loss": 1.0, "step_time_s": t, "samples_per_s": samples_per_step / t,
                                "tokens_per_s": 256 * samples_per_step / t, "mem_bytes": 1000 * step,
                                "mfu": 0.4 if step > 2 else 0.0, **{f"comm_s/{a}": s for a, s in comm.items()},
                                **{f"comm_s/{a}/all_reduce": s for a, s in comm.items()},  # a part, not more
                                **{f"comm_bytes/{a}": 1e6 for a in comm}}) + "\n")


@pytest.fixture
def measured_study(tmp_path: Path) -> Study:
    study = plan(tmp_path, [1, 2, 4], "weak")
    study.save()
    p1, p2, p4 = (Path(p.run_dir) for p in study.points)
    write_metrics(p1, 5, 1.0, 2, {})
    write_metrics(p2, 5, 1.25, 4, {"dp": 0.25})         # 3.2 samples/s: efficiency 0.8
    p4.mkdir(parents=True)                               # ran out of memory at step 1
    (p4 / LOCAL_LOG).write_text("step 1\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB\n")
    (p4 / EXIT_FILE).write_text(json.dumps({"rc": 1, "elapsed_s": 3.0, "timed_out": False}))
    return study


def test_status_names_the_failure(measured_study: Study) -> None:
    states = [point_status(measured_study, p) for p in measured_study.points]
    assert [s.state for s in states] == ["done", "done", "failed"]
    assert states[2].reason.startswith("out of memory (exited with 1) after 0/5 steps: torch.OutOfMemoryError")


def test_report_from_metrics_with_a_failed_point(measured_study: Study) -> None:
    rows, files = report(Study.load(measured_study.out))
    out = Path(measured_study.out)
    with open(out / "scaling.csv") as f:
        table = {r["point"]: r for r in csv.DictReader(f)}
    assert set(table) == {"p1", "p2", "p4"}
    p1, p2, p4 = table["p1"], table["p2"], table["p4"]
    assert (p1["status"], p1["steps_measured"], float(p1["step_time_s"]), float(p1["samples_per_s"])) == \
        ("done", "3", 1.0, 2.0)  # steps 3..5: the two 10 s warm-up steps are out
    assert float(p2["samples_per_s"]) == pytest.approx(3.2) and float(p2["efficiency"]) == pytest.approx(0.8)
    assert float(p2["ideal_samples_per_s"]) == pytest.approx(4.0)
    assert float(p2["comm_share/dp"]) == pytest.approx(0.2) and float(p2["mfu"]) == pytest.approx(0.4)
    assert float(p2["comm_s/dp/all_reduce"]) == 0.25 and "comm_share/dp/all_reduce" not in p2  # a part of dp's
    assert int(p2["mem_bytes"]) == 5000  # the peak, not the mean
    # the planner's prediction of the same point, on this CPU's measured figures
    assert float(p2["predicted_step_time_s"]) > 0 and float(p2["predicted_over_measured"]) == \
        pytest.approx(float(p2["predicted_step_time_s"]) / 1.25, rel=1e-4)
    parts = [float(v) for k, v in p2.items() if k.startswith("predicted/") and v]
    assert "predicted/comm_s/dp" in p2 and sum(parts) == pytest.approx(float(p2["predicted_step_time_s"]), rel=1e-4)
    assert p4["status"] == "failed" and "out of memory" in p4["reason"] and p4["step_time_s"] == ""
    md = (out / "scaling.md").read_text()
    assert "| p2 | 2 | dp2 z2 | 4 (ga 1) | done | 1.25 |" in md and "dp 20%" in md
    assert "- p4: failed: out of memory" in md
    for name in ("throughput", "efficiency", "mfu", "memory", "comm_share", "step_time"):
        png = out / f"{name}.png"
        assert png in files and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"![{name}]({name}.png)" in md


# --- a real local study ------------------------------------------------------------------------

def test_a_point_past_its_timeout_is_stopped_and_reported(tmp_path: Path) -> None:
    from megasora.scale.launch import run_point
    from megasora.scale.study import TIMEOUT_RC
    study = plan(tmp_path, [1], "weak")
    point = study.points[0]
    assert run_point(study, point, timeout_s=1, poll_s=0.5) == TIMEOUT_RC  # torchrun is still importing
    pid = json.loads((Path(point.run_dir) / "launch.json").read_text())["pid"]
    with pytest.raises(ProcessLookupError):  # its whole process group is gone
        import os
        os.killpg(pid, 0)
    status = point_status(study, point)
    assert status.state == "failed" and status.reason.startswith("timeout (--timeout reached) after 0/5 steps")


@pytest.mark.slow
def test_scale_run_one_and_two_processes(tmp_path: Path) -> None:
    import subprocess
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "megasora", "scale", "run", "--config", TINY, "--procs", "1", "2",
           "--steps", "3", "--warmup", "1", "--out", str(out), "--set", "train.ema_decay=0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    status = subprocess.run([sys.executable, "-m", "megasora", "scale", "status", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert [line.split()[:4] for line in status.stdout.splitlines()[1:]] == \
        [["p1", "1", "-", "done"], ["p2", "2", "-", "done"]], status.stdout
    rows, _ = report(Study.load(out))
    assert [(r["point"], r["gpus"], r["status"], r["steps_measured"], r["global_batch"]) for r in rows] == \
        [("p1", 1, "done", 2, 2), ("p2", 2, "done", 2, 4)]
    # the 2-process point really ran as one world of dp 2: 4 samples per step
    last = json.loads((out / "points" / "p2" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["samples"] == 3 * 4
