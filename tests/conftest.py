import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MEGASORA_CACHE", str(REPO / ".cache"))


@pytest.fixture
def tiny_config_path() -> Path:
    return REPO / "configs" / "tiny.yaml"
