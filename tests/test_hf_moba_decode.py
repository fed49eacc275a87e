"""Routed MoBA decode in a patched transformers model: the block means follow the KV cache.

Each decode step must route exactly as the same row of a full prefill does, while pooling every key
block once per cache rather than the whole cache every step; and any edit of the cache (beam reorder,
crop, batch selection, an in-place write, a new cache) must pool afresh, never reuse a stale mean.
A spy on the pooling counts the keys pooled.
"""

import copy
import os

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the HF integration needs transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sparse_attn.methods.moba as moba_module  # noqa: E402
from sparse_attn import hf, hf_block_means  # noqa: E402
from sparse_attn.testing import TINY_CAUSAL_LM, cache_argument  # noqa: E402

PROMPT, BLOCK, TOPK = 250, 64, 2
ROUTED = {"block_size": BLOCK, "topk": TOPK, "decode": "sparse"}
LAYERS = TINY_CAUSAL_LM["num_hidden_layers"]


def _model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY_CAUSAL_LM, pad_token_id=0)
    config._attn_implementation = "sdpa"
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _prompts(batch=2, length=PROMPT, seed=1):
    return torch.randint(1, 1000, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def pooled(monkeypatch):
    """The number of keys each call of the block pooling took, in order."""
    lengths = []
    pool = moba_module.block_mean_pool

    def spy(k, block_size):
        lengths.append(k.shape[2])
        return pool(k, block_size)

    monkeypatch.setattr(moba_module, "block_mean_pool", spy)
    return lengths


def _complete_keys(length):
    return length // BLOCK * BLOCK


def test_generation_pools_each_block_once_and_routes_like_the_prefill(pooled):
    model, ids = _model(), _prompts()
    new_tokens = 80
    with torch.no_grad(), hf.patched(model, "moba", **ROUTED) as handle:
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        decode_pooled = sum(pooled)
        # The same rows from one prefill of the whole text (moba_attn's routing).
        logits = model(out.sequences[:, :-1]).logits[:, PROMPT - 1 :]
    assert handle.stats.calls[(0, "decode", "moba")] == new_tokens - 1
    # Per layer: the blocks complete at the first decode step, then each block as it completes.
    assert decode_pooled == LAYERS * _complete_keys(PROMPT + new_tokens - 1)
    torch.testing.assert_close(torch.stack(out.logits, dim=1), logits, atol=2e-4, rtol=1e-4)


def _step(model, cache, token, run=None, mask=None):
    """One decode step of every row with `token` (B, 1) through `run` (default the model itself), with the
    padding `mask` (B, cache length + 1) if any; returns its logits (B, vocab)."""
    run = model if run is None else run
    return run(token, attention_mask=mask, use_cache=True, **cache_argument(model, cache)).logits[:, -1]


def _prefilled(model, ids, mask=None):
    cache = transformers.DynamicCache()
    model(ids, attention_mask=mask, use_cache=True, **cache_argument(model, cache))
    return cache


def _assert_step_pools(model, cache, token, pooled, keys, mask=None):
    """Runs a step and checks that it pooled `keys` keys in every layer (a list: the pools in order) and equals
    the same step run on a copy of the cache (a cache the tracker has never seen pools every block)."""
    untracked = copy.deepcopy(cache)
    pooled.clear()
    logits = _step(model, cache, token, mask=mask)
    expected = keys if isinstance(keys, list) else [keys] * LAYERS
    assert pooled == [n for n in expected if n]
    torch.testing.assert_close(logits, _step(model, untracked, token, mask=mask), atol=0, rtol=0)


@pytest.mark.parametrize("edit", ["reorder", "crop", "select", "in-place write", "new cache"])
def test_cache_edits_pool_afresh(pooled, edit):
    model, ids = _model(), _prompts()
    token = torch.tensor([[7], [11]])
    with torch.no_grad(), hf.patched(model, "moba", **ROUTED):
        cache = _prefilled(model, ids)
        length = PROMPT
        for _ in range(3):  # the first step pools the prompt's blocks; the next two pool nothing
            _assert_step_pools(model, cache, token, pooled, _complete_keys(length + 1) if length == PROMPT else 0)
            length += 1
        if edit == "reorder":
            cache.reorder_cache(torch.tensor([1, 0]))
        elif edit == "crop":
            cache.crop(-5)  # negative: tokens to remove, in every transformers version
            length -= 5
        elif edit == "select":
            cache.batch_select_indices(torch.tensor([1]))
            token = token[1:]
        elif edit == "in-place write":
            stored = hf_block_means._appending_keys(cache, 0)
            stored[:, :, 3] *= 2.0  # layer 0 only: layer 1 still continues
            _assert_step_pools(model, cache, token, pooled, [_complete_keys(length + 1), 0])
            return
        else:
            cache = _prefilled(model, _prompts(seed=2)[:, :length])
        _assert_step_pools(model, cache, token, pooled, _complete_keys(length + 1))
        _assert_step_pools(model, cache, token, pooled, 0)  # and follows the edited cache from then on


def test_left_padded_batch_runs_views_and_follows_each_row(pooled, monkeypatch):
    """A left-padded batch decodes row by row on views of the cache (no copy of it), each row's means following
    its own block grid (anchored at its first real token), pooled once per block."""
    model, ids = _model(), _prompts()
    pad = 37
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    token = torch.tensor([[7], [11]])
    storages = []
    decode = hf.moba_decode
    monkeypatch.setattr(
        hf, "moba_decode", lambda q, k, v, **o: (storages.append(k.untyped_storage()), decode(q, k, v, **o))[1]
    )
    with torch.no_grad(), hf.patched(model, "moba", **ROUTED):
        cache = _prefilled(model, ids.masked_fill(mask == 0, 0), mask)
        for step in range(8):
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            real = [PROMPT + step + 1, PROMPT - pad + step + 1]  # each row's real keys after the step
            if step == 0:
                keys = [_complete_keys(n) for n in real] * LAYERS
            else:
                keys = [BLOCK if n % BLOCK == 0 else 0 for n in real] * LAYERS
            storages.clear()
            _assert_step_pools(model, cache, token, pooled, keys, mask)
            cached = [hf_block_means._appending_keys(cache, layer).untyped_storage() for layer in range(LAYERS)]
            # Each layer's two rows read the cache in place (the copy of the cache that the check ran next
            # appended its own calls after these).
            assert [s.data_ptr() for s in storages[: 2 * LAYERS]] == [s.data_ptr() for s in cached for _ in "ab"]


def test_chunked_prefill_between_steps_pools_afresh(pooled):
    """A multi-token chunk (the prefill path, which does not follow the means) breaks the chain."""
    model, ids = _model(), _prompts()
    token = torch.tensor([[7], [11]])
    with torch.no_grad(), hf.patched(model, "moba", **ROUTED):
        cache = _prefilled(model, ids)
        _assert_step_pools(model, cache, token, pooled, _complete_keys(PROMPT + 1))
        model(_prompts(length=40, seed=3), use_cache=True, **cache_argument(model, cache))
        _assert_step_pools(model, cache, token, pooled, _complete_keys(PROMPT + 42))


def test_inference_mode_and_unpatch(pooled):
    model, ids = _model(), _prompts()
    token = torch.tensor([[7], [11]])
    with hf.patched(model, "moba", **ROUTED) as handle:
        attention = model.model.layers[0].self_attn
        assert attention._forward_pre_hooks and attention._forward_hooks
        with torch.inference_mode():  # tensors without version counters
            cache = _prefilled(model, ids)
            _assert_step_pools(model, cache, token, pooled, _complete_keys(PROMPT + 1))
            _assert_step_pools(model, cache, token, pooled, 0)
    assert not attention._forward_pre_hooks and not attention._forward_hooks
    assert handle.stats.calls[(0, "decode", "moba")] == 4


def test_only_routed_decode_layers_are_followed():
    model = _model()
    with hf.patched(model, "moba", block_size=BLOCK, topk=TOPK, layer_config={1: {"decode": "sparse"}}):
        assert not model.model.layers[0].self_attn._forward_pre_hooks
        assert model.model.layers[1].self_attn._forward_pre_hooks
    with hf.patched(model, "xattention"):
        assert not any(module._forward_pre_hooks for module in model.modules())


def test_compiled_decode_steps_equal_eager(reference_engine):
    """Under torch.compile the hooks stand aside (each traced step pools the whole cache) and the steps equal eager."""
    model, ids = _model(), _prompts()
    token = torch.tensor([[7], [11]])
    with torch.no_grad(), hf.patched(model, "moba", **ROUTED):
        eager_cache, compiled_cache = _prefilled(model, ids), _prefilled(model, ids)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")
        for _ in range(2):
            expected = _step(model, eager_cache, token)
            torch.testing.assert_close(_step(model, compiled_cache, token, compiled), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_gpu_followed_means_equal_pooling_every_step(pooled):
    """bf16 on the GPU (the split-KV decode kernel): steps with followed block means equal the same steps pooling
    the whole cache each time (a fresh copy of the cache per step)."""
    model, ids = _model().cuda().to(torch.bfloat16), _prompts(length=1000).cuda()
    token = torch.tensor([[7], [11]], device="cuda")
    with torch.no_grad(), hf.patched(model, "moba", block_size=BLOCK, topk=4, decode="sparse"):
        cache = _prefilled(model, ids)
        for length in range(1001, 1031):  # the cache's length after the step; block 15 completes at 1024
            completed = _complete_keys(length) if length == 1001 else BLOCK if length % BLOCK == 0 else 0
            _assert_step_pools(model, cache, token, pooled, completed)


def test_a_model_loaded_under_configure_follows_from_its_second_step(pooled):
    """No patch handle registers hooks on a model loaded with attn_implementation="sparse_attn": its first routed
    decode step pools the whole cache and starts following, the second pools afresh once, then blocks only."""
    try:
        hf.configure("moba", **ROUTED)
        torch.manual_seed(0)
        config = transformers.LlamaConfig(**TINY_CAUSAL_LM, pad_token_id=0)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sparse_attn").eval()
        token = torch.tensor([[7], [11]])
        with torch.no_grad():
            cache = _prefilled(model, _prompts())
            for step in range(8):  # cache lengths 251 .. 258: block 3 completes at 256
                length = PROMPT + step + 1
                keys = _complete_keys(length) if step < 2 else BLOCK if length % BLOCK == 0 else 0
                _assert_step_pools(model, cache, token, pooled, keys)
        assert model.model.layers[0].self_attn._forward_pre_hooks
    finally:
        hf.configure(None)
