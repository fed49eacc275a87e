"""Hugging Face integration: tiny offline models (random weights, fp32 on the CPU) through sparse_attn.hf.

Full budget (XAttention tau = 1, MoBA topk covering every block, the dense method) must reproduce
SDPA; padding must not change a sequence's result; unpatch must restore the exact previous outputs.
"""

import os
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="the HF integration needs transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sparse_attn import hf  # noqa: E402
from sparse_attn.methods.moba import moba_attn  # noqa: E402
from sparse_attn.methods.xattention import save_thresholds  # noqa: E402
from sparse_attn.reference import masked_attention  # noqa: E402
from sparse_attn.testing import (  # noqa: E402
    TINY_CAUSAL_LM,
    assert_patched_bf16_follows_flash_rule,
    cache_argument,
    max_err,
)

SEQ_LEN, BLOCK = 256, 64
FULL_XATTN = {"threshold": 1.0, "block_size": BLOCK, "stride": 8}
COMMON = {**TINY_CAUSAL_LM, "pad_token_id": 0}


def _config(family: str):
    if family == "llama":
        return transformers.LlamaConfig(**COMMON)
    if family == "qwen2":
        # Layer 1 is a sliding-window layer with a window shorter than the prompt: it must stay dense.
        config = transformers.Qwen2Config(use_sliding_window=True, sliding_window=128, max_window_layers=1, **COMMON)
        if getattr(config, "layer_types", None) is not None:
            assert config.layer_types == ["full_attention", "sliding_attention"]
        return config
    if family == "qwen3":
        return transformers.Qwen3Config(**COMMON)
    if family == "mistral":
        return transformers.MistralConfig(sliding_window=None, **COMMON)
    raise ValueError(family)


def _model(family="llama", seed=0):
    torch.manual_seed(seed)
    config = _config(family)
    config._attn_implementation = "sdpa"
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _ids(batch=1, length=SEQ_LEN, seed=1):
    return torch.randint(1, 1000, (batch, length), generator=torch.Generator().manual_seed(seed))


def _greedy(model, ids, mask=None, new_tokens=6, **generate_options):
    mask = torch.ones_like(ids) if mask is None else mask
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        **generate_options,
    )
    return out[:, ids.shape[1] :]


# ---------------------------------------------------------------------------------- full budget = SDPA
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_full_budget_xattention_matches_sdpa(family):
    model, ids = _model(family), _ids()
    with torch.no_grad():
        expected_logits, expected_tokens = model(ids).logits, _greedy(model, ids)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the one-time sliding-window note
            with hf.patched(model, "xattention", **FULL_XATTN) as handle:
                assert model.config._attn_implementation == "sparse_attn"
                logits, tokens = model(ids).logits, _greedy(model, ids)
    torch.testing.assert_close(logits, expected_logits, atol=2e-4, rtol=1e-4)
    assert torch.equal(tokens, expected_tokens)
    calls = handle.stats.calls
    assert calls[(0, "prefill", "xattention")] == 2 and calls[(0, "decode", "dense")] == 5
    # Qwen2's layer 1 slides a 128-token window over 256 tokens: it ran dense.
    sliding = family == "qwen2"
    assert calls[(1, "prefill", "dense" if sliding else "xattention")] == 2


# topk covers every block of the prompt and of the generated tokens (MoBA routes the decode queries too).
FULL_MOBA = {"block_size": BLOCK, "topk": SEQ_LEN // BLOCK + 1, "decode": "sparse"}
FULL_PROXY = {"gamma": 1.0, "block_size": BLOCK}
FULL_S2O = {"tau": 0.0, "segment_len": BLOCK, "block_m": 16, "block_n": 16}  # tau = 0 never stops


@pytest.mark.parametrize(
    "method, options, decode",
    [
        ("dense", {}, "dense"),
        ("moba", FULL_MOBA, "moba"),
        ("proxyattn", FULL_PROXY, "dense"),
        ("s2o", FULL_S2O, "dense"),
    ],
)
def test_full_budget_dense_moba_proxyattn_and_s2o_match_sdpa(reference_engine, method, options, decode):
    model, ids = _model("llama"), _ids()
    with torch.no_grad():
        expected_logits, expected_tokens = model(ids).logits, _greedy(model, ids)
        with hf.patched(model, method, **options) as handle:
            logits, tokens = model(ids).logits, _greedy(model, ids)
    torch.testing.assert_close(logits, expected_logits, atol=2e-4, rtol=1e-4)
    assert torch.equal(tokens, expected_tokens)
    assert handle.stats.calls[(0, "prefill", method)] == 2
    assert handle.stats.calls[(0, "decode", decode)] == 5  # MoBA routes the decode queries too; the others' are dense


def _static_cache(model, length):
    """A StaticCache of `length` slots (transformers 5 sizes it from the config, 4.53 takes more arguments)."""
    try:
        return transformers.StaticCache(config=model.config, max_cache_len=length)
    except TypeError:
        return transformers.StaticCache(config=model.config, max_batch_size=1, max_cache_len=length)


@pytest.mark.parametrize("method, options", [("dense", {}), ("moba", FULL_MOBA)])
def test_static_cache_without_padding_matches_sdpa(reference_engine, method, options):
    """A StaticCache holds more slots than tokens. With nothing padded, transformers hands the attention
    no mask (generate) or an all-ones one that flash attention's hook drops: the empty slots must not
    be attended."""
    model, ids = _model("llama"), _ids()
    with torch.no_grad():
        expected = model(ids, **cache_argument(model, _static_cache(model, 2 * SEQ_LEN))).logits
        expected_tokens = _greedy(model, ids, cache_implementation="static")
        with hf.patched(model, method, **options):
            for mask in (None, torch.ones_like(ids)):
                cache = _static_cache(model, 2 * SEQ_LEN)
                logits = model(ids, attention_mask=mask, **cache_argument(model, cache)).logits
                torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)
            tokens = _greedy(model, ids, cache_implementation="static")
    assert torch.equal(tokens, expected_tokens)


