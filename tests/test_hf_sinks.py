"""Attention sinks in the HF patcher: a tiny random GPT-OSS (per-head `sinks` passed as `s_aux`, a sliding
layer then a full one) patched with every method, against the model's own eager attention, which appends
the sink as one more softmax column. The sinks are drawn large, so that they take a real share of each row.
"""

import os

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the HF integration needs transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not hasattr(transformers, "GptOssConfig"):
    pytest.skip("this transformers has no GPT-OSS", allow_module_level=True)

from sparse_attn import hf  # noqa: E402
from sparse_attn.testing import TINY_CAUSAL_LM, assert_patched_bf16_follows_flash_rule  # noqa: E402

SEQ_LEN, BLOCK, WINDOW = 192, 32, 48
FULL_BUDGET = {
    "dense": {},
    "moba": {"block_size": BLOCK, "topk": SEQ_LEN // BLOCK + 1, "decode": "sparse"},
    "xattention": {"threshold": 1.0, "block_size": BLOCK, "stride": 8},
    "proxyattn": {"gamma": 1.0, "block_size": BLOCK},
    "s2o": {"tau": 0.0, "segment_len": BLOCK, "block_m": 16, "block_n": 16},
}


def _model(seed=0):
    """Layer 0 slides a 48-token window (it runs dense, with its sinks); layer 1 is full attention."""
    torch.manual_seed(seed)
    dims = {key: TINY_CAUSAL_LM[key] for key in ("vocab_size", "hidden_size", "num_attention_heads", "head_dim")}
    config = transformers.GptOssConfig(
        **dims,
        num_key_value_heads=2,
        intermediate_size=128,
        num_hidden_layers=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"],
        pad_token_id=0,
        max_position_embeddings=4096,
    )
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(3.0, 1.5)
    return model


def _left_padded_batch():
    ids = torch.randint(1, 1000, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :37] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _greedy(model, ids, mask, **options):
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0, **options
    )
    return out[:, ids.shape[1] :]


@pytest.mark.parametrize("method", sorted(FULL_BUDGET))
def test_full_budget_matches_the_models_eager_attention_with_sinks(reference_engine, method):
    model, (ids, mask) = _model(), _left_padded_batch()
    with torch.no_grad():
        expected_logits, expected_tokens = model(ids, attention_mask=mask).logits, _greedy(model, ids, mask)
        with hf.patched(model, method, **FULL_BUDGET[method]) as handle:
            logits, tokens = model(ids, attention_mask=mask).logits, _greedy(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(logits[real], expected_logits[real], atol=2e-4, rtol=1e-4)
    assert torch.equal(tokens, expected_tokens)
    calls = handle.stats.calls
    assert calls[(0, "prefill", "dense")] == 2  # the sliding layer
    assert calls[(1, "prefill", method)] == 2


@pytest.mark.parametrize("method", ["dense", "moba"])
def test_static_cache_decode_with_sinks(reference_engine, method):
    """A StaticCache (keys padded to its length, so the padding mask is always there) decodes as eager does."""
    model, (ids, mask) = _model(), _left_padded_batch()
    with torch.no_grad():
        expected = _greedy(model, ids, mask, cache_implementation="static")
        with hf.patched(model, method, **FULL_BUDGET[method]):
            assert torch.equal(_greedy(model, ids, mask, cache_implementation="static"), expected)


def test_sinks_matter():
    """The same model with its sinks at -inf (no sink) gives other logits: the test above can fail."""
    model, (ids, mask) = _model(), _left_padded_batch()
    with torch.no_grad(), hf.patched(model, "dense"):
        with_sinks = model(ids, attention_mask=mask).logits
        for layer in model.model.layers:
            layer.self_attn.sinks.fill_(float("-inf"))
        without = model(ids, attention_mask=mask).logits
    assert (with_sinks - without)[mask.bool()].abs().max() > 0.05


@pytest.mark.parametrize("method", ["dense", "moba"])
def test_training_gradients_match_eager(reference_engine, method):
    """loss.backward() through the patched attention gives the eager model's gradients, the sinks' included."""
    model, (ids, mask) = _model(), _left_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)

    def gradients():
        model.zero_grad()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if "self_attn" in name}

    expected = gradients()
    with hf.patched(model, method, **FULL_BUDGET[method]):
        got = gradients()
    assert any(name.endswith("sinks") for name in got)
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], atol=1e-5, rtol=1e-3, msg=name)


def test_softcapping_with_sinks_is_refused():
    model = _model()
    attention = model.model.layers[1].self_attn
    query = key = value = torch.zeros(1, 4, 8, 64)
    with hf.patched(model, "dense"), pytest.raises(NotImplementedError, match="sinks .* softcapping"):
        hf.sparse_attention_forward(
            attention, query, key[:, :2], value[:, :2], None, s_aux=attention.sinks, softcap=30.0
        )


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["dense", "moba"])
def test_gpu_bf16_follows_flash_rule(method):
    model = _model().cuda()
    ids = torch.randint(1, 1000, (1, 2048), generator=torch.Generator().manual_seed(2)).cuda()
    options = {"block_size": 128, "topk": 4} if method == "moba" else {}
    assert_patched_bf16_follows_flash_rule(model, ids, method, **options)
