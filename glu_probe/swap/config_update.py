"""Updating a Hugging Face host's config after a swap.

The width and activation keys the adapters name are written only where a model rebuilt from the
updated config (on the ``meta`` device) changes nothing but the swapped blocks
(:func:`_shared_keys`), then copied to the private copies of the config that sub-modules hold
(T5's stacks). :func:`_update_config` also writes the record's base fields (the per-block
description: :mod:`glu_probe.swap.record`).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._warnings import external_stacklevel
from .base import HF_ACT_NAMES, RECORD_ATTR, VARIANT_ACTIVATION, MLPAdapter, SwapReport
from .hosts import _ancestors, _hf_config, _is_pretrained, _relative, _under
from .record import _record_widths


def _sync_config_copies(
    owner_path: str, owner: nn.Module, config: Any, updates: dict[str, tuple[Any, Any]]
) -> dict[str, tuple[Any, Any]]:
    """Apply ``updates`` (key: (old, new)) of ``config`` to the private copies of it that
    sub-modules of ``owner`` hold, where such a copy still has the old value: T5's encoder and
    decoder stacks each keep a deep copy of the root config (with ``is_decoder`` changed), and
    their ``d_ff`` would otherwise keep describing the blocks before the swap. A copy is a config
    of the same class that is neither ``config`` itself nor one of its sub-configs. Returns the
    updates made, keyed by the copy's path (``encoder.config.d_ff``), one entry per copy."""
    done: dict[str, tuple[Any, Any]] = {}
    seen = {id(config)} | {id(v) for v in vars(config).values()}
    keys = {k: v for k, v in updates.items() if k != RECORD_ATTR}
    for path, module in owner.named_modules():
        copy = _hf_config(module)
        if copy is None or id(copy) in seen or type(copy) is not type(config):
            continue
        seen.add(id(copy))
        where = ".".join(p for p in (owner_path, path) if p)
        for key, (before, after) in keys.items():
            if hasattr(copy, key) and getattr(copy, key) == before:
                setattr(copy, key, after)
                done[f"{where}.config.{key}"] = (before, after)
    return done


def _module_signature(module: nn.Module) -> tuple[Any, ...]:
    """What a config key can change in a module built from the config, cheaply: its class, its
    plain settings (e.g. Mamba's ``activation`` string) and functions it holds."""
    import types

    funcs = tuple(
        sorted(
            (k, getattr(v, "__qualname__", repr(v)))
            for k, v in vars(module).items()
            if isinstance(v, types.FunctionType | types.BuiltinFunctionType)
        )
    )
    from glu_probe._settings import plain_settings

    # The class by name: parametrized modules (weight_norm) get a new class per instance.
    cls = type(module)
    return (cls.__module__, cls.__qualname__, plain_settings(module), funcs)


def _rebuild_host(
    model: nn.Module, owner_path: str, config: Any
) -> tuple[str, nn.Module, str | None] | None:
    """The outermost ``PreTrainedModel`` at or above ``owner_path`` built from ``config`` or from
    a config holding it (``(path, module, attribute)``: LLaVA's ``text_config``)."""
    for p, m in [
        *reversed(_ancestors(model, owner_path)),
        (owner_path, model.get_submodule(owner_path)),
    ]:
        c = _hf_config(m)
        if c is None or not _is_pretrained(m):
            continue
        if c is config:
            return p, m, None
        attr = next((k for k, v in vars(c).items() if v is config), None)
        if attr is not None:
            return p, m, attr
    return None


#: How a config key left unchanged because it would change only the blocks the swap leaves as
#: the host's own (left out by include/exclude, skipped under strict=False) is reported (in
#: ``SwapReport.config_skipped``, without a warning: the partial swap is asked for).
_EXCLUDED_ONLY = "it would change the blocks this swap leaves unchanged"


#: How a key is reported that is left unchanged because the config cannot be checked by a
#: rebuild and blocks the swap leaves unchanged follow it (also without a warning).
_UNCHECKED_KEPT = "the config cannot be checked by a rebuild"


