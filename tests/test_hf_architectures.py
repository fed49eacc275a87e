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