@pytest.mark.parametrize("method, options", [("dense", {}), ("moba", FULL_MOBA)])
def test_static_cache_with_a_mask_over_every_slot(reference_engine, method, options):
    """A caller's 2D mask as long as the StaticCache (0 on the empty slots, as static-shape loops keep it):
    the queries are the last filled keys, not the last slots."""
    model, ids = _model("llama"), _ids()
    length = 2 * SEQ_LEN

    def run():
        cache, mask = _static_cache(model, length), torch.zeros(1, length, dtype=torch.long)
        mask[:, :SEQ_LEN] = 1
        logits = [model(ids, attention_mask=mask, **cache_argument(model, cache)).logits[:, -1]]
        for step in range(2):
            mask = mask.clone()
            mask[:, SEQ_LEN + step] = 1
            token = logits[-1].argmax(-1, keepdim=True)
            logits.append(model(token, attention_mask=mask, **cache_argument(model, cache)).logits[:, -1])
        return torch.stack(logits, 1)

    with torch.no_grad():
        expected = run()
        with hf.patched(model, method, **options):
            torch.testing.assert_close(run(), expected, atol=2e-4, rtol=1e-4)


def test_packing_in_place_rewrites_and_new_key_bounds_split_afresh(reference_engine):
    """The mask-derived pieces are memoised per pass: position ids written in place between passes (also
    under inference mode, whose tensors have no version counter), or a new cu_seq_lens_k beside the same
    cu_seq_lens_q, split afresh."""
    module = _module(hf.SparseAttnConfig("dense"))
    q, k, v = _qkv(1, 200, 200)

    def alone(bounds):
        return torch.cat(
            [hf.sparse_attention_forward(module, *(t[:, :, a:b] for t in (q, k, v)), None)[0] for a, b in bounds], 1
        )

    for context in (torch.no_grad, torch.inference_mode):
        with context():
            positions = torch.cat([torch.arange(80), torch.arange(120)])[None]
            packed = hf.sparse_attention_forward(module, q, k, v, None, position_ids=positions)[0]
            torch.testing.assert_close(packed, alone([(0, 80), (80, 200)]))
            positions[0, 80:] = torch.arange(80, 200)  # one sequence now, in the same tensor
            positions[0, 150:] = torch.arange(50)
            packed = hf.sparse_attention_forward(module, q, k, v, None, position_ids=positions)[0]
            torch.testing.assert_close(packed, alone([(0, 150), (150, 200)]))
    cu_q = torch.tensor([0, 100, 200], dtype=torch.int32)
    for cu_k in ([0, 100, 200], [0, 60, 200]):
        cu_k = torch.tensor(cu_k, dtype=torch.int32)
        config = hf.SparseAttnConfig("dense")
        out = hf.sparse_attention_forward(
            _module(config), q, k, v, None, cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k, is_causal=False
        )[0]
        pieces = [
            hf.sparse_attention_forward(
                _module(config), q[:, :, a:b], k[:, :, c:d], v[:, :, c:d], None, is_causal=False
            )[0]
            for (a, b), (c, d) in zip([(0, 100), (100, 200)], zip(cu_k[:-1].tolist(), cu_k[1:].tolist()))
        ]
        torch.testing.assert_close(out, torch.cat(pieces, 1))


