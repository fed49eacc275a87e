"""Hugging Face transformers integration: run a model's attention layers through sparse_attn methods.

    handle = sparse_attn.hf.patch(model, "xattention", threshold=0.9, block_size=128, dense_layers=[0])
    model.generate(...)                       # prefill sparse, decode dense
    handle.unpatch()                          # or sparse_attn.hf.unpatch(model); bit-identical to before

    sparse_attn.hf.configure("moba", block_size=512, topk=3)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sparse_attn")

How it plugs in (shared/specs/ecosystem.md section 1). One attention function is registered under
the name "sparse_attn" with `AttentionInterface.register`, and `keep_mask` (transformers'
`flash_attention_mask`, plus a StaticCache's empty slots) with `AttentionMaskInterface.register`, so
padding arrives as a 2D (B, Skv) keep-mask (or None) and never as an O(N^2) 4D mask. Switching the
model's `config._attn_implementation` selects it; no `forward` method is replaced, so projections,
RoPE and caches stay transformers' own.

Where the configuration lives. `patch` stores one `SparseAttnConfig` as `_sparse_attn_config` on
the model and on every one of its submodules (the same object). The attention function receives
the attention module, not the model, so reading the attribute off that module finds the right
model's configuration without a global registry keyed by object ids (which outlive nothing and get
reused); it travels with `copy.deepcopy` and disappears with the model. Modules without one (a
model loaded with `attn_implementation="sparse_attn"`) use the process default set by `configure`.
Per-layer choices are keyed by `module.layer_idx`; modules without a `layer_idx` (vision towers,
encoders outside the decoder stack) cannot be addressed per layer and run dense.

Phases. Prefill (Sq == Skv) and chunked prefill (Sq < Skv, bottom-right aligned) run the method;
decode (Sq <= 16 and Sq < Skv) runs dense SDPA unless `decode="sparse"` and the method routes
decode queries itself (MoBA; its block means follow the cache: sparse_attn.hf_block_means).
Padding: the package decision is that every sequence's block grid starts at its first real token, so
a padded batch is unpadded into per-sequence pieces (grouped by length and batched again) and gives
the same result as separate unpadded runs. Packed sequences (`cu_seq_lens_q/k` kwargs, or position
ids restarting inside one row) are split the same way.
Sliding-window layers stay dense (windowed SDPA) with a one-time warning.

DeepSeek Sparse Attention models (an indexer hands each layer its token selection as `indices=`) run
token-sparse attention over that selection under 'dense' and 'hisa', the only methods they take;
'hisa' swaps their indexers for `HISAIndexer`s at patch time (sparse_attn.hf_dsa).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import hf_block_means
from .decode import MAX_DECODE_QUERIES
from .hf_dsa import HISAIndexer, dsa_indexers, indexed_attention, is_indexed_config
from .host_memo import HostMemo
from .methods.hisa import check_options as check_hisa_options
from .methods.moba import check_options as check_moba_options
from .methods.moba import moba_attn, moba_decode, moba_route
from .methods.proxyattn import check_options as check_proxy_options
from .methods.proxyattn import proxy_attn
from .methods.s2o import check_options as check_s2o_options
from .methods.s2o import s2o_attention
from .methods.xattention import check_options as check_xattention_options
from .methods.xattention import load_thresholds, xattention_attn
from .reference import causal_token_mask
from .sinks import check_attn_sink, sdpa_with_sink

__all__ = [
    "ATTENTION_NAME",
    "AttentionStats",
    "LayerPlan",
    "PatchHandle",
    "SparseAttnConfig",
    "configure",
    "observing",
    "patch",
    "patched",
    "sparse_attention_forward",
    "unpatch",
]

ATTENTION_NAME = "sparse_attn"
MIN_TRANSFORMERS = (4, 53)
_CONFIG_ATTR = "_sparse_attn_config"
_HANDLE_ATTR = "_sparse_attn_handle"

# An option without a default: MoBA's reference has none, and its users run from 256/4 to 4096/12 (spec moba.md).
_REQUIRED = "required"
# Per method: its options with their defaults, and whether it can route decode queries itself.
_METHOD_OPTIONS = {
    "dense": {},
    "xattention": {"threshold": 0.9, "stride": 8, "block_size": 128, "chunk_size": None},
    "moba": {"block_size": _REQUIRED, "topk": _REQUIRED},
    "proxyattn": {"gamma": 0.95, "num_proxy_groups": 1, "stride": 4, "block_size": 128, "min_budget_tokens": 2048},
    "s2o": {"segment_len": 1024, "tau": 1e-2, "block_m": 64, "block_n": 64, "stop_rule": "max", "keep_frac": 1.0},
    "hisa": {"block_size": 128, "block_topk": 64, "forced": "slots"},
}
_SPARSE_DECODE = {"moba", "hisa"}
# What a DSA model (its attention takes indexer selections) can run: its own indexer, or HISA's.
_INDEXED_METHODS = ("dense", "hisa")


# ---------------------------------------------------------------------------------- transformers
def _release(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _require_transformers():
    """Import transformers, check its version, register the attention and mask functions (idempotent)."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            "sparse_attn.hf needs Hugging Face transformers >= 4.53: pip install 'transformers>=4.53'"
        ) from err
    if _release(transformers.__version__) < MIN_TRANSFORMERS:
        raise ImportError(
            f"sparse_attn.hf needs transformers >= 4.53, found {transformers.__version__}: older versions have no "
            "AttentionMaskInterface, so a custom attention function would not receive the padding mask. "
            "Upgrade with: pip install -U 'transformers>=4.53'"
        )
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, sparse_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, keep_mask)
    return transformers


