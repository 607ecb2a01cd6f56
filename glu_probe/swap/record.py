"""The ``glu_probe_swap`` record a swap leaves on a Hugging Face config: read and written.

Read: the width and alignment it gives a block, so that a model rebuilt from a saved config and
swapped again by the reload recipe gets the saved model's widths. Written: the description of
every block a swap built under a config (per-block ``"widths"`` and ``"alignments"``, blocks of
other variants under ``"mixed"``), the module keywords, and the record on a composite model's
top config. The reload recipe depends on these fields, so their rules sit together here. (The
config keys themselves and the record's base fields: :mod:`glu_probe.swap.config_update`.)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from glu_probe.modules import GATED_VARIANTS, VARIANTS, _keyword_defaults, activation_name

from .._warnings import external_stacklevel
from .base import RECORD_ATTR, VARIANT_ACTIVATION, MLPAdapter, MLPSpec, SwapEntry, SwapReport
from .hosts import (
    _ancestors,
    _hf_config,
    _holds_config,
    _relative,
    _saved_holder,
    _under,
    config_owner,
)
from .origin import _built_by_swap


def _is_width(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _record_widths(record: Mapping[str, Any]) -> dict[str, tuple[int, int]] | None:
    """A config record's per-block ``"widths"`` (path relative to the config's owner ->
    (native width, swapped width)), or ``None`` for a record without them (whose one
    ``"native_hidden"`` / ``"hidden"`` describe its blocks). Malformed entries are left out."""
    per_block = record.get("widths")
    if not isinstance(per_block, dict):
        return None
    return {
        rel: (pair[0], pair[1])
        for rel, pair in per_block.items()
        if isinstance(pair, (list, tuple))
        and len(pair) >= 2
        and _is_width(pair[0])
        and _is_width(pair[1])
    }


def _recorded_alignment(record: Mapping[str, Any], path: str | None) -> int | None:
    """The alignment the block at ``path`` (relative to the config's owner) was made with, per
    a config record: its entry under ``"alignments"``, else the record's ``"multiple_of"``."""
    per_block = record.get("alignments")
    if isinstance(per_block, dict) and path is not None and _is_width(per_block.get(path)):
        return int(per_block[path])
    aligned = record.get("multiple_of")
    return aligned if _is_width(aligned) else None


def _recorded_width(record: Mapping[str, Any], path: str | None) -> int | None:
    """The swapped width a config record gives the block at ``path`` (relative to the config's
    owner): its entry under ``"widths"`` (none for a block marked ``"mixed"``), else, for a
    record without them, its one ``"hidden"``; ``None`` where it gives none."""
    mixed = record.get("mixed")
    if isinstance(mixed, dict) and path in mixed:
        return None
    per_block = _record_widths(record)
    if per_block is not None:
        pair = per_block.get(path) if path is not None else None
        return pair[1] if pair is not None else None
    recorded = record.get("hidden")
    return recorded if _is_width(recorded) else None


def _rebuilt_width(
    spec: MLPSpec, record: Mapping[str, Any], path: str | None
) -> tuple[int, int] | None:
    """(width, alignment) that a config record (of the swap's variant and match) gives the
    host's own block ``spec`` of a model rebuilt from the config, at ``path`` relative to the
    config's owner; ``None`` where it gives none."""
    used = _recorded_alignment(record, path) or 1
    per_block = _record_widths(record)
    if per_block is not None:
        # Blocks of several widths under one config (BART with encoder_ffn_dim !=
        # decoder_ffn_dim): no single width describes them, and a chain's blocks (swiglu then
        # gelu: 256 -> 384 and 128 -> 192) did not load into the rebuilt model's swap, which
        # fell back to 256 and 128 (review, session 26). The record gives each block's, and
        # only those: its "hidden" gave a block of another width's width to any block of the
        # recorded native width (re-review, session 26).
        mixed = record.get("mixed")
        pair = per_block.get(path) if path is not None else None
        if (
            pair is not None
            and not (isinstance(mixed, dict) and path in mixed)
            and record.get("in_features") in (None, spec.in_features)
            and record.get("out_features") in (None, spec.out_features)
            and spec.hidden_features in pair
        ):
            return pair[1], used
        return None
    recorded = record.get("hidden")
    if spec.hidden_features == recorded:
        # its native block has the swapped width: keep it, so that state dicts load
        return spec.hidden_features, used
    native = (
        record.get("native_hidden") == spec.hidden_features
        and record.get("in_features") == spec.in_features
        and record.get("out_features") == spec.out_features
    )
    if isinstance(recorded, int) and record.get("width_key") is None and native:
        # The config has no key for the width (the BART family, Whisper, GPT-J with
        # n_inner=None), so the rebuilt block has its source width: a chain that left the
        # family and came back (swiglu then gelu: 2048 -> 1368 -> 2056) ended elsewhere than
        # a single swap of the rebuilt model (2048), and its state dict did not load
        # (review, session 20). The recorded width is the chain's.
        return recorded, used
    return None


def _recorded_matches(spec: MLPSpec, record: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(width, alignment) pairs that a config record gives the blocks of ``spec``'s native width
    and input / output widths, largest alignment first; ``[]`` where it gives none or blocks of
    that width several widths."""
    if (record.get("in_features"), record.get("out_features")) != (
        spec.in_features,
        spec.out_features,
    ):
        return []
    per_block = _record_widths(record)
    found: set[tuple[int, int | None]] = set()
    if per_block is not None:
        mixed = record.get("mixed")
        found = {
            (h, _recorded_alignment(record, rel))
            for rel, (n, h) in per_block.items()
            if n == spec.hidden_features and not (isinstance(mixed, dict) and rel in mixed)
        }
    elif record.get("native_hidden") == spec.hidden_features and _is_width(record.get("hidden")):
        found = {(record["hidden"], _recorded_alignment(record, None))}
    if len({h for h, _ in found}) != 1:
        return []
    return sorted(((h, d or 1) for h, d in found), key=lambda hd: -hd[1])


def _describe_blocks(
    rec: dict[str, Any],
    old_record: Any,
    config: Any,
    owner_path: str,
    entries: Sequence[SwapEntry],
    built_before: Sequence[bool],
    sigs: Sequence[tuple[str, int | None]],
    earlier: Mapping[str, tuple[str, int | None]],
) -> tuple[dict[str, str], dict[str, str]]:
    """Describe in ``rec``, a config record with no width key (the blocks of a model rebuilt
    from the config have their native widths), every block under the config that a swap built:
    this swap's (``entries``, ``sigs``: their variant labels and widths; ``built_before``: the
    block replaced was one an earlier swap built) and the blocks an earlier swap built that this
    one leaves (``earlier``: root path -> variant label and width). Sets ``"hidden"``,
    ``"native_hidden"``, ``"multiple_of"``, ``"in_features"`` and ``"out_features"`` to the one
    value the described blocks share (else ``None``), and, where one pair of widths does not
    describe them all or some are left undescribed, ``"widths"``: path relative to the config's
    owner -> ``[native width, width]`` of every block whose native width is known (the blocks
    left undescribed included, so that a later swap still knows it), and, where their alignments
    differ, ``"alignments"``: path -> the alignment each width was made with.

    The native width (that of the block a model rebuilt from the config holds there) is the
    replaced block's for a host's own block; for a block an earlier swap built, the previous
    record's: its ``"widths"`` entry, or the value of its width key, or its ``"native_hidden"``
    where it described the block by its one width (a record without ``"widths"`` describes
    every block it does not mark ``"mixed"``). Returns (root path -> what it is) the blocks the
    record does not describe, for ``"mixed"``: those of another variant, and those whose native
    width is unknown (also given on their own, second)."""
    old = old_record if isinstance(old_record, dict) else {}
    old_key = old.get("width_key")
    old_widths = _record_widths(old)
    old_mixed: dict[str, Any] = old["mixed"] if isinstance(old.get("mixed"), dict) else {}

    def previous(rel: str, width: int | None) -> tuple[int | None, int | None]:
        """(native width at ``rel``, alignment of its block of ``width``) per the old record."""
        if isinstance(old_key, str):  # (left unchanged since: the rebuilt block reads it)
            value = getattr(config, old_key, None)
            native = value if _is_width(value) else None
            described = width == old.get("hidden")
        elif old_widths is not None:
            if rel not in old_widths:
                return None, None
            native, was = old_widths[rel]
            described = was == width
        elif _is_width(old.get("native_hidden")) and old.get("hidden") == width:
            native, described = old["native_hidden"], True
        else:
            return None, None
        if not described:
            return native, None
        if rel in old_mixed:
            # A block the old record lists under "mixed" has its own alignment under
            # "alignments" (its "multiple_of" is that of the blocks it describes): dropped here,
            # a later swap back to its variant recorded multiple_of 1 for it (re-review,
            # session 26).
            per_block = old.get("alignments")
            aligned = per_block.get(rel) if isinstance(per_block, dict) else None
            return native, aligned if _is_width(aligned) else None
        return native, _recorded_alignment(old, rel)

    labels = {label for label, _ in sigs}
    # relative path -> (root path, variant label, native width, width, alignment)
    blocks: dict[str, tuple[str, str, int | None, int | None, int | None]] = {}
    from_old = False
    for path, (label, h) in earlier.items():
        rel = _relative(path, owner_path)
        native, aligned = previous(rel, h)
        blocks[rel] = (path, label, native, h, aligned)
        from_old = from_old or (label in labels and native is not None)
    for entry, built, (label, _) in zip(entries, built_before, sigs, strict=True):
        rel = _relative(entry.path, owner_path)
        native = previous(rel, entry.source_hidden)[0] if built else entry.source_hidden
        blocks[rel] = (entry.path, label, native, entry.hidden_features, entry.multiple_of)
    described = {
        rel: block
        for rel, block in blocks.items()
        if block[1] in labels and block[2] is not None and block[3] is not None
    }
    odd: dict[str, str] = {}
    lost: dict[str, str] = {}
    for rel, (path, label, _, h, _) in blocks.items():
        if label not in labels:
            odd[path] = f"{label} (width {h})"
        elif rel not in described:
            lost[path] = odd[path] = f"{label} (width {h}, native width unknown)"

    def unique(values: Iterable[Any]) -> Any:
        kinds = set(values)
        return next(iter(kinds)) if len(kinds) == 1 else None

    ins = {e.in_features for e in entries} | ({old.get("in_features")} if from_old else set())
    outs = {e.out_features for e in entries} | ({old.get("out_features")} if from_old else set())
    rec["hidden"] = unique(b[3] for b in described.values())
    rec["native_hidden"] = unique(b[2] for b in described.values())
    rec["multiple_of"] = unique(b[4] for b in described.values())
    rec["in_features"] = unique(ins)
    rec["out_features"] = unique(outs)
    pairs = {rel: [b[2], b[3]] for rel, b in blocks.items() if None not in (b[2], b[3])}
    one = {(b[2], b[3]) for b in described.values()} == {(rec["native_hidden"], rec["hidden"])}
    if pairs and (odd or not one):
        rec["widths"] = pairs
    # Every block's alignment, those listed under "mixed" included (as "widths" carries their
    # widths), so that a later swap back to one variant still knows it.
    alignments = {rel: b[4] for rel, b in blocks.items() if b[4] is not None}
    carried = any(b[0] in odd for b in blocks.values() if b[4] is not None)
    if alignments and (rec["multiple_of"] is None or carried):
        # (a width taken from the record is reported with the alignment it was made with)
        rec["alignments"] = alignments
    return odd, lost


def _listed(paths: Any, path: str, owner_path: str) -> bool:
    """Whether a record's path list (``"excluded"``, relative to the config's owner) holds the
    block at root path ``path``."""
    return (
        isinstance(paths, list)
        and _under(path, owner_path)
        and _relative(path, owner_path) in paths
    )


def _recordable_kwargs(
    module_kwargs: Mapping[str, Any], variant: str | None = None
) -> dict[str, Any]:
    """The module keywords a config record can hold: those whose values survive a JSON round
    trip (``save_pretrained`` writes the config as JSON); the passable ones all do (``packed``,
    ``fused``, ``align_to``, ``approximate``). With ``variant``, a keyword given at the block's
    default is left out: it builds the block a swap without it builds (``packed=True`` then a
    swap without it warned that the keywords differed; review, session 23)."""
    defaults = _keyword_defaults(variant) if variant in VARIANTS else {}
    return {
        k: v
        for k, v in sorted(module_kwargs.items())
        if (v is None or isinstance(v, (bool, int, float, str)))
        and not (k in defaults and type(v) is type(defaults[k]) and v == defaults[k])
    }


def _record_kwargs(rec: dict[str, Any], module_kwargs: Mapping[str, Any]) -> None:
    """Put the swap's module keywords in a config record (``"module_kwargs"``, which the reload
    recipe passes back to :func:`swap_mlp`: ``approximate="tanh"`` changes the numbers and
    ``packed=False`` the state-dict keys of what is built), and name those it cannot hold."""
    kept = _recordable_kwargs(module_kwargs, rec.get("variant"))
    rec.pop("module_kwargs", None)
    rec.pop("module_kwargs_unrecorded", None)
    if kept:
        rec["module_kwargs"] = kept
    left = sorted(set(module_kwargs) - set(_recordable_kwargs(module_kwargs)))
    if left:
        rec["module_kwargs_unrecorded"] = left


def _differing_kwargs(
    record: Mapping[str, Any], recordable: Mapping[str, Any]
) -> dict[str, tuple[Any, Any]]:
    """The module keywords on which a config record (a swap to the same variant made it) and a
    new swap's (``recordable``) differ: name -> (the record's value, the swap's),
    :data:`_MISSING` where one has none. Keywords the record could not hold are not compared."""
    old = record.get("module_kwargs")
    old = dict(old) if isinstance(old, Mapping) else {}
    unrecorded = record.get("module_kwargs_unrecorded")
    skip = set(unrecorded) if isinstance(unrecorded, list) else set()
    keys = sorted((set(old) | set(recordable)) - skip)
    return {
        k: (old.get(k, _MISSING), recordable.get(k, _MISSING))
        for k in keys
        if old.get(k, _MISSING) != recordable.get(k, _MISSING)
    }


def _describe_differing(differing: Mapping[str, tuple[Any, Any]]) -> str:
    """:func:`_differing_kwargs`'s answer as text (``""`` where none differ)."""
    parts = [
        f"{k}: record {old!r} vs {new!r}"
        if old is not _MISSING and new is not _MISSING
        else f"{k}={old!r} in the record only"
        if old is not _MISSING
        else f"{k}={new!r} here only"
        for k, (old, new) in differing.items()
    ]
    return "; ".join(parts)