@pytest.mark.skipif(not hasattr(transformers, "Llama4TextConfig"), reason="transformers without Llama 4")
def test_chunked_attention_layers_are_refused_beyond_one_chunk(reference_engine):
    """Llama 4's chunked layers see only their chunk; the 2D keep-mask cannot say so: refused past one chunk,
    as transformers' flash path does, and equal to SDPA within it."""
    torch.manual_seed(0)
    config = transformers.Llama4TextConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=128, intermediate_size_mlp=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=2, num_experts_per_tok=1,
        attention_chunk_size=32, pad_token_id=0, attn_implementation="sdpa",
    )  # fmt: skip
    model = transformers.Llama4ForCausalLM(config).eval()
    assert "chunked_attention" in config.layer_types
    with torch.no_grad():
        short, long = _ids(length=32), _ids(length=80)
        expected = model(short).logits
        with hf.patched(model, "dense"):
            torch.testing.assert_close(model(short).logits, expected, atol=2e-4, rtol=1e-4)
            with pytest.raises(NotImplementedError, match="chunked-attention layer"):
                model(long)


@pytest.mark.parametrize("method, options", [("dense", {}), ("moba", FULL_MOBA)])
def test_inference_mode(reference_engine, method, options):
    """Tensors made under torch.inference_mode() have no version counter (the sequence-piece cache reads it)."""
    model, ids = _model("llama"), _ids(batch=2)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: the mask path as well as the position-id one
    with torch.inference_mode():
        expected_logits, expected_tokens = model(ids, attention_mask=mask).logits, _greedy(model, ids, mask)
        with hf.patched(model, method, **options):
            logits, tokens = model(ids, attention_mask=mask).logits, _greedy(model, ids, mask)
            single = model(ids[:1]).logits
    torch.testing.assert_close(logits[:, 5:], expected_logits[:, 5:], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(single, expected_logits[:1], atol=2e-4, rtol=1e-4)
    assert torch.equal(tokens, expected_tokens)


def test_configure_for_from_config(reference_engine):
    reference_model, ids = _model("llama"), _ids()
    try:
        config = hf.configure("xattention", **FULL_XATTN)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(_config("llama"), attn_implementation="sparse_attn")
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, reference_model(ids).logits, atol=2e-4, rtol=1e-4)
        assert config.stats.calls[(1, "prefill", "xattention")] == 1
    finally:
        hf.configure(None)


# ---------------------------------------------------------------------------------- padding
def test_left_padded_batch_equals_unpadded_runs(reference_engine):
    model = _model("llama")
    long, short = _ids(length=SEQ_LEN, seed=2)[0], _ids(length=SEQ_LEN - 70, seed=3)[0]
    batch = torch.zeros(2, SEQ_LEN, dtype=torch.long)
    batch[0], batch[1, 70:] = long, short
    mask = (torch.arange(SEQ_LEN) >= torch.tensor([[0], [70]])).long()
    # A budget that drops blocks: the result depends on where each sequence's block grid starts.
    with torch.no_grad(), hf.patched(model, "xattention", threshold=0.3, block_size=BLOCK, track_density=True) as h:
        padded = _greedy(model, batch, mask)
        alone = [_greedy(model, long[None]), _greedy(model, short[None])]
        padded_logits = model(batch, attention_mask=mask).logits
        alone_logits = [model(long[None]).logits[0], model(short[None]).logits[0]]
    assert h.stats.mean_density() < 0.95
    assert torch.equal(padded[0], alone[0][0]) and torch.equal(padded[1], alone[1][0])
    torch.testing.assert_close(padded_logits[0], alone_logits[0], atol=2e-4, rtol=1e-4)
    # The padded row's positions are shifted by 70 (no position_ids given): RoPE is relative, so only rounding moves.
    torch.testing.assert_close(padded_logits[1, 70:], alone_logits[1], atol=5e-4, rtol=1e-4)


def _module(config, layer_idx=0):
    module = types.SimpleNamespace(layer_idx=layer_idx, is_causal=True)
    setattr(module, hf._CONFIG_ATTR, config)
    return module


def _qkv(batch, seq_q, seq_kv, seed=0, heads=(4, 2)):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads[0], seq_q, 64, generator=gen)
    k, v = (torch.randn(batch, heads[1], seq_kv, 64, generator=gen) for _ in range(2))
    return q, k, v


def _oracle(q, k, v, allowed):
    return masked_attention(q, k, v, allowed, compute_dtype=torch.float64)[0].float().transpose(1, 2)