def keep_mask(**kwargs):
    """transformers' mask hook: flash attention's 2D keep-mask (None when no key is padding), except
    that the empty slots of a StaticCache are marked too.

    Flash attention's hook returns None for an all-ones mask, and generate() passes no mask at all
    to implementations not named "flash" when nothing is padded; a StaticCache's keys are then its
    whole preallocated length, filled only up to the tokens seen. This returns an all-ones mask of
    the filled length instead, which `sparse_attention_forward` reads as "the keys past it are empty".

    DSA models get SDPA's 4D boolean mask, always materialised: their indexer masks its (Sq, Skv)
    scores with it (it slices the 4D mask), and `indexed_attention` reads the causal and padding
    limits of the selected keys from it. So does a mask with an overlay that a keep-mask cannot carry
    (a bidirectional prefix over image tokens, a caller's or/and mask function): the dense path
    honours it as a custom mask, and the sparse methods refuse it. Bidirectional masks (an encoder's,
    cross-attention's) are padding only: their keys are not the queries' cache.
    """
    from transformers.masking_utils import flash_attention_mask, sdpa_mask

    if is_indexed_config(kwargs.get("config")) or _has_overlay(kwargs):
        return sdpa_mask(**{**kwargs, "allow_is_causal_skip": False})
    mask = flash_attention_mask(**kwargs)
    if "allow_is_bidirectional_skip" in kwargs:  # transformers 5's create_bidirectional_mask
        return mask
    filled = _filled_keys(kwargs)
    if mask is not None:
        # A caller's mask over a StaticCache's whole length (0 on the empty slots): the queries are the last
        # filled keys, not the last slots, so it is cut to the filled ones.
        return mask[:, :filled] if filled is not None and 0 <= filled < mask.shape[1] else mask
    if filled is None or filled >= kwargs["kv_length"]:
        return None
    device = kwargs.get("device") or getattr(kwargs.get("cache_position"), "device", None)
    return torch.ones(kwargs["batch_size"], max(filled, 0), dtype=torch.bool, device=device)


def _has_overlay(kwargs) -> bool:
    """Whether transformers' mask function adds to causal (or sliding) attention what flash attention's
    keep-mask drops: a caller's or/and mask function (transformers 5 then sets use_vmap), or a blockwise
    overlay (PaliGemma's, built with or_masks). Sliding windows and packing are and_masks of their own,
    which the keep-mask path handles."""
    mask_function = kwargs.get("mask_function")
    return bool(kwargs.get("use_vmap")) or getattr(mask_function, "__qualname__", "").startswith("or_masks.")


def _filled_keys(kwargs) -> int | None:
    """The number of keys the cache holds once this step's are in (from transformers' mask arguments), or
    None when they do not say. A tensor offset (a StaticCache's) costs one sync per mask."""
    if kwargs.get("q_length") is not None:  # transformers >= 5: the queries' positions and count
        seen = kwargs.get("q_offset", 0) + kwargs["q_length"]
    elif kwargs.get("cache_position") is not None:  # 4.53: the queries' positions
        seen = kwargs["cache_position"][-1] + 1
    else:
        return None
    return int(seen) - kwargs.get("kv_offset", 0)


# ---------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class LayerPlan:
    """What one layer runs: a method name, its options and the decode policy ('dense' or 'sparse')."""

    method: str
    options: dict
    decode: str = "dense"


_DENSE_PLAN = LayerPlan("dense", {}, "dense")


@dataclass
class AttentionStats:
    """Counters of what ran: `calls[(layer_idx, phase, path)]` with phase 'prefill' or 'decode' and path the
    method that actually ran ('dense' for fallbacks); with `track_density`, `densities` holds
    (layer_idx, fraction of causally visible blocks computed) per sparse call, and per call of a DSA
    model the fraction of visible keys its selection attends (costs a device sync)."""

    track_density: bool = False
    calls: Counter = field(default_factory=Counter)
    densities: list = field(default_factory=list)

    def mean_density(self) -> float | None:
        return sum(d for _, d in self.densities) / len(self.densities) if self.densities else None

    def reset(self) -> None:
        self.calls.clear()
        self.densities.clear()


def _check_method(method) -> str:
    if method not in _METHOD_OPTIONS:
        raise ValueError(f"unknown sparse_attn method {method!r}; choose one of {sorted(_METHOD_OPTIONS)}")
    return method


def _method_options(method: str, options: dict, inherited: dict | None = None) -> dict:
    unknown = set(options) - set(_METHOD_OPTIONS[method])
    if unknown:
        raise TypeError(
            f"method {method!r} has no option(s) {sorted(unknown)}; its options are {sorted(_METHOD_OPTIONS[method])}"
        )
    resolved = {**_METHOD_OPTIONS[method], **(inherited or {}), **options}
    missing = sorted(name for name, value in resolved.items() if value is _REQUIRED)
    if missing:
        raise TypeError(
            f"method {method!r} needs the option(s) {missing}: it has no defaults (MoBA's reference has none; "
            "settings in use run from block_size=256, topk=4 to block_size=4096, topk=12)"
        )
    if method == "xattention":
        resolved["threshold"] = _resolve_threshold(resolved["threshold"])
        check_xattention_options(
            stride=resolved["stride"], block_size=resolved["block_size"], chunk_size=resolved["chunk_size"]
        )
    elif method == "moba":
        check_moba_options(**resolved)
    elif method == "proxyattn":
        check_proxy_options(**resolved)
    elif method == "s2o":
        check_s2o_options(**resolved)
    elif method == "hisa":
        check_hisa_options(**resolved, topk=None)  # the model's index_topk is checked at patch time
    return resolved


def _resolve_threshold(threshold):
    """A float, a [Hq] tensor, a [layers, Hq] table, or the path of a JSON table from `save_thresholds`."""
    if isinstance(threshold, (str, os.PathLike)):
        return load_thresholds(threshold)[0]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, list, tuple, torch.Tensor)):
        raise TypeError(
            f"XAttention threshold must be a float, a [Hq] or [layers, Hq] table, or a path, got {threshold!r}"
        )
    if isinstance(threshold, (list, tuple)):
        threshold = torch.tensor(threshold, dtype=torch.float64)
    values = threshold if isinstance(threshold, torch.Tensor) else torch.tensor(float(threshold))
    if values.dim() > 2:
        raise ValueError(f"XAttention threshold must be a float, [Hq] or [layers, Hq], got shape {tuple(values.shape)}")
    if values.is_complex() or bool(((values < 0) | (values > 1) | values.isnan()).any()):
        raise ValueError(f"XAttention threshold values must lie in [0, 1], got {threshold!r}")
    return threshold


