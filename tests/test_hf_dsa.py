"""DeepSeek Sparse Attention models through sparse_attn.hf: tiny offline DeepSeek-V3.2 and GLM-MoE-DSA models
(random weights, fp32 on the CPU). Spec hisa_dsa.md section 5, oracle 8.

'dense' must reproduce the model's own SDPA path (attention over its indexer's top-k); 'hisa' must equal it
while every block is a candidate, select what HISA selects beyond that, and keep padding invisible.
"""

import copy
import os

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the HF integration needs transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not hasattr(transformers, "DeepseekV32Config") or not hasattr(transformers.Cache, "update_indexer"):
    pytest.skip("this transformers has no DeepSeek-V3.2 model with an indexer key cache", allow_module_level=True)

import sparse_attn.methods.hisa as hisa_module  # noqa: E402
from sparse_attn import hf  # noqa: E402
from sparse_attn.hf_dsa import HISAIndexer, _key_ranges, indexed_attention  # noqa: E402
from sparse_attn.methods.hisa import dsa_select, hisa_select  # noqa: E402
from sparse_attn.testing import (  # noqa: E402
    TINY_CAUSAL_LM,
    TINY_DSA_LM,
    assert_patched_bf16_follows_flash_rule,
    cache_argument,
)

pytestmark = pytest.mark.usefixtures("reference_engine")
TOPK = 8
COMMON = {**TINY_DSA_LM, "index_topk": TOPK, "max_position_embeddings": 256, "pad_token_id": 0}
FAMILIES = ["deepseek_v32"] + (["glm_moe_dsa"] if hasattr(transformers, "GlmMoeDsaConfig") else [])
# Blocks of 4 keys, 3 candidates: HISA prunes prefixes beyond 12 keys (DSA keeps 8 of them).
PRUNING = {"block_size": 4, "block_topk": 3}


def _model(family="deepseek_v32", seed=0):
    torch.manual_seed(seed)
    if family == "deepseek_v32":
        config = transformers.DeepseekV32Config(**COMMON, attn_implementation="sdpa")
        return transformers.DeepseekV32ForCausalLM(config).eval()
    config = transformers.GlmMoeDsaConfig(**COMMON, head_dim=24, attn_implementation="sdpa")
    return transformers.GlmMoeDsaForCausalLM(config).eval()


def _ids(batch=2, length=40, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, COMMON["vocab_size"], (batch, length), generator=generator)


def _left_padded(ids, pads):
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _indexers(model):
    return [layer.self_attn.indexer for layer in model.model.layers if layer.self_attn.indexer is not None]


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_dense_matches_the_models_own_indexed_attention(family):
    model = _model(family)
    ids, mask = _left_padded(_ids(), [0, 5])
    expected = model(ids, attention_mask=mask).logits
    expected_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    with hf.patched(model, "dense", track_density=True) as handle:
        got = model(ids, attention_mask=mask).logits
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        static = model.generate(
            ids, attention_mask=mask, max_new_tokens=5, do_sample=False, cache_implementation="static"
        )
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    assert torch.equal(tokens, expected_tokens) and torch.equal(static, expected_tokens)
    assert {path for _, _, path in handle.stats.calls} == {"dense"}
    # Density: the indexer's 8 keys over the visible ones, below 1 once rows see more than 8.
    assert all(0 < density < 1 for _, density in handle.stats.densities)
    assert any(phase == "decode" for _, phase, _ in handle.stats.calls)


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_hisa_equals_dsa_while_every_block_is_a_candidate(family):
    """Oracle 8: HISA only changes anything once a prefix exceeds block_topk * block_size keys."""
    model = _model(family)
    ids, mask = _left_padded(_ids(length=40), [0, 3])
    expected = model(ids, attention_mask=mask).logits
    with hf.patched(model, "hisa", block_size=16, block_topk=3) as handle:  # 48 candidate keys >= 40
        assert all(isinstance(indexer, HISAIndexer) for indexer in _indexers(model))
        got = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-5)
    assert {path for _, _, path in handle.stats.calls} == {"hisa"}