@pytest.mark.parametrize(
    "method, options",
    [
        ("xattention", {"threshold": 0.6, "block_size": BLOCK}),
        ("proxyattn", {"gamma": 0.6, "min_budget_tokens": BLOCK, "stride": 8, "block_size": BLOCK}),
        ("s2o", {"tau": 0.2, "stop_rule": "mean", "segment_len": 64, "block_m": 16, "block_n": 16}),
    ],
)
def test_function_padding_and_packing_equal_separate_runs(reference_engine, method, options):
    config = hf.SparseAttnConfig(method, track_density=True, **options)
    module = _module(config)
    q, k, v = _qkv(1, 300, 300)
    alone = [
        hf.sparse_attention_forward(module, *(t[:, :, s] for t in (q, k, v)), None)[0]
        for s in (slice(0, 120), slice(120, 300))
    ]
    # Left padding: the 120-token sequence padded to 300 next to the 300-token one... as two rows of a batch.
    padded_q, padded_k, padded_v = (torch.cat([t, t]) for t in (q, k, v))
    for t, src in ((padded_q, q), (padded_k, k), (padded_v, v)):
        t[1, :, 180:] = src[0, :, :120]
    mask = torch.ones(2, 300, dtype=torch.bool)
    mask[1, :180] = False
    out, weights = hf.sparse_attention_forward(module, padded_q, padded_k, padded_v, mask)
    full = hf.sparse_attention_forward(module, q, k, v, None)[0]
    assert weights is None and out.shape == (2, 300, 4, 64) and out.is_contiguous()
    torch.testing.assert_close(out[0], full[0])
    torch.testing.assert_close(out[1, 180:], alone[0][0])
    assert not out[1, :180].any()  # padding query rows stay zero
    # Packed: one row holding both sequences, split by restarting position ids.
    positions = torch.cat([torch.arange(120), torch.arange(180)])[None]
    packed = hf.sparse_attention_forward(module, q, k, v, None, position_ids=positions)[0]
    torch.testing.assert_close(packed[0, :120], alone[0][0])
    torch.testing.assert_close(packed[0, 120:], alone[1][0])
    assert config.stats.mean_density() < 0.95  # the budget drops blocks, so the grids' starts matter


# ---------------------------------------------------------------------------------- phases
@pytest.mark.parametrize("seq_q", [1, 4, 100])
def test_function_bottom_right_causal(reference_engine, seq_q):
    q, k, v = _qkv(2, seq_q, 256)
    allowed = torch.arange(256)[None, :] <= torch.arange(seq_q)[:, None] + 256 - seq_q
    for config in (hf.SparseAttnConfig("dense"), hf.SparseAttnConfig("xattention", **FULL_XATTN)):
        out, _ = hf.sparse_attention_forward(_module(config), q, k, v, None, scaling=0.1)
        expected = masked_attention(q, k, v, allowed, softmax_scale=0.1, compute_dtype=torch.float64)[0]
        torch.testing.assert_close(out, expected.float().transpose(1, 2), atol=1e-5, rtol=1e-5)
        path = "dense" if seq_q <= 16 or config.method == "dense" else "xattention"
        assert config.stats.calls[(0, "decode" if seq_q <= 16 else "prefill", path)] == 1


def test_function_decode_with_padding_and_sparse_decode(reference_engine):
    q, k, v = _qkv(2, 1, 200)
    mask = torch.ones(2, 200, dtype=torch.bool)
    mask[1, :50] = False
    dense, _ = hf.sparse_attention_forward(
        _module(hf.SparseAttnConfig("moba", block_size=BLOCK, topk=2)), q, k, v, mask
    )
    torch.testing.assert_close(dense, _oracle(q, k, v, mask[:, None, None, :]), atol=1e-5, rtol=1e-5)
    routed = hf.SparseAttnConfig("moba", block_size=BLOCK, topk=2, decode="sparse")
    out, _ = hf.sparse_attention_forward(_module(routed), q, k, v, mask)
    torch.testing.assert_close(out[0], moba_attn(q[:1], k[:1], v[:1], block_size=BLOCK, topk=2)[0].transpose(0, 1))
    sequence = [q[1:], k[1:, :, 50:], v[1:, :, 50:]]
    torch.testing.assert_close(out[1], moba_attn(*sequence, block_size=BLOCK, topk=2)[0].transpose(0, 1))
    assert routed.stats.calls[(0, "decode", "moba")] == 1


def test_function_sliding_window_and_softcap_run_dense(reference_engine):
    q, k, v = _qkv(1, 256, 256)
    position = torch.arange(256)
    window = (position[None, :] <= position[:, None]) & (position[:, None] - position[None, :] < 100)
    config = hf.SparseAttnConfig("xattention", **FULL_XATTN)
    hf._warned.discard("sliding-window")
    with pytest.warns(UserWarning, match="sliding-window"):
        out, _ = hf.sparse_attention_forward(_module(config), q, k, v, None, sliding_window=100)
    torch.testing.assert_close(out, _oracle(q, k, v, window), atol=1e-5, rtol=1e-5)
    assert config.stats.calls[(0, "prefill", "dense")] == 1

    # Softcapping: the dense method applies it in an eager softmax; sparse methods refuse it.
    out, _ = hf.sparse_attention_forward(_module(hf.SparseAttnConfig("dense")), q, k, v, None, softcap=5.0)
    logits = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double().repeat_interleave(2, 1)) / 8
    logits = (5.0 * torch.tanh(logits / 5.0)).masked_fill(~(position[None, :] <= position[:, None]), float("-inf"))
    expected = (logits.softmax(-1) @ v.double().repeat_interleave(2, 1)).float().transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(NotImplementedError, match="softcap"):
        hf.sparse_attention_forward(_module(config), q, k, v, None, softcap=5.0)