def _shared_keys(
    model: nn.Module,
    owner_path: str,
    config: Any,
    planned: dict[str, Any],
    swapped: list[str],
    excluded: Sequence[str] = (),
) -> dict[str, str] | str:
    """Keys of ``planned`` whose new value changes a module outside the ``swapped`` paths of a
    model rebuilt from the updated config (on the ``meta`` device), with the reason; a string
    saying why when the host cannot be rebuilt that way (nothing checked). A reason for a key
    that changes only blocks in ``excluded`` (the host's own blocks the swap leaves) starts with
    :data:`_EXCLUDED_ONLY`. Paths are the root's; those outside the rebuilt host are ignored."""
    found = _rebuild_host(model, owner_path, config)
    if found is None:
        return (
            "no Hugging Face PreTrainedModel at or above "
            f"{owner_path or 'the root'} is built from this config"
        )
    host_path, host, attr = found
    configs = [host.config, *(v for v in vars(host.config).values() if hasattr(v, "to_dict"))]
    if any(getattr(c, "use_pretrained_backbone", False) for c in configs):
        return "use_pretrained_backbone: rebuilding it would load backbone weights"
    rel = [_relative(p, host_path) for p in swapped if _under(p, host_path)]
    rel_excluded = [_relative(p, host_path) for p in excluded if _under(p, host_path)]

    def inside(name: str, paths: list[str]) -> bool:
        return any(name == q or name.startswith(q + ".") for q in paths)

    def signatures(key: str | None) -> dict[str, tuple[Any, ...]]:
        top = copy.deepcopy(host.config)
        cfg = getattr(top, attr) if attr else top
        if key is not None:
            setattr(cfg, key, planned[key])
        with (
            warnings.catch_warnings(),
            torch.random.fork_rng(devices=[]),
            torch.device("meta"),
        ):
            warnings.simplefilter("ignore")
            rebuilt = type(host)(top)
        return {n: _module_signature(m) for n, m in rebuilt.named_modules() if not inside(n, rel)}

    def failed(err: Exception) -> str:
        msg = " ".join(str(err).split())
        return f"{type(err).__name__}: {msg[:160]}{'...' if len(msg) > 160 else ''}"

    try:
        base = signatures(None)
    except Exception as err:
        return f"rebuilding {type(host).__name__} on meta failed ({failed(err)})"
    out: dict[str, str] = {}
    for key in planned:
        try:
            changed = signatures(key)
        except Exception as err:
            # The host builds from its config but not with this value (OpenAI GPT's afn
            # accepts relu/silu/gelu/swish only: a saved "sigmoid" could not be built at all;
            # review, session 25): the key stays.
            out[key] = (
                f"{type(host).__name__} cannot be built with {key}={planned[key]!r} "
                f"({failed(err)}): left unchanged"
            )
            continue
        diff = sorted(n for n in set(base) | set(changed) if base.get(n) != changed.get(n))
        if diff and all(inside(d, rel_excluded) for d in diff):
            out[key] = (
                f"{_EXCLUDED_ONLY} ({', '.join(sorted(excluded)[:3])}"
                f"{', ...' if len(excluded) > 3 else ''}) as well ({key}={planned[key]!r})"
            )
        elif diff:
            shown = ", ".join(d or "<root>" for d in diff[:3]) + (", ..." if len(diff) > 3 else "")
            out[key] = (
                f"{type(host).__name__} rebuilt from the config with {key}="
                f"{planned[key]!r} would also change {shown} (outside the swapped "
                "blocks): left unchanged"
            )
    return out


def _rebuilds_record(report: SwapReport, record: Any, owner_path: str) -> bool:
    """Whether every block of ``report`` is one a config record of its variant gives under
    ``"widths"`` with the width it got (native width -> swapped width): the reload recipe's
    swap of a model rebuilt from the config, which needs no width key (its blocks of several
    widths are told already: it warned that the key was left unchanged; re-review, session
    27)."""
    if not isinstance(record, dict) or record.get("variant") != report.variant:
        return False
    per_block = _record_widths(record)
    return per_block is not None and all(
        per_block.get(_relative(e.path, owner_path)) == (e.source_hidden, e.hidden_features)
        for e in report.entries
    )


