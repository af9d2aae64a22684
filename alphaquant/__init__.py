"""AlphaQuant: GPTQ for Mixture-of-Experts LLMs. The Python API is one verb:

    import alphaquant
    result = alphaquant.quantize(model="demo/olmoe-tiny", recipe="configs/gptq_olmoe_mixed.json",
                                 calibration={"dataset": "demo/corpus/train.txt", "num_samples": 16},
                                 output={"dir": "outputs/tiny-mixed"})
    result.perplexity, result.output_dir, result.model

Errors a user can fix are `alphaquant.UserError` (ConfigError, DataError), as the CLI prints them.
"""
from alphaquant._layout import install_checkout_finder
from alphaquant.errors import ConfigError, DataError, UserError

install_checkout_finder()   # alphaquant.models / alphaquant.callbacks from a checkout (see _layout.py)

__all__ = ["ConfigError", "DataError", "QuantizeResult", "UserError", "detect_moe_architecture", "quantize"]


def __getattr__(name):
    # lazy, so `import alphaquant.errors` (every CLI start, --help) does not import torch
    if name in ("quantize", "QuantizeResult"):
        from alphaquant import api
        return getattr(api, name)
    if name == "detect_moe_architecture":
        from alphaquant.api.detect import detect_moe_architecture
        return detect_moe_architecture
    raise AttributeError(f"module 'alphaquant' has no attribute {name!r}")