def test_unsupported_features_raise():
    q, k, v = _qkv(1, 64, 64)
    module = _module(hf.SparseAttnConfig("xattention"))
    with pytest.raises(NotImplementedError, match="dropout"):
        hf.sparse_attention_forward(module, q, k, v, None, dropout=0.1)
    with pytest.raises(NotImplementedError, match="output_attentions"):
        hf.sparse_attention_forward(module, q, k, v, None, output_attentions=True)
    with pytest.raises(ValueError, match="attn_sink must be one logit per query head"):  # sinks work (test_hf_sinks)
        hf.sparse_attention_forward(module, q, k, v, None, s_aux=torch.zeros(3))
    with pytest.raises(NotImplementedError, match="position_bias"):
        hf.sparse_attention_forward(module, q, k, v, None, position_bias=torch.zeros(1, 4, 64, 64))
    with pytest.raises(NotImplementedError, match="4D attention mask"):
        hf.sparse_attention_forward(module, q, k, v, torch.ones(1, 1, 64, 64, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="sparse decode"):
        hf.SparseAttnConfig("xattention", decode="sparse")
    with pytest.raises(ValueError, match="unknown sparse_attn method"):
        hf.SparseAttnConfig("nope")
    with pytest.raises(TypeError, match="topk"):
        hf.SparseAttnConfig("xattention", topk=3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        hf.SparseAttnConfig("xattention", threshold=1.5)
    for exclusion in ({"layers": [0]}, {"dense_layers": [1]}):
        with pytest.raises(ValueError, match="layer_config names layer 1"):
            hf.SparseAttnConfig("moba", block_size=64, topk=3, layer_config={1: {"topk": 2}}, **exclusion)


@pytest.mark.parametrize(
    "method, options, error, match",
    [
        ("moba", {"topk": 0}, ValueError, "topk"),
        ("moba", {"block_size": 64.0}, TypeError, "block_size"),
        ("xattention", {"stride": 3}, ValueError, "stride=3 must divide block_size=128"),
        ("xattention", {"block_size": 0}, ValueError, "block_size"),
        ("xattention", {"chunk_size": 100}, ValueError, "chunk_size=100 must be a multiple"),
        ("xattention", {"threshold": True}, TypeError, "threshold must be a float"),
        ("xattention", {"threshold": torch.full((1, 2, 4), 0.9)}, ValueError, "got shape \\(1, 2, 4\\)"),
        ("proxyattn", {"gamma": 0.0}, ValueError, "gamma"),
        ("proxyattn", {"stride": 200}, ValueError, "stride=200"),
        ("proxyattn", {"threshold": 0.9}, TypeError, "no option"),
        ("s2o", {"segment_len": 100}, ValueError, "multiple of block_m"),
        ("s2o", {"tau": -1.0}, ValueError, "tau"),
        ("s2o", {"stop_rule": "min"}, ValueError, "stop_rule"),
    ],
)
def test_bad_options_raise_when_configured(method, options, error, match):
    """Option values are checked when the plan is made, not at the first forward (which may be far away)."""
    required = {"block_size": 64, "topk": 2} if method == "moba" else {}
    with pytest.raises(error, match=match):
        hf.SparseAttnConfig(method, **{**required, **options})
    with pytest.raises(error, match=match):
        hf.SparseAttnConfig(method, **required, layer_config={1: options})
    with pytest.raises(error, match=match):
        hf.patch(_model("llama"), method, **{**required, **options})


def test_moba_options_have_no_defaults():
    """MoBA's block_size and topk are required (spec moba.md, package decision), also in a layer's config."""
    with pytest.raises(TypeError, match=r"needs the option\(s\) \['block_size', 'topk'\]"):
        hf.SparseAttnConfig("moba")
    with pytest.raises(TypeError, match=r"needs the option\(s\) \['topk'\]"):
        hf.patch(_model("llama"), "moba", block_size=64)
    with pytest.raises(TypeError, match=r"\['block_size'\]"):
        hf.SparseAttnConfig("dense", layer_config={0: {"method": "moba", "topk": 2}})
    config = hf.SparseAttnConfig("moba", block_size=64, topk=2, layer_config={1: {"topk": 3}})
    assert config.plan(1).options == {"block_size": 64, "topk": 3}
    # A layer that switches method inherits neither the options nor the decode policy.
    switched = hf.SparseAttnConfig("moba", block_size=64, topk=2, decode="sparse", layer_config={1: {"method": "s2o"}})
    assert (switched.plan(0).decode, switched.plan(1).decode) == ("sparse", "dense")


def test_transformers_version_under_test():
    """scripts/test.sh runs this file again against transformers 4.53.3: make sure that one was imported."""
    expected = os.environ.get("SPARSE_ATTN_EXPECT_TRANSFORMERS")
    assert hf._release(transformers.__version__) >= hf.MIN_TRANSFORMERS
    if expected:
        assert transformers.__version__ == expected


def test_old_transformers_is_rejected(monkeypatch):
    model = _model("llama")
    # Loading model classes may replace transformers' lazy module in sys.modules: patch the current one.
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.52.3")
    with pytest.raises(ImportError, match=r"transformers >= 4\.53, found 4\.52\.3"):
        hf.patch(model, "dense")
    with pytest.raises(ImportError, match="4.53"):
        hf.configure("dense")


@pytest.mark.parametrize(
    "method, options",
    [
        ("moba", {"block_size": BLOCK, "topk": 2}),
        ("xattention", {"threshold": 0.6, "block_size": BLOCK, "stride": 8}),
        ("proxyattn", {"gamma": 0.6, "block_size": BLOCK, "min_budget_tokens": BLOCK}),
        ("s2o", {"tau": 0.3, "segment_len": BLOCK, "block_m": 16, "block_n": 16}),
    ],
)
def test_sparse_budget_equals_the_method_called_directly(reference_engine, monkeypatch, method, options):
    """At a budget that drops keys, each layer's output is the method's own function on that layer's q, k
    and v (post-RoPE, GQA, the model's scale): the patcher adds nothing and loses nothing."""
    import sparse_attn

    direct = {
        "moba": sparse_attn.moba_attn,
        "xattention": sparse_attn.xattention_attn,
        "proxyattn": sparse_attn.proxy_attn,
        "s2o": sparse_attn.s2o_attention,
    }[method]
    seen = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        out, weights = hf.sparse_attention_forward(module, query, key, value, attention_mask, **kwargs)
        seen.append((query, key, value, kwargs.get("scaling"), out))
        return out, weights

    model, ids = _model("llama"), _ids()
    with torch.no_grad(), hf.patched(model, method, **options):
        # After patching, which registers the function: the model looks it up on every call.
        monkeypatch.setitem(transformers.AttentionInterface._global_mapping, hf.ATTENTION_NAME, recording)
        model(ids)
    assert len(seen) == 2
    for query, key, value, scaling, out in seen:
        expected = direct(query, key, value, softmax_scale=scaling, **options).transpose(1, 2)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
        dense = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
        assert max_err(out, dense.transpose(1, 2)) > 1e-4  # the budget dropped keys


# ---------------------------------------------------------------------------------- patch lifecycle
def test_unpatch_restores_bit_identical_outputs(reference_engine):
    model, ids = _model("llama"), _ids()
    with torch.no_grad():
        before = model(ids).logits
        handle = hf.patch(model, "xattention", threshold=0.5, block_size=BLOCK)
        sparse = model(ids).logits
        assert not torch.equal(sparse, before)
        assert hf.unpatch(model) and not handle.active and not hf.unpatch(model)
        assert model.config._attn_implementation == "sdpa"
        assert not any(hf._CONFIG_ATTR in m.__dict__ for m in model.modules())
        assert torch.equal(model(ids).logits, before)
        with hf.patched(model, "moba", block_size=BLOCK, topk=1):
            hf.patch(model, "dense")  # re-patching replaces the plan; the original name is still restored
        assert torch.equal(model(ids).logits, before)
    registered = transformers.AttentionInterface._global_mapping["sparse_attn"]
    assert registered is hf.sparse_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    assert AttentionMaskInterface._global_mapping["sparse_attn"] is hf.keep_mask


def test_nested_scopes_restore_the_patch_active_on_entry(reference_engine):
    """`patched` and `observing` (calibration's) inside a patch put that same patch back on exit."""
    model, ids = _model("llama"), _ids()
    with torch.no_grad():
        before = model(ids).logits
        outer = hf.patch(model, "xattention", threshold=0.5, block_size=BLOCK, track_density=True)
        sparse = model(ids).logits
        with hf.patched(model, "moba", block_size=BLOCK, topk=1) as inner:
            assert not outer.active and inner.active
            assert not torch.equal(model(ids).logits, sparse)
        assert outer.active and not inner.active and model.__dict__[hf._HANDLE_ATTR] is outer
        calls = sum(outer.stats.calls.values())
        assert torch.equal(model(ids).logits, sparse) and sum(outer.stats.calls.values()) > calls
        seen = []
        with hf.observing(model, lambda layer, q, k: seen.append(layer)):
            assert torch.equal(model(ids).logits, before)
        assert seen == [0, 1] and outer.active and torch.equal(model(ids).logits, sparse)
        with hf.patched(model, "dense"):
            replacement = hf.patch(model, "moba", block_size=BLOCK, topk=1)  # a plain patch inside replaces
        assert replacement.active and not outer.active
        hf.unpatch(model)
        assert torch.equal(model(ids).logits, before)
        assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    "method, options",
    [
        ("xattention", FULL_XATTN),
        ("moba", {"block_size": BLOCK, "topk": 2}),
        ("proxyattn", FULL_PROXY),
        ("s2o", FULL_S2O),
    ],
)
def test_backward_matches_dense_at_full_budget(reference_engine, method, options):
    model, ids = _model("llama"), _ids(length=128)
    model.train()  # attention_dropout is 0: training mode must not trip the dropout check

    def grads():
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    expected_loss, expected = grads()
    with hf.patched(model, method, **options) as handle:
        loss, got = grads()
    assert handle.stats.calls[(1, "prefill", method)] == 1
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)
    for name, grad in got.items():
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad, expected[name], atol=1e-4, rtol=1e-3, msg=name)


