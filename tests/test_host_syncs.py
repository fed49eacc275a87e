"""Decode steps without needless host syncs.

On a GPU, reading a tensor on the host (`bool(t.any())`, `.tolist()`, a data-sized output) waits for every
queued kernel and so drains the launch queue. A decode step launches small kernels, so a sync in each layer
costs it a queue refill per layer. `HostSyncs` counts on the CPU the ops that would sync on a GPU; these
tests hold the routed decode paths to none per layer: what derives from the mask is derived once per
forward pass (`HostMemo`).
"""

import os

import pytest
import torch

from sparse_attn.host_memo import HostMemo
from sparse_attn.methods.hisa import HISABlockMeans, hisa_indexer, hisa_segments
from sparse_attn.methods.moba import MoBABlockMeans, moba_decode
from sparse_attn.testing import TINY_CAUSAL_LM, TINY_DSA_LM, HostSyncs, cache_argument


def test_host_syncs_counts_the_ops_that_would_sync():
    t = torch.tensor([0, 2, 1])
    with HostSyncs() as log:
        t.sum().item()
        bool(t.any())
        t.nonzero()
        t[t > 0]
        torch.repeat_interleave(t)
        torch.repeat_interleave(t, output_size=3)  # sized by the caller: no sync
        t.cumsum(0)
    assert sum(log.sites.values()) == 5
    assert log.in_package() == {}  # called from this test, not from sparse_attn


def test_host_memo_holds_its_sources_weakly():
    """A memo never keeps a mask alive (a DSA model's 4D prefill mask can be gigabytes)."""
    import gc
    import weakref

    memo, mask = HostMemo(), torch.ones(4, 64, 64, dtype=torch.bool)
    memo.get(mask[:, 0], (), lambda: 1)
    alive = weakref.ref(mask)
    del mask
    gc.collect()
    assert alive() is None


def test_host_memo_knows_inference_tensors_only_within_a_pass():
    """Inference tensors have no version counter: known again by storage while the layers rise (a fresh view
    per layer included), derived afresh when a pass starts again (its buffer may have been refilled)."""
    memo, calls = HostMemo(), []
    with torch.inference_mode():
        mask = torch.ones(2, 8, 5, dtype=torch.bool)
        for layer in (0, 1, 2):
            assert memo.get(mask[:, 0], (), lambda: calls.append(layer) or int(mask[:, 0].sum()), layer=layer) == 10
        mask[0, 0, 0] = False
        assert memo.get(mask[:, 0], (), lambda: calls.append(0) or int(mask[:, 0].sum()), layer=0) == 9
        assert memo.get(mask[:, 0], (), lambda: calls.append(None) or 0, layer=None) == 0  # no layer: no memo
    assert calls == [0, 0, None]


def test_host_memo_derives_again_for_a_new_or_written_tensor():
    memo, calls = HostMemo(), []

    def derive(t):
        calls.append(1)
        return int(t.sum())

    mask = torch.ones(2, 5, dtype=torch.bool)
    assert memo.get(mask, (), lambda: derive(mask), layer=0) == 10
    assert memo.get(mask[:, :], (), lambda: derive(mask), layer=1) == 10  # a fresh view of the same tensor
    assert len(calls) == 1
    mask[0, 0] = False  # written in place: derived again
    assert memo.get(mask, (), lambda: derive(mask), layer=2) == 9
    assert memo.get(mask, ("other",), lambda: derive(mask), layer=3) == 9  # another signature
    assert memo.get(mask.clone(), (), lambda: derive(mask), layer=4) == 9  # another tensor
    assert len(calls) == 4


def test_host_memo_derives_again_in_every_pass():
    """A buffer refilled between passes by a write that leaves the version counter alone (through numpy,
    or `.data`): a new pass (the layers start again) derives afresh."""
    memo, buffer = HostMemo(), torch.ones(2, 5, dtype=torch.bool)
    assert memo.get(buffer, (), lambda: int(buffer.sum()), layer=0) == 10
    version = buffer._version
    buffer.numpy()[0, :3] = False
    assert buffer._version == version  # no trace of the write
    assert memo.get(buffer, (), lambda: int(buffer.sum()), layer=0) == 7


