"""`megasora env`, and kernels that never vanish silently: a missing csrc extension is JIT-built,
and a fresh Debian-style venv (pip 23.x) either builds the extension or says in one line that the
reference ops run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FALLBACK = "model.kernels=auto is using the pure-PyTorch reference ops"
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "MEGASORA_LAUNCHER", "PYTHONPATH")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def megasora_env(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megasora", "env", *args], cwd=REPO, capture_output=True, text=True,
                          env=clean_env(PYTHONPATH=str(REPO), **env), timeout=300)


def test_env_reports_what_a_bug_report_needs() -> None:
    proc = megasora_env("--json", "--no-build")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert {"python", "OpenMPI"} <= set(report["system"])
    assert {"torch", "torch CUDA build", "NCCL"} <= set(report["torch"])
    assert {"deepspeed", "transformers", "diffusers", "webdataset", "PyAV", "mpi4py"} <= set(report["packages"])
    assert report["packages"]["deepspeed"][0].isdigit()
    assert {"CPU extension", "CUDA extension", "model.kernels=auto runs"} <= set(report["kernels"])
    assert "NVIDIA apex FusedAdam" in report["optimizers"] and report["devices"]["visible"]
    assert report["launcher"]["detected"].startswith("single: rank 0/1")


def test_env_names_the_launcher_it_is_under() -> None:
    proc = megasora_env("--no-build", RANK="1", WORLD_SIZE="4", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2",
                        MASTER_ADDR="10.1.2.3", MASTER_PORT="29500")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torchrun: rank 1/4, local rank 1/2, master 10.1.2.3:29500" in proc.stdout
    assert "python" in proc.stdout and "NCCL" in proc.stdout


JIT_PROBE = """
import sys, torch
sys.modules["megasora._C"] = None  # the prebuilt extension is missing
import megasora.kernels as K
from megasora.kernels import fused, reference
K.set_backend("auto")
x, s = torch.randn(2, 3, 8, dtype=torch.float64).float(), torch.randn(2, 1, 8)
diff = (K.modulated_norm(x, s, s) - reference.modulated_norm(x, s, s, None, None, 1e-6, "layer")).abs().max()
print("BACKEND", K.backend(), "|", fused.HOW, "|", float(diff))
"""


@pytest.mark.slow
def test_missing_extension_is_jit_built_and_matches_the_reference() -> None:
    """The first process compiles csrc/ into TORCH_EXTENSIONS_DIR (minutes, once per checkout)."""
    proc = subprocess.run([sys.executable, "-c", JIT_PROBE], cwd=REPO, capture_output=True, text=True,
                          env=clean_env(PYTHONPATH=str(REPO)), timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("BACKEND"))
    backend, how, diff = (part.strip() for part in line[len("BACKEND"):].split("|"))
    assert backend == "fused" and how.startswith("JIT-built in"), line
    assert float(diff) < 1e-5, line


def fresh_venv(tmp: Path) -> tuple[Path, Path]:
    """A copy of the sources (no built .so) and a `python -m venv` venv with its own bundled pip (23.x);
    torch, setuptools (84, as on a current Debian machine) & co. come from the main venv through a
    .pth file, so nothing is downloaded. The venv's bundled setuptools is removed so that the
    editable install runs under setuptools 84, the combination that can skip build_ext."""
    src = tmp / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        if (REPO / name).is_file():
            shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "csrc", src / "csrc")
    shutil.copytree(REPO / "configs", src / "configs")
    shutil.copytree(REPO / "megasora", src / "megasora", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    site = next((venv / "lib").glob("python3*/site-packages"))
    for bundled in ["pkg_resources", "_distutils_hack", "distutils-precedence.pth", *site.glob("setuptools*")]:
        path = site / bundled
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    import torch
    (site / "main_venv.pth").write_text(str(Path(torch.__file__).parents[1]) + "\n")
    return src, venv


@pytest.mark.slow
@pytest.mark.timeout(2400)  # a venv, a compile of csrc/ and two tiny trainings
def test_fresh_venv_with_old_pip_builds_or_says_so(tmp_path: Path) -> None:
    src, venv = fresh_venv(tmp_path)
    pip = subprocess.run([str(venv / "bin" / "pip"), "--version"], capture_output=True, text=True, check=True)
    assert pip.stdout.startswith("pip 2"), pip.stdout  # the venv's own bundled pip (23.x on Debian 12)
    install = subprocess.run([str(venv / "bin" / "pip"), "install", "--no-build-isolation", "--no-deps", "-e",
                              str(src)], capture_output=True, text=True, env=clean_env(), timeout=1800)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-3000:]
    prebuilt = list((src / "megasora").glob("_C*.so"))
    # First `megasora train`, once as installed (JIT on) and once with the JIT build switched off.
    for jit in ("1", "0"):
        run = subprocess.run([str(venv / "bin" / "megasora"), "train", "--config", "configs/tiny.yaml", "--set",
                              "train.steps=1", "--set", f"run.dir={tmp_path / ('run' + jit)}"], cwd=src,
                             capture_output=True, text=True, env=clean_env(MEGASORA_JIT=jit), timeout=1800)
        output = run.stdout + run.stderr
        assert run.returncode == 0, output[-3000:]
        if prebuilt or jit == "1":  # built by pip, or JIT-built now: the fused ops run and the log says so
            assert "megasora.kernels: fused csrc ops on CPU" in output, output[-3000:]
            assert FALLBACK not in output
        else:  # nothing built and not allowed to build: exactly one line says so
            assert output.count(FALLBACK) == 1, output[-3000:]
