"""The patcher on more transformers decoder families than test_hf.py's four: tiny random configs, a left-padded
batch, `dense` and full-budget MoBA against the model's own attention (SDPA, or eager where the family has
no SDPA path), prefill logits and greedy decode. Families this transformers lacks are skipped.
"""

import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the HF integration needs transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sparse_attn import hf  # noqa: E402
from sparse_attn.testing import TINY_CAUSAL_LM  # noqa: E402

# Families with their own attention quirks: Gemma's query_pre_attn_scalar and (Gemma 3) sliding layers and
# QK norms, Phi-3's fused projections, OLMo-2's QK norms, Cohere 2's sliding layers, Granite's attention
# multiplier, StarCoder2's biases, EXAONE 4's hybrid layers, SmolLM3's NoPE layers, MoE families.
FAMILIES = [
    "gemma",
    "gemma3_text",
    "phi3",
    "olmo2",
    "cohere2",
    "granite",
    "starcoder2",
    "exaone4",
    "smollm3",
    "mixtral",
    "qwen3_moe",
    "glm4",
    "helium",
    "ernie4_5",
]
# The shared tiny dimensions, plus what MoE, sliding-window and tokenizer-id fields these families read.
TINY = dict(
    TINY_CAUSAL_LM,
    moe_intermediate_size=64,
    num_local_experts=4,
    num_experts=4,
    num_experts_per_tok=2,
    sliding_window=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
SEQ_LEN, BLOCK = 160, 32
FULL_MOBA = {"block_size": BLOCK, "topk": SEQ_LEN // BLOCK + 2, "decode": "sparse"}


def _model(family):
    try:
        config = transformers.AutoConfig.for_model(family, **TINY)
    except ValueError:
        pytest.skip(f"this transformers has no {family}")
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[: config.num_hidden_layers]
    torch.manual_seed(0)
    try:
        return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    except ValueError:  # no SDPA path in this family
        return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_and_full_budget_moba_match_the_models_attention(reference_engine, family):
    model = _model(family)
    ids = torch.randint(3, 256, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :23] = 0
    generate = dict(attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the one-time sliding-window note
        expected_logits = model(ids, attention_mask=mask).logits
        expected_tokens = model.generate(ids, **generate)
        for method, options in (("dense", {}), ("moba", FULL_MOBA)):
            with hf.patched(model, method, **options):
                logits = model(ids, attention_mask=mask).logits
                tokens = model.generate(ids, **generate)
            real = mask.bool()
            torch.testing.assert_close(logits[real], expected_logits[real], atol=2e-4, rtol=1e-4, msg=method)
            assert torch.equal(tokens, expected_tokens), method


def test_encoder_decoder_cross_attention_sees_every_encoder_key():
    """BART: the cross-attention mask is bidirectional (decoder queries, encoder keys). A StaticCache cut
    meant for causal self-attention once cut it to the decoder's length: 1 encoder key per generate step."""
    config = transformers.BartConfig(
        vocab_size=200, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256,
        pad_token_id=1, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, forced_eos_token_id=None,
        init_std=0.3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BartForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()
    generator = torch.Generator().manual_seed(0)
    source, target = (torch.randint(3, 200, (1, n), generator=generator) for n in (40, 8))
    options = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, num_beams=1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want_logits, want = model(input_ids=source, decoder_input_ids=target).logits, model.generate(source, **options)
        with hf.patched(model, "dense"):
            got_logits, got = (
                model(input_ids=source, decoder_input_ids=target).logits,
                model.generate(source, **options),
            )
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(got, want)


def test_bidirectional_prefix_overlay_is_kept_on_the_dense_path():
    """PaliGemma's prefix (token_type_ids) attends bidirectionally: a mask overlay that flash attention's
    keep-mask drops. The dense path gets the whole mask; a sparse method refuses it rather than run causal."""
    if not hasattr(transformers, "PaliGemmaConfig"):
        pytest.skip("this transformers has no PaliGemma")
    text = dict(
        vocab_size=200, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0,
    )  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=16)  # fmt: skip
    config = transformers.PaliGemmaConfig(
        text_config=text, vision_config=vision, image_token_index=199, projection_dim=64, vocab_size=200
    )
    torch.manual_seed(0)
    model = transformers.PaliGemmaForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()
    tokens = torch.randint(3, 190, (1, 40), generator=torch.Generator().manual_seed(1))
    prefix = torch.zeros_like(tokens)
    prefix[:, 24:] = 1  # 24 bidirectional prefix tokens, then a causal suffix
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = model(input_ids=tokens, token_type_ids=prefix).logits
        with hf.patched(model, "dense"):
            got = model(input_ids=tokens, token_type_ids=prefix).logits
            without = model(input_ids=tokens).logits  # no attention_mask at all: 4.53 builds one key too many
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(without, model(input_ids=tokens).logits, rtol=1e-5, atol=1e-5)
        with hf.patched(model, "moba", block_size=16, topk=4):
            with pytest.raises(NotImplementedError, match="custom 4D attention mask"):
                model(input_ids=tokens, token_type_ids=prefix)
