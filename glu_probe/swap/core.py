"""The MLP-swap driver: walk a model, ask adapters, build parameter-matched replacements.

``swap_mlp`` is all-or-nothing: every block is recognised, described and rebuilt before the
first one is installed, and any module that *looks* like an MLP but no adapter recognises makes
the call fail (``strict=True``) instead of leaving a half-swapped model.

Width rule (``match="params"``): the source block has ``P_src`` parameters (its linear layers
and, for timm, its inner norm). A replacement of width ``h`` has ``P(h) = slope·h + const``
parameters (closed form, :func:`glu_probe.modules.mlp_num_params` plus the norm's per-unit
parameters), and ``h`` is the multiple of ``multiple_of`` closest to the solution of
``P(h) = P_src``. If that alignment cannot meet ``tolerance`` (relative difference, default 1%),
the largest divisor of ``multiple_of`` that can is used instead, with a warning. The resulting
error is at most ``multiple_of_used · slope / 2`` parameters.

This module is the orchestration: :func:`swap_mlp` (checks, selection, the all-or-nothing plan)
and :func:`_install_and_configure`, with the width rule (:func:`_resolve_width`). The pieces
they use have their own modules: the shared types and the adapter registry (``base``), the
host model and config above a block (``hosts``), copies of the host's own blocks (``origin``),
the host's initialisation (``init``), block selection (``select``), the config record
(``record``) and config keys (``config_update``), and the per-block safety checks (``guards``).
The names code imports from here (``MLPAdapter``, ``register_adapter``, ``host_init``, ...) are
re-exported.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from glu_probe.modules import (
    GATED_VARIANTS,
    VARIANTS,
    _block_keywords,
    _check_keywords,
    _param_line,
    activation_name,
    closest_width,
)

from .._warnings import external_stacklevel
from .base import (
    _REGISTER_HELP,
    RECORD_ATTR,
    MLPAdapter,
    MLPSpec,
    SwapEntry,
    SwapReport,
    UnsupportedModelError,
    _params,
    register_adapter,
    registered_adapters,
    unregister_adapter,
)
from .base import HF_ACT_NAMES as HF_ACT_NAMES
from .base import VARIANT_ACTIVATION as VARIANT_ACTIVATION
from .base import spec_from_glu_probe as spec_from_glu_probe
from .config_update import _sync_config_copies, _update_config
from .guards import (
    _check_hooks,
    _check_tied,
    _keep_dropout_modes,
    _keep_frozen,
    _same_kind,
    _Snapshot,
    _warn_mixed_dtypes,
    hooked_modules,
)
from .hosts import _hf_config, _is_pretrained, _relative, _under, config_owner
from .origin import ORIGIN_ATTR, _built_by_swap, _meta_copy, _origin_of
from .origin import _shell as _shell
from .origin import _stand_in as _stand_in
from .record import (
    _block_signature,
    _describe_blocks,
    _describe_differing,
    _differing_kwargs,
    _listed,
    _listed_by_top,
    _realigns,
    _rebuilt_width,
    _record_at_root,
    _record_kwargs,
    _recordable_kwargs,
    _recorded_alignment,
    _recorded_matches,
    _recorded_width,
    _undescribed,
    _warn_mixed_record,
)
from .select import (
    PathFilter,
    _custom_linears,
    _looks_like_mlp,
    _select_blocks,
    _uncovered_weights,
    _walk,
)
from .weight_init import host_init

__all__ = [
    "MLPAdapter",
    "MLPSpec",
    "SwapEntry",
    "SwapReport",
    "UnsupportedModelError",
    "register_adapter",
    "registered_adapters",
    "swap_mlp",
    "unregister_adapter",
]


def _resolve_width(
    spec: MLPSpec,
    variant: str,
    match: str,
    multiple_of: int,
    tolerance: float | None,
    record: dict[str, Any] | None,
    path: str | None = None,
    place: Literal["rebuilt", "own", "built"] = "rebuilt",
    listed: bool = False,
) -> tuple[int, int]:
    """(hidden width, alignment used) of the replacement for ``spec``.

    ``place``: where the block is. ``"rebuilt"``: a host's own block of a model that holds no
    block a swap built (a model rebuilt from a saved config, swapped by the reload recipe);
    ``"own"``: a host's own block of a model that holds some (a partial swap after another);
    ``"built"``: a block an earlier swap built. ``path``: the block's path relative to the
    model owning the config, for the record's per-block ``"widths"``.

    Under a config record of this variant and match, a rebuilt block gets the width the record
    gives it (its entry under ``"widths"``, or the record's one width): a chain's width, so that
    the saved state dict loads. A host's own block in a partial swap after another gets the width
    the record gives the blocks of its native width (``"widths"`` entries of that native width
    that agree, or ``"native_hidden"`` -> ``"hidden"``) only where that width is what matching
    this block's parameters with the alignment the width was made with gives (one width per
    native width, whatever this call's ``multiple_of`` / ``tolerance``; never another block's
    width, a chain's, or one given by ``hidden_features``). A width taken from the record is
    reported with the alignment it was made with (the record's, per block under
    ``"alignments"`` where they differ), not this call's. Otherwise the width comes from this
    call's arguments and the block's own width, as in a swap of a fresh model.

    ``listed``: the block's sub-model is one a composite model's top record of this variant and
    match names (what the reload recipe passes); a rebuilt block then takes the width its own
    record (of this variant) gives whatever that record's match."""
    gated = variant in GATED_VARIANTS
    same = (
        record is not None
        and record.get("variant") == variant
        and record.get("match", match) == match
    )
    # A composite model's sub-models each keep their own record, but the recipe passes the top
    # record's match (the last swap's) to all: a tower swapped by width before another by
    # params was rebuilt by params, and its state dict did not load (re-review, session 27).
    described = same or (listed and record is not None and record.get("variant") == variant)
    if described and record is not None and place == "rebuilt":
        # A host rebuilt from a config this function already updated. Only for a swap of the
        # same match: a config updated by match="width" made a later match="params" swap keep
        # that width, +50% parameters without a word (review, session 20). Also for
        # match="width" (the reload recipe passes the record's match): a chain that ended with
        # a match="width" swap has the width of the chain, not of the host's own block.
        taken = _rebuilt_width(spec, record, path)
        if taken is not None:
            return taken
    if (
        same
        and record is not None
        and place == "built"
        and _recorded_width(record, path) == (spec.hidden_features)
    ):
        # A re-swap of a block a swap built keeps its width, and so the alignment that width
        # was made with: it went to 1 in the report and the record (re-review, session 26).
        return spec.hidden_features, _recorded_alignment(record, path) or 1
    if match == "width":
        return spec.hidden_features, 1
    if gated == spec.gated:
        return spec.hidden_features, 1  # same family: identical parameter count at equal width
    slope, const = _param_line(spec.in_features, spec.out_features, spec.bias, gated)
    if spec.norm is not None:
        slope += _params(spec.norm) // spec.hidden_features
    target = spec.num_params
    if same and record is not None and place != "built":
        # Partial swaps of one variant chain: the width an earlier swap matched for blocks of
        # this native width, with its alignment. Checked against this block's own match: the
        # record's width for blocks of native width 256 went to any block of that width, also
        # when it was the decoder's (128 -> 85) or a chain's (review, session 26).
        for h, d in _recorded_matches(spec, record):
            if closest_width(target, slope, const, d) == h:
                return h, d
    divisors = [d for d in range(multiple_of, 0, -1) if multiple_of % d == 0]
    best: tuple[int, int] | None = None
    for d in divisors:
        h = closest_width(target, slope, const, d)
        err = abs(slope * h + const - target) / target
        if best is None:
            best = (h, d)
        if tolerance is None or err <= tolerance:
            if d != multiple_of:
                h0 = best[0]
                err0 = abs(slope * h0 + const - target) / target
                warnings.warn(
                    f"swap_mlp: multiple_of={multiple_of} gives width {h0} with a "
                    f"{100 * err0:.2f}% parameter mismatch (> tolerance "
                    f"{100 * (tolerance or 0):.2f}%); using multiple_of={d} "
                    f"(width {h}, {100 * err:.2f}%) instead",
                    UserWarning,
                    stacklevel=external_stacklevel(),  # (the caller of swap_mlp)
                )
            return h, d
    h = closest_width(target, slope, const, 1)
    err = abs(slope * h + const - target) / target
    warnings.warn(
        f"swap_mlp: no width matches {target} parameters within {100 * (tolerance or 0):.2f}% "
        f"(best: {h}, {100 * err:.2f}%); the block is too small for the tolerance",
        UserWarning,
        stacklevel=external_stacklevel(),
    )
    return h, 1


#: ``make_mlp`` arguments the default :meth:`MLPAdapter.build` takes from the source block.
_FROM_SOURCE = frozenset({"bias", "drop", "norm_layer", "use_conv", "device", "dtype"})


def swap_mlp(
    model: nn.Module,
    variant: str,
    *,
    match: Literal["params", "width"] = "params",
    multiple_of: int = 8,
    strict: bool = True,
    tolerance: float | None = 0.01,
    hidden_features: int | None = None,
    init: Literal["host", "default"] = "host",
    include: PathFilter | None = None,
    exclude: PathFilter | None = None,
    **module_kwargs: Any,
) -> SwapReport:
    """Replace every MLP block of ``model`` in place by a ``variant`` block.

    Args:
        model: a timm / Hugging Face / plain PyTorch model (see the registered adapters).
        variant: ``"glu" | "bilinear" | "reglu" | "geglu" | "swiglu"`` (gated) or
            ``"relu" | "gelu" | "silu"`` (non-gated).
        match: ``"params"`` keeps each block's parameter count (gated <-> non-gated via the
            closed-form counts; same family keeps the width), ``"width"`` keeps the hidden
            width (the gated width for gated blocks).
        multiple_of: alignment of new widths under ``match="params"``.
        strict: if ``True`` (default), any MLP-looking module that no adapter recognises raises
            :class:`UnsupportedModelError`; if ``False`` it is left alone with a warning and
            listed in ``SwapReport.unrecognised``. A model with no recognised block always raises.
        tolerance: largest accepted relative parameter difference under ``match="params"``
            before ``multiple_of`` is relaxed (warning); ``None`` never relaxes it.
        hidden_features: use this width for every block instead of matching.
        init: ``"host"`` initialises new blocks with the host's conventions (see
            :func:`host_init`); ``"default"`` keeps ``nn.Linear`` defaults.
        include: swap only the recognised blocks whose path (as ``SwapReport.paths`` gives it)
            matches: a regular expression (a string or a compiled ``re.Pattern``) matched
            against the whole path (``r"blocks\\.[0-5]\\.mlp"``; a string also matches the path
            equal to it, so a plain path matches itself), any iterable of them (a list, tuple,
            set or generator; any may match), or a callable ``(path, module) -> bool``. A block
            reachable under several names of its parent (``layer.ffn = layer.mlp``) matches
            under any of them. ``None``: every block.
        exclude: leave the blocks it matches (same forms) unchanged; they are listed in
            ``SwapReport.excluded``. A pattern or callable that matches no recognised block
            warns (a typo would otherwise swap everything). MLP-looking modules that no adapter
            recognises are left alone without an error (``strict=True``) where ``include`` /
            ``exclude`` leave them out and no block inside them is swapped.
        module_kwargs: passed to the block constructors (e.g. ``packed=False``,
            ``approximate="tanh"`` for ``"geglu"``); one that the new block does not take is a
            ``TypeError`` before anything is changed.

    Returns:
        A :class:`SwapReport` (per-block paths, widths, parameter counts, config updates).

    The device, dtype, training mode, frozen state (``requires_grad``, per layer role where a
    block is partly frozen), dropout probabilities, bias flags and inner norm of each block are
    kept. A Hugging Face host's config is updated in place (width and, where only the MLP uses
    it, the activation; plus a ``glu_probe_swap`` record), so a model rebuilt from it and swapped
    again has the same structure. Another model built from the *same config object* sees those
    updates too (transformers keeps a reference, not a copy): build each model from its own
    config, or swap a ``copy.deepcopy`` of the model.

    All or nothing: every block is built before the first is installed, and if installing or
    updating the configs fails, the model's modules and configs are restored before the error
    propagates.
    """
    if torch.is_inference_mode_enabled():
        # Blocks built under inference mode hold inference tensors, which cannot train (a
        # Lightning validation hook runs under it; review, session 18): build them outside it.
        # (Not `ntk.functional.allows_autograd`: its extra frame would shift the stacklevel of
        # every warning the swap gives.)
        with torch.inference_mode(False):
            return swap_mlp(
                model,
                variant,
                match=match,
                multiple_of=multiple_of,
                strict=strict,
                tolerance=tolerance,
                hidden_features=hidden_features,
                init=init,
                include=include,
                exclude=exclude,
                **module_kwargs,
            )
    if not isinstance(model, nn.Module):
        raise TypeError(f"swap_mlp expects an nn.Module, got {type(model).__name__}")
    if not isinstance(variant, str) or variant.lower() not in VARIANTS:
        raise ValueError(f"unknown MLP variant {variant!r}; expected one of {sorted(VARIANTS)}")
    variant = variant.lower()
    if match not in ("params", "width"):
        raise ValueError(f"match must be 'params' or 'width', got {match!r}")
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise ValueError(f"multiple_of must be a positive int, got {multiple_of!r}")
    if tolerance is not None and not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1) or None, got {tolerance!r}")
    if hidden_features is not None and (
        isinstance(hidden_features, bool)
        or not isinstance(hidden_features, int)
        or hidden_features < 1
    ):
        raise ValueError(f"hidden_features must be a positive int, got {hidden_features!r}")
    if init not in ("host", "default"):
        raise ValueError(f"init must be 'host' or 'default', got {init!r}")
    if "act_layer" in module_kwargs:
        raise TypeError("swap_mlp: the variant fixes the activation; do not pass act_layer")
    taken = sorted(set(module_kwargs) & _FROM_SOURCE)

    adapters = registered_adapters()
    found: list[tuple[str, nn.Module, MLPAdapter]] = []
    others: list[tuple[str, nn.Module]] = []
    position: dict[str, int] = {}  # walk order, to list paths in model order
    for path, module, adapter in _walk(model, "", adapters):
        position[path] = len(position)
        if adapter is None:
            others.append((path, module))
        else:
            found.append((path, module, adapter))
    if any(path == "" for path, _, _ in found):
        raise UnsupportedModelError(
            f"the model itself is an MLP block ({type(model).__name__}); swap_mlp replaces blocks "
            "inside a host model. Build the new block directly with glu_probe.make_mlp."
        )
    matched = [p for p, _, _ in found]
    # (path, module, description, root paths of the recognised blocks inside it)
    suspects: list[tuple[str, nn.Module, str, list[str]]] = []
    for p, m in others:
        if not p or not _looks_like_mlp(p, m, adapters):
            continue
        inner = [q[len(p) + 1 :] for q in matched if q.startswith(p + ".")]
        if not inner:
            # (adapters that run the block to check its form decline hooked blocks)
            hooked = ", with hooks the new block would not carry" if hooked_modules(m) else ""
            suspects.append((p, m, f"{p} ({type(m).__name__}{hooked}{_custom_linears(m)})", []))
            continue
        # An ancestor of recognised blocks (a wrapper) is fine unless it holds weights of its
        # own outside them: a mixture-of-experts block whose shared expert is a LlamaMLP keeps
        # its routed experts and router, which a swap of the shared expert alone would leave
        # behind (a silent partial swap).
        left = _uncovered_weights(m, inner)
        if left:
            shown = ", ".join(left[:4]) + (", ..." if len(left) > 4 else "")
            what = (
                f"{p} ({type(m).__name__}, whose weights {shown} are outside the recognised "
                f"block(s) {', '.join(inner)}; e.g. a mixture-of-experts block)"
            )
            suspects.append((p, m, what, [f"{p}.{q}" for q in inner]))
    names = ", ".join(a.name for a in adapters)
    if not found:
        what = (
            f"MLP-like modules no adapter recognises: {[s[2] for s in suspects]}"
            if suspects
            else "no MLP-like module at all"
        )
        raise UnsupportedModelError(
            f"swap_mlp found no recognised MLP block in {type(model).__name__} ({what}; "
            f"adapters tried: {names}). {_REGISTER_HELP}"
        )

    # Every path of every block, aliases included: a model registered under two names
    # (``self.net = m; self.backbone = m``) or a block under two attribute names is found once
    # by the walk (``named_children`` de-duplicates) but reaches its parameters by each name.
    candidate_ids = {id(m) for _, m, _ in found} | {id(m) for _, m, _, _ in suspects}
    paths_of: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        if id(m) in candidate_ids:
            paths_of.setdefault(id(m), []).append(n)
    all_found = found
    found, excluded, left_out = _select_blocks(model, found, suspects, paths_of, include, exclude)
    unrecognised = [s for s in suspects if s[0] not in left_out]
    if unrecognised:
        msg = (
            f"{type(model).__name__} is only partly recognised: {len(all_found)} MLP block(s) "
            f"({', '.join(matched[:4])}{', ...' if len(matched) > 4 else ''}) but also "
            f"{[s[2] for s in unrecognised]} that no adapter ({names}) recognises. "
            f"{_REGISTER_HELP}"
        )
        if strict:
            raise UnsupportedModelError(
                msg + " Pass strict=False to swap only the recognised ones (or leave these "
                "modules out with exclude=)."
            )
        warnings.warn(msg, UserWarning, stacklevel=external_stacklevel())
    excluded.sort(key=position.__getitem__)
    _warn_mixed_record(model, found, variant)

    # Parameters of a block that are also used elsewhere (tied to another block's, or to a
    # non-MLP module): a swap would untie them and miscount. Whole shared blocks are fine.
    param_names: dict[int, list[str]] = {}
    for n, q in model.named_parameters(remove_duplicate=False):
        param_names.setdefault(id(q), []).append(n)

    # Describe and build everything before installing anything: all or nothing.
    plan: list[tuple[str, nn.Module, MLPAdapter, nn.Module, SwapEntry]] = []
    first_use: dict[int, tuple[nn.Module, SwapEntry]] = {}
    failed: dict[int, str] = {}
    skipped: list[str] = []
    realigned: list[tuple[str, int, int]] = []  # (path, resolved width, built width)
    recordable = _recordable_kwargs(module_kwargs, variant)
    same_kind: list[str] = []  # blocks replaced by fresh ones of the function class they had
    any_built = any(_built_by_swap(block) is not None for _, block, _ in all_found)
    kwargs_differ: dict[str, str] = {}  # what differs -> first path
    for path, old, adapter in found:
        if id(old) in failed:
            skipped.append(f"{path} ({type(old).__name__}, the block at {failed[id(old)]})")
            continue
        if id(old) in first_use:
            # One block under several parents (weights shared across layers): one replacement,
            # installed at every path, so the sharing survives the swap.
            new, first = first_use[id(old)]
            entry = dataclasses.replace(first, path=path, shared_with=first.path)
            plan.append((path, old, adapter, new, entry))
            continue
        try:
            _check_hooks(old, adapter)
            _check_tied(path, old, adapter, paths_of[id(old)], param_names)
            spec = adapter.describe(old)
        except UnsupportedModelError as err:
            what = f"{path} ({type(old).__name__}; adapter {adapter.name!r}: {err})"
            if strict:
                raise UnsupportedModelError(
                    f"swap_mlp cannot swap the block at {what}. {_REGISTER_HELP} Pass "
                    "strict=False to swap only the other blocks."
                ) from err
            failed[id(old)] = path
            skipped.append(what)
            continue
        if taken and type(adapter).build is MLPAdapter.build:
            # The default build takes these from the source block (a raw "make_mlp() got
            # multiple values for keyword argument" before: review, session 18); an adapter
            # with its own build may take them.
            raise TypeError(
                f"swap_mlp: {taken} are taken from each block being replaced (its biases, "
                f"dropout, norm, layout, device and dtype) by adapter {adapter.name!r}, not from "
                "swap_mlp's arguments; change them on the new blocks after the swap"
            )
        # (checked before the width is resolved: a refused call gave its width warnings first)
        if module_kwargs and type(adapter).build is MLPAdapter.build:
            _check_module_kwargs(variant, module_kwargs)
        owner = config_owner(model, path)
        record = getattr(owner[2], RECORD_ATTR, None) if owner is not None else None
        if not isinstance(record, dict):
            record = None
        # a host's own block under a record of this variant: a model rebuilt from a saved
        # config, or a partial swap after another (a re-swap of swapped blocks replaces them)
        own_under_record = (
            record is not None and record.get("variant") == variant and _built_by_swap(old) is None
        )
        kw_diff = (
            _differing_kwargs(record, recordable) if own_under_record and record is not None else {}
        )
        if hidden_features is not None:
            hidden, used = hidden_features, 1
        else:
            rel = _relative(path, owner[0]) if owner is not None else None
            place: Literal["rebuilt", "own", "built"] = (
                "built" if _built_by_swap(old) is not None else "own" if any_built else "rebuilt"
            )
            listed = (
                place == "rebuilt"
                and record is not None
                and owner is not None
                and record.get("match") != match
                and _listed_by_top(model, owner[0], owner[2], variant, match)
            )
            hidden, used = _resolve_width(
                spec, variant, match, multiple_of, tolerance, record, rel, place, listed
            )
        new = adapter.build(spec, variant, hidden, **module_kwargs)
        built = getattr(new, "hidden_features", None)
        if isinstance(built, int) and built != hidden:
            # A module keyword changed the width after it was resolved (align_to rounds the
            # gated width up): the report said 170 for a 192-wide block, +12.8% parameters
            # under match="params" with no word (review, session 20). The real width is
            # reported, and the change is told once per swap.
            realigned.append((path, hidden, built))
            hidden = built
        elif (
            isinstance(built, int)
            and set(kw_diff) == {"align_to"}
            and not _realigns(built, kw_diff["align_to"][0])
        ):
            # An align_to that changes neither this block's width nor that of the record's
            # (128 with align_to 64 or none) builds the same block: the recipe's swap of a
            # composite whose towers differ only so warned of a difference it did not make.
            kw_diff = {}
        if kw_diff:
            kwargs_differ.setdefault(_describe_differing(kw_diff), path)
        _warn_mixed_dtypes(path, old, new, adapter)
        # Quiet for the reload recipe's swap of a model rebuilt from a saved config: a host's own
        # block under a record of this variant that does not list it as left out, in a model
        # holding no block a swap built. (A partial swap after another is not a rebuild: its
        # trained block was dropped without a word; review, session 23.)
        rebuilt = (
            own_under_record
            and not any_built
            and not _listed(
                record.get("excluded") if record else None, path, owner[0] if owner else ""
            )
        )
        if _same_kind(spec, new, hidden) and not rebuilt:
            same_kind.append(f"{path} ({spec.kind or type(old).__name__}, {spec.activation})")
        origin = _origin_of(old)
        if init == "host":
            host_init(model, path, new, source=old, origin=origin)
        # the host's own block, for a later swap of this place (a meta copy: no storage)
        new.__dict__[ORIGIN_ATTR] = origin if origin is not old else _meta_copy(old)
        new.train(old.training)
        _keep_dropout_modes(path, old, new, adapter)
        _keep_frozen(path, old, new, adapter)
        entry = SwapEntry(
            path=path,
            adapter=adapter.name,
            source=spec.kind or type(old).__name__,
            source_activation=spec.activation,
            source_gated=spec.gated,
            source_hidden=spec.hidden_features,
            hidden_features=hidden,
            params_before=spec.num_params,
            params_after=_params(new),
            multiple_of=used,
            in_features=spec.in_features,
            out_features=spec.out_features,
        )
        plan.append((path, old, adapter, new, entry))
        first_use[id(old)] = (new, entry)
    if same_kind:
        warnings.warn(
            f"swap_mlp: {len(same_kind)} block(s) already are what this swap builds ({variant!r} "
            f"at the same width: {', '.join(same_kind[:3])}"
            + (", ..." if len(same_kind) > 3 else "")
            + "): they are replaced by newly initialised blocks, and their weights are dropped. "
            "To keep trained weights in glu_probe blocks, copy them over with "
            "glu_probe.convert.convert_mlp_state_dict (e.g. from_hf_llama) instead",
            UserWarning,
            stacklevel=external_stacklevel(),
        )
    for differing, path0 in kwargs_differ.items():
        warnings.warn(
            f"swap_mlp: the config's {RECORD_ATTR} record of {path0} was made by a swap to "
            f"{variant!r} with other module keywords ({differing}): a model rebuilt from a saved "
            "config gets the blocks of the saved model only when the swap is given the same "
            "ones, as the reload recipe does with **record['module_kwargs']. The record will "
            "describe this swap's keywords",
            UserWarning,
            stacklevel=external_stacklevel(),
        )
    if realigned:
        path0, resolved, built = realigned[0]
        warnings.warn(
            f"swap_mlp: the new blocks are wider or narrower than the resolved width: {path0} "
            f"{resolved} -> {built}"
            + (f" (and {len(realigned) - 1} more)" if len(realigned) > 1 else "")
            + " (a module keyword such as align_to changed it); the report gives the built "
            "widths" + (", and the parameter counts no longer match" if match == "params" else ""),
            UserWarning,
            stacklevel=external_stacklevel(),
        )
    if skipped:
        msg = (
            f"swap_mlp: {len(skipped)} block(s) matched by an adapter cannot be swapped and are "
            f"left unchanged: {skipped}. {_REGISTER_HELP}"
        )
        if not plan:
            raise UnsupportedModelError(f"swap_mlp found no block it can swap: {msg}")
        warnings.warn(msg, UserWarning, stacklevel=external_stacklevel())
    report = SwapReport(variant=variant, match=match, entries=[e for *_, e in plan])
    report.unrecognised = [s[2] for s in unrecognised] + skipped
    report.excluded = excluded
    # What the model holds after the swap, outside this swap's blocks: the host's own blocks
    # (left out, skipped by strict=False, or MLP-like modules no adapter recognises), which the
    # config record lists under "excluded" for the reload recipe, and the blocks an earlier
    # swap built, which the record describes only if they are what this swap builds.
    planned = {path for path, *_ in plan}
    host_own: list[str] = []
    earlier: dict[str, tuple[str, int | None]] = {}
    for path, block, _ in all_found:
        if path in planned:
            continue
        built = _built_by_swap(block)
        if built is None:
            host_own.append(path)
        else:
            earlier[path] = _block_signature(built)
    own = set(host_own)
    host_own += [p for p, _, _, inner in suspects if all(q in own for q in inner)]
    host_own.sort(key=position.__getitem__)
    # Installing and updating the configs runs user code (a registered adapter's install, a
    # config's __setattr__ validators): a failure part way through restores the model and its
    # configs as they were, so the swap stays all or nothing.
    undo = _Snapshot(model)
    try:
        _install_and_configure(
            model,
            plan,
            paths_of,
            report,
            variant,
            match,
            host_own,
            earlier,
            module_kwargs,
            # (those holding none of the swapped blocks are under "excluded" already)
            lenient=[s[0] for s in unrecognised if s[0] not in host_own],
        )
    except BaseException:
        undo.restore()
        raise
    return report


