"""The Python API: `quantize(...)` (the verb) and its `QuantizeResult`; see alphaquant/api/core.py."""
from alphaquant.api.core import QuantizeResult, quantize, run_config

__all__ = ["QuantizeResult", "quantize", "run_config"]
