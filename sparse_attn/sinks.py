"""Learned attention sinks: one logit per query head that joins every row's softmax with no value
(GPT-OSS's `sinks`, passed by transformers as `s_aux`; FlashMLA's `attn_sink`), so a row may give
part of its mass to nothing.

Softmax over a row's attended logits plus the sink s scales the sink-free output by
exp(lse) / (exp(lse) + exp(s)) = sigmoid(lse - s), with lse the row's log-sum-exp over its attended
logits. So every path that returns its LSE takes a sink for one elementwise op after the kernel, and
autograd carries the gradients: to q, k and v through the LSE (every backward here takes an LSE
gradient) and to the sink directly. A row with no attended key keeps output 0.
"""

from __future__ import annotations

import torch

from .selection import _check_tensor

__all__ = ["attention_result", "check_attn_sink", "sdpa_with_sink", "with_attn_sink"]

_SINK_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_attn_sink(attn_sink, num_q_heads: int, device) -> None:
    """None, or a float tensor (num_q_heads,) on `device`."""
    if attn_sink is None:
        return
    _check_tensor(attn_sink, "attn_sink", dim=1, dtypes=_SINK_DTYPES)
    if attn_sink.shape[0] != num_q_heads or attn_sink.device != torch.device(device):
        raise ValueError(
            f"attn_sink must be one logit per query head, ({num_q_heads},) on {device}, got "
            f"{tuple(attn_sink.shape)} on {attn_sink.device}"
        )


def with_attn_sink(out: torch.Tensor, lse: torch.Tensor, attn_sink) -> torch.Tensor:
    """`out` (lse's shape plus a last axis; heads on axis 1 of both) as if `attn_sink` had joined each
    row's softmax: scaled by sigmoid(lse - sink of the row's head), in out's dtype. No sink: out unchanged."""
    if attn_sink is None:
        return out
    shape = [1] * lse.dim()
    shape[1] = -1
    lse = lse if lse.dtype == torch.float64 else lse.float()  # the PyTorch paths' fp64 LSE stays fp64
    # A row without a key keeps output 0 whatever the sink (-inf - -inf would be NaN).
    kept = torch.sigmoid(torch.where(lse == float("-inf"), lse, lse - attn_sink.to(lse.dtype).view(shape)))
    return (out * kept[..., None]).to(out.dtype)


def attention_result(out: torch.Tensor, lse: torch.Tensor, attn_sink, return_lse: bool, *, packed: bool = False):
    """A public function's return: `out` with the sink applied, and the LSE as fp32 when asked.
    `packed`: out is (total, Hq, D) against lse (Hq, total)."""
    out = with_attn_sink(out, lse.t() if packed else lse, attn_sink)
    return (out, lse.float()) if return_lse else out


# SDPA's flash and cuDNN kernels take head dims that are multiples of 8.
_HEAD_DIM_STEP = 8


def sdpa_with_sink(query, key, value, attn_sink, *, attn_mask=None, is_causal=False, scale=None):
    """`F.scaled_dot_product_attention` (native GQA) with a sink: one more key per row whose logit is its
    head's sink and whose value is 0.

    SDPA has no sink, so it is built in. A sink key is prepended with a 1 in one extra channel, where
    query head h carries sink_h / scale and the real keys carry 0: the sink key's logit is sink_h in
    every row and the real logits are unchanged. Channels are zero-padded to a multiple of 8, so SDPA's
    fast kernels still take them. With `is_causal` (top-left, Sq == Skv) a zero query row is prepended
    as well, so that row i still sees keys 0..i, and the sink. `attn_mask` (bool, or additive float)
    gets a column that allows the sink. The price is one padded copy of q, k and v.
    """
    batch, num_q_heads, seq_q, dim = query.shape
    num_kv_heads, dim_v = key.shape[1], value.shape[-1]
    scale = dim**-0.5 if scale is None else scale
    width = -(-(max(dim, dim_v) + 1) // _HEAD_DIM_STEP) * _HEAD_DIM_STEP
    # Clamped so that it stays finite in q's dtype (0 * inf would be NaN in the real keys' logits): a sink
    # of -inf then has a logit of -finfo.max / 16 * scale, whose exp is 0 beside any real logit.
    bound = torch.finfo(query.dtype).max / 16
    sink_channel = (attn_sink.double() / scale).clamp(-bound, bound).to(query.dtype)
    sink_channel = sink_channel[None, :, None, None].expand(batch, -1, seq_q, 1)
    q = torch.cat([query, sink_channel], dim=-1)
    q = torch.nn.functional.pad(q, (0, width - dim - 1, int(is_causal), 0))
    sink_key = key.new_zeros(batch, num_kv_heads, 1, width)
    sink_key[..., dim] = 1
    k = torch.cat([sink_key, torch.nn.functional.pad(key, (0, width - dim))], dim=2)
    v = torch.nn.functional.pad(value, (0, width - dim_v, 1, 0))  # the sink's value row is 0
    if attn_mask is not None:
        opening = torch.ones if attn_mask.dtype == torch.bool else torch.zeros
        attn_mask = torch.cat(
            [opening((*attn_mask.shape[:-1], 1), dtype=attn_mask.dtype, device=attn_mask.device), attn_mask], dim=-1
        )
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=num_q_heads != num_kv_heads
    )
    return out[:, :, int(is_causal) :, :dim_v]