def _capture_indexer_inputs(indexer, inputs):
    """Run the HISAIndexer's own projections on the inputs its layer received (no cache)."""
    hidden_states, q_resid, position_embeddings = inputs
    return indexer._index_inputs(hidden_states, q_resid, position_embeddings, None)


def _indexer_calls(model):
    """Records (hidden_states, q_resid, position_embeddings, mask, output) of every indexer call."""
    calls = []

    def hook(module, args, kwargs, output):
        calls.append((module, args[:3], args[3], output))

    handles = [indexer.register_forward_hook(hook, with_kwargs=True) for indexer in _indexers(model)]
    return calls, handles


def _index_scores(q, k, weights):
    """I[b, t, s] = sum_h w[b, t, h] ReLU(q[b, t, h] . k[b, s]), written out."""
    return torch.einsum("bth,btsh->bts", weights, torch.einsum("bthd,bsd->btsh", q, k).relu())


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_hisa_path_reproduces_the_models_indexer_and_its_rope(family):
    """Forced onto its own path where HISA equals DSA, the HISAIndexer selects what the model's indexer selects:
    its projections, RoPE (rotate-half for DeepSeek-V3.2), weight scaling and padding ranges are the model's."""
    model = _model(family)
    ids, mask = _left_padded(_ids(length=24), [0, 6])
    dsa_calls, handles = _indexer_calls(model)
    model(ids, attention_mask=mask)
    for handle in handles:
        handle.remove()
    with hf.patched(model, "hisa", block_size=4, block_topk=8):  # 32 candidates >= 24: HISA = DSA
        for indexer in _indexers(model):
            indexer.all_candidates = 0  # take HISA's own path anyway
        hisa_calls, handles = _indexer_calls(model)
        model(ids, attention_mask=mask)
        for handle in handles:
            handle.remove()
        inputs = [_capture_indexer_inputs(indexer, layer_inputs) for indexer, layer_inputs, _, _ in hisa_calls]
        indexer, (hidden_states, _, (cos, sin)), _, _ = hisa_calls[0]
    allowed = mask.bool()[:, None, :] & torch.ones(24, 24, dtype=torch.bool).tril()[None]
    for (_, _, _, dsa), (_, _, _, hisa), (q, k, weights) in zip(dsa_calls, hisa_calls, inputs, strict=True):
        scores = _index_scores(q, k, weights)
        for row in range(ids.shape[0]):
            for t in range(ids.shape[1]):
                visible = int(allowed[row, t].sum())
                want = dsa[row, t, : min(TOPK, visible)].long() if visible else torch.zeros(0, dtype=torch.long)
                got = hisa[row, t][hisa[row, t] >= 0].long()
                assert len(set(got.tolist())) == len(got) and bool(allowed[row, t, got].all()), (row, t)
                # ReLU makes exact ties (zero scores): equal score multisets, not equal sets.
                torch.testing.assert_close(scores[row, t, got].sort().values, scores[row, t, want].sort().values)
    q, k, _ = inputs[0]
    assert q.shape == (2, 24, COMMON["index_n_heads"], COMMON["index_head_dim"])
    if family != "deepseek_v32":
        return
    # Oracle 8: DeepSeek-V3.2's index keys carry rotate-half (NeoX) RoPE on their first qk_rope_head_dim dims.
    plain = indexer.k_norm(indexer.wk(hidden_states))
    rope_dim, half = COMMON["qk_rope_head_dim"], COMMON["qk_rope_head_dim"] // 2
    x = plain[..., :rope_dim]
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    torch.testing.assert_close(k[..., :rope_dim], x * cos + rotated * sin)
    torch.testing.assert_close(k[..., rope_dim:], plain[..., rope_dim:])


