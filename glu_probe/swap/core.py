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
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import inspect
import math
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from glu_probe.modules import (
    GATED_VARIANTS,
    VARIANTS,
    _block_keywords,
    _check_keywords,
    _keyword_defaults,
    _param_line,
    activation_name,
    closest_width,
    make_mlp,
)

from .._warnings import external_stacklevel

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

#: Canonical activation name -> Hugging Face ``ACT2FN`` key written into host configs.
HF_ACT_NAMES = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_tanh": "gelu_pytorch_tanh",
    "silu": "silu",
    "sigmoid": "sigmoid",
    "identity": "linear",
}
#: Gate (gated variants) or hidden (dense variants) activation of each variant.
VARIANT_ACTIVATION = {
    "glu": "sigmoid",
    "bilinear": "identity",
    "reglu": "relu",
    "geglu": "gelu",
    "swiglu": "silu",
    "relu": "relu",
    "gelu": "gelu",
    "silu": "silu",
}
RECORD_ATTR = "glu_probe_swap"
"""Name of the record ``swap_mlp`` leaves on a Hugging Face config (a JSON-able dict)."""

_REGISTER_HELP = (
    "To swap a custom block, subclass glu_probe.swap.MLPAdapter (matches, describe, and "
    "optionally build/install/config_keys) and call glu_probe.swap.register_adapter(MyAdapter())."
)


class UnsupportedModelError(ValueError):
    """No MLP block recognised, or only some of them (never a silent partial swap)."""


@dataclass(frozen=True)
class MLPSpec:
    """What an adapter found: the shape and conventions of one MLP block."""

    in_features: int
    hidden_features: int
    """Width of the hidden layer; the gated width for gated blocks."""
    out_features: int
    gated: bool
    activation: str
    """Canonical name (``activation_name``) of the hidden/gate activation."""
    num_params: int
    """Parameters of the block's own layers (excluding e.g. BERT's residual LayerNorm)."""
    bias: tuple[bool, bool] = (True, True)
    drop: tuple[float, float] = (0.0, 0.0)
    norm: nn.Module | None = None
    """Inner norm after the activation (timm ``scale_mlp_norm``), copied into the new block."""
    use_conv: bool = False
    kind: str = ""
    """Human-readable name of the source block, e.g. ``"timm.Mlp"`` or ``"GPT2MLP"``."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32


class MLPAdapter(ABC):
    """Teaches :func:`swap_mlp` one family of MLP blocks.

    ``matches`` is a cheap structural test; ``describe`` reads the block (and raises
    :class:`UnsupportedModelError` if it only partly fits); ``build`` makes the replacement
    (default: :func:`glu_probe.modules.make_mlp`); ``install`` puts it in place (default:
    ``setattr`` on the parent); ``config_keys`` names the host-config fields for the width and
    the activation that the swap updates.
    """

    name: str = "adapter"
    #: ``True``: the width key of ``config_keys`` is updated only where the config's value is
    #: the width of every block this adapter swapped (a key that may mean something else).
    width_key_must_match: bool = False

    @abstractmethod
    def matches(self, module: nn.Module) -> bool:
        """Whether ``module`` is a block this adapter handles."""

    @abstractmethod
    def describe(self, module: nn.Module) -> MLPSpec:
        """Read the block's shape, activation, biases, dropout, device and dtype."""

    def build(self, spec: MLPSpec, variant: str, hidden: int, **kwargs: Any) -> nn.Module:
        """The replacement block (default: ``make_mlp`` with the source's conventions)."""
        norm_layer = _norm_factory(spec.norm) if spec.norm is not None else None
        return make_mlp(
            variant,
            spec.in_features,
            hidden,
            spec.out_features,
            bias=spec.bias,
            drop=spec.drop,
            norm_layer=norm_layer,
            use_conv=spec.use_conv,
            device=spec.device,
            dtype=spec.dtype,
            **kwargs,
        )

    def install(self, root: nn.Module, path: str, old: nn.Module, new: nn.Module) -> None:
        """Put ``new`` where ``old`` is (default: replace the attribute at ``path``)."""
        parent, _, attr = path.rpartition(".")
        setattr(root.get_submodule(parent), attr, new)

    def config_keys(self, model: nn.Module) -> tuple[str | None, str | None]:
        """Host-config fields ``(width_key, activation_key)`` to update (``None``: leave)."""
        return None, None

    def dropped_modules(self, module: nn.Module) -> list[nn.Module]:
        """The modules of ``module`` that the swap takes out of the model (default: all of
        them, the block replaced whole). Hooks on them would be lost, so a block with such
        hooks is refused; an adapter that rewires a block in place (BERT's layer) keeps the
        rest, and their hooks (transformers' own output-capturing ones) with them."""
        return list(module.modules())

    def source_parameters(self, module: nn.Module) -> list[nn.Parameter]:
        """The parameters the new block replaces (default: all of ``module``'s)."""
        return list(module.parameters())

    def resembles(self, module: nn.Module) -> bool:
        """Whether ``module`` looks like this adapter's block even where :meth:`matches` declines
        it (a failed check): the driver then reports it as an unrecognised MLP block instead of
        leaving it alone silently. Default: ``False``."""
        return False


@dataclass
class SwapEntry:
    """One swapped block."""

    path: str
    adapter: str
    source: str
    source_activation: str
    source_gated: bool
    source_hidden: int
    hidden_features: int
    params_before: int
    params_after: int
    multiple_of: int
    shared_with: str | None = None
    """Path of the first entry of a block shared by several parents (one replacement, installed
    at every path; its parameters count once in the report's totals)."""
    in_features: int | None = None
    """The block's input width (``None`` where the adapter does not say)."""
    out_features: int | None = None
    """The block's output width."""

    @property
    def rel_diff(self) -> float:
        """``(after - before) / before``."""
        return (self.params_after - self.params_before) / self.params_before