def test_routed_moba_decode_makes_no_host_sync():
    q = torch.randn(2, 8, 1, 32, dtype=torch.float16)
    k, v = (torch.randn(2, 2, 300, 32, dtype=torch.float16) for _ in range(2))
    means = MoBABlockMeans(32)
    moba_decode(q, k[:, :, :299], v[:, :, :299], block_size=32, topk=3, block_means=means)
    with HostSyncs() as log:
        moba_decode(q, k, v, block_size=32, topk=3, block_means=means)
    assert log.in_package() == {}


def test_hisa_indexer_with_its_segments_makes_no_host_sync():
    gen = torch.Generator().manual_seed(0)
    q, k, weights = torch.randn(2, 4, 16, generator=gen), torch.randn(400, 16, generator=gen), torch.rand(2, 4)
    ks, ke = torch.tensor([0, 200], dtype=torch.int32), torch.tensor([200, 400], dtype=torch.int32)
    options = dict(block_size=16, block_topk=4, topk=24)
    means = torch.cat([HISABlockMeans(16).update(k[:200]), HISABlockMeans(16).update(k[200:])])
    segments = hisa_segments(ks, ke, 400, block_size=16)  # once per step; then each layer's call is sync-free
    with HostSyncs() as log:
        selected = hisa_indexer(q, k, weights, ks, ke, **options, block_means=means, segments=segments)
    assert log.in_package() == {}
    assert torch.equal(selected, hisa_indexer(q, k, weights, ks, ke, **options))


def test_hisa_block_means_update_makes_no_host_sync():
    state, k = HISABlockMeans(16), torch.randn(2, 100, 8)
    state.update(k[:, :99])
    with HostSyncs() as log:
        state.update(k)
    assert log.in_package() == {}


# ---------------------------------------------------------------------------------- patched models
transformers = pytest.importorskip("transformers", reason="the HF integration needs transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from sparse_attn import hf  # noqa: E402


def _llama(layers):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**TINY_CAUSAL_LM, "num_hidden_layers": layers}, pad_token_id=0)
    config._attn_implementation = "sdpa"
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _deepseek_v32(layers):
    torch.manual_seed(0)
    options = {**TINY_DSA_LM, "num_hidden_layers": layers, "index_topk": 8, "max_position_embeddings": 512}
    config = transformers.DeepseekV32Config(**options, pad_token_id=0, attn_implementation="sdpa")
    return transformers.DeepseekV32ForCausalLM(config).eval()


def _decode_step_syncs(model, method, options, padded, prompt, context):
    """The package's host syncs in the second decode step after a prefill of 2 rows of `prompt` tokens."""
    ids = torch.randint(1, 1000, (2, prompt), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :9] = 0
    with context(), hf.patched(model, method, **options):
        out = model(ids, attention_mask=mask, use_cache=True)
        cache = out.past_key_values
        for _ in range(2):
            token = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            with HostSyncs() as log:
                out = model(token, attention_mask=mask, use_cache=True, **cache_argument(model, cache))
    return sum(log.in_package().values())


ROUTED = [
    pytest.param(_llama, "moba", {"block_size": 32, "topk": 2, "decode": "sparse"}, 200, id="moba"),
    pytest.param(
        _deepseek_v32,
        "hisa",
        {"block_size": 4, "block_topk": 3, "decode": "sparse"},  # 12 candidate keys of 40
        40,
        id="hisa",
        marks=pytest.mark.skipif(not hasattr(transformers, "DeepseekV32Config"), reason="transformers 5.x"),
    ),
]


@pytest.mark.usefixtures("reference_engine")
@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("build, method, options, prompt", ROUTED)
def test_routed_decode_step_syncs_per_pass_not_per_layer(build, method, options, prompt, padded, context):
    """A routed decode step's syncs (the mask's reading) do not grow with the number of layers."""
    syncs = [_decode_step_syncs(build(layers), method, options, padded, prompt, context) for layers in (2, 3)]
    assert syncs[0] == syncs[1], syncs
