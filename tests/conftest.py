import os
import sys
from pathlib import Path

import pytest

from parallel_utils import train_runs
from shared_runs import SAMPLING

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MEGASORA_CACHE", str(REPO / ".cache"))


@pytest.fixture
def tiny_config_path() -> Path:
    return REPO / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def sampling_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run directory of shared_runs.SAMPLING, trained once for every module that samples from it.
    Tests read it and write elsewhere."""
    run = tmp_path_factory.mktemp("sampling") / "run"
    train_runs(1, [(str(run), SAMPLING, None)])
    return run


LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def no_leaked_launch_env():
    """A test that sets rank variables in this process would make every later `megasora` subprocess
    think it is one rank of a job and wait for its peers; fail the leaking test instead."""
    before = {k: os.environ.get(k) for k in LAUNCH_ENV}
    yield
    after = {k: os.environ.get(k) for k in LAUNCH_ENV}
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    assert after == before, f"test leaked launcher environment: {after}"
