"""Values derived on the host from tensors that every layer of a transformers forward pass receives.

Deriving such a value (which rows of a mask are padding, where each packed sequence starts, HISA's block
grid) reads the tensor on the host, which on a GPU waits for every queued kernel. The patched attention
gets the same mask, cu_seq_lens or position ids in every layer of a pass: memoised, the sync happens once
per pass instead of once per layer of every decode step.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch


@dataclass
class _Entry:
    key: tuple
    bases: tuple  # weak references to the sources' base tensors (None for inference tensors)
    layer: int | None  # the last layer that read it
    value: object


class HostMemo:
    """The values last derived from a few tensors (a model with sliding and full layers gets two masks
    per pass).

    A tensor is known again only within a forward pass, while the callers' `layer` indices keep rising
    (a serving loop may refill one buffer between passes, and some writes leave no trace: through numpy,
    `.data`, or under torch.inference_mode(), whose tensors have no version counter), and there by its
    identity, view geometry and version counter, so another tensor, or the same one written in place,
    derives its value again. An inference tensor is known by its storage instead (a fresh view of the
    same mask in each layer is the same). Sources are held weakly: a memo never keeps a (possibly large)
    mask alive.
    """

    _ENTRIES = 4

    def __init__(self):
        self.entries: list = []

    def get(self, sources, signature: tuple, derive, *, layer: int | None = None):
        """derive(), or the value it gave for these `sources` (a tensor or a tuple of them) and `signature`,
        read by `layer` (the caller's layer index; anything but an int counts as unknown)."""
        sources = sources if isinstance(sources, tuple) else (sources,)
        layer = layer if isinstance(layer, int) else None
        key = (*signature, *(_state(t) for t in sources))
        bases = tuple(None if t.is_inference() else _base(t) for t in sources)
        for entry in self.entries:
            if entry.key != key or not all(_same(ref, base) for ref, base in zip(entry.bases, bases)):
                continue
            if layer is None or entry.layer is None or layer <= entry.layer:
                continue  # another pass may have refilled it
            entry.layer = layer
            return entry.value
        value = derive()
        refs = tuple(None if base is None else weakref.ref(base) for base in bases)
        self.entries = [_Entry(key, refs, layer, value), *self.entries[: self._ENTRIES - 1]]
        return value


def _base(tensor: torch.Tensor) -> torch.Tensor:
    # A view made afresh in each layer (DeepSeek-V3.2 hands its indexer mask[:, 0]) stands for its base.
    return tensor if tensor._base is None else tensor._base


def _same(ref, base) -> bool:
    return ref is None if base is None else ref is not None and ref() is base


def _state(tensor: torch.Tensor) -> tuple:
    geometry = (tuple(tensor.shape), tensor.stride(), tensor.storage_offset(), tensor.dtype, tensor.device)
    if tensor.is_inference():
        return ("inference", tensor.untyped_storage().data_ptr(), *geometry)
    return (tensor._version, *geometry)