def _realigns(width: int | None, align_to: Any) -> bool:
    """Whether a block of ``width`` built with ``align_to`` (``_MISSING``: not passed, the
    default 0) gets another width: ``align_to`` rounds the gated width up to a multiple of it.
    An unknown width counts as changed."""
    if align_to is _MISSING or not _is_width(align_to):
        return False
    return width is None or width % align_to != 0


_MISSING = object()


def _block_signature(block: nn.Module) -> tuple[str, int | None]:
    """``(variant, width)`` of a block a swap built: the variant named by its gating and
    activation (``"gelu"``, ``"swiglu"``; otherwise a description such as ``"gated
    gelu_tanh"``), with ``" (packed=False)"`` for a gated block with separate gate and up
    layers (other state-dict keys: a chain of swaps with either layout is "mixed"; review,
    session 23) and ``" (fused=True)"`` / ``" (fused=False)"`` for one built with that keyword
    (other rounding: blocks built with ``fused=True``, then a swap without it, were rebuilt
    unfused by the recipe, whose logits differed; re-review, session 27), and its hidden
    width."""
    act = getattr(block, "act", None)
    try:
        name = activation_name(act) if isinstance(act, nn.Module) else type(block).__name__
    except Exception:
        name = type(block).__name__
    gated = bool(getattr(block, "gated", False))
    label = next(
        (v for v, a in VARIANT_ACTIVATION.items() if a == name and (v in GATED_VARIANTS) == gated),
        f"gated {name}" if gated else name,
    )
    if gated and getattr(block, "packed", True) is False:
        label += " (packed=False)"
    fused = getattr(block, "fused", None)
    if gated and isinstance(fused, bool):
        label += f" (fused={fused})"
    width = getattr(block, "hidden_features", None)
    return label, width if isinstance(width, int) else None