def test_from_pretrained_with_configure(reference_engine, tmp_path):
    """The documented alternative: configure(), then from_pretrained(attn_implementation="sparse_attn")."""
    reference_model, ids = _model("qwen3"), _ids()
    reference_model.save_pretrained(tmp_path)
    try:
        config = hf.configure("moba", block_size=BLOCK, topk=SEQ_LEN // BLOCK)
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sparse_attn").eval()
        assert model.config._attn_implementation == "sparse_attn"
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, reference_model(ids).logits, atol=2e-4, rtol=1e-4)
        assert config.stats.calls[(0, "prefill", "moba")] == 1
    finally:
        hf.configure(None)


def test_calibrate_xattention_from_a_model(reference_engine, tmp_path):
    """Thresholds from the model equal thresholds from its q/k captured by an independent attention function."""
    from sparse_attn.methods.xattention import calibrate_xattention

    model, texts = _model("llama"), [_ids(length=256, seed=5), _ids(batch=2, length=192, seed=6)]
    captured = [[], []]

    def capture(module, query, key, value, attention_mask, scaling=None, **kwargs):
        captured[module.layer_idx].append((query.detach(), key.detach()))
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    def use(name):
        if hasattr(model, "set_attn_implementation"):  # transformers 5
            model.set_attn_implementation(name)
        else:
            model.config._attn_implementation = name

    transformers.AttentionInterface.register("capture_for_test", capture)
    use("capture_for_test")
    with torch.no_grad():
        for ids in texts:
            model(ids)
    use("sdpa")
    expected = calibrate_xattention(captured, stride=8, block_size=BLOCK)

    table = calibrate_xattention(model, inputs=texts, stride=8, block_size=BLOCK)
    assert table.shape == (2, 4) and bool(((table >= 0) & (table <= 1)).all())
    torch.testing.assert_close(table, expected, rtol=0, atol=1e-6)
    assert model.config._attn_implementation == "sdpa"  # the observer patch is gone
    # The table drives the patcher per (layer, head) straight from its JSON file.
    save_thresholds(tmp_path / "calibrated.json", table, {"model": "tiny llama"})
    with (
        torch.no_grad(),
        hf.patched(model, "xattention", threshold=str(tmp_path / "calibrated.json"), block_size=BLOCK),
    ):
        assert torch.isfinite(model(texts[0]).logits).all()
    with pytest.raises(ValueError, match="inputs"):
        calibrate_xattention(model, stride=8, block_size=BLOCK)


