"""MoBA block means that follow a transformers KV cache from one decode step to the next.

Routed MoBA decode needs the mean of every complete key block. Pooling them from the whole cache at
each step reads every cached key, about half of what dense decode reads, so the patcher keeps one
`MoBABlockMeans` per (cache, layer) and pools each block once.

The attention function is not handed the cache object, so a forward pre-hook on each patched
attention module reads it from the call's keyword arguments. Reusing the means is exact only if this
step's keys are the keys we pooled last step with the new tokens appended. The pre-hook checks that
before the cache update: the layer must be one whose `update` only concatenates (transformers'
`DynamicLayer`, or a 4.x `DynamicCache`), and the keys it holds must be the very tensor the last step
saw, with an unchanged version counter. Beam reordering, cropping, batch selection, offloading and a
new cache all replace that tensor, so they pool afresh: never a stale mean.
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


@dataclass
class _LayerMeans:
    means: MoBABlockMeans
    keys: weakref.ref | None = None  # the keys tensor the means were last updated from
    version: int | None = None
    length: int = 0


# cache object -> {layer_idx: _LayerMeans}; entries go when the cache is garbage-collected.
_tracked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# id(attention module) -> (that cache's layer table, layer_idx, whether its stored keys continue the
# last step's), written by the pre-hook and read by the attention function in the same call.
_calls = threading.local()


def _version(tensor: torch.Tensor) -> int | None:
    # Inference-mode tensors carry no version counter; their identity stands for them.
    return None if tensor.is_inference() else tensor._version


def _appending_keys(cache, layer_idx: int) -> torch.Tensor | None:
    """The keys `cache` holds for `layer_idx` when its update only appends to them, else None."""
    from transformers import cache_utils

    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers >= 4.54: one object per layer
        dynamic = getattr(cache_utils, "DynamicLayer", None)
        if layer_idx < len(layers) and type(layers[layer_idx]) is dynamic:  # not its subclasses (sliding, quantized)
            return layers[layer_idx].keys
        return None
    if type(cache) is cache_utils.DynamicCache and layer_idx < len(cache.key_cache):
        return cache.key_cache[layer_idx]
    return None


def _before_attention(module, args, kwargs) -> None:
    """Forward pre-hook: note whether this layer's cached keys are the ones its means were pooled from."""
    if torch.compiler.is_compiling():  # traced code does not follow caches: it pools every step
        return
    calls = _calls.__dict__
    calls.pop(id(module), None)
    cache = next((kwargs[name] for name in _CACHE_ARGUMENTS if kwargs.get(name) is not None), None)
    layer_idx = getattr(module, "layer_idx", None)
    if cache is None or not isinstance(layer_idx, int):
        return
    try:
        layers = _tracked.setdefault(cache, {})
    except TypeError:  # a cache that cannot be weakly referenced: pool every step
        return
    entry, stored = layers.get(layer_idx), _appending_keys(cache, layer_idx)
    continues = (
        entry is not None
        and stored is not None
        and entry.keys is not None
        and entry.keys() is stored
        and entry.version == _version(stored)
    )
    calls[id(module)] = (layers, layer_idx, continues)


def _after_attention(module, args, kwargs, output) -> None:
    if not torch.compiler.is_compiling():
        _calls.__dict__.pop(id(module), None)


def block_means_for(module, key: torch.Tensor, new_tokens: int, block_size: int) -> MoBABlockMeans | None:
    """The `MoBABlockMeans` to route this decode step with: the layer's running means when `key` (this step's
    whole cache, as the cache returned it) is last step's keys plus `new_tokens`, else fresh ones that
    later steps continue. None when the module's call was not seen by the pre-hook (unpatched, compiled)."""
    call = None if torch.compiler.is_compiling() else _calls.__dict__.get(id(module))
    if call is None:
        return None
    layers, layer_idx, continues = call
    entry = layers.get(layer_idx)
    if not (continues and entry.means.block_size == block_size and entry.length + new_tokens == key.shape[2]):
        entry = layers[layer_idx] = _LayerMeans(MoBABlockMeans(block_size))
    entry.keys, entry.version, entry.length = weakref.ref(key), _version(key), key.shape[2]
    return entry.means


def track(module) -> list:
    """Registers the hooks on one attention module; returns their handles (`.remove()` undoes them)."""
    return [
        module.register_forward_pre_hook(_before_attention, with_kwargs=True),
        module.register_forward_hook(_after_attention, with_kwargs=True, always_call=True),
    ]
