"""GPU-only: the local models on CUDA use flash / memory-efficient attention, never cuDNN's (whose
per-shape plan build cost 1.4 s of the first layer), and match the CPU float32 logits. Skipped in CI."""
import pytest
import torch

from alphaquant import models
import tiny

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("family", list(tiny.FAMILIES))
def test_cuda_forward_avoids_cudnn_attention_and_matches_cpu(family, tmp_path):
    ckpt = tiny.make_checkpoint(family, tmp_path / family)
    ids = torch.randint(0, 320, (2, 64), generator=torch.Generator().manual_seed(0))
    ref = models.from_pretrained(ckpt, dtype="fp32")
    with torch.no_grad():
        expected = ref(ids).float()
    model = models.from_pretrained(ckpt, dtype="bf16").cuda()
    from torch.profiler import ProfilerActivity, profile
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        got = model(ids.cuda()).float().cpu()
    names = {e.key for e in prof.key_averages()}
    assert not any("cudnn_attention" in n for n in names), sorted(n for n in names if "attention" in n)
    assert any("scaled_dot_product" in n for n in names)
    rel = (got - expected).norm() / expected.norm()
    assert rel < 0.05, rel
