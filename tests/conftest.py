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
    """The session's Triton-interpreter runs (tests/triton_interp.py starts them together at the first)."""
    import importlib.util
    if importlib.util.find_spec("triton") is None or torch.cuda.is_available():
        return
    import triton_interp
    triton_interp.PENDING[:] = sorted({str(item.path) for item in session.items
                                       if item.name.endswith("_in_triton_interpreter")})