def _install_and_configure(
    model: nn.Module,
    plan: list[tuple[str, nn.Module, MLPAdapter, nn.Module, SwapEntry]],
    paths_of: dict[int, list[str]],
    report: SwapReport,
    variant: str,
    match: Literal["params", "width"],
    host_own: Sequence[str] = (),
    earlier: dict[str, tuple[str, int | None]] | None = None,
    module_kwargs: Mapping[str, Any] | None = None,
    lenient: Sequence[str] = (),
) -> None:
    """The part of :func:`swap_mlp` that changes the model: install the planned blocks, repoint
    aliases and update the Hugging Face configs (filling ``report``'s config fields).

    ``lenient``: root paths of the MLP-like modules no adapter recognised that ``strict=False``
    left in place. A record above them says ``"strict": False``: the reload recipe's swap of a
    model rebuilt from the config meets them again (a mixture-of-experts wrapper around a
    swapped shared expert, which ``exclude=`` cannot leave out; review, session 25).

    ``host_own``: root paths of the blocks (and MLP-like modules) that are still the host's own
    after the swap; ``earlier``: root path -> (variant, width) of the blocks an earlier swap
    built that this one leaves in place. Each config's record lists the first (relative to the
    sub-model owning the config: what a model rebuilt from it holds) under ``"excluded"``, and
    under ``"mixed"`` those of the second that it does not describe."""
    earlier = earlier or {}
    replaced = {path: _replaced_paths(path, old, adapter) for path, old, adapter, *_ in plan}
    # (read before installing: a layer rewired in place holds its new block afterwards)
    built_before = [_built_by_swap(old) is not None for _, old, *_ in plan]
    for path, old, adapter, new, _ in plan:
        # The new block's modes as the plan set them (dropouts switched off stay off): an
        # install that sets its wrapper's mode recursively (BERT's ResidualNormMLP, the
        # structural adapter's ResidualAddMLP) reset them (re-review, session 25).
        modes = [(m, m.training) for m in new.modules()]
        adapter.install(model, path, old, new)
        for m, training in modes:
            m.training = training
    _repoint_aliases(model, plan, paths_of)
    # One update per config: each block's config is that of the sub-model owning it. A block
    # outside the PreTrainedModel that saves its config is not saved with it, so that model's
    # record and width key do not describe it: a wrapper exposing its model's config
    # (self.config = net.config) that holds a block of its own built from it gave the group to
    # whichever block came first (paths began with "net.", or held "extra" cut to "a";
    # re-review, session 27).
    saved = {
        id(c) for m in model.modules() if _is_pretrained(m) and (c := _hf_config(m)) is not None
    }
    groups: dict[int, tuple[str, nn.Module, Any, list[int]]] = {}
    owners: dict[int, list[str]] = {}
    for k, (path, *_rest) in enumerate(plan):
        owner = config_owner(model, path)
        if owner is None or (id(owner[2]) in saved and not _is_pretrained(owner[1])):
            continue
        groups.setdefault(id(owner[2]), (*owner, []))[3].append(k)
        seen = owners.setdefault(id(owner[2]), [])
        if owner[0] not in seen:
            seen.append(owner[0])
    for paths in owners.values():
        if len(paths) > 1:
            # Two models built from one config object (a teacher and a student, an ensemble):
            # one record cannot describe both (keyed per owner, the second write silently undid
            # the first; re-review, session 27).
            warnings.warn(
                f"swap_mlp: the models at {paths} share one config object; its record and "
                f"width keys describe the blocks under {paths[0]!r} only, so the reload recipe "
                "may not rebuild the others. Build each model from its own config "
                "(copy.deepcopy(config)) to save them separately",
                UserWarning,
                stacklevel=external_stacklevel(),
            )
    mixed: dict[str, str] = {}  # root path -> what the block is, for blocks a record misses
    unknown: dict[str, str] = {}  # (those of them whose native width is unknown)
    for owner_path, owner_module, config, ks in groups.values():
        sub = SwapReport(variant=variant, match=match, entries=[plan[k][4] for k in ks])
        new_act = getattr(plan[ks[0]][3], "act", None)
        act = activation_name(new_act) if isinstance(new_act, nn.Module) else None
        adapters_used = [plan[k][2] for k in ks]
        own = [p for p in host_own if _under(p, owner_path)]
        before = {p: sig for p, sig in earlier.items() if _under(p, owner_path)}
        updates, kept, unchecked = _update_config(
            model,
            owner_path,
            owner_module,
            config,
            sub,
            adapters_used,
            act,
            own,
            list(before),
            replaced,
        )
        rec = updates[RECORD_ATTR][1]
        _record_kwargs(rec, module_kwargs or {})
        sigs = [_block_signature(plan[k][3]) for k in ks]
        if rec.get("width_key") is None:
            odd, lost = _describe_blocks(
                rec,
                updates[RECORD_ATTR][0],
                config,
                owner_path,
                [plan[k][4] for k in ks],
                [built_before[k] for k in ks],
                sigs,
                before,
            )
            unknown.update(lost)
        else:  # (the rebuilt blocks have the recorded width: one width describes them)
            odd = _undescribed(before, sigs, rec["hidden"])
        if own:  # (a model rebuilt from the config is swapped with exclude=these)
            rec["excluded"] = [_relative(p, owner_path) for p in own]
        if any(_under(p, owner_path) for p in lenient):
            rec["strict"] = False
        if odd:
            rec["mixed"] = {_relative(p, owner_path): odd[p] for p in odd}
            mixed.update(odd)
        prefix = f"{owner_path}.config." if owner_path else ""
        report.config_updates.update({prefix + k: v for k, v in updates.items()})
        report.config_updates.update(_sync_config_copies(owner_path, owner_module, config, updates))
        report.config_skipped.update({prefix + k: v for k, v in kept.items()})
        if unchecked is not None:
            report.config_unchecked[f"{owner_path}.config" if owner_path else "config"] = unchecked
    signatures = [_block_signature(new) for *_, new, _ in plan]
    mixed.update(
        _record_at_root(
            model,
            groups,
            report,
            host_own,
            earlier,
            signatures,
            mixed,
            module_kwargs or {},
            strict=not lenient,
        )
    )
    kinds = {p: what for p, what in mixed.items() if p not in unknown}
    if kinds:
        shown = ", ".join(f"{p}: {what}" for p, what in list(kinds.items())[:4]) + (
            ", ..." if len(kinds) > 4 else ""
        )
        built = sorted({f"{label} (width {h})" for label, h in signatures})
        warnings.warn(
            f"swap_mlp: the model now holds glu_probe blocks of more than one kind: this swap "
            f"built {', '.join(built)}, and an earlier swap left {shown}. The config's "
            f"{RECORD_ATTR} record describes one variant, so it lists those blocks "
            'under "mixed": a model rebuilt from the config and swapped with the reload recipe '
            "would not be this model. Swap them to the same variant and width before saving, "
            "or rebuild the model by replaying the same swaps",
            UserWarning,
            stacklevel=external_stacklevel(),
        )
    if unknown:
        shown = ", ".join(list(unknown)[:4]) + (", ..." if len(unknown) > 4 else "")
        warnings.warn(
            f"swap_mlp: the config's {RECORD_ATTR} record does not say the width of the "
            f"block a model rebuilt from the config holds at {shown} (an earlier record did "
            'not describe it), so it lists those blocks under "mixed": the reload recipe would '
            "not rebuild this model. Rebuild it by replaying the same swaps",
            UserWarning,
            stacklevel=external_stacklevel(),
        )