def _update_config(
    model: nn.Module,
    owner_path: str,
    owner: nn.Module,
    config: Any,
    report: SwapReport,
    adapters: list[MLPAdapter],
    act_name: str | None,
    excluded: Sequence[str] = (),
    earlier: Sequence[str] = (),
    replaced: Mapping[str, Sequence[str]] | None = None,
) -> tuple[dict[str, tuple[Any, Any]], dict[str, str], str | None]:
    """Update ``config`` for the blocks of ``report``: ``(updates, keys left unchanged and why,
    why the shared-key check did not run or None)``. ``excluded``: root paths of the host's own
    blocks under this config that the swap leaves (their keys are kept); ``earlier``: those of
    blocks an earlier swap built (a model rebuilt from the config is swapped there too);
    ``replaced``: block path -> root paths of the modules its swap takes out (a layer rewired
    in place keeps the rest, which the shared-key check must still see; the whole block by
    default)."""
    widths = {e.hidden_features for e in report.entries}
    width_keys: set[str] = set()
    act_keys: set[str] = set()
    old_record = getattr(config, RECORD_ATTR, None)
    for adapter in {id(a): a for a in adapters}.values():
        wk, ak = adapter.config_keys(owner)
        if wk is None and ak is None and isinstance(old_record, dict):
            wk, ak = old_record.get("width_key"), old_record.get("act_key")
        if wk and adapter.width_key_must_match:
            sources = {e.source_hidden for e in report.entries if e.adapter == adapter.name}
            value = getattr(config, wk, None)
            # (a per-layer list, as Gemma 3n's intermediate_size, is not this width: left alone)
            if not isinstance(value, int) or sources != {value}:
                wk = None
        if wk:
            width_keys.add(wk)
        if ak:
            act_keys.add(ak)
    hidden = next(iter(widths)) if len(widths) == 1 else None
    if hidden is None and width_keys and not _rebuilds_record(report, old_record, owner_path):
        warnings.warn(
            f"swap_mlp: blocks got different widths {sorted(widths)}; config keys "
            f"{sorted(width_keys)} left unchanged",
            UserWarning,
            stacklevel=external_stacklevel(),
        )
    planned: dict[str, Any] = {}
    for key in sorted(width_keys):
        if hidden is not None and hasattr(config, key):
            planned[key] = hidden
    act = HF_ACT_NAMES.get(act_name or "", HF_ACT_NAMES[VARIANT_ACTIVATION[report.variant]])
    for key in sorted(act_keys):
        if hasattr(config, key):
            planned[key] = act
    changing = {k: v for k, v in planned.items() if getattr(config, k) != v}
    left: dict[str, str] = {}
    unchecked: str | None = None
    if changing:
        replaced = replaced or {}
        swapped = [q for e in report.entries for q in replaced.get(e.path, [e.path])]
        swapped += list(earlier)
        shared = _shared_keys(model, owner_path, config, changing, swapped, excluded)
        if isinstance(shared, str) and excluded:
            # Nothing says which modules the keys change, and blocks of the host's own are
            # left under this config: a key they follow would no longer describe them.
            shown = ", ".join(excluded[:3]) + (", ..." if len(excluded) > 3 else "")
            left = {
                k: f"{_UNCHECKED_KEPT} ({shared}), and the blocks this swap leaves unchanged "
                f"({shown}) may follow it: left unchanged ({k}={v!r})"
                for k, v in changing.items()
            }
        elif isinstance(shared, str):
            unchecked = shared
        else:
            left = shared
    for key in left:
        del planned[key]
        if left[key].startswith((_EXCLUDED_ONLY, _UNCHECKED_KEPT)):
            continue
        warnings.warn(
            f"swap_mlp: config key {key!r} not updated: {left[key]}",
            UserWarning,
            stacklevel=external_stacklevel(),
        )
    updates: dict[str, tuple[Any, Any]] = {}
    for key, value in planned.items():
        updates[key] = (getattr(config, key), value)
        setattr(config, key, value)

    # The host's own blocks (what a model rebuilt from this config holds where the width key is
    # not written): carried through a chain of swaps, so that _resolve_width applies the
    # recorded width to such blocks only, not to a model of other sizes built from a copy of
    # this config (review, session 20: GPT-J at n_embd 64 got a width recorded at 16). A record
    # that writes no width key gets them from every block under the config (_describe_blocks):
    # copied here, a partial swap of other blocks (the decoder after the encoder) recorded the
    # encoder's native width with the decoder's width (re-review, session 26).
    def unique(values: set[Any]) -> Any:
        return next(iter(values)) if len(values) == 1 else None

    native = (
        {k: old_record.get(k) for k in ("native_hidden", "in_features", "out_features")}
        if isinstance(old_record, dict) and "native_hidden" in old_record
        else {
            "native_hidden": unique({e.source_hidden for e in report.entries}),
            "in_features": unique({e.in_features for e in report.entries}),
            "out_features": unique({e.out_features for e in report.entries}),
        }
    )
    rec = {
        "variant": report.variant,
        "match": report.match,
        "hidden": hidden,
        # the alignment that width was made with (a later swap that reuses the width says it)
        "multiple_of": unique({e.multiple_of for e in report.entries}),
        "width_key": next(iter(sorted(k for k in width_keys if k in planned)), None),
        "act_key": next(iter(sorted(k for k in act_keys if k in planned)), None),
        **native,
    }
    updates[RECORD_ATTR] = (old_record, rec)
    setattr(config, RECORD_ATTR, rec)
    return updates, left, unchecked