@torch.no_grad()
@pytest.mark.parametrize("family", FAMILIES)
def test_hisa_prunes_long_prefixes_as_hisa_select_does(family):
    model = _model(family)
    ids = _ids(batch=1, length=40)
    with hf.patched(model, "hisa", **PRUNING):
        calls, handles = _indexer_calls(model)
        model(ids)
        for handle in handles:
            handle.remove()
        for indexer, inputs, _, selected in calls:
            q, k, weights = _capture_indexer_inputs(indexer, inputs)
            expected = hisa_select(q, k, weights, topk=TOPK, **PRUNING)[:, :, 0]
            assert torch.equal(selected.sort(dim=-1).values, expected.sort(dim=-1).values)
            # Beyond 12 keys HISA ranks only its candidates: never more score mass than DSA's top-k, less somewhere.
            scores = _index_scores(q, k, weights)
            dsa = dsa_select(q, k, weights, topk=TOPK)[:, :, 0]
            mass = [torch.where(s >= 0, scores.gather(-1, s.clamp(min=0).long()), 0).sum(-1) for s in (selected, dsa)]
            assert bool((mass[0] <= mass[1] + 1e-5).all()) and bool((mass[0] < mass[1] - 1e-5).any())


@torch.no_grad()
def test_hisa_padding_and_decode_equal_separate_runs():
    """Blocks start at every sequence's first real token, so a left-padded row selects and attends as the same
    sequence run alone; decode='sparse' runs HISA for decode steps too."""
    model = _model()
    ids, mask = _left_padded(_ids(length=40), [0, 7])
    with hf.patched(model, "hisa", decode="sparse", **PRUNING) as handle:
        batched = model(ids, attention_mask=mask).logits
        alone = model(ids[1:, 7:]).logits
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        tokens_alone = model.generate(ids[1:, 7:], max_new_tokens=4, do_sample=False)
        # A StaticCache's unfilled index keys sit in the last eligible block, which is always kept.
        static = model.generate(
            ids, attention_mask=mask, max_new_tokens=4, do_sample=False, cache_implementation="static"
        )
    torch.testing.assert_close(batched[1, 7:], alone[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(tokens[1, -4:], tokens_alone[0, -4:]) and torch.equal(static, tokens)
    assert any(key[1:] == ("decode", "hisa") for key in handle.stats.calls)


@torch.no_grad()
def test_packed_documents_in_a_custom_4d_mask():
    """A block-diagonal 4D mask (two documents in one row): 'dense' follows it as SDPA does, and HISA anchors
    the second document's blocks at its own start, so it selects and attends as that document run alone."""
    model = _model()
    ids = _ids(batch=1, length=40)
    allowed = torch.ones(40, 40, dtype=torch.bool).tril()
    allowed[20:, :20] = False
    expected = model(ids, attention_mask=allowed[None, None]).logits
    with hf.patched(model, "dense"):
        dense = model(ids, attention_mask=allowed[None, None]).logits
    with hf.patched(model, "hisa", **PRUNING):
        packed = model(ids, attention_mask=allowed[None, None]).logits
        alone = model(ids[:, 20:]).logits
    torch.testing.assert_close(dense, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[0, 20:], alone[0], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_hisa_decode_selection_equals_the_prefill_row():
    """Oracle 6 in the model: a decode step through the cache selects what a prefill selects for that position."""
    model = _model()
    ids = _ids(batch=1, length=41)
    with hf.patched(model, "hisa", decode="sparse", **PRUNING):
        calls, handles = _indexer_calls(model)
        model(ids)
        prefill = [selected[:, -1] for _, _, _, selected in calls]
        calls.clear()
        cache = cache_argument(model, transformers.DynamicCache(config=model.config))
        model(ids[:, :-1], use_cache=True, **cache)
        calls.clear()
        model(ids[:, -1:], use_cache=True, **cache)
        for handle in handles:
            handle.remove()
    decode = [selected[:, 0] for _, _, _, selected in calls]
    assert len(decode) == len(prefill) == 2
    for got, want in zip(decode, prefill, strict=True):
        assert torch.equal(got.sort(dim=-1).values, want.sort(dim=-1).values)


@torch.no_grad()
@pytest.mark.parametrize("edit", [None, "reorder", "padded"])
def test_hisa_decode_follows_the_indexer_key_cache(monkeypatch, edit):
    """decode='sparse': each step adds only its new index keys to the block means that follow the cache (every
    key on the first step and after a beam reorder; a left-padded batch row by row, each from its first real
    key), and equals the same step on a copy of the cache, which pools everything afresh."""
    added = []
    add = hisa_module._add_to_blocks
    monkeypatch.setattr(hisa_module, "_add_to_blocks", lambda *a: (added.append(a[-1].shape[-2]), add(*a))[1])
    model, length, pad = _model(), 40, 3
    ids, mask = _left_padded(_ids(length=length), [0, pad] if edit == "padded" else [0, 0])
    token = torch.tensor([[5], [9]])
    with hf.patched(model, "hisa", decode="sparse", **PRUNING):
        layers = len(_indexers(model))
        cache = transformers.DynamicCache(config=model.config)
        model(ids, attention_mask=mask, use_cache=True, **cache_argument(model, cache))
        for step in range(4):
            if edit == "reorder" and step == 2:
                cache.reorder_cache(torch.tensor([1, 0]))
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            untracked = copy.deepcopy(cache)
            added.clear()
            logits = model(token, attention_mask=mask, use_cache=True, **cache_argument(model, cache)).logits
            keys = length + step + 1
            fresh = step == 0 or (edit == "reorder" and step == 2)
            if edit == "padded":  # one state per row, anchored at its first real key
                assert added == ([keys, keys - pad] if fresh else [1, 1]) * layers, step
            else:  # one state for the batch
                assert added == [keys if fresh else 1] * layers, step
            again = model(token, attention_mask=mask, use_cache=True, **cache_argument(model, untracked)).logits
            torch.testing.assert_close(logits, again, atol=0, rtol=0)


@torch.no_grad()
def test_unpatch_restores_the_indexers_and_outputs():
    model = _model()
    ids = _ids()
    own = _indexers(model)
    keys = list(model.state_dict())
    before = model(ids).logits
    handle = hf.patch(model, "hisa", layer_config={1: {"method": "dense"}}, **PRUNING)
    assert isinstance(model.model.layers[0].self_attn.indexer, HISAIndexer)
    assert model.model.layers[1].self_attn.indexer is own[1]
    assert list(model.state_dict()) == keys
    assert not torch.equal(model(ids).logits, before)
    # A plan that fails leaves the patch in place; a new plan replaces the HISAIndexers of the old one.
    with pytest.raises(ValueError, match="topk=8"):
        hf.patch(model, "hisa", block_size=2, block_topk=3)
    assert handle.active and isinstance(model.model.layers[0].self_attn.indexer, HISAIndexer)
    handle = hf.patch(model, "hisa", block_size=4, block_topk=4)
    assert [indexer.block_topk for indexer in _indexers(model)] == [4, 4]
    handle.unpatch()
    assert _indexers(model) == own
    assert torch.equal(model(ids).logits, before)


@torch.no_grad()
@pytest.mark.skipif("glm_moe_dsa" not in FAMILIES, reason="this transformers has no GLM-MoE-DSA")
def test_shared_indexer_layers_take_their_source_layers_plan():
    """GLM-MoE-DSA's 'shared' layers attend over the previous indexed layer's top-k: one plan for both, or a
    ValueError naming the layers; with one plan, HISA's selection reaches the shared layer."""
    torch.manual_seed(0)
    config = transformers.GlmMoeDsaConfig(
        **COMMON, head_dim=24, attn_implementation="sdpa", indexer_types=["full", "shared"]
    )
    model = transformers.GlmMoeDsaForCausalLM(config).eval()
    assert model.model.layers[1].self_attn.indexer is None
    ids = _ids()
    expected = model(ids).logits
    with pytest.raises(ValueError, match="layer 1 reuses layer 0"):
        hf.patch(model, "hisa", layer_config={1: {"method": "dense"}}, **PRUNING)
    with pytest.raises(ValueError, match="layer 1 reuses layer 0"):
        hf.patch(model, "hisa", layers=[0], **PRUNING)
    with hf.patched(model, "dense"):
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)
    with hf.patched(model, "hisa", **PRUNING) as handle:
        pruned = model(ids).logits
    assert {key[0] for key in handle.stats.calls} == {0, 1} and not torch.allclose(pruned, expected)


def test_methods_that_do_not_fit_raise(monkeypatch):
    model = _model()
    with pytest.raises(ValueError, match="DeepSeek Sparse Attention model"):
        hf.patch(model, "xattention")
    with pytest.raises(ValueError, match="DeepSeek Sparse Attention model"):
        hf.patch(model, "hisa", layer_config={0: {"method": "moba", "block_size": 8, "topk": 2}}, **PRUNING)
    with pytest.raises(ValueError, match="topk=8"):
        hf.patch(model, "hisa", block_size=2, block_topk=3)  # 6 candidate keys cannot hold 8
    with pytest.raises(ValueError, match="forced"):
        hf.patch(model, "hisa", forced="both")
    assert type(_indexers(model)[0]).__name__ != "HISAIndexer"
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_CAUSAL_LM))
    with pytest.raises(ValueError, match="has none"):
        hf.patch(llama, "hisa")
    with pytest.raises(ValueError, match="use sparse_attn.hf.patch"):
        hf.configure("hisa")
    # A transformers whose caches keep no indexer keys cannot host HISA: said at patch time.
    monkeypatch.delattr(transformers.cache_utils.Cache, "update_indexer")
    with pytest.raises(NotImplementedError, match="update_indexer"):
        hf.patch(model, "hisa", **PRUNING)
    assert not getattr(model, "_sparse_attn_handle", None)