def _replaced_paths(path: str, old: nn.Module, adapter: MLPAdapter) -> list[str]:
    """Root paths of the modules of the block at ``path`` that its swap takes out (the
    adapter's ``dropped_modules``; read before it is installed): ``[path]`` for a block replaced
    whole, a layer's feed-forward parts for one rewired in place (BERT's ``intermediate`` and
    ``output``), so that the shared-key check still sees the rest of the layer (LiLT's layout
    feed-forward, sized from ``intermediate_size``; review, session 25)."""
    dropped = {id(m) for m in adapter.dropped_modules(old)}
    if id(old) in dropped:
        return [path]
    return [f"{path}.{n}" for n, m in old.named_modules() if n and id(m) in dropped]


def _passable_keywords(variant: str) -> list[str]:
    """The keywords a ``variant`` block takes that can be passed through ``swap_mlp``: not those
    it takes from the block it replaces (:data:`_FROM_SOURCE`), nor ``init`` (``swap_mlp``'s own
    argument, another meaning), nor ``act_layer`` (the variant fixes it)."""
    return sorted(_block_keywords(variant) - _FROM_SOURCE - {"init"})


def _check_module_kwargs(variant: str, module_kwargs: dict[str, Any]) -> None:
    """A keyword that neither ``swap_mlp`` nor the new blocks take is refused before anything
    is built (it had been dropped with a warning per block: a typo such as ``multple_of=4``
    swapped with the default alignment). The message lists what can be passed through."""
    try:
        _check_keywords(variant, module_kwargs)
    except TypeError:
        passable = _passable_keywords(variant)
        own = [n for n in inspect.signature(swap_mlp).parameters if n not in ("model", "variant")]
        unknown = sorted(k for k in module_kwargs if k not in passable)
        hints = [
            f"{k!r} -> {close[0]!r}?"
            for k in unknown
            if (close := difflib.get_close_matches(k, passable + own, n=1))
        ]
        raise TypeError(
            f"swap_mlp: unexpected keyword argument(s) {unknown} for the new {variant!r} blocks"
            + (f" ({', '.join(hints)})" if hints else "")
            + f"; through swap_mlp a {variant!r} block takes {passable}"
        ) from None


def _repoint_aliases(
    model: nn.Module,
    plan: list[tuple[str, nn.Module, MLPAdapter, nn.Module, SwapEntry]],
    paths_of: dict[int, list[str]],
) -> None:
    """After the installs: an alias of a replaced block that still names the old block (the same
    block under a second attribute name of its parent, ``layer.ffn = layer.mlp``) is pointed at
    what replaced it. Aliases of an ancestor (``self.backbone = self.net``) see it already, and a
    block rewired in place (BERT's layer) stays the same object at every path."""
    done: set[int] = set()
    for path, old, *_ in plan:
        if id(old) in done:
            continue
        done.add(id(old))
        now = model.get_submodule(path)
        if now is old:
            continue
        for alias in paths_of.get(id(old), []):
            parent, _, attr = alias.rpartition(".")
            try:
                holder = model.get_submodule(parent)
            except AttributeError:  # a path through a module the swap replaced
                continue
            if getattr(holder, attr, None) is old:
                setattr(holder, attr, now)
