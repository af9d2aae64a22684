"""HessianState / accumulate_hessian: streaming sums equal one-shot, weights act as √c."""
import torch
from torch.testing import assert_close

from alphaquant.gptq import HessianState, accumulate_hessian


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_batches_equal_one_shot_2d():
    g = _gen()
    x = torch.randn(6, 50, 32, generator=g)                  # 6 batches of 50 tokens
    state = HessianState.zeros(32)
    for xb in x:
        state.add(xb)
    xf = x.reshape(-1, 32).double()
    assert int(state.n_tokens) == 300
    assert_close(state.finalize(), (2 * xf.T @ xf / 300).float(), rtol=1e-5, atol=1e-5)


def test_batches_equal_one_shot_3d_with_leading_token_dims():
    g = _gen(1)
    x = torch.randn(4, 3, 2, 10, 16, generator=g)            # [batches, E, B, S, C]
    state = HessianState.zeros(16, experts=3)
    for xb in x:
        state.add(xb.reshape(3, -1, 16))                     # [E, T, C]
    xe = x.permute(1, 0, 2, 3, 4).reshape(3, -1, 16).double()
    ref = 2 * xe.transpose(1, 2) @ xe / 80
    assert state.n_tokens.tolist() == [80, 80, 80]
    assert_close(state.finalize(), ref.float(), rtol=1e-5, atol=1e-5)


def test_weighted_equals_inputs_scaled_by_sqrt_weight():
    g = _gen(2)
    x = torch.randn(200, 24, generator=g)
    c = torch.rand(200, generator=g)
    H_w = accumulate_hessian(torch.zeros(24, 24), x, weight=c)
    H_s = accumulate_hessian(torch.zeros(24, 24), x * c.sqrt()[:, None])
    assert_close(H_w, H_s, rtol=1e-5, atol=1e-5)