def _undescribed(
    before: dict[str, tuple[str, int | None]],
    built: Sequence[tuple[str, int | None]],
    hidden: int | None,
) -> dict[str, str]:
    """The blocks of ``before`` (path -> variant and width of a block an earlier swap built) that
    a record of this swap's blocks (``built``, recorded width ``hidden``) does not describe:
    another variant, or another width than the recorded one, with what they are."""
    labels = {label for label, _ in built}
    return {
        p: f"{label} (width {h})"
        for p, (label, h) in before.items()
        if label not in labels or (hidden is not None and h is not None and h != hidden)
    }


def _warn_mixed_record(
    model: nn.Module, found: list[tuple[str, nn.Module, MLPAdapter]], variant: str
) -> None:
    """Warn where this swap is about to build ``variant`` at a host's own block that a config
    record marks ``"mixed"``: a model rebuilt from the config of a model that held blocks of
    several variants, which one swap does not rebuild."""
    root_record = getattr(_hf_config(model), RECORD_ATTR, None)
    hits: dict[str, str] = {}
    for path, block, _ in found:
        if _built_by_swap(block) is not None:
            continue
        owner = config_owner(model, path)
        records = [(path, root_record)]
        if owner is not None:
            records.append((_relative(path, owner[0]), getattr(owner[2], RECORD_ATTR, None)))
        for rel, record in records:
            odd = record.get("mixed") if isinstance(record, dict) else None
            if isinstance(odd, dict) and rel in odd:
                hits[path] = str(odd[rel])
    if hits:
        shown = ", ".join(f"{p}: {what}" for p, what in list(hits.items())[:4]) + (
            ", ..." if len(hits) > 4 else ""
        )
        warnings.warn(
            f'swap_mlp: the config\'s {RECORD_ATTR} record is marked "mixed": the model it was '
            f"written for held other blocks at {shown}; this swap builds {variant!r} there, so "
            "it does not rebuild that model (its state dict will not load as saved)",
            UserWarning,
            stacklevel=external_stacklevel(),
        )


