"""GPTQ on plain tensors: Hessian accumulation and the expert-batched solver.

    from alphaquant.gptq import HessianState, gptq_quantize
    state = HessianState.zeros(cols=C, experts=E)
    state.add(x, weight=routing_probs)         # x [T, C], routing_probs [E, T]
    res = gptq_quantize(W, state.finalize(), fmt, act_order=True)
"""
from .hessian import HessianState, accumulate_hessian
from .linalg import CHOLESKY_FAILED, NO_TOKENS, upper_cholesky_of_inverse
from .solver import GPTQResult, gptq_quantize
from .sweep import clear_graph_cache

__all__ = ["HessianState", "accumulate_hessian", "GPTQResult", "gptq_quantize",
           "upper_cholesky_of_inverse", "NO_TOKENS", "CHOLESKY_FAILED", "clear_graph_cache"]


def __getattr__(name):
    # where the product specification put it; lazy, because this package knows no models (the label
    # comes from alphaquant.arch, a layer above)
    if name == "detect_moe_architecture":
        from alphaquant.api.detect import detect_moe_architecture
        return detect_moe_architecture
    raise AttributeError(f"module 'alphaquant.gptq' has no attribute {name!r}")
