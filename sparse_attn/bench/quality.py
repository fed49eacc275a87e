"""Accuracy of a benchmark row, measured against fp64 oracles on sampled query rows.

Two questions, two bounds:

* kernel error: our output against the fp64 oracle of the *same* selection (layout or routes).
  The kernel must be exact on its selection, so it is held to FlashAttention's rule: at most twice
  the error of a same-precision PyTorch implementation (the reference computed in the input
  dtype) against fp64, plus one unit roundoff of the dtype for when that implementation happens to
  be exact.
* error against dense: our output against fp64 dense causal attention, on the structured inputs
  of `sparse_attn.testing`. A selection that keeps every causal pair is lossless and is held to the
  same FlashAttention rule; a lossy one to a tolerance each suite documents in its `config`.

The oracles run on `rows` evenly spaced query rows (the last always included) and one (batch, KV
head) at a time, so they stay cheap at 128K keys; errors are relative Frobenius norms over those
rows. Mass recall is the share of each row's true softmax mass inside the selection,
exp(LSE_selected - LSE_dense), averaged over sampled rows and heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..reference import masked_attention


def sample_rows(seq_len_q: int, count: int, device) -> torch.Tensor:
    """At most `count` query rows evenly spaced over [0, seq_len_q), the last row (the most keys) included."""
    count = max(1, min(count, seq_len_q))
    return torch.linspace(0, seq_len_q - 1, count, device=device).round().long().unique()


def causal_rows(rows: torch.Tensor, seq_len_q: int, seq_len_kv: int) -> torch.Tensor:
    """Bool [R, Skv]: the keys each sampled row sees causally (bottom-right aligned), without the [Sq, Skv] mask."""
    positions = rows + (seq_len_kv - seq_len_q)
    return torch.arange(seq_len_kv, device=rows.device)[None, :] <= positions[:, None]


def layout_rows(layout, rows: torch.Tensor, num_q_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Bool [B, Hq, R, Skv]: the keys a block layout gives each sampled row, causal cut included."""
    blocks = layout.to_dense_mask()[:, layout.head_map(num_q_heads, num_kv_heads)]
    per_row = blocks[:, :, rows // layout.q_block_size]  # [B, Hq, R, N]
    keys = per_row.repeat_interleave(layout.kv_block_size, dim=-1)[..., : layout.seq_len_kv]
    return keys & causal_rows(rows, layout.seq_len_q, layout.seq_len_kv)


def routed_rows(routes: torch.Tensor, rows: torch.Tensor, block_size: int, seq_len_kv: int) -> torch.Tensor:
    """Bool [B, Hq, R, Skv]: the keys of each sampled row's routed blocks (int [B, Hq, Sq, K], -1 padded)."""
    num_blocks = -(-seq_len_kv // block_size)
    picked = routes[:, :, rows].long()
    slots = torch.where(picked < 0, num_blocks, picked)
    chosen = torch.zeros(*picked.shape[:3], num_blocks + 1, dtype=torch.bool, device=routes.device)
    chosen.scatter_(-1, slots, True)
    keys = chosen[..., :num_blocks].repeat_interleave(block_size, dim=-1)[..., :seq_len_kv]
    return keys & causal_rows(rows, routes.shape[2], seq_len_kv)


def oracle(q, k, v, rows, allowed, compute_dtype=torch.float64):
    """(out [B, Hq, R, D], lse [B, Hq, R]) of the sampled rows over the keys `allowed` permits.

    `allowed` broadcasts to [B, Hq, R, Skv]. One (batch, KV head) at a time keeps the upcast K/V
    copies at one head's size."""
    batch, num_q_heads = q.shape[:2]
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    allowed = allowed.expand(batch, num_q_heads, len(rows), k.shape[2])
    outs, lses = [], []
    for b in range(batch):
        for h in range(num_kv_heads):
            heads = slice(h * group, (h + 1) * group)
            out, lse = masked_attention(
                q[b : b + 1, heads][:, :, rows],
                k[b : b + 1, h : h + 1],
                v[b : b + 1, h : h + 1],
                allowed[b : b + 1, heads],
                compute_dtype=compute_dtype,
            )
            outs.append(out)
            lses.append(lse)
    out = torch.cat(outs, dim=1).view(batch, num_q_heads, len(rows), q.shape[-1])
    return out, torch.cat(lses, dim=1).view(batch, num_q_heads, len(rows))


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error in fp64; NaN stays NaN, so it can never pass a bound."""
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def mass_recall(lse_selected: torch.Tensor, lse_dense: torch.Tensor) -> float:
    """Mean share of each row's softmax mass inside the selection (rows with no key count as 1)."""
    share = torch.exp(lse_selected.double() - lse_dense.double()).nan_to_num(nan=1.0)
    return share.mean().item()


def flash_rule_bound(same_precision_error: float, dtype: torch.dtype) -> float:
    """FlashAttention's rule on relative error: 2x the same-precision implementation's, plus one unit roundoff."""
    return 2 * same_precision_error + torch.finfo(dtype).eps / 2


def within(error: float | None, bound: float | None) -> bool:
    """Written so that a NaN error or a missing value fails."""
    return error is not None and bound is not None and bool(error <= bound)


@dataclass
class Reference:
    """The fp64 oracle of the sampled rows over one selection (or dense causal), with the
    FlashAttention-rule bound for an implementation in the inputs' dtype."""

    out: torch.Tensor
    lse: torch.Tensor
    bound: float


def reference(q, k, v, rows, allowed) -> Reference:
    out, lse = oracle(q, k, v, rows, allowed)
    same, _ = oracle(q, k, v, rows, allowed, compute_dtype=q.dtype)
    return Reference(out, lse, flash_rule_bound(rel_error(same, out), q.dtype))


def dense_reference(q, k, v, rows) -> Reference:
    return reference(q, k, v, rows, causal_rows(rows, q.shape[2], k.shape[2]))


def kernel_fields(ours_rows, selection: Reference) -> dict:
    """Our sampled rows against the oracle of our own selection: the kernel must be exact on it."""
    return {"kernel_rel_error": rel_error(ours_rows, selection.out), "kernel_error_bound": selection.bound}


def dense_fields(ours_rows, dense: Reference, selection: Reference, *, lossless: bool, tolerance: float) -> dict:
    """Our sampled rows against dense attention (FlashAttention's rule when the selection is lossless,
    else `tolerance`) and the selection's mass recall."""
    return {
        "output_rel_error": rel_error(ours_rows, dense.out),
        "error_bound": dense.bound if lossless else tolerance,
        "error_rule": "flash" if lossless else "tolerance",
        "error_reference": "dense",
        "mass_recall": mass_recall(selection.lse, dense.lse),
    }


def selection_fields(ours_rows, selection: Reference) -> dict:
    """For a given (random) layout: our sampled rows against its oracle are the output error, FlashAttention's rule."""
    return {
        "output_rel_error": rel_error(ours_rows, selection.out),
        "error_bound": selection.bound,
        "error_rule": "flash",
        "error_reference": "selection",
    }


def finish(row: dict) -> dict:
    """error_ok: every check the row carries passed; error_flags names the ones that did not."""
    flags = []
    if not within(row.get("output_rel_error"), row.get("error_bound")):
        flags.append(f"vs {row.get('error_reference')}")
    if "kernel_rel_error" in row and not within(row["kernel_rel_error"], row.get("kernel_error_bound")):
        flags.append("kernel")
    row["error_ok"] = not flags
    row["error_flags"] = flags
    return row