def _top_config(model: nn.Module, owner_path: str, config: Any) -> tuple[str, Any] | None:
    """(path of its owner, top config) of the composite model above the sub-model at
    ``owner_path`` whose config ``config`` is: the config of the outermost module above it that
    holds ``config`` as a sub-config (``text_config``, an ``EncoderDecoderConfig``'s
    ``encoder``), owned as :func:`~glu_probe.swap.hosts.config_owner` says (a wrapper exposing
    that config as its own does not own it); ``None`` where no module above holds one."""
    top: Any = None
    holders: list[tuple[str, nn.Module]] = []
    for p, m in reversed(_ancestors(model, owner_path)):  # (outermost first)
        c = _hf_config(m)
        if c is None or not _holds_config(m):
            continue
        if top is None and any(v is config for v in vars(c).values()):
            top = c
        if top is not None and c is top:
            holders.append((p, m))
    return None if top is None else (_saved_holder(holders)[0], top)


def _listed_by_top(
    model: nn.Module, owner_path: str, config: Any, variant: str, match: str
) -> bool:
    """Whether a composite model's top record of this ``variant`` and ``match`` (what the reload
    recipe passes) lists the sub-model at ``owner_path`` (whose config is ``config``) under
    ``"sub_configs"``: its own record then gives the widths the recipe rebuilds it with, also
    where that sub-model was swapped with the other ``match``."""
    found = _top_config(model, owner_path, config)
    record = getattr(found[1], RECORD_ATTR, None) if found is not None else None
    if not isinstance(record, dict) or found is None:
        return False
    subs = record.get("sub_configs")
    return (
        record.get("variant") == variant
        and record.get("match") == match
        and isinstance(subs, list)
        and _under(owner_path, found[0])
        and _relative(owner_path, found[0]) in subs
    )