def _check_decode(method: str, decode) -> str:
    if decode not in ("dense", "sparse"):
        raise ValueError(f"decode must be 'dense' or 'sparse', got {decode!r}")
    if decode == "sparse" and method not in _SPARSE_DECODE | {"dense"}:
        raise NotImplementedError(
            f"sparse decode is not implemented for method {method!r} (a prefill method); use decode='dense'. "
            f"Methods with sparse decode: {sorted(_SPARSE_DECODE)}"
        )
    return decode


def _layer_ids(values, name: str) -> frozenset:
    try:
        ids = frozenset(values)
    except TypeError:
        raise TypeError(f"{name} must be an iterable of layer indices, got {type(values).__name__}") from None
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
        raise ValueError(f"{name} must hold non-negative int layer indices, got {sorted(ids, key=str)}")
    return ids


class SparseAttnConfig:
    """The attention plan of one model (or the process default): a method and per-layer choices.

    method: 'dense' (SDPA), 'xattention' (options threshold, stride, block_size, chunk_size), 'moba'
        (options block_size, topk), 'proxyattn' (options gamma, num_proxy_groups, stride, block_size,
        min_budget_tokens), 's2o' (options segment_len, tau, block_m, block_n, stop_rule, keep_frac; causal
        layers only) or 'hisa' (options block_size, block_topk, forced; DSA models only, through `patch`);
        `options` are the method's keyword options. A DSA model (DeepSeek-V3.2, GLM-MoE-DSA) attends
        over its indexer's selection under 'dense' and 'hisa' alike, and takes no other method.
    layers: the layer indices that run the method (None: all); dense_layers: layers that stay dense.
    layer_config: {layer_idx: {"method": ..., "decode": ..., **options}} adjusting the sparse layers;
        options and decode are inherited from the top level when the layer keeps the top-level method.
    decode: 'dense' (default) or 'sparse' (methods that route decode queries: MoBA).
    track_density: record each sparse call's density in `stats` (a device sync per call).
    """

    def __init__(
        self,
        method,
        *,
        layers=None,
        dense_layers=None,
        decode="dense",
        layer_config=None,
        track_density=False,
        **options,
    ):
        self.method = _check_method(method)
        self.options = _method_options(self.method, options)
        self.decode = _check_decode(self.method, decode)
        self.layers = None if layers is None else _layer_ids(layers, "layers")
        self.dense_layers = _layer_ids(dense_layers or (), "dense_layers")
        if not isinstance(track_density, bool):
            raise TypeError(f"track_density must be a bool, got {type(track_density).__name__}")
        self.stats = AttentionStats(track_density=track_density)
        # observer(layer_idx, query, key): called on every unpadded full prefill (calibration capture).
        self.observer = None
        self._overrides = {}
        for idx, override in (layer_config or {}).items():
            if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
                raise ValueError(f"layer_config keys must be non-negative layer indices, got {idx!r}")
            if not isinstance(override, dict):
                raise TypeError(f"layer_config[{idx}] must be a dict, got {type(override).__name__}")
            if idx in self.dense_layers or (self.layers is not None and idx not in self.layers):
                raise ValueError(
                    f"layer_config names layer {idx}, which layers/dense_layers keep dense; drop one of the two"
                )
            override = dict(override)
            method_here = _check_method(override.pop("method", self.method))
            # A layer that keeps the top-level method inherits its options and decode policy; one that switches
            # method starts from that method's defaults (decode 'dense').
            same_method = method_here == self.method
            decode_here = _check_decode(method_here, override.pop("decode", self.decode if same_method else "dense"))
            inherited = self.options if same_method else None
            self._overrides[idx] = LayerPlan(
                method_here, _method_options(method_here, override, inherited), decode_here
            )
        self._plans = {}

    def plan(self, layer_idx) -> LayerPlan:
        """The plan of layer `layer_idx`; None (a module without a layer index) runs dense."""
        if layer_idx is None:
            return _DENSE_PLAN
        plan = self._plans.get(layer_idx)
        if plan is None:
            if (self.layers is not None and layer_idx not in self.layers) or layer_idx in self.dense_layers:
                plan = _DENSE_PLAN
            else:
                plan = self._overrides.get(layer_idx) or LayerPlan(self.method, self.options, self.decode)
            self._plans[layer_idx] = plan
        return plan

    def methods(self) -> set:
        """Every method some layer may run under this plan (the top-level one and the per-layer ones)."""
        return {self.method, *(plan.method for plan in self._overrides.values())}

    def max_table_layer(self) -> int | None:
        """Rows needed by [layers, Hq] threshold tables: the smallest table height among the plans, if any."""
        heights = [
            plan.options["threshold"].shape[0]
            for plan in [LayerPlan(self.method, self.options), *self._overrides.values()]
            if plan.method == "xattention"
            and isinstance(plan.options["threshold"], torch.Tensor)
            and plan.options["threshold"].dim() == 2
        ]
        return min(heights) if heights else None

    def __repr__(self) -> str:
        return (
            f"SparseAttnConfig(method={self.method!r}, options={self.options}, layers={self.layers}, "
            f"dense_layers={sorted(self.dense_layers)}, decode={self.decode!r}, layer_config={self._overrides})"
        )


_default_config: SparseAttnConfig | None = None
_warned: set = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


# ---------------------------------------------------------------------------------- public API
class PatchHandle:
    """Returned by `patch`: `config`, `stats`, and `unpatch()`; also a context manager that unpatches on exit."""

    def __init__(self, model, config: SparseAttnConfig):
        self.model = model
        self.config = config
        self.active = False

    def _activate(self, previous, indexers) -> None:
        self._previous = previous  # [(config object, its previous _attn_implementation)]
        self._indexers = list(indexers)  # [(attention module, its own indexer)] where HISA replaced it
        self._hooks = []  # the block-mean trackers of routed MoBA decode layers
        self.active = True

    @property
    def stats(self) -> AttentionStats:
        return self.config.stats

    def unpatch(self) -> None:
        if not self.active:
            return
        # Each config gets back its own previous value (sub-configs may differ), written to the stored
        # attribute directly so no recursive setter or dispatch check runs in between.
        for config, previous in self._previous:
            _write_implementation(config, previous)
        for attention, indexer in self._indexers:
            attention.indexer = indexer
        for hook in self._hooks:
            hook.remove()
        for module in self.model.modules():
            module.__dict__.pop(_CONFIG_ATTR, None)
        if self.model.__dict__.get(_HANDLE_ATTR) is self:
            del self.model.__dict__[_HANDLE_ATTR]
        self.active = False

    def __enter__(self) -> PatchHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.unpatch()

    def __repr__(self) -> str:
        return f"PatchHandle({type(self.model).__name__}, {self.config!r}, active={self.active})"