def test_key_ranges_and_indexed_attention_masking():
    allowed = torch.tensor([[[0, 1, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0]]], dtype=torch.bool)
    first, end = _key_ranges(allowed)
    assert first.tolist() == [[1, 1, 0]] and end.tolist() == [[3, 4, 0]]
    assert _key_ranges(torch.tensor([[[1, 0, 1, 0]]], dtype=torch.bool)) is None

    # Indices naming masked, out-of-range or -1 positions are dropped; a row left with none gives 0.
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 5)
    indices = torch.tensor([[[2, 0, 1], [3, -1, 1], [0, 1, 9]]])
    out, density = indexed_attention(q, k, v, allowed[:, None], indices, 0.5, return_density=True)
    assert torch.equal(indexed_attention(q, k, v, allowed[:, None], indices, 0.5), out)
    assert density.item() == pytest.approx((2 / 2 + 2 / 3) / 2)  # the third row sees no key
    kept = [[2, 1], [3, 1], []]
    for row, keys in enumerate(kept):
        if not keys:
            assert torch.equal(out[0, :, row], torch.zeros(2, 5))
            continue
        probs = (torch.einsum("hd,hkd->hk", q[0, :, row], k[0, :, keys]) * 0.5).softmax(-1)
        torch.testing.assert_close(out[0, :, row], torch.einsum("hk,hkd->hd", probs, v[0, :, keys]))
    with pytest.raises(ValueError, match="indices must be"):
        indexed_attention(q, k, v, allowed[:, None], indices[0], 0.5)


# ---------------------------------------------------------------------------------- GPU (bf16, Triton kernels)
@pytest.mark.gpu
@pytest.mark.parametrize("method, options", [("dense", {}), ("hisa", {"block_size": 16, "block_topk": 4})])
def test_gpu_bf16_indexed_attention_follows_flash_rule(method, options):
    """The bf16 model through the token-sparse and indexer kernels is no further from the fp32 model than its own
    bf16 SDPA path is (2x rule); HISA's 64 candidate keys cover these 48-token prompts, so it equals DSA."""
    stats = assert_patched_bf16_follows_flash_rule(_model().cuda(), _ids(length=48).cuda(), method, **options)
    assert stats.calls[(0, "prefill", method)] == 1
