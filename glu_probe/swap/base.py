"""The types every part of the swap shares, and the adapter registry.

What an adapter reads from a block (:class:`MLPSpec`), the adapter interface
(:class:`MLPAdapter`, whose default ``build`` rebuilds an inner norm with its settings), what a
swap reports (:class:`SwapEntry`, :class:`SwapReport`), the error it raises, the registry that
:func:`~glu_probe.swap.core.swap_mlp` asks, and the constants naming activations and the config
record. Kept apart from the driver so that the adapters (``timm.py``, ``hf_*.py``,
``structural.py``, ...) import these without importing it; :mod:`glu_probe.swap.core`
re-exports them.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from glu_probe.modules import activation_name, make_mlp

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