def _model_configs(model) -> list:
    """Every transformers config of the model: its own, its submodules', and their sub-configs, parents first."""
    found, queue = {}, [getattr(model, "config", None)]
    queue += [getattr(module, "config", None) for module in model.modules()]
    while queue:
        config = queue.pop(0)
        if config is None or id(config) in found or not hasattr(config, "_attn_implementation"):
            continue
        found[id(config)] = config
        queue += [getattr(config, key, None) for key in getattr(config, "sub_configs", None) or ()]
    return list(found.values())


def _read_implementation(config):
    return config.__dict__.get("_attn_implementation_internal", getattr(config, "_attn_implementation", None))


def _write_implementation(config, value) -> None:
    if "_attn_implementation_internal" in config.__dict__:
        config._attn_implementation_internal = value
    else:
        config._attn_implementation = value


def patch(
    model, method, *, layers=None, dense_layers=None, decode="dense", layer_config=None, **method_config
) -> PatchHandle:
    """Run the attention of a transformers model through `method`; returns a `PatchHandle`.

    Options as in `SparseAttnConfig` (plus `track_density=True` to record densities in
    `handle.stats`). XAttention's `threshold` may be a float, a [Hq] tensor, a [layers, Hq] table or
    the path of a JSON table written by `sparse_attn.methods.xattention.save_thresholds`. Patching a
    patched model replaces its plan. Raises ImportError for transformers < 4.53.
    """
    _require_transformers()
    if not isinstance(model, torch.nn.Module) or not _model_configs(model):
        raise TypeError(f"patch needs a transformers model (an nn.Module with a config), got {type(model).__name__}")
    config = SparseAttnConfig(
        method, layers=layers, dense_layers=dense_layers, decode=decode, layer_config=layer_config, **method_config
    )
    layer_ids = [m.layer_idx for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    named = set(config.layers or ()) | set(config.dense_layers) | set(config._overrides)
    if layer_ids and named - set(layer_ids):
        raise ValueError(
            f"layers, dense_layers and layer_config name layer(s) {sorted(named - set(layer_ids))} that the model "
            f"does not have (its layers: {min(layer_ids)}..{max(layer_ids)})"
        )
    table_rows = config.max_table_layer()
    if table_rows is not None and layer_ids and max(layer_ids) >= table_rows:
        raise ValueError(f"the threshold table has {table_rows} layers, but the model has layer {max(layer_ids)}")
    return _apply(model, config)


def _apply(model, config: SparseAttnConfig, handle: PatchHandle | None = None) -> PatchHandle:
    """Install a checked plan; `handle` (an unpatched one) is re-activated rather than a new one made."""
    hisa_indexers = _hisa_indexers(model, config)  # before unpatch: a plan that fails leaves the old patch
    unpatch(model)
    previous = [(c, _read_implementation(c)) for c in _model_configs(model)]
    handle = handle or PatchHandle(model, config)
    handle._activate(previous, [(attention, hisa.dsa_indexer) for attention, hisa in hisa_indexers])
    for attention, indexer in hisa_indexers:
        attention.indexer = indexer
    for module in model.modules():
        setattr(module, _CONFIG_ATTR, config)
        if _routes_moba_decode(config, module):
            handle._hooks += hf_block_means.track(module)
    model.__dict__[_HANDLE_ATTR] = handle
    try:
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(ATTENTION_NAME)
        else:
            for c, _ in previous:
                c._attn_implementation = ATTENTION_NAME
        if getattr(model.config, "_attn_implementation", None) != ATTENTION_NAME:
            raise RuntimeError(
                f"{type(model).__name__} did not accept attn_implementation={ATTENTION_NAME!r}: its attention does not "
                "dispatch through transformers' AttentionInterface, and sparse_attn never replaces forward methods"
            )
    except BaseException:
        handle.unpatch()
        raise
    return handle


def _routes_moba_decode(config: SparseAttnConfig, module) -> bool:
    layer_idx = getattr(module, "layer_idx", None)
    if not isinstance(layer_idx, int):
        return False
    plan = config.plan(layer_idx)
    return plan.method == "moba" and plan.decode == "sparse"


def _hisa_indexers(model, config: SparseAttnConfig) -> list:
    """(attention module, its HISAIndexer) for the layers whose plan is HISA; checks that the plan's methods
    suit the model (a DSA model runs its indexer's selection: 'dense' or 'hisa'; HISA needs an indexer)."""
    indexers = dsa_indexers(model)
    indexed = bool(indexers) or any(is_indexed_config(c) for c in _model_configs(model))
    name = type(model).__name__
    if indexed and config.methods() - set(_INDEXED_METHODS):
        raise ValueError(
            f"{name} is a DeepSeek Sparse Attention model: its indexer selects every query's keys, so it runs "
            f"'dense' (its own indexer) or 'hisa', not {sorted(config.methods() - set(_INDEXED_METHODS))}"
        )
    if not indexed and "hisa" in config.methods():
        raise ValueError(
            f"HISA replaces the lightning indexer of a DeepSeek Sparse Attention model (DeepSeek-V3.2, "
            f"GLM-MoE-DSA); {name} has none"
        )
    _check_shared_indexer_plans(model, config, {getattr(a, "layer_idx", None) for a, _ in indexers})
    swaps = []
    for attention, indexer in indexers:
        plan = config.plan(getattr(attention, "layer_idx", None))
        if plan.method == "hisa":
            swaps.append((attention, HISAIndexer(indexer, **plan.options, decode=plan.decode)))
    return swaps


def _check_shared_indexer_plans(model, config: SparseAttnConfig, indexed_layers: set) -> None:
    """A layer without an indexer of its own (GLM-MoE-DSA's 'shared' layers) attends over the top-k of the
    nearest indexed layer before it, so it cannot run a plan of its own: refuse one that differs."""
    sources = sorted(i for i in indexed_layers if isinstance(i, int))
    for module in model.modules():
        layer_idx = getattr(module, "layer_idx", None)
        if getattr(module, "indexer", False) is not None or not isinstance(layer_idx, int):
            continue
        source = max((i for i in sources if i < layer_idx), default=None)
        if source is not None and config.plan(layer_idx) != config.plan(source):
            raise ValueError(
                f"layer {layer_idx} reuses layer {source}'s indexer selection (it has no indexer of its own), "
                f"so it must have layer {source}'s plan: got {config.plan(layer_idx)} against {config.plan(source)}"
            )


def unpatch(model) -> bool:
    """Undo `patch` on `model` (previous attention implementation, no stored config); False if it was not patched."""
    handle = model.__dict__.get(_HANDLE_ATTR)
    if handle is None:
        return False
    handle.unpatch()
    return True


@contextlib.contextmanager
def _scoped_patch(model, method, **config):
    """Patch for a `with` block; on exit the model is as it was on entry, so a patch that was active
    then (the same handle object) is back in force."""
    outer = model.__dict__.get(_HANDLE_ATTR) if isinstance(model, torch.nn.Module) else None
    handle = patch(model, method, **config)
    try:
        yield handle
    finally:
        handle.unpatch()
        if outer is not None and not outer.active and _HANDLE_ATTR not in model.__dict__:
            _apply(model, outer.config, outer)


@contextlib.contextmanager
def patched(model, method, **config):
    """`with patched(model, "xattention", threshold=0.9) as handle: ...`: patch, then on exit restore the
    model's state on entry (its original attention, or the patch that was active)."""
    with _scoped_patch(model, method, **config) as handle:
        yield handle


@contextlib.contextmanager
def observing(model, observer):
    """Dense attention, calling `observer(layer_idx, query, key)` (post-RoPE, detached) on every unpadded
    full prefill: how `calibrate_xattention` reads a model's q and k without keeping them. On exit the
    model's patch on entry, if any, is back in force."""
    with _scoped_patch(model, "dense") as handle:
        handle.config.observer = observer
        yield handle


def configure(method, **config) -> SparseAttnConfig | None:
    """Set the process-wide plan used by models loaded with `attn_implementation="sparse_attn"` (and by any
    module that was not patched); `configure(None)` clears it. Returns the config (its `stats` count calls).
    Registers the attention function, so call it before `from_pretrained`."""
    global _default_config
    _require_transformers()
    default = None if method is None else SparseAttnConfig(method, **config)
    if default is not None and "hisa" in default.methods():
        raise ValueError("HISA swaps a DSA model's indexer modules: use sparse_attn.hf.patch(model, 'hisa', ...)")
    _default_config = default
    return _default_config


# ---------------------------------------------------------------------------------- attention function
def sparse_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The registered attention function (transformers' contract).

    query (B, Hq, Sq, D), key and value (B, Hkv, Skv, D) after RoPE and the cache update;
    attention_mask a 2D (B, Skv) keep-mask or None (a custom 4D mask runs dense only).
    Returns (output (B, Sq, Hq, D) contiguous, None).
    """
    config = module.__dict__.get(_CONFIG_ATTR) or _default_config
    if config is None:
        _warn_once(
            "no-config",
            "sparse_attn: this model has no sparse_attn configuration (call sparse_attn.hf.patch(model, ...) or "
            "sparse_attn.hf.configure(...) before loading); running dense attention",
        )
        config = _DENSE_FALLBACK
    _reject_unsupported(dropout, kwargs)
    layer_idx = getattr(module, "layer_idx", None)
    plan = config.plan(layer_idx if isinstance(layer_idx, int) else None)
    sink = kwargs.get("s_aux")
    if kwargs.get("indices") is not None:
        return _indexer_attention(
            plan, layer_idx, query, key, value, attention_mask, kwargs["indices"], scaling, sink, config
        )
    is_causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")

    custom_mask = attention_mask is not None and attention_mask.dim() == 4
    keep = None
    if not custom_mask:
        key, value, keep = _align_padding_mask(attention_mask, key, value, layer_idx)
    seq_q, seq_kv = query.shape[2], key.shape[2]
    _refuse_long_chunked_attention(module, layer_idx, seq_kv)
    if config.observer is not None and keep is None and not custom_mask and seq_q == seq_kv:
        config.observer(layer_idx, query.detach(), key.detach())
    if causal and seq_q > seq_kv:
        raise ValueError(f"causal attention needs Sq <= Skv, got query length {seq_q} and key length {seq_kv}")
    decoding = seq_q < seq_kv and seq_q <= MAX_DECODE_QUERIES
    path = plan.method
    if path != "dense":
        if window is not None:
            _warn_once(
                "sliding-window",
                "sparse_attn: sliding-window layers run dense (windowed SDPA); the sparse method applies to "
                "full-attention layers only",
            )
            path = "dense"
        elif decoding and plan.decode == "dense":
            path = "dense"
        elif softcap is not None:
            raise NotImplementedError(
                f"attention logit softcapping (softcap={softcap}) is not supported by the sparse method "
                f"{plan.method!r}; run those layers dense (dense_layers=... or method='dense')"
            )
        elif custom_mask:
            raise NotImplementedError(
                f"a custom 4D attention mask cannot be used with the sparse method {plan.method!r}; pass a 2D "
                "padding mask, or run dense"
            )
    config.stats.calls[(layer_idx, "decode" if decoding else "prefill", path)] += 1

    if path == "dense":
        dense = _DenseArgs(causal, scaling, window, softcap, sink)
        if custom_mask:
            # Cut to the keys, as transformers' own attention functions do (4.53's PaliGemma makes one more).
            out = _dense_attention(query, key, value, dense, custom_mask=attention_mask[..., : key.shape[2]])
        elif keep is not None and decoding:
            out = _dense_attention(query, key, value, dense, keep=keep)  # a (B, 1, Sq, Skv) mask is small here
        else:
            pieces = _sequence_pieces(keep, query.shape[0], seq_q, seq_kv, kwargs, query.device, layer_idx)
            out = _run_pieces(lambda q, k, v: _dense_attention(q, k, v, dense), query, key, value, pieces)
    else:
        pieces = _sequence_pieces(keep, query.shape[0], seq_q, seq_kv, kwargs, query.device, layer_idx)
        suffixes = pieces.suffixes if decoding and pieces is not None else None
        followed = None
        if path == "moba" and decoding and causal and (pieces is None or suffixes is not None):
            followed = hf_block_means.moba_block_means(module, key, seq_q, plan.options["block_size"])
            if followed is None and module.__dict__.get(_CONFIG_ATTR) is None:
                # A model loaded under `configure` was never patched: follow its cache from the next step.
                hf_block_means.track_once(module)

        def method(q, k, v, sequence=None):
            means = None if followed is None else followed.of(sequence)
            return _method_attention(plan, layer_idx, q, k, v, causal, scaling, sink, config.stats, means)

        if suffixes is not None:
            out = _run_suffixes(method, query, key, value, suffixes)
        else:
            out = _run_pieces(method, query, key, value, pieces)
    return out.transpose(1, 2).contiguous(), None


_DENSE_FALLBACK = SparseAttnConfig("dense")


def _refuse_long_chunked_attention(module, layer_idx, seq_kv: int) -> None:
    """Llama 4's chunked-attention layers see only their own chunk of `attention_chunk_size` keys, a pattern
    the 2D keep-mask cannot carry (transformers' flash path refuses it the same way): beyond one chunk,
    running them causally would be a silent wrong answer."""
    model_config = getattr(module, "config", None)
    layer_types = getattr(model_config, "layer_types", None)
    chunk = getattr(model_config, "attention_chunk_size", None)
    if chunk is None or not isinstance(layer_idx, int) or not layer_types or layer_idx >= len(layer_types):
        return
    if layer_types[layer_idx] == "chunked_attention" and seq_kv > chunk:
        raise NotImplementedError(
            f"layer {layer_idx} is a chunked-attention layer (attention_chunk_size={chunk}) and sees {seq_kv} keys: "
            "sparse_attn does not implement chunked attention; load the model with attn_implementation='sdpa'"
        )


def _indexer_attention(plan: LayerPlan, layer_idx, query, key, value, attention_mask, indices, scaling, sink, config):
    """A DSA model's attention over its indexer's selection (under 'dense' its own indexer chose it; under
    'hisa' a HISAIndexer did, except for decode steps with decode='dense')."""
    if plan.method not in _INDEXED_METHODS:
        raise ValueError(
            f"this DeepSeek Sparse Attention model's indexer selects every query's keys: method {plan.method!r} "
            f"cannot run on it; use one of {_INDEXED_METHODS}"
        )
    seq_q, seq_kv = query.shape[2], key.shape[2]
    decoding = seq_q < seq_kv and seq_q <= MAX_DECODE_QUERIES
    path = "dense" if decoding and plan.decode == "dense" else plan.method
    config.stats.calls[(layer_idx, "decode" if decoding else "prefill", path)] += 1
    result = indexed_attention(
        query, key, value, attention_mask, indices, scaling, attn_sink=sink, return_density=config.stats.track_density
    )
    out = _record_density(result, config.stats, layer_idx, lambda density: density.item())
    return out.transpose(1, 2).contiguous(), None


def _reject_unsupported(dropout, kwargs) -> None:
    if dropout:
        raise NotImplementedError(
            f"attention dropout (dropout={dropout}) is not supported by sparse_attn; set the model's attention_dropout "
            "to 0 for training"
        )
    if kwargs.get("output_attentions"):
        raise NotImplementedError(
            "output_attentions=True is not supported by sparse_attn (no attention weights are formed); "
            "use attn_implementation='eager' to inspect attention weights"
        )
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError(
            "an additive position_bias (T5-style relative attention bias) is not supported by sparse_attn; "
            "run such models with attn_implementation='sdpa'"
        )


_keep_memo, _pieces_memo = HostMemo(), HostMemo()


def _align_padding_mask(mask, key, value, layer=None):
    """(key, value, keep (B, Skv) bool or None). A mask shorter than the keys marks a StaticCache's filled prefix.
    `layer`: the caller's layer index, for the memo of the mask's reading."""
    if mask is None:
        return key, value, None
    if mask.dim() != 2:
        raise ValueError(f"expected a 2D (batch, keys) padding mask, got shape {tuple(mask.shape)}")
    keep = _keep_memo.get(mask, (key.shape[2],), lambda: _padding_keep(mask, key.shape[2]), layer=layer)
    if mask.shape[1] < key.shape[2]:
        key, value = key[:, :, : mask.shape[1]], value[:, :, : mask.shape[1]]
    return key, value, keep


def _padding_keep(mask, seq_kv: int):
    """The bool keep-mask of `mask` for `seq_kv` keys, or None when it keeps every key (one sync)."""
    keep = mask.to(torch.bool)
    if keep.shape[1] > seq_kv:
        keep = keep[:, -seq_kv:]
    return None if bool(keep.all()) else keep


# ---------------------------------------------------------------------------------- sequences
@dataclass
class _Pieces:
    """Sequences to run separately: per piece, rows into the flattened (B * Sq) queries and (B * Skv) keys;
    `suffixes`, when every batch row's real queries and keys are a suffix of its own (left padding), the
    (first query, first key) of each row, so that a decode step can take views instead of copies."""

    q_rows: list
    k_rows: list
    suffixes: list | None = None


def _sequence_pieces(keep, batch, seq_q, seq_kv, kwargs, device, layer=None) -> _Pieces | None:
    """None when the batch runs as is; otherwise the unpadded (or unpacked) sequences."""
    cu_q, cu_k, positions = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k"), kwargs.get("position_ids")
    if keep is not None:
        sources, kind = keep, "mask"
        derive = functools.partial(_pieces_from_mask, keep, seq_q, seq_kv, device)
    elif cu_q is not None and cu_k is not None:
        sources, kind = (cu_q, cu_k), "cu"
        derive = functools.partial(_pieces_from_cu, cu_q, cu_k, batch, seq_q, seq_kv, device)
    elif batch == 1 and seq_q == seq_kv > 1 and isinstance(positions, torch.Tensor) and positions.shape[-1] == seq_q:
        sources, kind = positions, "positions"
        derive = functools.partial(_pieces_from_positions, positions.reshape(-1), device)
    else:
        return None
    return _pieces_memo.get(sources, (kind, batch, seq_q, seq_kv), derive, layer=layer)


def _pieces_from_mask(keep, seq_q, seq_kv, device) -> _Pieces:
    # Queries are the last Sq key positions, so each sequence's real queries are the last of its real
    # keys: unpadded, they are bottom-right aligned against its real keys, exactly as without padding.
    keep = keep.cpu()
    q_rows, k_rows, suffixes = [], [], []
    for b in range(keep.shape[0]):
        k_pos = keep[b].nonzero().squeeze(1)
        q_pos = keep[b, seq_kv - seq_q :].nonzero().squeeze(1)
        q_rows.append((q_pos + b * seq_q).to(device))
        k_rows.append((k_pos + b * seq_kv).to(device))
        suffixes.append((seq_q - q_pos.numel(), seq_kv - k_pos.numel()))
    left_padded = all(bool(keep[b, start:].all()) for b, (_, start) in enumerate(suffixes))
    return _Pieces(q_rows, k_rows, suffixes if left_padded else None)


def _pieces_from_cu(cu_q, cu_k, batch, seq_q, seq_kv, device) -> _Pieces:
    if batch != 1:
        raise ValueError(f"cu_seq_lens_q/k describe packed sequences in a batch of 1, got batch {batch}")
    cu_q, cu_k = cu_q.tolist(), cu_k.tolist()
    if len(cu_q) != len(cu_k) or cu_q[-1] != seq_q or cu_k[-1] != seq_kv:
        raise ValueError(f"cu_seq_lens_q/k {cu_q}, {cu_k} do not match Sq={seq_q}, Skv={seq_kv}")
    q_rows = [torch.arange(a, b, device=device) for a, b in zip(cu_q[:-1], cu_q[1:])]
    k_rows = [torch.arange(a, b, device=device) for a, b in zip(cu_k[:-1], cu_k[1:])]
    return _Pieces(q_rows, k_rows)


def _pieces_from_positions(positions, device) -> _Pieces | None:
    # As transformers does for flash attention: packed sequences restart at the smallest position id.
    starts = (positions == positions.min()).nonzero().squeeze(1).tolist()
    if starts[0] != 0 or len(starts) == 1:
        return None
    bounds = [*starts, positions.numel()]
    rows = [torch.arange(a, b, device=device) for a, b in zip(bounds[:-1], bounds[1:])]
    return _Pieces(rows, rows)


def _run_suffixes(attention, query, key, value, suffixes: list):
    """attention(q, k, v, (row, first key)) on each batch row's real suffix of queries and keys, as views: in a
    decode step the keys are the whole cache, which a gather would copy for a handful of queries. Rows of
    padding queries stay 0."""
    outputs = []
    for b, (q_start, k_start) in enumerate(suffixes):
        if q_start == query.shape[2]:
            outputs.append(query.new_zeros(query.shape[1], query.shape[2], value.shape[-1]))
            continue
        row = slice(b, b + 1)
        out = attention(query[row, :, q_start:], key[row, :, k_start:], value[row, :, k_start:], (b, k_start))
        outputs.append(F.pad(out[0], (0, 0, q_start, 0)))
    return torch.stack(outputs)


def _run_pieces(attention, query, key, value, pieces: _Pieces | None):
    """attention(q, k, v) -> (n, Hq, Lq, D) on the whole batch, or per piece with pieces of equal lengths batched."""
    if pieces is None:
        return attention(query, key, value)
    batch, num_q_heads, seq_q, _ = query.shape
    q_tokens = query.transpose(1, 2).reshape(batch * seq_q, num_q_heads, -1)
    k_tokens, v_tokens = (t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in (key, value))
    groups: dict = {}
    for q_rows, k_rows in zip(pieces.q_rows, pieces.k_rows):
        if q_rows.numel():
            groups.setdefault((q_rows.numel(), k_rows.numel()), []).append((q_rows, k_rows))
    rows, outputs = [], []
    for members in groups.values():
        q = torch.stack([q_tokens[q_rows] for q_rows, _ in members]).transpose(1, 2)
        k = torch.stack([k_tokens[k_rows] for _, k_rows in members]).transpose(1, 2)
        v = torch.stack([v_tokens[k_rows] for _, k_rows in members]).transpose(1, 2)
        out = attention(q, k, v)  # (n, Hq, Lq, Dv)
        rows += [q_rows for q_rows, _ in members]
        outputs.append(out.transpose(1, 2).reshape(-1, num_q_heads, out.shape[-1]))
    # Query rows of padding stay zero; index_copy keeps the assembly differentiable.
    flat = query.new_zeros(batch * seq_q, num_q_heads, value.shape[-1])
    if rows:
        flat = flat.index_copy(0, torch.cat(rows), torch.cat(outputs))
    return flat.view(batch, seq_q, num_q_heads, -1).transpose(1, 2)


# ---------------------------------------------------------------------------------- dense path
@dataclass(frozen=True)
class _DenseArgs:
    causal: bool
    scale: float | None
    window: int | None
    softcap: float | None
    sink: torch.Tensor | None  # one logit per query head (transformers' s_aux)


def _dense_attention(query, key, value, args: _DenseArgs, *, keep=None, custom_mask=None):
    """SDPA (eager when softcapping) with native GQA; causal bottom-right, sliding window, padding keep-mask,
    attention sinks."""
    seq_q, seq_kv = query.shape[2], key.shape[2]
    allowed, is_causal = custom_mask, False
    if custom_mask is None:
        # SDPA's is_causal is top-left aligned: only right for Sq == Skv. Sq == 1 sees every key.
        need_positions = args.window is not None or (args.causal and 1 < seq_q < seq_kv)
        if need_positions:
            q_pos = torch.arange(seq_q, device=query.device)[:, None] + (seq_kv - seq_q)
            k_pos = torch.arange(seq_kv, device=query.device)[None, :]
            allowed = causal_token_mask(seq_q, seq_kv, query.device) if args.causal else None
            if args.window is not None:
                in_window = (q_pos - k_pos < args.window) & (k_pos - q_pos < args.window)
                allowed = in_window if allowed is None else allowed & in_window
        if keep is not None:
            padding = keep[:, None, None, :]
            allowed = padding if allowed is None else allowed & padding
            if args.causal and seq_q > 1 and not need_positions:
                allowed = allowed & causal_token_mask(seq_q, seq_kv, query.device)
        if allowed is not None:
            # Rows with no visible key (padding queries) attend everywhere, so they stay finite.
            allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
        else:
            is_causal = args.causal and seq_q > 1
    if args.sink is not None:
        if args.softcap is not None:
            raise NotImplementedError("attention sinks (s_aux) together with logit softcapping are not supported")
        check_attn_sink(args.sink, query.shape[1], query.device)
        return sdpa_with_sink(query, key, value, args.sink, attn_mask=allowed, is_causal=is_causal, scale=args.scale)
    if args.softcap is not None:
        return _softcapped_attention(query, key, value, allowed, is_causal, args.scale, args.softcap)
    return F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=allowed,
        is_causal=is_causal,
        scale=args.scale,
        enable_gqa=query.shape[1] != key.shape[1],
    )


def _softcapped_attention(query, key, value, allowed, is_causal, scale, softcap):
    """softmax(softcap * tanh(scale q k^T / softcap)) v in fp32, GQA by a group axis (no K/V copies)."""
    batch, num_q_heads, seq_q, dim = query.shape
    num_kv_heads, seq_kv = key.shape[1], key.shape[2]
    scale = dim**-0.5 if scale is None else scale
    q = query.reshape(batch, num_kv_heads, num_q_heads // num_kv_heads, seq_q, dim).float()
    logits = q @ key.float()[:, :, None].transpose(-1, -2) * scale
    logits = (softcap * torch.tanh(logits / softcap)).reshape(batch, num_q_heads, seq_q, seq_kv)
    if is_causal:
        allowed = causal_token_mask(seq_q, seq_kv, query.device)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf")) if allowed.dtype == torch.bool else logits + allowed
    probs = logits.softmax(dim=-1).reshape(batch, num_kv_heads, -1, seq_q, seq_kv)
    return (probs @ value.float()[:, :, None]).reshape(batch, num_q_heads, seq_q, -1).to(query.dtype)


# ---------------------------------------------------------------------------------- methods
def _method_attention(plan: LayerPlan, layer_idx, q, k, v, causal, scale, sink, stats: AttentionStats, block_means):
    """`block_means`: the MoBABlockMeans following this layer's cache for these sequences (routed MoBA decode of
    an unpadded batch, or of one row of a left-padded one), or None."""
    options = plan.options
    if plan.method == "xattention":
        result = xattention_attn(
            q,
            k,
            v,
            stride=options["stride"],
            threshold=options["threshold"],
            layer_idx=layer_idx,
            block_size=options["block_size"],
            causal=causal,
            chunk_size=options["chunk_size"],
            softmax_scale=scale,
            attn_sink=sink,
            return_layout=stats.track_density,
        )
        return _record_density(result, stats, layer_idx, lambda layout: layout.density(causal=causal))
    if plan.method == "moba":
        block_size, topk = options["block_size"], options["topk"]
        if causal and q.shape[2] <= MAX_DECODE_QUERIES and q.shape[2] < k.shape[2]:
            # Routed decode: the split-KV kernel over the routed blocks, with block means pooled once per
            # block where hf_block_means follows the cache, else from the whole cache each step.
            out = moba_decode(
                q, k, v, block_size=block_size, topk=topk, block_means=block_means, softmax_scale=scale, attn_sink=sink
            )
        else:
            out = moba_attn(
                q, k, v, block_size=block_size, topk=topk, causal=causal, softmax_scale=scale, attn_sink=sink
            )
        if stats.track_density:
            stats.densities.append((layer_idx, _moba_density(q, k, block_size, topk, causal)))
        return out
    if plan.method == "proxyattn":
        result = proxy_attn(
            q, k, v, **options, causal=causal, softmax_scale=scale, attn_sink=sink, return_layout=stats.track_density
        )
        return _record_density(result, stats, layer_idx, lambda layout: layout.density(causal=causal))
    if plan.method == "s2o":
        if not causal:
            raise NotImplementedError("S2O is a causal prefill method; run non-causal layers dense (dense_layers=...)")
        result = s2o_attention(
            q, k, v, **options, softmax_scale=scale, attn_sink=sink, return_stats=stats.track_density
        )
        return _record_density(result, stats, layer_idx, lambda s2o_stats: s2o_stats.density.item())
    raise AssertionError(f"no sparse path for method {plan.method!r}")


def _record_density(result, stats: AttentionStats, layer_idx, density_of):
    """The output of a method called to return (out, extra) when stats.track_density (else just out), with
    `density_of(extra)` recorded."""
    if not stats.track_density:
        return result
    out, extra = result
    stats.densities.append((layer_idx, density_of(extra)))
    return out


def _moba_density(q, k, block_size, topk, causal) -> float:
    """Mean over query rows of routed blocks / causally visible blocks."""
    routes = moba_route(q.detach(), k.detach(), block_size=block_size, topk=topk, causal=causal)
    chosen = (routes >= 0).sum(dim=-1).double()
    num_blocks = -(-k.shape[2] // block_size)
    if causal:
        position = torch.arange(q.shape[2], device=q.device) + (k.shape[2] - q.shape[2])
        visible = (position // block_size + 1).double()
    else:
        visible = torch.full((q.shape[2],), float(num_blocks), device=q.device, dtype=torch.float64)
    return float((chosen / visible).mean())
