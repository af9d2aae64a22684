import os
import random
import sys
from pathlib import Path

import pytest
import torch

# tests import the shared tiny-model factory as `tiny`
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_collection_finish(session):
    """Background subprocesses of the selected tests that have them (tests/background.py), and the list of the
    session's Triton-interpreter runs (tests/triton_interp.py starts them together at the first)."""
    _prestart(session)
    import importlib.util
    if importlib.util.find_spec("triton") is None or torch.cuda.is_available():
        return
    import triton_interp
    triton_interp.PENDING[:] = sorted({str(item.path) for item in session.items
                                       if item.name.endswith("_in_triton_interpreter")})


def _prestart(session):
    """Test modules with a prestart() start their background subprocess now (tests/background.py)."""
    seen = set()
    for item in session.items:
        mod = getattr(item, "module", None)
        if mod is not None and hasattr(mod, "prestart") and mod not in seen:
            seen.add(mod)
            mod.prestart()