def _record_at_root(
    model: nn.Module,
    groups: dict[int, Any],
    report: SwapReport,
    host_own: Sequence[str] = (),
    earlier: dict[str, tuple[str, int | None]] | None = None,
    built: Sequence[tuple[str, int | None]] = (),
    mixed: dict[str, str] | None = None,
    module_kwargs: Mapping[str, Any] | None = None,
    strict: bool = True,
) -> dict[str, str]:
    """A composite model (CLIP, SigLIP, PaliGemma, ``EncoderDecoderModel``) whose swapped blocks
    all belong to sub-configs gets a record on its top config too, naming them: the documented
    reload reads ``config.glu_probe_swap["variant"]`` from the saved top config, which had none
    (an AttributeError; review, session 20). It holds no width (``hidden`` None), so it changes
    no swap; the sub-configs' records keep theirs. Its ``"excluded"`` lists the host's own blocks
    of the whole model, and its ``"mixed"`` the blocks of an earlier swap of another variant
    (in any sub-model) and those the sub-configs' records mark; returns the latter (root paths).

    The top config is that of the outermost model above the sub-models that holds their configs
    as its sub-configs, also when ``model`` wraps it (a ``LightningModule`` holding a
    ``CLIPModel``): the wrapper has no config, so the record was not written, or an earlier
    record went stale and the recipe rebuilt another variant (re-review, session 26). Its paths
    are relative to that model (what a model rebuilt from its config holds), also where the
    wrapper exposes the model's config as its own (:func:`_top_config`).

    Its ``"match"`` and ``"module_kwargs"`` are this swap's, which the recipe passes to every
    sub-model: a sub-model an earlier swap built with other module keywords is listed under
    ``"mixed"`` (the recipe would build it with these; not for an ``align_to`` alone that leaves
    each of its blocks' widths as they are: 128 with ``align_to=64`` or none), while one swapped
    with the other ``match`` keeps the widths its own record gives (:func:`_listed_by_top`).
    The blocks a sub-model's own record marks ``"mixed"`` are listed too where this swap leaves
    that sub-model (its record is still the one that marks them)."""
    earlier = earlier or {}
    # id(top config) -> (its owner's path, the config, [(sub-model path, plan indices)])
    tops: dict[int, tuple[str, Any, list[tuple[str, list[int]]]]] = {}
    written = {id(config) for _, _, config, _ in groups.values()}
    for owner_path, _owner, config, ks in groups.values():
        found = _top_config(model, owner_path, config)
        if found is not None and id(found[1]) not in written:
            tops.setdefault(id(found[1]), (*found, []))[2].append((owner_path, ks))
    odd_all: dict[str, str] = {}
    for top_path, root, members in tops.values():
        subs = sorted(_relative(path, top_path) for path, _ in members)
        old = getattr(root, RECORD_ATTR, None)
        before = {p: sig for p, sig in earlier.items() if _under(p, top_path)}
        if before and isinstance(old, dict) and isinstance(old.get("sub_configs"), list):
            subs = sorted(set(subs) | set(old["sub_configs"]))  # (an earlier swap's, still there)
        rec: dict[str, Any] = {
            "variant": report.variant,
            "match": report.match,
            "hidden": None,
            "width_key": None,
            "act_key": None,
            "sub_configs": subs,
        }
        _record_kwargs(rec, module_kwargs or {})
        own = [_relative(p, top_path) for p in host_own if _under(p, top_path)]
        if own:
            rec["excluded"] = own
        if not strict:
            rec["strict"] = False
        signatures = [built[k] for _, ks in members for k in ks if k < len(built)]
        odd = {
            **{p: what for p, what in (mixed or {}).items() if _under(p, top_path)},
            **_undescribed(before, signatures, None),
        }
        recordable = _recordable_kwargs(module_kwargs or {}, report.variant)
        for p, (label, h) in before.items():
            owner = config_owner(model, p) if p not in odd else None
            sub = getattr(owner[2], RECORD_ATTR, None) if owner is not None else None
            if not isinstance(sub, dict) or owner is None:
                continue
            # A block its sub-model's own record marks "mixed" (written by an earlier swap of
            # that sub-model, which this one leaves): rewritten without it, the top record let
            # the recipe through, and the state dict did not load (re-review, session 27).
            sub_mixed = sub.get("mixed")
            rel = _relative(p, owner[0])
            if isinstance(sub_mixed, dict) and rel in sub_mixed:
                odd[p] = str(sub_mixed[rel])
                continue
            # A sub-model this swap leaves, built with other module keywords (its own record's):
            # the recipe passes this record's to every sub-model (re-review, session 27). An
            # align_to that leaves its width as it is (128 with align_to 64, or none) builds the
            # same block: not marked for it alone (the recipe refused a model it reloads).
            differing = _differing_kwargs(sub, recordable)
            if set(differing) == {"align_to"} and not _realigns(h, differing["align_to"][1]):
                continue
            if differing:
                odd[p] = f"{label} (width {h}, module keywords {_describe_differing(differing)})"
        if odd:
            rec["mixed"] = {_relative(p, top_path): what for p, what in odd.items()}
        setattr(root, RECORD_ATTR, rec)
        prefix = f"{top_path}.config." if top_path else ""
        report.config_updates[prefix + RECORD_ATTR] = (old, rec)
        odd_all.update(odd)
    return odd_all