def test_top_level_api():
    import sparse_attn

    assert sparse_attn.patch is hf.patch and sparse_attn.unpatch is hf.unpatch
    assert sparse_attn.patched is hf.patched and sparse_attn.configure is hf.configure


def test_demo_command_dsa(reference_engine, capsys):
    from sparse_attn.__main__ import main

    if not hasattr(transformers, "DeepseekV32Config"):
        assert main(["demo", "--arch", "deepseek_v32"]) == 1
        return
    assert main(["demo", "--arch", "deepseek_v32", "--prompt-len", "320", "--new-tokens", "2", "--device", "cpu"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.split()}
    # 'dense' is the model's own indexer: SDPA's logits, at the density of 128 keys out of up to 320.
    _, _, density, agree, kl, match = rows["dense"]
    assert (agree, match) == ("1.000", "1.000") and float(kl) < 1e-6
    assert 0.3 < float(density) < 1 and 0.3 < float(rows["hisa"][2]) < 1
    # A method the model cannot take is refused before any work, with patch's reason.
    assert main(["demo", "--arch", "deepseek_v32", "--methods", "dense,moba", "--device", "cpu"]) == 1
    assert main(["demo", "--methods", "hisa", "--device", "cpu"]) == 1
    assert "has none" in capsys.readouterr().out


def test_demo_command(reference_engine, capsys):
    from sparse_attn.__main__ import main

    assert main(["demo", "--prompt-len", "256", "--new-tokens", "3", "--block-size", "64", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {
        line.split()[0]: line.split()
        for line in lines
        if line.split() and line.split()[0] in {"dense", "xattention", "moba", "s2o"}
    }
    assert set(rows) == {"dense", "xattention", "moba", "s2o"}
    # Dense through the patcher is SDPA itself: density 1, full agreement, zero KL, identical tokens.
    assert rows["dense"][2:] == ["1.000", "1.000", "0.00e+00", "1.000"]
    for method in ("xattention", "moba", "s2o"):
        density = float(rows[method][2])
        assert 0 < density <= 1 and 0 <= float(rows[method][3]) <= 1


# ---------------------------------------------------------------------------------- per-layer plans
def test_per_layer_configuration(reference_engine, monkeypatch, tmp_path):
    calls = []

    def spy(q, k, v, **options):
        threshold = options["threshold"]
        if isinstance(threshold, torch.Tensor) and threshold.dim() == 2:
            threshold = threshold[options["layer_idx"]]  # the row xattention_select reads
        calls.append(threshold)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    monkeypatch.setattr(hf, "xattention_attn", spy)
    model, ids = _model("llama"), _ids(length=128)
    with torch.no_grad():
        with hf.patched(model, "xattention", dense_layers=[0], threshold=0.8, block_size=BLOCK) as handle:
            model(ids)
        assert calls == [0.8]  # only layer 1 ran XAttention
        assert handle.stats.calls[(0, "prefill", "dense")] == 1

        calls.clear()
        with hf.patched(model, "xattention", layers=[0], threshold=0.8, layer_config={0: {"threshold": 0.95}}):
            model(ids)
        assert calls == [0.95]

        calls.clear()
        table = torch.tensor([[0.5, 0.6, 0.7, 0.8], [0.9, 0.91, 0.92, 0.93]])
        save_thresholds(tmp_path / "tau.json", table)
        with hf.patched(model, "xattention", threshold=str(tmp_path / "tau.json"), block_size=BLOCK):
            model(ids)
        torch.testing.assert_close(torch.stack(calls), table)

        moba_layer = {"method": "moba", "block_size": 2 * BLOCK, "topk": 1}
        with hf.patched(model, "xattention", layer_config={1: moba_layer}, block_size=BLOCK) as h:
            model(ids)
        assert h.stats.calls[(1, "prefill", "moba")] == 1
        assert h.config.plan(1).options == {"block_size": 2 * BLOCK, "topk": 1}  # not xattention's block_size

    with pytest.raises(ValueError, match="threshold table has 1 layers"):
        hf.patch(model, "xattention", threshold=table[:1])
    # A layer the model lacks once left every layer dense without a word.
    for options in ({"layers": [5]}, {"dense_layers": [7]}, {"layer_config": {9: {"topk": 1}}}):
        with pytest.raises(ValueError, match="does not have"):
            hf.patch(model, "moba", block_size=BLOCK, topk=1, **options)


# ---------------------------------------------------------------------------------- GPU (bf16, Triton engine)
@pytest.mark.gpu
@pytest.mark.parametrize(
    "method, options",
    [("xattention", {"threshold": 1.0, "block_size": 128, "stride": 8}), ("moba", {"block_size": 128, "topk": 5})],
)
def test_gpu_full_budget_bf16_follows_flash_rule(method, options):
    """At full budget the patched bf16 model is no further from the fp32 model than SDPA in bf16 is (2x rule)."""
    stats = assert_patched_bf16_follows_flash_rule(_model("llama").cuda(), _ids(length=512).cuda(), method, **options)
    assert stats.calls[(0, "prefill", method)] == 1


# ---------------------------------------------------------------------------------- torch.compile
COMPILED_METHODS = [
    ("dense", {}),
    ("moba", {"block_size": BLOCK, "topk": 2}),
    ("xattention", {"threshold": 0.9, "block_size": BLOCK, "stride": 8}),
    ("s2o", {"segment_len": BLOCK, "block_m": 16, "block_n": 16}),
]


@pytest.mark.parametrize("method, options", COMPILED_METHODS[:2], ids=[m for m, _ in COMPILED_METHODS[:2]])
def test_torch_compile_of_a_patched_model(reference_engine, method, options):
    """torch.compile(model) traces through the patched attention (graph breaks where selection is data-dependent)
    and computes what the eager model does."""
    model, ids = _model("llama"), _ids()
    with torch.no_grad(), hf.patched(model, method, **options):
        eager = model(ids).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")(ids).logits
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("method, options", COMPILED_METHODS, ids=[m for m, _ in COMPILED_METHODS])
def test_gpu_inductor_compiles_the_patched_model(method, options):
    """On the GPU Inductor sees the Triton kernels through torch.library.triton_op: the compiled bf16 model's logits
    are the eager patched model's, up to bf16 rounding."""
    model, ids = _model("llama").cuda().to(torch.bfloat16), _ids(length=1024).cuda()
    with torch.no_grad(), hf.patched(model, method, **options):
        eager = model(ids).logits.float()
        torch._dynamo.reset()
        compiled = torch.compile(model)(ids).logits.float()
    assert (compiled - eager).abs().max() <= 0.05 * eager.abs().max()


def test_track_density_must_be_a_bool():
    with pytest.raises(TypeError, match="track_density must be a bool"):
        hf.SparseAttnConfig("dense", track_density="yes")
