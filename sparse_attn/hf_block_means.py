"""Block means that follow a transformers KV cache from one decode step to the next.

Routed MoBA decode needs the mean of every complete key block, and HISA's decode the means of the
indexer key blocks. Pooling them from the whole cache at each step reads every cached key (for MoBA
about half of what dense decode reads; for HISA all that the flat DSA indexer reads), so the patcher
keeps one state (`MoBABlockMeans`, `HISABlockMeans`) per (cache, layer) and pools each block once.

Reusing a state is exact only if this step's keys are the keys it was last updated from with the new
tokens appended. That is checked before the cache update: the cache layer must be one whose update only
concatenates (transformers' `DynamicLayer` for keys, `DynamicIndexedLayer` for indexer keys, or a 4.x
`DynamicCache`), and the keys it holds must be the very tensor the state last saw, with an unchanged
version counter. Beam reordering, cropping, batch selection, offloading and a new cache all replace that
tensor, so they pool afresh: never a stale mean.

MoBA's attention function is not handed the cache object, so a forward pre-hook on each routed
attention module reads it from the call's keyword arguments (`track`); HISA's indexer module is.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch

from .methods.moba import MoBABlockMeans

# The names transformers passes the cache by: `cache` from 5.24, `past_key_values` in 4.56 to 5.23 (and
# deprecated after), `past_key_value` before.
_CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")
# Which cache layer classes only ever append to each kind of keys (exact types: not their sliding,
# quantized or static relatives).
_APPENDING_LAYERS = {"keys": "DynamicLayer", "indexer_keys": "DynamicIndexedLayer"}


class SequenceMeans(dict):
    """One layer's block-mean states: one for the whole batch (`of(None)`) or, for a left-padded batch run
    row by row, one per (batch row, first real key) (`of((row, start))`), each made by `make()`."""

    def __init__(self, make, block_size: int):
        super().__init__()
        self.make, self.block_size = make, block_size

    def of(self, sequence):
        if sequence not in self:
            self[sequence] = self.make()
        return self[sequence]


@dataclass
class _Followed:
    means: SequenceMeans
    keys: weakref.ref | None = None  # the keys tensor the means were last updated from
    version: int | None = None
    length: int = 0


# cache object -> {(kind, layer_idx): _Followed}; entries go when the cache is garbage-collected.
_tracked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _version(tensor: torch.Tensor) -> int | None:
    # Inference-mode tensors carry no version counter; their identity stands for them.
    return None if tensor.is_inference() else tensor._version


def _appending_keys(cache, layer_idx: int, kind: str = "keys") -> torch.Tensor | None:
    """The `kind` keys ('keys' or 'indexer_keys') `cache` holds for `layer_idx` when its updates only append
    to them, else None."""
    from transformers import cache_utils

    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers >= 4.54: one object per layer
        appending = getattr(cache_utils, _APPENDING_LAYERS[kind], None)
        if layer_idx < len(layers) and type(layers[layer_idx]) is appending:
            return getattr(layers[layer_idx], kind)
        return None
    if kind == "keys" and type(cache) is cache_utils.DynamicCache and layer_idx < len(cache.key_cache):
        return cache.key_cache[layer_idx]
    return None


def keys_unchanged(cache, layer_idx: int, kind: str) -> bool:
    """Before the cache update: whether the layer's `kind` keys are those its followed means last saw."""
    try:
        entry = _tracked.get(cache, {}).get((kind, layer_idx))
    except TypeError:  # a cache that cannot be weakly referenced is never followed
        return False
    stored = _appending_keys(cache, layer_idx, kind)
    return (
        entry is not None
        and stored is not None
        and entry.keys is not None
        and entry.keys() is stored
        and entry.version == _version(stored)
    )


def followed_means(cache, layer_idx: int, kind: str, keys, new_tokens: int, unchanged: bool, make, block_size: int):
    """After the cache update, given `keys` (the whole cache as it returned them) and `unchanged` (from
    `keys_unchanged` before the update): the layer's `SequenceMeans` when the keys are its last keys plus
    `new_tokens` and its block size is `block_size`, else a fresh one of `make()` states, which later steps
    continue. The caller updates the states with its keys (each pools what it has not seen)."""
    try:
        layers = _tracked.setdefault(cache, {})
    except TypeError:
        return SequenceMeans(make, block_size)
    entry = layers.get((kind, layer_idx))
    keep = unchanged and entry is not None and entry.length + new_tokens == keys.shape[-2]
    if not (keep and entry.means.block_size == block_size):
        entry = layers[(kind, layer_idx)] = _Followed(SequenceMeans(make, block_size))
    entry.keys, entry.version, entry.length = weakref.ref(keys), _version(keys), keys.shape[-2]
    return entry.means


# ---------------------------------------------------------------------------------- MoBA (hooks)
# id(attention module) -> (cache, layer_idx, keys_unchanged), written by the pre-hook and read by the
# attention function in the same call.
_calls = threading.local()


def _before_attention(module, args, kwargs) -> None:
    if torch.compiler.is_compiling():  # traced code does not follow caches: it pools every step
        return
    calls = _calls.__dict__
    calls.pop(id(module), None)
    cache = next((kwargs[name] for name in _CACHE_ARGUMENTS if kwargs.get(name) is not None), None)
    layer_idx = getattr(module, "layer_idx", None)
    if cache is not None and isinstance(layer_idx, int):
        calls[id(module)] = (cache, layer_idx, keys_unchanged(cache, layer_idx, "keys"))


def _after_attention(module, args, kwargs, output) -> None:
    if not torch.compiler.is_compiling():
        _calls.__dict__.pop(id(module), None)


def moba_block_means(module, key: torch.Tensor, new_tokens: int, block_size: int) -> SequenceMeans | None:
    """The `SequenceMeans` to route this decode step of `module` with (`key`: the whole cache as the cache
    returned it), or None when the pre-hook did not see the call (unpatched, compiled, no cache)."""
    call = None if torch.compiler.is_compiling() else _calls.__dict__.get(id(module))
    if call is None:
        return None
    cache, layer_idx, unchanged = call
    return followed_means(
        cache, layer_idx, "keys", key, new_tokens, unchanged, lambda: MoBABlockMeans(block_size), block_size
    )


def track(module) -> list:
    """Registers the hooks on one attention module; returns their handles (`.remove()` undoes them)."""
    return [
        module.register_forward_pre_hook(_before_attention, with_kwargs=True),
        module.register_forward_hook(_after_attention, with_kwargs=True, always_call=True),
    ]


def track_once(module) -> None:
    """`track` for a module that no patch handle owns (a model loaded under `configure`): the hooks stay, and
    cost a lookup per call once the module no longer routes decode."""
    if not torch.compiler.is_compiling() and not module.__dict__.get("_sparse_attn_follows_cache"):
        track(module)
        module.__dict__["_sparse_attn_follows_cache"] = True