@dataclass
class SwapReport:
    """What :func:`swap_mlp` did."""

    variant: str
    match: str
    entries: list[SwapEntry]
    config_updates: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    """``key -> (old, new)`` per updated config field. Keys of the root model's own config are
    plain (``"n_inner"``); those of a sub-model's config (a wrapped model, a composite model's
    ``text_config``) are prefixed with the sub-model's path: ``"net.config.n_inner"``."""
    unrecognised: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    """Paths (of the object swapped) of the recognised blocks left unchanged by ``include`` /
    ``exclude``, and of MLP-like modules no adapter recognises that they leave out. (A config's
    ``glu_probe_swap`` record lists, under ``"excluded"``, the host's own blocks left after the
    swap, relative to the model owning the config: what its reload recipe leaves out.)"""
    config_skipped: dict[str, str] = field(default_factory=dict)
    """Config keys left unchanged on purpose (same naming as ``config_updates``) and why: e.g. an
    activation key that other, non-MLP modules of a model rebuilt from the config read too."""
    config_unchecked: dict[str, str] = field(default_factory=dict)
    """Configs (``"config"``, or ``"<path>.config"`` for a sub-model's) whose keys were written
    *without* the shared-key check behind :attr:`config_skipped`, and why: the host could not be
    rebuilt from the config on the ``meta`` device (a constructor that needs real values or
    more arguments, a wrapper that only exposes the config, a pretrained backbone to load)."""

    @property
    def paths(self) -> list[str]:
        """Module paths of every swapped block, in model order (shared blocks at each path)."""
        return [e.path for e in self.entries]

    @property
    def params_before(self) -> int:
        """Parameters of the replaced blocks (a block shared by several paths counted once)."""
        return sum(e.params_before for e in self.entries if e.shared_with is None)

    @property
    def params_after(self) -> int:
        """Parameters of the new blocks (a shared replacement counted once)."""
        return sum(e.params_after for e in self.entries if e.shared_with is None)

    @property
    def rel_diff(self) -> float:
        """Relative difference of the total MLP parameter count."""
        return (self.params_after - self.params_before) / self.params_before

    @property
    def max_abs_rel_diff(self) -> float:
        """Largest |params_after / params_before − 1| of a single block."""
        return max(abs(e.rel_diff) for e in self.entries)

    def to_markdown(self) -> str:
        """The report as a markdown table: one row per path, a total, the config changes."""
        lines = [
            f"swap_mlp -> {self.variant} (match={self.match})",
            "",
            "| path | from | hidden | to hidden | params before | params after | rel diff |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for e in self.entries:
            if e.shared_with is not None:
                lines.append(f"| {e.path} | shares {e.shared_with} | | | | | |")
                continue
            lines.append(
                f"| {e.path} | {e.source} ({e.source_activation}) | {e.source_hidden} | "
                f"{e.hidden_features} | {e.params_before} | {e.params_after} | "
                f"{100 * e.rel_diff:+.2f}% |"
            )
        lines.append(
            f"| **total** | | | | {self.params_before} | {self.params_after} | "
            f"{100 * self.rel_diff:+.2f}% |"
        )
        if self.config_updates:
            lines.append("")
            lines.append(
                "config: "
                + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in self.config_updates.items())
            )
        if self.excluded:
            lines.append("")
            lines.append(f"left unchanged (include/exclude): {', '.join(self.excluded)}")
        for key, why in self.config_skipped.items():
            lines.append(f"config {key} left unchanged: {why}")
        for key, why in self.config_unchecked.items():
            lines.append(f"{key} updated without the shared-key check: {why}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


_ADAPTERS: list[MLPAdapter] = []


def register_adapter(adapter: MLPAdapter, *, first: bool = True) -> MLPAdapter:
    """Register ``adapter`` (an :class:`MLPAdapter` instance) for :func:`swap_mlp`.

    With ``first=True`` (default) it is asked before the built-in adapters, so it can take over
    blocks they would otherwise match. Returns the adapter (usable as a decorator on an
    instance-returning expression).
    """
    if not isinstance(adapter, MLPAdapter):
        raise TypeError(
            f"register_adapter expects an MLPAdapter instance, got {type(adapter).__name__}"
        )
    if adapter in _ADAPTERS:
        _ADAPTERS.remove(adapter)
    if first:
        _ADAPTERS.insert(0, adapter)
    else:
        _ADAPTERS.append(adapter)
    return adapter


def unregister_adapter(adapter: MLPAdapter) -> None:
    """Remove a registered adapter (``ValueError`` if it is not registered)."""
    if adapter not in _ADAPTERS:
        raise ValueError(f"adapter {adapter!r} is not registered")
    _ADAPTERS.remove(adapter)


def registered_adapters() -> list[MLPAdapter]:
    """Adapters in the order :func:`swap_mlp` asks them."""
    return list(_ADAPTERS)


def _norm_settings(norm: nn.Module) -> dict[str, Any]:
    """The constructor settings of ``norm`` that can be read back from the instance, under
    every spelling a norm constructor uses (``elementwise_affine`` / ``affine``, ...)."""
    affine = getattr(norm, "elementwise_affine", getattr(norm, "affine", None))
    if not isinstance(affine, bool):
        affine = getattr(norm, "weight", None) is not None
    out: dict[str, Any] = {"elementwise_affine": affine, "affine": affine}
    if isinstance(getattr(norm, "eps", None), float):
        out["eps"] = norm.eps
    if isinstance(norm, nn.LayerNorm):
        out["bias"] = norm.bias is not None
    for name in ("momentum", "track_running_stats"):
        if hasattr(norm, name):
            out[name] = getattr(norm, name)
    return out


def _norm_factory(norm: nn.Module) -> Callable[..., nn.Module]:
    """A ``norm_layer(width, device=, dtype=)`` factory rebuilding ``norm``'s type and options.

    The norm's own class with every setting its constructor takes and the instance shows (eps,
    affine, bias, momentum, ...). Only ``nn.LayerNorm`` and ``nn.RMSNorm`` were rebuilt with
    their settings before; any other class got its defaults (timm ``RmsNorm(eps=1e-2)`` came
    back with eps 1e-6, ``affine=False`` affine, ``BatchNorm2d(eps=0.1)`` with 1e-5), and a
    ``LayerNorm`` subclass became a plain ``nn.LayerNorm`` (``LayerNorm2d``: a crash on the
    first forward; review, session 20). The rebuilt norm is checked against the source: the same
    class, parameter names and eps, else :class:`UnsupportedModelError`.
    """
    cls = type(norm)
    try:
        accepted = set(inspect.signature(cls).parameters)
    except (TypeError, ValueError):
        accepted = set()
    settings = {k: v for k, v in _norm_settings(norm).items() if k in accepted}
    want = {name for name, _ in norm.named_parameters(recurse=False)}

    def make(n: int, **dd: Any) -> nn.Module:
        try:
            new = cls(n, **settings, **dd)
        except TypeError as err:
            raise UnsupportedModelError(
                f"cannot rebuild the inner norm {cls.__name__} of the MLP at a new width: {err}"
            ) from err
        got = {name for name, _ in new.named_parameters(recurse=False)}
        if got != want or getattr(new, "eps", None) != getattr(norm, "eps", None):
            raise UnsupportedModelError(
                f"cannot rebuild the inner norm {cls.__name__} of the MLP with its settings "
                f"(parameters {sorted(want)} -> {sorted(got)}, eps {getattr(norm, 'eps', None)} "
                f"-> {getattr(new, 'eps', None)})"
            )
        return new

    return make


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _first_param(module: nn.Module) -> torch.Tensor:
    for p in module.parameters():
        return p
    raise UnsupportedModelError(f"{type(module).__name__} has no parameters")


def spec_from_glu_probe(module: Any, kind: str) -> MLPSpec:
    """Describe one of our own :class:`~glu_probe.modules.MLP` / ``GatedMLP`` blocks."""
    fc2 = module.fc2
    assert isinstance(fc2, nn.Linear | nn.Conv2d)
    fc1_bias = (module.fc1 if hasattr(module, "fc1") else module.fc1_g).bias is not None
    norm = None if isinstance(module.norm, nn.Identity) else module.norm
    p = _first_param(module)
    return MLPSpec(
        in_features=int(module.in_features),  # type: ignore[arg-type]
        hidden_features=int(module.hidden_features),  # type: ignore[arg-type]
        out_features=int(module.out_features),  # type: ignore[arg-type]
        gated=bool(module.gated),
        activation=activation_name(module.act),  # type: ignore[arg-type]
        num_params=_params(module),
        bias=(fc1_bias, fc2.bias is not None),
        drop=(float(module.drop1.p), float(module.drop2.p)),  # type: ignore[union-attr]
        norm=norm,
        use_conv=bool(getattr(module, "use_conv", False)),
        kind=kind,
        device=p.device,
        dtype=p.dtype,
    )


# --------------------------------------------------------------------------- host conventions


def _hf_config(model: nn.Module) -> Any:
    try:
        config = getattr(model, "config", None)
    except Exception:  # a ``config`` property that fails (not loaded yet): no config to use
        return None
    if config is not None and hasattr(config, "to_dict") and hasattr(config, "model_type"):
        return config
    return None


def _holds_config(model: nn.Module) -> bool:
    """``model.config`` is its own (an instance or class attribute), not read through a
    forwarding ``__getattr__``."""
    return "config" in vars(model) or any("config" in vars(k) for k in type(model).__mro__)


def _is_timm_host(model: nn.Module) -> bool:
    return any(c.__module__.startswith("timm.") for c in type(model).__mro__)


def _is_timm_model(model: nn.Module) -> bool:
    """A timm *model* (not one of its layers): a ``timm.models`` class with ``forward_features``,
    or the wrapper ``timm.create_model(..., features_only=True)`` returns (``FeatureListNet``
    and its kin hold the model's stages, not the model: without ``forward_features`` they were
    not taken for a model, and a backbone's swapped blocks got another init; review, s24)."""
    module = type(model).__module__
    if module == "timm.models._features":
        return type(model).__name__.startswith("Feature") and type(model).__name__.endswith("Net")
    return module.startswith("timm.models.") and hasattr(model, "forward_features")


def _timm_family(host: nn.Module, name: str) -> str:
    """The timm family module (``timm.models.convnext``, ...) whose init conventions apply to
    the block at ``name`` inside ``host``: the host's own, or for a ``features_only`` wrapper
    (``timm.models._features``) that of the outermost module between it and the block that
    belongs to a family (its stages: ``stages_0`` is a ``ConvNeXtStage``)."""
    module = type(host).__module__
    if not module.startswith("timm.models._"):
        return module
    parts = name.split(".")
    for k in range(1, len(parts)):
        inner = type(host.get_submodule(".".join(parts[:k]))).__module__
        if inner.startswith("timm.models.") and not inner.startswith("timm.models._"):
            return inner
    return module


def _is_pretrained(model: nn.Module) -> bool:
    return _hf_config(model) is not None and any(
        c.__name__ == "PreTrainedModel" for c in type(model).__mro__
    )


def _ancestors(root: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of the modules above ``path``, nearest first, ``root`` (``""``) last."""
    parts = path.split(".") if path else []
    return [
        (".".join(parts[:k]), root.get_submodule(".".join(parts[:k])))
        for k in range(len(parts) - 1, -1, -1)
    ]


def config_owner(root: nn.Module, path: str) -> tuple[str, nn.Module, Any] | None:
    """The Hugging Face config that describes the block at ``path``, ``(owner path, owner,
    config)``, ``owner`` the outermost module holding that config object; ``None`` if none.

    It is the config of the outermost model above the block that holds one (a wrapped model's
    own config: a ``LightningModule`` holding a ``GPT2LMHeadModel``; T5's root config, not the
    private copies its stacks hold), except where the nearest one is a sub-config of it (a
    composite model's ``text_config`` / ``vision_config``, as in LLaVA): then that sub-config.
    A wrapper that only forwards attribute reads to the model it wraps (``torch.compile``'s
    ``OptimizedModule``, FSDP) does not hold the config: the record's paths are the model's,
    which is what gets saved (review, session 25: they began with ``_orig_mod.``)."""
    holders = [
        (p, m, c)
        for p, m in reversed(_ancestors(root, path))
        if (c := _hf_config(m)) and _holds_config(m)
    ]
    if not holders:
        return None
    outer, near = holders[0][2], holders[-1][2]
    config = near if any(v is near for v in vars(outer).values()) else outer
    owner = next((p, m) for p, m, c in holders if c is config)
    return owner[0], owner[1], config


def _init_host(root: nn.Module, path: str) -> tuple[str, nn.Module, str] | None:
    """The sub-model whose init conventions apply to the block at ``path``: its nearest ancestor
    that is a Hugging Face ``PreTrainedModel`` (``"hf"``) or a timm model (``"timm"``); a root
    that only holds a config (``"hf"``) or is a timm module (``"timm"``) as a last resort."""
    for p, m in _ancestors(root, path):
        if _is_pretrained(m):
            return p, m, "hf"
        if _is_timm_model(m):
            return p, m, "timm"
    if _hf_config(root) is not None:
        return "", root, "hf"
    if _is_timm_host(root):
        return "", root, "timm"
    return None


def _keep_dropout_modes(path: str, old: nn.Module, new: nn.Module, adapter: MLPAdapter) -> None:
    """Carry dropout modes that differ from the block's own: a model in training mode whose
    dropouts the user put in eval mode (switched off) kept them off only until the swap, whose
    ``new.train(old.training)`` turned the new block's back on (review, session 25). A dropout
    takes the mode of the source's one of the same name (timm's ``drop1`` / ``drop2``), else
    the source dropouts' common mode; modes that differ with no such match get a warning."""
    kinds = (nn.modules.dropout._DropoutNd,)
    dropped = {id(m) for m in adapter.dropped_modules(old)}
    sources = {n: m for n, m in old.named_modules() if isinstance(m, kinds) and id(m) in dropped}
    modes = {m.training for m in sources.values()}
    if not sources or modes == {old.training}:
        return  # new.train(old.training) already gave every dropout its mode
    unmatched = []
    for name, m in new.named_modules():
        if not isinstance(m, kinds):
            continue
        src = sources.get(name)
        if src is not None:
            m.train(src.training)
        elif len(modes) == 1:
            m.train(next(iter(modes)))
        else:
            unmatched.append(name)
    if unmatched:
        warnings.warn(
            f"swap_mlp: {path}'s dropouts are in different modes "
            f"({', '.join(f'{n}: {m.training}' for n, m in sources.items())}); the new "
            f"block's {unmatched} are in the block's mode (training={old.training}): set "
            "their modes again if needed",
            stacklevel=external_stacklevel(),
        )


def _keep_frozen(path: str, old: nn.Module, new: nn.Module, adapter: MLPAdapter) -> None:
    """Carry the source block's frozen state (``requires_grad``) to ``new``: a frozen block
    stays frozen; a partly frozen one (BitFit: biases train, weights do not) keeps its flags per
    layer role, input layers to ``fc1``/``fc1_g``/``fc1_x``, output layer to ``fc2``, weight to
    weight and bias to bias. Only the fully frozen case was kept before session 18: a partly
    frozen block came back fully trainable, silently (review). Where the roles cannot be mapped
    (a rewired block, input layers frozen differently from each other), flags uniform per kind
    (every weight frozen, every bias trained) still carry over; otherwise a warning says that
    the new block trains every parameter."""
    flags = [p.requires_grad for p in adapter.source_parameters(old)]
    if all(flags):
        return
    if not any(flags):
        new.requires_grad_(False)  # a frozen block stays frozen
        return
    roles = _source_roles(old)
    inputs = [m for n, m in new.named_children() if n in ("fc1", "fc1_g", "fc1_x")]
    output = getattr(new, "fc2", None)
    if roles is not None and inputs and isinstance(output, nn.Module):
        ins, out = roles
        plan: list[tuple[list[nn.Module], str, bool]] = []
        for names, targets in ((ins, inputs), ((out,), [output])):
            for kind in ("weight", "bias"):
                seen = {
                    t.requires_grad
                    for n in names
                    if isinstance(t := getattr(getattr(old, n, None), kind, None), torch.Tensor)
                }
                if seen:
                    plan.append(
                        (targets, kind, seen.pop()) if len(seen) == 1 else ([], kind, False)
                    )
        if plan and all(targets for targets, _, _ in plan):
            for targets, kind, flag in plan:
                for module in targets:
                    param = getattr(module, kind, None)
                    if isinstance(param, nn.Parameter):
                        param.requires_grad_(flag)
            return
    # No layer roles (a rewired block such as BERT's, a block with a norm inside), or input
    # layers frozen differently: the flags may still be uniform per kind (BitFit freezes every
    # weight and trains every bias), and then weights follow weights, biases biases.
    own = {id(p) for p in adapter.source_parameters(old)}
    kinds: dict[str, set[bool]] = {}
    for name, p in old.named_parameters():
        if id(p) in own:
            kinds.setdefault(name.rsplit(".", 1)[-1], set()).add(p.requires_grad)
    if kinds and all(len(v) == 1 for v in kinds.values()):
        for name, p in new.named_parameters():
            kind = name.rsplit(".", 1)[-1]
            if kind in kinds:
                p.requires_grad_(next(iter(kinds[kind])))
        return
    warnings.warn(
        f"swap_mlp: the block at {path or '<root>'} is partly frozen ({sum(flags)} of "
        f"{len(flags)} parameter tensors train) in a way that does not map onto the new "
        "block's layers; the new block trains all its parameters",
        UserWarning,
        stacklevel=external_stacklevel(),
    )


def _source_roles(source: nn.Module) -> tuple[tuple[str, ...], str] | None:
    """Child names of the source block's input layers (the gate and up projections of a split
    gated block, else the one input layer) and of its output layer, for a block the swap
    *replaces* (not a layer it rewires) and that holds nothing else with parameters."""
    for ins, out in ((("gate_proj", "up_proj"), "down_proj"), (("c_fc",), "c_proj")):
        if all(hasattr(source, n) for n in (*ins, out)):
            return ins, out
    from glu_probe.swap.structural import _analyse

    form = _analyse(source)
    if form is None:
        return None
    names = {id(c): n for n, c in source.named_children()}
    inputs = (names[id(form.fc1)],) + ((names[id(form.up)],) if form.up is not None else ())
    return inputs, names[id(form.fc2)]


#: ``nn.Module``'s own bookkeeping containers (hooks, the non-persistent buffer set, ...), by
#: attribute name and type: a stand-in gets fresh empty ones, never the live module's.
_MODULE_CONTAINERS: dict[str, type] = {
    k: type(v) for k, v in vars(nn.Module()).items() if isinstance(v, dict | set)
}


def _shell(source: nn.Module, children: dict[str, nn.Module]) -> nn.Module:
    """A module of ``source``'s class and instance settings (``__init__`` not run) whose
    children are ``children``, with no parameters or buffers of its own and fresh, empty hook
    dicts and non-persistent buffer set: whatever is registered on it stays off ``source``.
    Other attributes (e.g. a ``config``) are shared by reference, read-only by convention."""
    shell = object.__new__(type(source))
    state = shell.__dict__
    state.update(source.__dict__)
    state.update({k: t() for k, t in _MODULE_CONTAINERS.items()})
    state["_is_full_backward_hook"] = None
    state["_modules"] = dict(children)
    return shell


#: Instance attribute (in ``__dict__``, not a registered sub-module) of a block a swap built:
#: a parameter-free, meta-device copy of the *first* block swapped out at its place (the
#: host's own class and layer names), which a later swap of the same place initialises from.
ORIGIN_ATTR = "_glu_probe_origin"


def _meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` (class, instance settings, children) whose parameters and buffers
    are meta tensors of the same shapes and dtypes, with fresh hook dicts: no storage, nothing
    shared with the live module but read-only attributes (a ``config``)."""
    children = {k: None if c is None else _meta_copy(c) for k, c in module._modules.items()}
    dup = _shell(module, children)  # type: ignore[arg-type]
    dup.__dict__.pop(ORIGIN_ATTR, None)
    for k, v in module._parameters.items():
        dup._parameters[k] = (
            None if v is None else nn.Parameter(torch.empty_like(v, device="meta"), v.requires_grad)
        )
    for k, b in module._buffers.items():
        dup._buffers[k] = None if b is None else torch.empty_like(b, device="meta")
    dup._non_persistent_buffers_set.update(module._non_persistent_buffers_set)
    return dup


def _origin_of(block: nn.Module) -> nn.Module:
    """The block a swap's initialisation reads the host's rules from: for a block an earlier
    swap built, the copy of the host's own block it replaced (:data:`ORIGIN_ATTR`), else the
    block itself."""
    origin = block.__dict__.get(ORIGIN_ATTR)
    return origin if isinstance(origin, nn.Module) else block


def _stand_in(source: nn.Module, children: dict[str, nn.Module]) -> nn.Module:
    """A shallow stand-in for ``source`` (same class and instance settings) whose parameterised
    children are ``children`` only (:func:`_shell`): the host's ``_init_weights`` sees the new
    layers under the source's names, and nothing of the live model is touched."""
    kept = {
        n: c
        for n, c in source.named_children()
        if not any(True for _ in c.parameters()) and not any(True for _ in c.buffers())
    }
    return _shell(source, {**kept, **children})


def _new_layers(block: nn.Module) -> tuple[list[nn.Module], nn.Module | None]:
    """Input layers (``fc1``, or ``fc1_g`` and ``fc1_x``) and output layer of a new block."""
    inner = getattr(block, "mlp", block)  # ResidualAddMLP / ResidualNormMLP hold it as .mlp
    ins = [
        getattr(inner, n)
        for n in ("fc1", "fc1_g", "fc1_x")
        if isinstance(getattr(inner, n, None), nn.Module)
    ]
    out = getattr(inner, "fc2", None)
    return ins, out if isinstance(out, nn.Module) else None


def _is_t5_block(source: nn.Module | None) -> bool:
    return (
        source is not None
        and hasattr(source, "wo")
        and (hasattr(source, "wi") or hasattr(source, "wi_0"))
    )


def _fan_in(layer: nn.Module | None) -> int | None:
    """Input width of a ``Linear`` / ``Conv2d`` (the hidden width, for an output layer)."""
    width = getattr(layer, "in_features", None) or getattr(layer, "in_channels", None)
    return width if isinstance(width, int) else None


@contextlib.contextmanager
def _config_width(config: Any, old: Iterable[int | None], new: int | None) -> Iterator[None]:
    """Inside the ``with`` statement, the config's MLP-width keys (:data:`WIDTH_KEYS` of the
    structural adapter: ``d_ff``, ``intermediate_size``, ...) that hold one of the widths
    ``old`` (the source's, and that of the host's own block first swapped out there: a nested
    config copy, T5's encoder and decoder stacks, keeps that one) read ``new``, the width the
    swap writes there afterwards; restored on exit. An ``_init_weights`` that scales by the
    configured width (T5's ``wo``: ``factor/√d_ff``) then initialises the new block as it would
    a block of a host rebuilt from the updated config."""
    from glu_probe.swap.structural import WIDTH_KEYS

    olds = {w for w in old if w is not None and w != new}
    saved: dict[str, Any] = {}
    if config is not None and olds and new is not None:
        for key in WIDTH_KEYS:
            value = getattr(config, key, None)
            if type(value) is int and value in olds:
                saved[key] = value
    try:
        for key in saved:
            setattr(config, key, new)
        yield
    finally:
        for key, value in saved.items():
            setattr(config, key, value)


def _hf_init(
    host: nn.Module,
    block: nn.Module,
    source: nn.Module | None,
    *,
    class_rule: bool = False,
    origin: nn.Module | None = None,
) -> bool:
    """The host ``PreTrainedModel``'s own ``_init_weights``: on every new sub-module (as HF's
    ``initialize_weights`` does), then on a stand-in of the source block holding the new layers
    under the source's names (so class-specific rules apply: CLIP's MLP stds, GPT-2's scaled
    ``c_proj``, T5's ``wi``/``wo``), with the config's width keys reading the new width
    (:func:`_config_width`). ``False`` where the host has no ``_init_weights`` or it fails, or
    (``class_rule=True``) where no stand-in can be built. ``origin``: the host's own block
    whose class and layer names the stand-in takes (:func:`_origin_of`; ``source`` itself by
    default), ``source`` the block replaced now (its width is the config's)."""
    init_fn = getattr(host, "_init_weights", None)
    if not callable(init_fn):
        return False
    ref = origin if origin is not None else source
    roles = _source_roles(ref) if ref is not None else None
    ins, out = _new_layers(block)
    can_stand_in = roles is not None and bool(ins) and out is not None
    if class_rule and not can_stand_in:
        return False
    old_widths: tuple[int | None, ...] = ()
    if roles is not None and source is not None and ref is not None:
        # the replaced block's hidden width (its output layer under the host's name, or, for a
        # block an earlier swap built, its fc2) and the host's own block's
        old_widths = (
            _fan_in(getattr(source, roles[1], None)) or _fan_in(_new_layers(source)[1]),
            _fan_in(getattr(ref, roles[1], None)),
        )
    try:
        with torch.no_grad(), _config_width(_hf_config(host), old_widths, _fan_in(out)):
            for m in block.modules():
                if m is not block and not isinstance(m, nn.Sequential):
                    init_fn(m)
            if can_stand_in:
                assert roles is not None and ref is not None and out is not None
                for lin in ins:
                    init_fn(_stand_in(ref, {**dict.fromkeys(roles[0], lin), roles[1]: out}))
    except Exception:
        return False
    return True


#: timm families whose models initialise their Linear layers with their own ``_init_weights``
#: (trunc_normal(0.02), zero bias) and then, always, divide ``blocks[i].mlp.fc2`` (and the
#: attention projection) by ``sqrt(2·(i+1))`` in ``fix_init_weight``.
_DEPTH_RESCALED = ("timm.models.eva", "timm.models.beit")


def _redraw_packed_up_half(block: Any, fn: Any, name: str) -> None:
    """Re-draw the up half of a packed gated block's ``fc1`` as ``fn`` draws a separate
    ``nn.Linear(in, h)`` named ``<name>.fc1_x`` (timm ``SwiGLU``'s up projection).

    ``fn`` saw ``fc1`` as one layer of ``2h`` rows: an init whose scale depends on fan-out
    (xavier_uniform: timm ViT's ``jax`` / ``moco`` modes, MLP-Mixer / ResMLP) gave the up half
    ``√((in + h)/(in + 2h))`` of the std timm's ``SwiGLU`` gets (0.74x at h = 4·in). The gate
    half is left as the host left it: these inits end with the block's ``init_weights`` (timm
    ``SwiGLU``'s gate rule), which ``fn`` has run.
    """
    from timm.models._manipulate import named_apply

    from ..modules import GatedMLP

    if not (isinstance(block, GatedMLP) and block.packed and type(block.fc1) is nn.Linear):
        return
    w, b = block.up_params()
    stand = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    named_apply(fn, stand, name=f"{name}.fc1_x", include_root=True)
    w.copy_(stand.weight)
    if b is not None:
        b.copy_(stand.bias)


@contextlib.contextmanager
def _init_in_float32(block: nn.Module) -> Iterator[None]:
    """Hold ``block``'s 16-bit floating tensors in float32 for an init, then cast them back.

    torch's ``trunc_normal_`` drawn in fp16/bf16 is far off (std 0.036 / 0.097 for 0.02, values
    clamped at ±2: review, session 25); a host's own blocks are initialised in float32 and cast.
    The tensors keep their identity (``.data`` is swapped), so optimisers and hooks still hold
    them.
    """
    low = [
        (t, t.dtype)
        for t in [*block.parameters(), *block.buffers()]
        if t.dtype in (torch.float16, torch.bfloat16)
    ]
    for t, _ in low:
        t.data = t.data.float()
    try:
        yield
    finally:
        for t, dtype in low:
            t.data = t.data.to(dtype)


def _timm_init(host: nn.Module, name: str, block: Any) -> None:
    """timm conventions, by family (see :func:`host_init`)."""
    import sys

    from timm.models._manipulate import named_apply

    family_name = _timm_family(host, name)
    family = sys.modules.get(family_name)
    fn = getattr(family, "_init_weights", None)
    with torch.no_grad():
        own_init: Any = getattr(host, "_init_weights", None)
        if family_name in _DEPTH_RESCALED and callable(own_init):
            # EVA / EVA-02 / BEiT: the model's own _init_weights on the Linear layers only
            # (trunc_normal(0.02), zero bias; gates included: EVA never calls SwiGLU's
            # init_weights), then fix_init_weight's 1/sqrt(2·(layer+1)) on blocks[layer].mlp.fc2.
            for m in block.modules():
                if isinstance(m, nn.Linear):
                    own_init(m)
            hit = re.fullmatch(r"blocks\.(\d+)\.mlp", name)
            if hit and callable(getattr(host, "fix_init_weight", None)):
                _, out = _new_layers(block)
                if isinstance(out, nn.Linear):
                    out.weight.div_(math.sqrt(2.0 * (int(hit.group(1)) + 1)))
            return
        if (
            not hasattr(host, "weight_init_mode")
            and callable(fn)
            and family_name
            in (
                "timm.models.convnext",
                "timm.models.mlp_mixer",
            )
        ):
            # ConvNeXt: trunc_normal(0.02) / zero bias for Linear *and* Conv2d (conv_mlp);
            # MLP-Mixer / ResMLP: xavier_uniform, biases N(0, 1e-6²) in blocks named *mlp*.
            try:
                named_apply(fn, block, name=name, include_root=True)
                _redraw_packed_up_half(block, fn, name)
                return
            except Exception:  # e.g. a bias-free layer ConvNeXt's init does not expect
                pass
        from timm.models.vision_transformer import get_init_weights_vit

        mode = getattr(host, "weight_init_mode", "") or ""
        vit_init = get_init_weights_vit(mode)
        convs: tuple[type, ...] = (nn.Conv1d,) if "jax" in mode else (nn.Conv1d, nn.Conv2d)

        def init(module: nn.Module, name: str = "") -> None:
            # The ViT inits ('' and moco) draw nn.Linear only: the 1x1 convs of a use_conv
            # block (FocalNet, a ConvNeXt features_only backbone) kept torch's default,
            # 2-5x timm's scale (review, session 24). They get trunc_normal(0.02) and zero
            # bias, the rule of every timm family with conv MLPs, before the block's own
            # init_weights (the gate rule; named_apply walks children first).
            if isinstance(module, convs):
                weight, bias = module.weight, module.bias
                assert isinstance(weight, torch.Tensor)
                nn.init.trunc_normal_(weight, std=0.02)
                if isinstance(bias, torch.Tensor):
                    nn.init.zeros_(bias)
            else:
                vit_init(module, name)

        named_apply(init, block, name=name, include_root=True)
        _redraw_packed_up_half(block, vit_init, name)
        hit = re.fullmatch(r"(?:.*\.)?blocks\.(\d+)\.mlp", name)
        if getattr(host, "fix_init", False) and hit and hasattr(block, "fc2"):
            block.fc2.weight.div_(math.sqrt(2.0 * (int(hit.group(1)) + 1)))


def host_init(
    root: nn.Module,
    path: str,
    block: Any,
    *,
    source: nn.Module | None = None,
    origin: nn.Module | None = None,
) -> None:
    """Initialise a new block the way its host initialises its own MLPs.

    The host is the sub-model that owns the block: its nearest ancestor that is a Hugging Face
    ``PreTrainedModel`` or a timm model (so a model wrapped in a ``LightningModule`` and the
    towers of a composite model get their own conventions); ``source`` is the block being
    replaced, and ``origin`` the host's own block that was first swapped out at this place,
    whose class and layer names decide the rules below (``source`` by default). A second swap
    of the same place (``swiglu`` then back to ``gelu``) thus initialises as the first did:
    T5's, GPT-2's and CLIP's rules see their own block's class, not a glu-probe block's.

    * Hugging Face: the host's own ``_init_weights``, applied to every new sub-module (plain
      layers: N(0, initializer_range²) or as the family does, zero biases) and then to a
      stand-in of the source block holding the new layers under the source's names (the
      source's class, fresh hook dicts: nothing of the live model is touched), so that a
      class-specific rule applies as to the source: GPT-2's scaled output projection
      ``r / sqrt(2 · n_layer)``, CLIP's ``fc1`` / ``fc2`` stds, T5's ``wi`` / ``wo`` rule
      (``factor/√d_model``, ``factor/√d_ff``; T5 v1.0 and v1.1, MT5, ...), and no T5 rule
      where the host's ``_init_weights`` has none for the block (Pix2Struct's vision MLP, which
      has ``wi``/``wo`` layers but gets N(0, initializer_range²)). While it runs, the config's
      MLP-width keys (``d_ff``, ``intermediate_size``, ``n_inner``, ``hidden_dim``,
      ``ffn_dim``) that hold the source's width read the new width, the value the swap writes
      there: a width-scaled rule (T5's ``wo``) gives what a host rebuilt from the updated
      config gives its own blocks. For gated blocks both input layers get the rule of the
      source's input layer(s).
    * Hugging Face fallbacks: a T5-family block (``source`` with ``wi``/``wo`` layers, config
      with ``initializer_factor``) whose host has no usable ``_init_weights`` (or whose
      stand-in cannot be built), or a block with no ``source`` in a host whose config has
      ``initializer_factor`` and no ``initializer_range``: T5's rule, N(0, (factor/√fan_in)²),
      zero biases. Otherwise, if the host has no ``_init_weights`` (or it fails): N(0, r²)
      with ``r`` the config's ``initializer_range`` or ``init_std``.
    * timm EVA / EVA-02 and BEiT: the model's own ``_init_weights`` on every ``Linear`` of the
      new block (trunc_normal(0.02), zero bias; a gated block's gate too, as EVA's own
      ``SwiGLU`` / ``GluMlp`` get it: EVA never calls their ``init_weights``), then
      ``fix_init_weight``'s depth rescaling of ``blocks[i].mlp.fc2`` by ``1/sqrt(2·(i+1))``.
      Inner norms keep their fresh (ones / zeros) init, as EVA leaves them.
    * a ``features_only`` wrapper (``FeatureListNet``, ...) is the model it was made from:
      the family of its stages applies.
    * timm ConvNeXt / MLP-Mixer (and ResMLP): the family's own ``_init_weights`` (ConvNeXt:
      trunc_normal(0.02) and zero bias for ``Linear`` and the 1x1 ``Conv2d`` of ``conv_mlp``;
      Mixer: xavier-uniform weights and N(0, 1e-6²) biases).
    * other timm models: the ViT init (``weight_init_mode``: '' -> trunc_normal(0.02) / zero
      bias, or jax / moco; the 1x1 convs of a ``use_conv`` block, which the ViT inits other
      than jax leave alone, get trunc_normal(0.02) / zero bias, the rule of timm's families
      with conv MLPs such as FocalNet), applied with timm's own ``named_apply`` so that blocks
      with an ``init_weights()`` (timm's ``SwiGLU``, our ``GatedMLP``) get it exactly as in a
      freshly built timm ViT (gate weight N(0, 1e-6²), gate bias 1); plus ``fix_init`` rescaling of
      ``fc2`` by ``1/sqrt(2·(layer+1))``. This is the convention of the ViT family; other timm
      families (Swin, CaiT, ...) use the same trunc_normal(0.02) / zero-bias Linear init, and
      their new gated blocks get the ViT gate convention above. Depth rescalings other than
      ViT's ``fix_init`` and EVA's / BEiT's ``fix_init_weight`` are not applied.
    * anything else: the block keeps ``nn.Linear``'s default init.
    """
    found = _init_host(root, path)
    if found is None:
        return
    host_path, host, kind = found
    name = path[len(host_path) + 1 :] if host_path else path
    if kind == "timm":
        with _init_in_float32(block):
            _timm_init(host, name, block)
        return
    config = _hf_config(host)
    if config is None:
        return
    # T5's rule, N(0, (factor/√fan_in)²), is a fallback: the host's own _init_weights applies it
    # to its T5-family blocks through the stand-in (with d_ff reading the new width) and gives
    # other blocks with wi/wo layers (Pix2Struct's vision MLP) the host's rule for them.
    ref = origin if origin is not None else source
    t5_rule = hasattr(config, "initializer_factor") and (
        _is_t5_block(ref) or (source is None and not hasattr(config, "initializer_range"))
    )
    class_rule = _is_t5_block(ref)
    if (
        not (t5_rule and source is None)
        and _is_pretrained(host)
        and _hf_init(host, block, source, class_rule=class_rule, origin=ref)
    ):
        return
    if t5_rule:
        factor = float(config.initializer_factor)
        with torch.no_grad():
            for m in block.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, mean=0.0, std=factor / math.sqrt(m.in_features))
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        return
    std_key = next((k for k in ("initializer_range", "init_std") if hasattr(config, k)), None)
    if std_key is not None:
        std = float(getattr(config, std_key))
        with torch.no_grad():
            for m in block.modules():
                if isinstance(m, nn.Linear | nn.Conv2d):
                    nn.init.normal_(m.weight, mean=0.0, std=std)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm | nn.RMSNorm) and hasattr(m, "reset_parameters"):
                    m.reset_parameters()
            n_layer = getattr(config, "n_layer", None)
            if getattr(config, "model_type", "") == "gpt2" and n_layer and hasattr(block, "fc2"):
                nn.init.normal_(block.fc2.weight, mean=0.0, std=std / math.sqrt(2 * n_layer))


# --------------------------------------------------------------------------- the driver

_CANDIDATE_NAME = re.compile(
    r"^(mlp|mlps|ffn|ffns|feed_?forward|intermediate|mlp_block|block_sparse_moe|moe|experts)$",
    re.I,
)
_HEAD_CLASS = re.compile(r"(head$|classifier)", re.I)
_CANDIDATE_CLASS = re.compile(
    r"(mlp|feedforward|feed_forward|ffn|intermediate|swiglu|geglu|sparsemoe|moeblock|moelayer"
    r"|moe$|experts$|dense\w*actdense|densereludense)",
    re.I,
)


def _walk(
    module: nn.Module, prefix: str, adapters: list[MLPAdapter]
) -> Iterator[tuple[str, nn.Module, MLPAdapter | None]]:
    """Yield ``(path, module, adapter)`` for matched blocks (not descending into them) and
    ``(path, module, None)`` for every other module."""
    for adapter in adapters:
        if adapter.matches(module):
            yield prefix, module, adapter
            return
    yield prefix, module, None
    for name, child in module.named_children():
        yield from _walk(child, f"{prefix}.{name}" if prefix else name, adapters)


def _uncovered_weights(module: nn.Module, inner: list[str]) -> list[str]:
    """Names of ``module``'s matrix (or larger) parameters outside the blocks at ``inner``.

    Vectors (norm scales, biases, gates' scalars) do not count: a wrapper may add a norm."""
    out = []
    for name, param in module.named_parameters():
        if param.ndim >= 2 and not any(name.startswith(q + ".") for q in inner):
            out.append(name)
    return out


def _is_head(module: nn.Module) -> bool:
    """Classifier / prediction heads (timm's ``NormMlpClassifierHead``, ...): not MLP blocks."""
    return bool(_HEAD_CLASS.search(type(module).__name__))


def _holds_mlp_layers(module: nn.Module) -> bool:
    """A block that holds its feed-forward layers itself as ``mlp_*`` Linear children, with no
    ``mlp`` child (timm's ``ParallelScalingBlock``: ``mlp_out_proj``, its input projection fused
    into ``in_proj``). It was never counted as MLP-like: a ViT with such blocks and a swappable
    attention-pool MLP was swapped there alone, with success and no unrecognised block (review,
    session 20)."""
    children = dict(module.named_children())
    if "mlp" in children:
        return False
    return any(n.startswith("mlp_") and isinstance(c, nn.Linear) for n, c in children.items())


def _looks_like_mlp(path: str, module: nn.Module, adapters: Sequence[MLPAdapter] = ()) -> bool:
    if any(a.resembles(module) for a in adapters):
        return True
    if _is_head(module):
        return False
    if _holds_mlp_layers(module):
        return True
    last = path.rpartition(".")[2]
    return bool(_CANDIDATE_NAME.match(last) or _CANDIDATE_CLASS.search(type(module).__name__))


def _resolve_width(
    spec: MLPSpec,
    variant: str,
    match: str,
    multiple_of: int,
    tolerance: float | None,
    record: dict[str, Any] | None,
    path: str | None = None,
    place: Literal["rebuilt", "own", "built"] = "rebuilt",
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
    call's arguments and the block's own width, as in a swap of a fresh model."""
    gated = variant in GATED_VARIANTS
    same = (
        record is not None
        and record.get("variant") == variant
        and record.get("match", match) == match
    )
    if same and record is not None and place == "rebuilt":
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
        if own_under_record and record is not None:
            differing = _kwargs_differ(record, recordable)
            if differing:
                kwargs_differ.setdefault(differing, path)
        if hidden_features is not None:
            hidden, used = hidden_features, 1
        else:
            rel = _relative(path, owner[0]) if owner is not None else None
            place: Literal["rebuilt", "own", "built"] = (
                "built" if _built_by_swap(old) is not None else "own" if any_built else "rebuilt"
            )
            hidden, used = _resolve_width(
                spec, variant, match, multiple_of, tolerance, record, rel, place
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
    # One update per config: each block's config is that of the sub-model owning it.
    groups: dict[int, tuple[str, nn.Module, Any, list[int]]] = {}
    for k, (path, *_rest) in enumerate(plan):
        owner = config_owner(model, path)
        if owner is not None:
            groups.setdefault(id(owner[2]), (*owner, []))[3].append(k)
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


def _listed(paths: Any, path: str, owner_path: str) -> bool:
    """Whether a record's path list (``"excluded"``, relative to the config's owner) holds the
    block at root path ``path``."""
    return (
        isinstance(paths, list)
        and _under(path, owner_path)
        and _relative(path, owner_path) in paths
    )


def _same_kind(spec: MLPSpec, new: nn.Module, hidden: int) -> bool:
    """Whether the block built for ``spec`` computes the function class the replaced block had:
    same gating, activation and width (a same-variant swap, which only re-initialises)."""
    act = getattr(new, "act", None)
    try:
        name = activation_name(act) if isinstance(act, nn.Module) else None
    except Exception:
        return False
    return (
        name is not None
        and name == spec.activation
        and bool(getattr(new, "gated", False)) == bool(spec.gated)
        and hidden == spec.hidden_features
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


def _kwargs_differ(record: Mapping[str, Any], recordable: Mapping[str, Any]) -> str:
    """How the module keywords of a config record (a swap to the same variant made it) differ
    from a new swap's, as text (``""`` where they agree). Keywords the record could not hold are
    not compared."""
    old = record.get("module_kwargs")
    old = dict(old) if isinstance(old, Mapping) else {}
    unrecorded = record.get("module_kwargs_unrecorded")
    skip = set(unrecorded) if isinstance(unrecorded, list) else set()
    keys = sorted((set(old) | set(recordable)) - skip)
    parts = [
        f"{k}: record {old[k]!r} vs {recordable[k]!r}"
        if k in old and k in recordable
        else (
            f"{k}={old[k]!r} in the record only" if k in old else f"{k}={recordable[k]!r} here only"
        )
        for k in keys
        if old.get(k, _MISSING) != recordable.get(k, _MISSING)
    ]
    return "; ".join(parts)


_MISSING = object()


def _under(path: str, owner_path: str) -> bool:
    """Whether ``path`` is at or below ``owner_path`` (``""``: the root, which holds all)."""
    return not owner_path or path == owner_path or path.startswith(owner_path + ".")


def _relative(path: str, owner_path: str) -> str:
    """``path`` relative to ``owner_path`` (a path at or below it)."""
    return path[len(owner_path) + 1 :] if owner_path else path


def _built_by_swap(block: nn.Module) -> nn.Module | None:
    """The block an earlier swap built at this place (in ``block`` itself or, for a layer an
    adapter rewired in place, BERT's or OPT's, inside it), or ``None`` for a host's own block."""
    for m in block.modules():
        if ORIGIN_ATTR in vars(m):
            return m
    return None


def _block_signature(block: nn.Module) -> tuple[str, int | None]:
    """``(variant, width)`` of a block a swap built: the variant named by its gating and
    activation (``"gelu"``, ``"swiglu"``; otherwise a description such as ``"gated
    gelu_tanh"``), with ``" (packed=False)"`` for a gated block with separate gate and up
    layers (other state-dict keys: a chain of swaps with either layout is "mixed"; review,
    session 23), and its hidden width."""
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


class _Snapshot:
    """The attributes of every module of a model and of every Hugging Face config it holds
    (sub-configs included), to put back after a failed swap. Shallow: each module's class
    (a parametrization changes it), its attributes and the contents of every dict or set it
    holds (children, parameters, buffers, hook dicts, the non-persistent buffer set) are
    restored, and the configs' values; tensors are not copied (the swap changes none in
    place)."""

    def __init__(self, model: nn.Module) -> None:
        self.modules: list[tuple[nn.Module, type, dict[str, Any], dict[str, Any]]] = []
        for m in model.modules():
            attrs = dict(vars(m))
            contents = {
                k: dict(v) if isinstance(v, dict) else set(v)
                for k, v in attrs.items()
                if isinstance(v, dict | set)
            }
            self.modules.append((m, type(m), attrs, contents))
        configs: dict[int, Any] = {}
        todo = [c for m in model.modules() if (c := _hf_config(m)) is not None]
        while todo:
            c = todo.pop()
            if id(c) in configs:
                continue
            configs[id(c)] = c
            todo.extend(
                v for v in vars(c).values() if hasattr(v, "to_dict") and hasattr(v, "model_type")
            )
        self.configs = [(c, dict(vars(c))) for c in configs.values()]

    def restore(self) -> None:
        """Put everything back. Only containers whose contents changed are rewritten (a dict
        subclass may refuse ``update``: diffusers' ``FrozenDict``, which every diffusers model
        holds, made the rollback itself fail, hiding the swap's error and restoring nothing;
        re-review, session 22), and one that cannot be is left with a warning while the rest,
        configs included, is still restored."""
        failed: list[str] = []
        for m, cls, attrs, contents in self.modules:
            for key, saved in contents.items():
                now = attrs[key]
                if _same_contents(now, saved):
                    continue
                try:
                    now.clear()
                    now.update(saved)
                except Exception as err:
                    failed.append(f"{type(m).__name__}.{key} ({type(err).__name__}: {err})")
            if type(m) is not cls:
                m.__class__ = cls
            vars(m).clear()
            vars(m).update(attrs)
        for c, attrs in self.configs:
            vars(c).clear()
            vars(c).update(attrs)
        if failed:
            warnings.warn(
                "swap_mlp: rolling back the failed swap could not restore "
                + ", ".join(failed[:4])
                + (", ..." if len(failed) > 4 else ""),
                RuntimeWarning,
                stacklevel=external_stacklevel(),
            )


def _same_contents(now: Any, saved: Any) -> bool:
    """Whether a dict holds the same keys bound to the same objects (identity: values may be
    tensors), or a set the same members, as its snapshot."""
    if isinstance(saved, set):
        return bool(now == saved)
    return bool(now.keys() == saved.keys() and all(now[k] is v for k, v in saved.items()))


#: ``include`` / ``exclude`` of :func:`swap_mlp`: a regular expression (string or compiled)
#: matched against a block's whole path, an iterable of them, or a callable
#: ``(path, module) -> bool``.
PathFilter = (
    str | re.Pattern[str] | Iterable[str | re.Pattern[str]] | Callable[[str, nn.Module], bool]
)


def _path_matcher(
    name: str, spec: PathFilter, known: set[str]
) -> list[tuple[str, Callable[[str, nn.Module], bool]]]:
    """``(label, test)`` per pattern of an ``include`` / ``exclude`` argument (one for a
    callable), to tell which matched nothing. A string pattern matches a path it equals, or
    that it matches as a regular expression; one that is not a regular expression must be one
    of the ``known`` paths."""
    if callable(spec):
        fn = spec
        label = getattr(fn, "__qualname__", None) or repr(fn)
        return [(f"callable {label}", lambda path, module: bool(fn(path, module)))]
    if isinstance(spec, str | re.Pattern):
        items: list[Any] = [spec]
    elif isinstance(spec, Iterable) and not isinstance(spec, bytes | bytearray):
        items = list(spec)  # (once: a generator)
    else:
        items = [spec]
    if not all(
        isinstance(p, str) or (isinstance(p, re.Pattern) and isinstance(p.pattern, str))
        for p in items
    ):
        raise TypeError(
            f"swap_mlp: {name} must be a regular expression (a string or a compiled pattern), "
            f"an iterable of them or a callable (path, module) -> bool, got {spec!r}"
        )
    tests: list[tuple[str, Callable[[str, nn.Module], bool]]] = []
    for p in items:
        if isinstance(p, re.Pattern):
            tests.append((p.pattern, _regex_test(None, p)))
            continue
        try:
            compiled: re.Pattern[str] | None = re.compile(p)
        except re.error as err:
            if p not in known:
                raise ValueError(
                    f"swap_mlp: {name} pattern {p!r} is not a regular expression ({err}) nor "
                    "the path of a block"
                ) from None
            compiled = None
        tests.append((p, _regex_test(p, compiled)))
    return tests


def _regex_test(
    literal: str | None, compiled: re.Pattern[str] | None
) -> Callable[[str, nn.Module], bool]:
    def test(path: str, _module: nn.Module) -> bool:
        return path == literal or (compiled is not None and compiled.fullmatch(path) is not None)

    return test


def _first_paths(found: Sequence[tuple[Any, ...]]) -> str:
    return ", ".join(f[0] for f in found[:4]) + (", ..." if len(found) > 4 else "")


def _select_blocks(
    model: nn.Module,
    found: list[tuple[str, nn.Module, MLPAdapter]],
    suspects: Sequence[tuple[str, nn.Module, str, list[str]]],
    paths_of: dict[int, list[str]],
    include: PathFilter | None,
    exclude: PathFilter | None,
) -> tuple[list[tuple[str, nn.Module, MLPAdapter]], list[str], set[str]]:
    """The recognised blocks ``include`` / ``exclude`` keep, the paths they leave out (blocks and
    MLP-like modules no adapter recognises), and the paths of the latter that they leave out
    (those holding no kept block), which are then not unrecognised blocks. A block is matched
    under each name its parent gives it (``layer.ffn = layer.mlp``); a block found at several
    paths (shared across layers) is kept or left out at all of them."""
    if include is None and exclude is None:
        return found, [], set()

    def names(path: str, module: nn.Module) -> list[str]:
        holder = model.get_submodule(path.rpartition(".")[0])
        aliases = [
            q
            for q in paths_of.get(id(module), [])
            if q != path and model.get_submodule(q.rpartition(".")[0]) is holder
        ]
        return [path, *aliases]

    candidates = [(p, m, names(p, m)) for p, m, _ in found]
    candidates += [(p, m, names(p, m)) for p, m, _, _ in suspects]
    known = {q for _, _, qs in candidates for q in qs}
    chosen = {p: True for p, _, _ in candidates}
    for name, spec, want in (("include", include, True), ("exclude", exclude, False)):
        if spec is None:
            continue
        tests = _path_matcher(name, spec, known)
        used: set[int] = set()
        for path, module, qs in candidates:
            hits = [i for i, (_, test) in enumerate(tests) if any(test(q, module) for q in qs)]
            used.update(hits)
            if bool(hits) is not want:
                chosen[path] = False
        unused = [label for i, (label, _) in enumerate(tests) if i not in used]
        if unused:
            shown = _first_paths(found)
            if callable(spec):
                message = (
                    f"the {name} {unused[0]} matches no recognised MLP block (it is called "
                    f"with each block's path and module, e.g. {shown})"
                )
            else:
                message = (
                    f"{name} pattern(s) {unused} match no recognised MLP block (patterns are "
                    f"matched against the whole path, e.g. {shown})"
                )
            warnings.warn(f"swap_mlp: {message}", UserWarning, stacklevel=external_stacklevel())
    by_module: dict[int, list[str]] = {}
    for path, module, _ in found:
        by_module.setdefault(id(module), []).append(path)
    for paths in by_module.values():
        if len({chosen[p] for p in paths}) > 1:
            raise ValueError(
                f"swap_mlp: the block at {paths} is one module shared by these paths; include "
                "or exclude all of them"
            )
    kept = [f for f in found if chosen[f[0]]]
    if not kept:
        raise ValueError(
            f"swap_mlp: include/exclude leave none of the {len(found)} recognised block(s) to "
            f"swap ({_first_paths(found)})"
        )
    left_out = {
        p
        for p, _, _, inner in suspects
        if not chosen[p] and not any(chosen.get(q, False) for q in inner)
    }
    return kept, [p for p, _, _ in found if not chosen[p]] + sorted(left_out), left_out


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
    are relative to that model (what a model rebuilt from its config holds)."""
    earlier = earlier or {}
    # id(top config) -> (its owner's path, the config, [(sub-model path, plan indices)])
    tops: dict[int, tuple[str, Any, list[tuple[str, list[int]]]]] = {}
    for owner_path, _owner, config, ks in groups.values():
        for p, m in reversed(_ancestors(model, owner_path)):  # (outermost first)
            top = _hf_config(m)
            holds = top is not None and any(v is config for v in vars(top).values())
            if holds and _holds_config(m):
                if id(top) not in groups:
                    tops.setdefault(id(top), (p, top, []))[2].append((owner_path, ks))
                break
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
        if odd:
            rec["mixed"] = {_relative(p, top_path): what for p, what in odd.items()}
        setattr(root, RECORD_ATTR, rec)
        prefix = f"{top_path}.config." if top_path else ""
        report.config_updates[prefix + RECORD_ATTR] = (old, rec)
        odd_all.update(odd)
    return odd_all


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


def _custom_linears(module: nn.Module) -> str:
    """A note naming the ``nn.Linear`` subclasses with their own ``forward`` among a block's
    layers (Falcon's ``FalconLinear``): the built-in adapters take plain layers only, since a
    subclass's forward may compute something else."""
    names = sorted(
        {
            type(m).__name__
            for m in module.children()
            if isinstance(m, nn.Linear) and type(m).forward is not nn.Linear.forward
        }
    )
    if not names:
        return ""
    return f", whose layers are {', '.join(names)}: nn.Linear subclasses with their own forward"


#: The hook registries of ``nn.Module`` (the new block would not carry them).
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def _has_own_hooks(module: nn.Module) -> bool:
    return any(getattr(module, d, None) for d in _HOOK_DICTS)


def hooked_modules(module: nn.Module) -> list[str]:
    """Names (``""``: the block itself) of the modules in ``module`` with forward, pre-forward
    or backward hooks: a swap builds a new block, which would not carry them."""
    return [name for name, m in module.named_modules() if _has_own_hooks(m)]


def _warn_mixed_dtypes(path: str, old: nn.Module, new: nn.Module, adapter: MLPAdapter) -> None:
    """Warn where the replaced block's floating parameters have several dtypes (T5 keeps
    ``wo`` in float32 in a 16-bit model, ``_keep_in_fp32_modules``): the new block has one."""
    olds = {p.dtype for p in adapter.source_parameters(old) if p.is_floating_point()}
    if len(olds) > 1:
        news = {p.dtype for p in new.parameters() if p.is_floating_point()}
        warnings.warn(
            f"swap_mlp: the block at {path} holds parameters in several dtypes "
            f"({', '.join(sorted(str(d) for d in olds))}); the new block holds "
            f"{', '.join(sorted(str(d) for d in news))} (a layer the host kept in float32, such "
            "as T5's wo, is not kept so): cast the new block's layers if the model needs it",
            UserWarning,
            stacklevel=external_stacklevel(),
        )


def _check_hooks(module: nn.Module, adapter: MLPAdapter) -> None:
    """Refuse a block with hooks or parametrizations on a module the swap takes out: the new
    block would not carry them (and a parametrization's tensors would count as parameters)."""
    from torch.nn.utils import parametrize

    dropped = {id(m) for m in adapter.dropped_modules(module)}
    checks = (
        (
            parametrize.is_parametrized,
            "parametrizations ({where}: weight_norm, spectral_norm, ...), which the new block "
            "would not carry (and whose extra tensors would be counted as its parameters): "
            "remove them (torch.nn.utils.parametrize.remove_parametrizations), swap, then "
            "register them on the new block's layers",
        ),
        (
            _has_own_hooks,
            "hooks ({where}), which the new block would not carry (a swap that dropped them "
            "would change what the model computes or records): remove them (handle.remove()), "
            "swap, then register them on the new block at this path",
        ),
    )
    for found, message in checks:
        names = [n for n, m in module.named_modules() if id(m) in dropped and found(m)]
        if names:
            where = ", ".join(repr(n) if n else "the block itself" for n in names[:4])
            raise UnsupportedModelError("it has " + message.format(where=where))


def _check_tied(
    path: str,
    block: nn.Module,
    adapter: MLPAdapter,
    paths: list[str],
    param_names: dict[int, list[str]],
) -> None:
    """Refuse a block whose replaced parameters are also used outside it (module docstring).

    ``paths`` are all the paths of the block module, aliases included: a name reaching a
    parameter through any of them is the block's own."""
    for q in adapter.source_parameters(block):
        names = param_names.get(id(q), [])
        inside = [n for n in names if any(n.startswith(p + ".") for p in paths)]
        outside = [n for n in names if n not in inside]
        if outside:
            shown = ", ".join(outside[:3]) + (", ..." if len(outside) > 3 else "")
            raise UnsupportedModelError(
                f"the parameter {inside[0] if inside else '?'} of the MLP block at {path} "
                f"({type(block).__name__}) is also {shown}: weights tied between distinct "
                "blocks (or to a non-MLP module) would be silently untied by a swap, and its "
                "parameter count would be wrong. Untie them first, or share the whole block "
                "module (which is kept shared)"
            )


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
    if hidden is None and width_keys:
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
