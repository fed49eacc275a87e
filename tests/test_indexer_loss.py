"""The DSA indexer's KL training loss against a written-out fp64 formula (spec hisa_dsa.md section 1)."""

import pytest
import torch

from sparse_attn import indexer_kl_loss
from sparse_attn.methods import indexer_loss


def _inputs(rng, batch=2, q_heads=4, kv_heads=2, seq_q=12, seq_kv=16, dim=8):
    q = torch.randn(batch, q_heads, seq_q, dim, generator=rng, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, seq_kv, dim, generator=rng, dtype=torch.float64)
    scores = torch.randn(batch, seq_q, seq_kv, generator=rng, dtype=torch.float64)
    return q, k, scores


def _oracle(q, k, scores, visible, scale):
    """Per row: p = mean over heads of softmax over the visible keys; KL(p || softmax(scores over them))."""
    group = q.shape[1] // k.shape[1]
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(group, dim=1)) * scale
    p = logits.masked_fill(~visible[:, None], float("-inf")).softmax(-1).mean(1)
    log_model = scores.masked_fill(~visible, float("-inf")).log_softmax(-1)
    terms = torch.where(visible, p * (p.clamp(min=1e-300).log() - log_model.clamp(min=-1e300)), 0.0)
    return terms.sum(-1), p


def test_dense_warm_up_matches_the_formula_and_its_gradient(rng):
    q, k, scores = _inputs(rng)
    scores.requires_grad_()
    visible = torch.ones(12, 16, dtype=torch.bool).tril(diagonal=4).expand(2, -1, -1)  # bottom-right causal
    expected, p = _oracle(q, k, scores, visible, 0.3)
    got = indexer_kl_loss(scores, q, k, softmax_scale=0.3, reduction="none")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert bool((got >= -1e-12).all())
    # d KL / d scores = softmax(scores) - p over the visible keys: the indexer is pulled toward p.
    (grad,) = torch.autograd.grad(indexer_kl_loss(scores, q, k, softmax_scale=0.3, reduction="sum"), scores)
    model = scores.detach().masked_fill(~visible, float("-inf")).softmax(-1)
    torch.testing.assert_close(grad, model - p, rtol=1e-10, atol=1e-12)
    mean = indexer_kl_loss(scores, q, k, softmax_scale=0.3)
    torch.testing.assert_close(mean, expected.mean())
    everything = indexer_kl_loss(scores, q, k, softmax_scale=0.3, causal=False, reduction="none")
    torch.testing.assert_close(everything, _oracle(q, k, scores, torch.ones_like(visible), 0.3)[0])


def test_the_loss_vanishes_when_the_indexer_matches_the_attention(rng):
    q, k, _ = _inputs(rng)
    visible = torch.ones(12, 16, dtype=torch.bool).tril(diagonal=4).expand(2, -1, -1)
    _, p = _oracle(q, k, torch.zeros(2, 12, 16, dtype=torch.float64), visible, 8**-0.5)
    matching = p.clamp(min=1e-300).log()
    assert indexer_kl_loss(matching, q, k).abs().item() < 1e-12


def test_sparse_stage_restricts_both_distributions_to_the_selected_keys(rng, monkeypatch):
    q, k, scores = _inputs(rng)
    # Every row selects a random subset of its visible keys, listed in random order, -1 padded; row 3 of
    # batch 1 selects nothing.
    width = 6
    indices = torch.full((2, 12, width), -1, dtype=torch.int64)
    for b in range(2):
        for t in range(12):
            visible = torch.randperm(t + 5, generator=rng)[: int(torch.randint(1, width + 1, (1,), generator=rng))]
            indices[b, t, : len(visible)] = visible
    indices[1, 3] = -1
    selected = torch.zeros(2, 12, 16, dtype=torch.bool)
    for b in range(2):
        for t in range(12):
            selected[b, t, indices[b, t][indices[b, t] >= 0]] = True
    at_indices = scores.gather(-1, indices.clamp(min=0)).requires_grad_()
    got = indexer_kl_loss(at_indices, q, k, indices=indices, reduction="none")
    expected, _ = _oracle(q, k, scores, selected, 8**-0.5)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert got[1, 3].item() == 0.0
    # The mean counts the 23 rows that select something; the empty row's gradient is zero, never NaN.
    mean = indexer_kl_loss(at_indices, q, k, indices=indices.to(torch.int32))
    torch.testing.assert_close(mean, expected.sum() / 23)
    (grad,) = torch.autograd.grad(mean, at_indices)
    assert torch.isfinite(grad).all() and not grad[1, 3].any()
    # Chunked over query rows, the same.
    monkeypatch.setattr(indexer_loss, "_CHUNK_ELEMENTS", 4 * width)
    torch.testing.assert_close(indexer_kl_loss(at_indices, q, k, indices=indices, reduction="none"), got)


def test_only_the_indexer_learns(rng):
    q, k, scores = _inputs(rng)
    q.requires_grad_()
    k.requires_grad_()
    scores = scores.float().requires_grad_()
    loss = indexer_kl_loss(scores, q.float(), k.float())
    loss.backward()
    assert loss.dtype == torch.float32 and scores.grad is not None
    assert q.grad is None and k.grad is None


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda s, q, k: (s[:, :, :5], q, k, {}), ValueError, "index_scores must be"),
        (lambda s, q, k: (s.long(), q, k, {}), TypeError, "index_scores"),
        (lambda s, q, k: (s, q, k, {"reduction": "max"}), ValueError, "reduction"),
        (lambda s, q, k: (s, q, k, {"indices": torch.zeros(2, 12, 3, dtype=torch.int64)}), ValueError, "index_scores"),
        (
            lambda s, q, k: (s[..., :3], q, k, {"indices": torch.zeros(2, 11, 3, dtype=torch.int64)}),
            ValueError,
            "indices",
        ),
        (lambda s, q, k: (s[..., :3], q, k, {"indices": torch.zeros(2, 12, 3)}), TypeError, "indices"),
        (lambda s, q, k: (s, q[:, :3], k, {}), ValueError, "heads"),
    ],
)
def test_bad_inputs_raise(rng, mutate, error, match):
    scores, q, k, options = mutate(*(lambda q, k, s: (s, q, k))(*_inputs(rng)))
    with pytest.raises(error, match=match):
        indexer_kl_loss(scores, q, k, **options)


def test_no_query_rows_give_a_differentiable_zero(rng):
    q, k, scores = _inputs(rng, seq_q=0)
    scores.requires_grad_()
    for reduction in ("mean", "sum", "none"):
        loss = indexer_kl_loss(scores, q, k, reduction=reduction)
        assert loss.numel() == 0 or float(loss) == 0.0
        loss.sum().backward()
        assert scores.grad.shape == scores.shape