def test_shared_tokens_with_routing_weights_equal_per_expert_loop():
    g = _gen(3)
    x = torch.randn(120, 16, generator=g)                    # tokens shared by all experts
    probs = torch.rand(4, 120, generator=g)
    probs[probs < 0.6] = 0                                   # not routed to that expert
    probs[2] = 0                                             # expert 2 gets no tokens
    state = HessianState.zeros(16, experts=4)
    for chunk in range(3):
        sl = slice(40 * chunk, 40 * (chunk + 1))
        state.add(x[sl], weight=probs[:, sl])
    H = state.finalize()
    for e in range(4):
        n = int((probs[e] > 0).sum())
        assert int(state.n_tokens[e]) == n
        assert_close(float(state.weight_sum[e]), float(probs[e].double().sum()))
        ref = 2 * (x * probs[e, :, None]).T @ x / max(n, 1)
        assert_close(H[e], ref, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(H[2]) == 0                    # zero H tells the solver "no tokens"


def test_merged_rank_states_equal_one_process():
    """Summing raw H, n_tokens and weight_sum (what all_reduce(SUM) does) == one process."""
    g = _gen(4)
    x = torch.randn(90, 12, generator=g)
    c = torch.rand(90, generator=g)
    one = HessianState.zeros(12).add(x, weight=c)
    rank0 = HessianState.zeros(12).add(x[:30], weight=c[:30])
    rank1 = HessianState.zeros(12).add(x[30:], weight=c[30:])
    merged = rank0.merge(rank1)
    assert_close(merged.finalize(), one.finalize(), rtol=1e-5, atol=1e-6)
    assert int(merged.n_tokens) == 90
    assert_close(merged.weight_sum, one.weight_sum)


def test_low_precision_inputs_accumulate_in_fp32():
    g = _gen(5)
    x = torch.randn(64, 8, generator=g).bfloat16()
    state = HessianState.zeros(8).add(x)
    assert state.H.dtype == torch.float32
    xf = x.double()
    assert_close(state.finalize(), (2 * xf.T @ xf / 64).float(), rtol=1e-5, atol=1e-5)


def test_linears_share_a_hessian_key_only_when_they_read_the_same_tensor():
    """Keys follow the tensor a pre-hook saw, not the width: o_proj reads a tensor as wide as q_proj's."""
    from alphaquant.callbacks.hooks import shared_input_keys

    g = _gen(6)
    normed, attn = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    seen = [("q", normed), ("k", normed), ("v", normed), ("o", attn),
            ("up", normed.view(10, 16)),          # same storage, other shape: another tensor
            ("t", normed.transpose(0, 1))]        # same storage and shape numel, other strides
    assert shared_input_keys(["q", "k", "v", "o", "up", "t", "never"], seen) == {
        "q": "q", "k": "q", "v": "q", "o": "o", "up": "up", "t": "t", "never": "never"}
    # the first linear in the given order names the key, whichever ran first
    assert shared_input_keys(["k", "q"], seen) == {"k": "k", "q": "k"}
    assert shared_input_keys(["a", "b"], [("a", attn[:0]), ("b", attn[:0])]) == {"a": "a", "b": "b"}   # empty


def test_expert_keys_pair_gate_with_up_and_leave_down_alone():
    """Mixtral's w2 has w1's in_features when intermediate == hidden; it still gets its own key."""
    from alphaquant.arch.base import MoEBlockInfo
    from alphaquant.callbacks.hooks import expert_keys

    b = MoEBlockInfo("block_sparse_moe", "block_sparse_moe.gate", "block_sparse_moe.router", 2, 1,
                     {e: f"block_sparse_moe.experts.{e}" for e in range(2)}, proj_names=("w1", "w3", "w2"))
    p = "block_sparse_moe.experts."
    group = ["self_attn.o_proj", f"{p}0.w1", f"{p}0.w3", f"{p}0.w2", f"{p}1.w3", f"{p}1.w2"]   # 1.w1 skipped
    assert expert_keys(group, [b]) == {f"{p}0.w1": f"{p}0.w1", f"{p}0.w3": f"{p}0.w1", f"{p}0.w2": f"{p}0.w2",
                                       f"{p}1.w3": f"{p}1.w3", f"{p}1.w2": f"{p}1.w2"}


def test_collector_learns_keys_on_the_first_batch_and_reuses_them_for_later_layers():
    """One group holding every linear of a layer (true_sequential false): each linear's Hessian is
    that of its own input (a plain pre-hook on the layer); keys learned on layer 0 serve layer 1;
    a pass without a batch leaves every linear its own zero Hessian."""
    from alphaquant import models
    import tiny
    from alphaquant.arch import get_adapter
    from alphaquant.pipeline.runner import PassPlan
    from alphaquant.callbacks.hessian import HessianCollector

    model = models.from_config({**tiny.BASE, **tiny.FAMILIES["mixtral"]}, seed=0)
    adapter = get_adapter(model)
    ids = torch.randint(0, 320, (2, 12), generator=_gen(7))
    hidden, kw = model.prepare_layer_inputs(ids)
    col = HessianCollector(adapter, "uniform")
    for i, layer in enumerate(model.model.layers):
        group = [n for g in adapter.sequential_groups(layer) for n in g]

        class Runner:
            block, device = layer, torch.device("cpu")
            plan = PassPlan("collect", "calib", i, 0, group)

        xs = {}

        def keep(name):
            def pre(_m, a):
                xs.setdefault(name, a[0].reshape(-1, a[0].shape[-1]).clone())
            return pre
        hooks = [layer.get_submodule(n).register_forward_pre_hook(keep(n)) for n in group]
        col.on_predict_start(None, Runner)
        assert (i > 0) == (not col._pending)          # layer 1 starts with the keys layer 0 learned
        with torch.no_grad():
            out = layer(hidden, **kw)
        col.on_predict_end(None, Runner)
        for h in hooks:
            h.remove()
        assert col.keys["self_attn.o_proj"] == "self_attn.o_proj"
        assert col.keys["block_sparse_moe.experts.0.w2"] == "block_sparse_moe.experts.0.w2"
        assert col.keys["self_attn.v_proj"] == col.keys["self_attn.k_proj"] == "self_attn.q_proj"
        assert col.keys["block_sparse_moe.experts.0.w3"] == "block_sparse_moe.experts.0.w1"
        for n in group:
            if n in xs:
                assert_close(col.states[col.keys[n]].H, xs[n].T @ xs[n], rtol=1e-5, atol=1e-4, msg=n)
        hidden = out

    fresh = HessianCollector(adapter, "uniform")
    fresh.on_predict_start(None, Runner)             # no batch at all in this pass
    fresh.on_predict_end(None, Runner)
    assert all(fresh.keys[n] == n for n in group if ".experts." not in n)
    assert not any(s.H.any() for s in fresh.states.values())
    assert not fresh._input_keys                     # nothing learned from no input
