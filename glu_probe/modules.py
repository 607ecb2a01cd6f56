"""GLU-family MLP blocks, their non-gated baselines, and exact parameter matching.

Two block families, both with timm's ``Mlp`` constructor signature so that they are drop-in
``mlp_layer`` arguments for timm models:

* :class:`MLP` (non-gated):  ``y = W2 · φ(W1 x + b1) + b2``.
* :class:`GatedMLP` (Shazeer 2020, "GLU Variants Improve Transformer"):
  ``y = W2 · (σ(Wg x + bg) ⊙ (Wu x + bu)) + b2``.

.. important::
   ``hidden_features`` of a gated block is the **gated width** ``h`` — the width of ``σ(Wg x)``
   (and of ``Wu x``), exactly as for timm's ``SwiGLU`` and Hugging Face's ``intermediate_size``.
   A gated block of width ``h`` therefore holds ``(2·in + out)·h`` weights, not ``(in + out)·h``.
   Use :func:`gated_hidden_features` / :func:`dense_hidden_features` to convert between
   parameter-matched widths. (timm's ``GluMlp``/``SwiGLUPacked`` instead take the *packed* width
   ``2h``; ours never do.)

Parameter counts (``b1``/``b2`` are the fc1/fc2 bias flags as 0/1)::

    P_dense(h) = (in + out + b1) · h + b2 · out
    P_gated(h) = (2·in + out + 2·b1) · h + b2 · out

Both are affine in ``h``, so the parameter-matched width is the multiple of ``multiple_of``
nearest to the exact real solution (the "2/3 rule": for ``in == out == d`` and no biases,
``P_gated(h') = P_dense(h)`` gives ``h' = 2h/3``).
"""

from __future__ import annotations

import decimal
import difflib
import inspect
import math
import numbers
import operator
import warnings
from collections.abc import Callable, Mapping
from fractions import Fraction
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _nn_module

from ._warnings import external_stacklevel
from .gated_product import fused_gate_kind, fused_gated_mlp

__all__ = [
    "ACTIVATIONS",
    "GATED_VARIANTS",
    "GEGLU",
    "GLU",
    "MLP",
    "VARIANTS",
    "Bilinear",
    "GatedMLP",
    "ReGLU",
    "SwiGLU",
    "activation_name",
    "closest_width",
    "dense_hidden_features",
    "gated_hidden_features",
    "is_gated_variant",
    "make_mlp",
    "mlp_num_params",
    "resolve_activation",
]

#: Canonical activation names accepted wherever an ``act_layer`` may be a string.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_tanh": partial(nn.GELU, approximate="tanh"),
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}
# Aliases used by Hugging Face configs (``hidden_act`` / ``activation_function``).
_ACT_ALIASES = {
    "swish": "silu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "linear": "identity",
    "none": "identity",
}

InitFn = Callable[[Tensor, Tensor | None], None]
"""``init(weight, bias)``: called in place on each logical projection (gate, up, down, fc1, fc2)."""


def _canonical_act_name(name: str) -> str:
    key = name.lower()
    key = _ACT_ALIASES.get(key, key)
    if key not in ACTIVATIONS:
        known = sorted(ACTIVATIONS) + sorted(_ACT_ALIASES)
        raise ValueError(
            f"unknown activation {name!r}; expected one of {known} or an nn.Module class"
        )
    return key


def resolve_activation(act: Any) -> nn.Module:
    """Build an activation module from a name, an ``nn.Module`` class/factory, or an instance.

    ``None`` means the identity. Strings: ``"relu" | "gelu" | "gelu_tanh" | "silu" | "sigmoid" |
    "identity"`` (plus HF aliases ``swish``, ``gelu_new``, ``gelu_pytorch_tanh``, ``linear``).
    """
    if act is None:
        return nn.Identity()
    if isinstance(act, str):
        return ACTIVATIONS[_canonical_act_name(act)]()
    if isinstance(act, nn.Module):
        return act
    if callable(act):
        try:
            mod = act()
        except TypeError as err:  # e.g. torch.relu / F.gelu: a function of the input
            raise TypeError(
                f"act_layer {act!r} could not be called without arguments ({err}); pass an "
                "nn.Module class (nn.ReLU), a factory returning a module, an instance or a name "
                "('relu'), not an activation function"
            ) from err
        if not isinstance(mod, nn.Module):
            raise TypeError(
                f"act_layer factory {act!r} returned {type(mod).__name__}, not nn.Module"
            )
        return mod
    raise TypeError(f"act_layer must be a name, an nn.Module class or instance; got {act!r}")


def activation_name(act: nn.Module) -> str:
    """Canonical name of an activation module (``"custom:<Class>"`` when unknown)."""
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    for name, cls in (
        ("relu", nn.ReLU),
        ("silu", nn.SiLU),
        ("sigmoid", nn.Sigmoid),
        ("identity", nn.Identity),
    ):
        if isinstance(act, cls):
            return name
    # transformers' activation classes (GELUActivation, NewGELUActivation, ...).
    cls_name = type(act).__name__
    hf = {
        "GELUActivation": "gelu",
        "NewGELUActivation": "gelu_tanh",
        "PytorchGELUTanh": "gelu_tanh",
        "GELUTanh": "gelu_tanh",
        "SiLUActivation": "silu",
        "LinearActivation": "identity",
    }
    if type(act).__module__.startswith("timm.layers"):
        # timm's own classes (what get_act_layer("gelu") returns): reported as custom:GELU
        # before (review, session 20)
        timm_names = {"GELU": "gelu", "GELUTanh": "gelu_tanh", "Sigmoid": "sigmoid"}
        if cls_name in timm_names:
            return timm_names[cls_name]
    return hf.get(cls_name, f"custom:{cls_name}")


def _pair(value: Any, name: str) -> tuple[Any, Any]:
    if isinstance(value, tuple | list):
        if len(value) != 2:
            raise ValueError(f"{name} must be a scalar or a pair, got {value!r}")
        return value[0], value[1]
    return value, value


def _check_width(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    try:
        value = operator.index(value)  # ints, numpy integers (widths read from configs)
    except TypeError:
        raise TypeError(f"{name} must be a positive int, got {value!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def _check_drop(value: Any) -> float:
    p = float(value)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {value!r}")
    return p


def _warn_ignored(cls: str, kwargs: Mapping[str, Any]) -> None:
    if kwargs:
        warnings.warn(
            f"{cls}: ignoring unsupported keyword arguments {sorted(kwargs)}",
            UserWarning,
            stacklevel=external_stacklevel(),
        )


# The checks below run at every call of a fused block, where host time is what a launch-bound
# step pays for (benchmarks/RESULTS_mlp.md, "host time"): plain loops and attribute reads, no
# import or generator per call.
def _global_hooks() -> bool:
    """Whether a global module hook is registered (it would watch every sub-module)."""
    m = _nn_module
    return bool(
        m._global_forward_hooks
        or m._global_forward_pre_hooks
        or m._global_backward_hooks
        or getattr(m, "_global_backward_pre_hooks", None)
    )


def _module_hooked(m: nn.Module) -> bool:
    """Whether a hook of ``m``'s own could watch it, or a wrapper replaced its ``forward`` on
    the instance (accelerate's device/offload hooks do that)."""
    return bool(
        m._forward_hooks
        or m._forward_pre_hooks
        or m._backward_hooks
        or m._backward_pre_hooks
        or "forward" in m.__dict__
    )


def _has_hooks(*modules: nn.Module) -> bool:
    """Whether a hook (per module or global) could watch these modules, or a wrapper replaced
    one's ``forward`` on the instance."""
    if _global_hooks():
        return True
    for m in modules:  # noqa: SIM110 (a loop: no generator object per call)
        if _module_hooked(m):
            return True
    return False


def _weight_and_bias(m: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(m.weight, m.bias)``, read from ``_parameters`` where both are registered there (two dict
    reads instead of two ``nn.Module.__getattr__`` calls), else through the attributes."""
    p = m._parameters
    if "weight" in p and "bias" in p and p["weight"] is not None:
        return p["weight"], p["bias"]  # type: ignore[return-value]
    return m.weight, m.bias  # type: ignore[return-value]


def _inactive_dropout(m: nn.Module | None) -> bool:
    """Whether ``m`` is exactly an ``nn.Identity``, or an ``nn.Dropout`` that drops nothing
    (in eval mode itself, or ``p = 0``): the fused path may skip it. The dropout's own flag
    counts, not the block's: Monte-Carlo dropout puts the model in eval mode and then its
    ``nn.Dropout`` modules back in training mode."""
    if type(m) is nn.Identity:
        return True
    return type(m) is nn.Dropout and (not m.training or m.p == 0)  # type: ignore[union-attr]


class _MLPBase(nn.Module):
    """What :class:`MLP` and :class:`GatedMLP` share: checked widths and the timm-named tail.

    A subclass constructor calls :meth:`_init_widths`, builds its own ``fc1`` layer(s), then
    :meth:`_init_tail`, in that order: layer creation order fixes the default initialisation.
    """

    in_features: int
    hidden_features: int
    out_features: int
    use_conv: bool
    act: nn.Module
    drop1: nn.Dropout
    norm: nn.Module
    fc2: nn.Linear | nn.Conv2d
    drop2: nn.Dropout

    def _init_widths(
        self,
        in_features: int,
        hidden_features: int | None,
        out_features: int | None,
        bias: bool | tuple[bool, bool],
        drop: float | tuple[float, float],
        use_conv: bool,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
        kwargs: dict[str, Any],
    ) -> tuple[Callable[..., nn.Linear | nn.Conv2d], bool, dict[str, Any]]:
        """Set the checked widths; return the projection factory (``nn.Linear``, or a 1x1
        ``nn.Conv2d`` with ``use_conv``), the ``fc1`` bias flag and the device/dtype keywords."""
        _warn_ignored(type(self).__name__, kwargs)
        self.in_features = _check_width(in_features, "in_features")
        self.hidden_features = _check_width(hidden_features or in_features, "hidden_features")
        self.out_features = _check_width(out_features or in_features, "out_features")
        b1, _ = _pair(bias, "bias")
        _pair(drop, "drop")  # a malformed pair fails before any layer is built
        if not isinstance(use_conv, bool):
            # timm's SwiGLU takes align_to 8th, its Mlp / GluMlp use_conv: a positional
            # SwiGLU(..., drop, 8) read as use_conv=8 would build 1x1 convs (review, s24)
            raise TypeError(f"use_conv must be a bool, got {use_conv!r}")
        self.use_conv = use_conv
        linear = partial(nn.Conv2d, kernel_size=1) if use_conv else nn.Linear
        return linear, bool(b1), {"device": device, "dtype": dtype}

    def _init_tail(
        self,
        act_layer: Any,
        norm_layer: Callable[..., nn.Module] | None,
        bias: bool | tuple[bool, bool],
        drop: float | tuple[float, float],
        linear: Callable[..., nn.Linear | nn.Conv2d],
        dd: dict[str, Any],
    ) -> None:
        """``act, drop1, norm, fc2, drop2`` (timm ``Mlp`` names) after ``fc1``."""
        h = self.hidden_features
        p1, p2 = _pair(drop, "drop")
        self.act = resolve_activation(act_layer)
        self.drop1 = nn.Dropout(_check_drop(p1))
        self.norm = norm_layer(h, **dd) if norm_layer else nn.Identity()
        self.fc2 = linear(h, self.out_features, bias=bool(_pair(bias, "bias")[1]), **dd)
        self.drop2 = nn.Dropout(_check_drop(p2))


class MLP(_MLPBase):
    """Non-gated MLP, ``y = drop2(fc2(norm(drop1(act(fc1(x))))))``.

    Same signature and attribute names as ``timm.layers.Mlp`` (``fc1, act, drop1, norm, fc2,
    drop2``), so it is a drop-in ``mlp_layer``. ``act_layer`` may be an ``nn.Module`` class or
    instance or one of the names in :data:`ACTIVATIONS`. ``bias`` and ``drop`` may be pairs
    (fc1, fc2). Weights use ``nn.Linear``'s default init unless ``init(weight, bias)`` is given.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Any = nn.GELU,
        norm_layer: Callable[..., nn.Module] | None = None,
        bias: bool | tuple[bool, bool] = True,
        drop: float | tuple[float, float] = 0.0,
        use_conv: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        init: InitFn | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        linear, b1, dd = self._init_widths(
            in_features, hidden_features, out_features, bias, drop, use_conv, device, dtype, kwargs
        )
        self.fc1 = linear(self.in_features, self.hidden_features, bias=b1, **dd)
        self._init_tail(act_layer, norm_layer, bias, drop, linear, dd)
        if init is not None:
            with torch.no_grad():
                init(self.fc1.weight, self.fc1.bias)
                init(self.fc2.weight, self.fc2.bias)

    @property
    def gated(self) -> bool:
        return False

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop1(self.act(self.fc1(x)))
        return self.drop2(self.fc2(self.norm(x)))

    def extra_repr(self) -> str:
        return f"act={activation_name(self.act)}"


class GatedMLP(_MLPBase):
    """Gated MLP (GLU family), ``y = W2 (act(x Wg + bg) ⊙ (x Wu + bu)) + b2``.

    ``hidden_features`` is the **gated width** (see the module docstring). With ``packed=True``
    (default) the gate and up projections are a single ``fc1`` with ``2·hidden`` output rows,
    ordered ``[gate; up]`` (:attr:`GATE_FIRST` is ``True``), so the forward pass runs one matmul
    and splits the result with a zero-copy ``chunk``; this is the layout of timm's
    ``SwiGLUPacked``. The packed block can run feature-major, so that its elementwise kernels
    read contiguous halves and its backward needs no ``cat`` (:mod:`glu_probe.gated_product`;
    same values and gradients up to rounding). ``fused=None`` (default) does so where that was
    measured to be faster: CUDA inputs computed in bf16/fp16 (autocast or 16-bit weights), where
    it was 3–8% faster than timm's ``SwiGLU`` and HF's ``LlamaMLP`` while the token-major packed
    block was 3–15% slower (H100, ``benchmarks/RESULTS_mlp.md``); in float32 and on CPU the
    token-major ``chunk`` expression runs. With a bias, 16-bit blocks narrower than
    :data:`~glu_probe.gated_product.SPLIT_BELOW_IN_FEATURES` (2048) input features run the
    fused path's split layout instead: token-major, the gate and up projections two GEMMs on
    ``fc1``'s row blocks (the bias in the GEMM, as in timm's ``SwiGLU``), which was 0.96–1.05x
    timm's ``SwiGLU`` on an H200 at widths 768–1536 (median 1.02x at 768, where the
    feature-major block was 1.01–1.30x from run to run). ``fused=True`` forces the fused path
    (either layout) wherever it applies, ``fused=False`` never takes it. With
    ``packed=False`` the projections are ``fc1_g`` (gate) and ``fc1_x`` (up), the layout of
    timm's ``SwiGLU``; :mod:`glu_probe.convert` maps between layouts.

    Attributes ``act, drop1, norm, fc2, drop2`` are as in timm's ``Mlp``; ``drop1`` acts on the
    gated product, ``norm`` (optional, ``norm_layer(hidden)``) follows it.

    ``align_to`` (as in timm's ``SwiGLU``, which timm's EVA and NaFlexViT pass) rounds the gated
    width up to a multiple of ``align_to``; 0 (default) keeps ``hidden_features`` as given.

    Weights use ``nn.Linear``'s default init (which depends only on fan-in, so packed and unpacked
    layouts draw from the same distribution) unless ``init(weight, bias)`` is given; ``init`` is
    applied to the gate, up and down projections separately (on views for the packed ``fc1``, so
    it must write in place, as ``nn.init`` functions do: rebinding ``weight.data`` is lost). An
    init applied to ``fc1`` as a whole that depends on fan-out (xavier: timm ViT's
    ``weight_init="jax"`` / ``"moco"``, MLP-Mixer) sees its ``2·hidden`` rows, as for timm's
    ``SwiGLUPacked``: the up half's std is ``√((in + h)/(in + 2h))`` of timm ``SwiGLU``'s.
    :func:`~glu_probe.swap_mlp` re-draws that half as its host draws a separate ``Linear``; in
    a model you build, ``packed=False`` gets timm ``SwiGLU``'s init.
    :meth:`init_weights` re-initialises the gate like timm's ``SwiGLU`` (weight ~ N(0, 1e-6²),
    bias 1), and is what timm's ViT init calls.
    """

    GATE_FIRST: bool = True

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Any = nn.SiLU,
        norm_layer: Callable[..., nn.Module] | None = None,
        bias: bool | tuple[bool, bool] = True,
        drop: float | tuple[float, float] = 0.0,
        use_conv: bool = False,
        *,
        packed: bool = True,
        fused: bool | None = None,
        init: InitFn | None = None,
        align_to: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        linear, b1, dd = self._init_widths(
            in_features, hidden_features, out_features, bias, drop, use_conv, device, dtype, kwargs
        )
        given = align_to
        try:  # any integer type (numpy's too, as timm's SwiGLU and our widths take), not bool
            align_to = -1 if isinstance(given, bool) else operator.index(given)
        except TypeError:
            align_to = -1
        if align_to < 0:
            raise ValueError(f"align_to must be a non-negative int (0: no rounding), got {given!r}")
        if align_to:  # timm's SwiGLU rule: the gated width rounded up to a multiple of align_to
            self.hidden_features += -self.hidden_features % align_to
        h = self.hidden_features
        self.packed = bool(packed)
        if fused is not None and not isinstance(fused, bool):
            raise TypeError(f"fused must be None (auto), True or False; got {fused!r}")
        self.fused: bool | None = fused
        # the channels: dim -3 of an (N, C, H, W) or unbatched (C, H, W) conv input (dim 1
        # split H of an unbatched one, and under vmap; review, session 24)
        self._chunk_dim = -3 if use_conv else -1
        if self.packed:
            self.fc1 = linear(self.in_features, 2 * h, bias=b1, **dd)
        else:
            self.fc1_g = linear(self.in_features, h, bias=b1, **dd)
            self.fc1_x = linear(self.in_features, h, bias=b1, **dd)
        self._init_tail(act_layer, norm_layer, bias, drop, linear, dd)
        if init is not None:
            with torch.no_grad():
                for w, b in (
                    self.gate_params(),
                    self.up_params(),
                    (self.fc2.weight, self.fc2.bias),
                ):
                    init(w, b)

    @property
    def gated(self) -> bool:
        return True

    def _half(self, t: Tensor | None, which: int) -> Tensor | None:
        if t is None:
            return None
        h = self.hidden_features
        start = which * h if self.GATE_FIRST else (1 - which) * h
        return t[start : start + h]

    def gate_params(self) -> tuple[Tensor, Tensor | None]:
        """(weight, bias) of the gate projection (views into ``fc1`` when packed)."""
        if self.packed:
            w = self._half(self.fc1.weight, 0)
            assert w is not None
            return w, self._half(self.fc1.bias, 0)
        return self.fc1_g.weight, self.fc1_g.bias

    def up_params(self) -> tuple[Tensor, Tensor | None]:
        """(weight, bias) of the up (value) projection (views into ``fc1`` when packed)."""
        if self.packed:
            w = self._half(self.fc1.weight, 1)
            assert w is not None
            return w, self._half(self.fc1.bias, 1)
        return self.fc1_x.weight, self.fc1_x.bias

    def init_weights(self) -> None:
        """timm ``SwiGLU.init_weights``: gate weight ~ N(0, 1e-6²), gate bias = 1."""
        w, b = self.gate_params()
        with torch.no_grad():
            if b is not None:
                nn.init.ones_(b)
            nn.init.normal_(w, std=1e-6)

    def _fused_kind(self) -> str | None:
        """The activation key when the fused path (either layout) applies, else ``None``.

        It applies to the packed ``nn.Linear`` layout with a known gate activation, no norm and
        no active ``drop1`` (an ``nn.Dropout`` in eval mode or with ``p = 0``, or an
        ``nn.Identity``), when no hook watches a sub-module (it bypasses their forwards) and
        every sub-module is still a registered module (a plain callable assigned in place of
        one keeps the plain path, which calls it).
        Under torch.func transforms, ``torch.compile`` / ``torch.export`` and
        ``torch.jit.trace``, :func:`~glu_probe.gated_product.fused_gated_mlp` itself computes the
        plain expression (Dynamo cannot trace an autograd Function with a custom ``jvp``, and
        Inductor fuses the elementwise ops itself).
        """
        if self.fused is False or not self.packed or self.use_conv:
            return None
        # sub-modules read from _modules once (nn.Module.__getattr__ is ~1 µs a lookup, and
        # this runs at every call: host time counts where small blocks are launch-bound)
        mods = self._modules
        get = mods.get
        fc1, fc2, norm, drop1, act = get("fc1"), get("fc2"), get("norm"), get("drop1"), get("act")
        if type(fc1) is not nn.Linear or type(fc2) is not nn.Linear:
            return None
        if type(norm) is not nn.Identity or not _inactive_dropout(drop1):
            return None
        if act is None or drop1 is None:
            return None
        if _has_hooks(fc1, act, drop1, norm, fc2):
            return None
        return fused_gate_kind(act)

    def _fused_pays(self, x: Tensor) -> bool:
        """``fused=None``: CUDA and a 16-bit compute dtype (measured, see the class docstring)."""
        if isinstance(x, torch.fx.Proxy):
            return False  # symbolic tracing (timm's feature extractors): the plain expression
        if self.fused is not None:
            return self.fused
        if not x.is_cuda:
            return False
        fc2 = self._modules.get("fc2")
        w2 = None if fc2 is None else fc2._parameters.get("weight")
        if w2 is None:
            return False  # a wrapped or replaced output layer: the plain path calls it
        dtype = w2.dtype
        if torch.is_autocast_enabled("cuda") and dtype != torch.float64:
            dtype = torch.get_autocast_dtype("cuda")  # autocast never casts float64
        return dtype in (torch.bfloat16, torch.float16)

    def forward(self, x: Tensor) -> Tensor:
        kind = self._fused_kind() if self._fused_pays(x) else None
        if kind is not None:
            mods = self._modules  # checked by _fused_kind: fc1 and fc2 are nn.Linear
            w1, b1 = _weight_and_bias(mods["fc1"])  # type: ignore[arg-type]
            w2, b2 = _weight_and_bias(mods["fc2"])  # type: ignore[arg-type]
            y = fused_gated_mlp(x, w1, b1, w2, b2, kind, self.GATE_FIRST)
            drop2 = mods.get("drop2")
            # no global hook here (_fused_kind checked): only drop2's own hooks are left to see
            if type(drop2) is nn.Dropout and drop2.p == 0 and not _module_hooked(drop2):
                return y  # the identity, without a module call (any other drop2 is called)
            return self.drop2(y)
        if self.packed:
            g, u = self.fc1(x).chunk(2, dim=self._chunk_dim)
            if not self.GATE_FIRST:
                g, u = u, g
            if getattr(self.act, "inplace", False):
                # an in-place activation may not write into one of the views chunk returns
                # (autograd refuses it); unpacked, its input is a fresh tensor
                g = g.clone()
            x = self.act(g) * u
        else:
            x = self.act(self.fc1_g(x)) * self.fc1_x(x)
        x = self.drop1(x)
        return self.drop2(self.fc2(self.norm(x)))

    def extra_repr(self) -> str:
        return (
            f"act={activation_name(self.act)}, packed={self.packed}, gate_first={self.GATE_FIRST}"
        )


class _FixedGateMLP(GatedMLP):
    """A :class:`GatedMLP` whose gate activation is fixed by the class (``_GATE``).

    ``act_layer`` is accepted for timm compatibility (timm's ``Block`` always passes its own,
    usually ``nn.GELU``) and deliberately ignored: the variant name fixes the gate. Use
    :class:`GatedMLP` for a custom gate.
    """

    _GATE: Callable[[], nn.Module] = nn.SiLU

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Any = None,
        norm_layer: Callable[..., nn.Module] | None = None,
        bias: bool | tuple[bool, bool] = True,
        drop: float | tuple[float, float] = 0.0,
        use_conv: bool = False,
        *,
        packed: bool = True,
        fused: bool | None = None,
        init: InitFn | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        del act_layer  # fixed by the variant, see the class docstring
        super().__init__(
            in_features,
            hidden_features,
            out_features,
            act_layer=type(self)._GATE,
            norm_layer=norm_layer,
            bias=bias,
            drop=drop,
            packed=packed,
            fused=fused,
            use_conv=use_conv,
            init=init,
            device=device,
            dtype=dtype,
            **kwargs,
        )


_FIXED_NOTE = """

    The gate activation is fixed; an ``act_layer`` argument (e.g. the ``nn.GELU`` that timm's
    ``Block`` passes) is accepted and ignored. Signature and layout: see :class:`GatedMLP`.
    """


class GLU(_FixedGateMLP):
    __doc__ = (
        "GLU: ``y = W2 (sigmoid(x Wg + bg) ⊙ (x Wu + bu)) + b2`` (Dauphin et al. 2017)."
        + _FIXED_NOTE
    )
    _GATE = nn.Sigmoid


class Bilinear(_FixedGateMLP):
    __doc__ = "Bilinear: ``y = W2 ((x Wg + bg) ⊙ (x Wu + bu)) + b2``." + _FIXED_NOTE
    _GATE = nn.Identity


class ReGLU(_FixedGateMLP):
    __doc__ = "ReGLU: ``y = W2 (relu(x Wg + bg) ⊙ (x Wu + bu)) + b2``." + _FIXED_NOTE
    _GATE = nn.ReLU


class SwiGLU(_FixedGateMLP):
    __doc__ = "SwiGLU: ``y = W2 (silu(x Wg + bg) ⊙ (x Wu + bu)) + b2``." + _FIXED_NOTE
    _GATE = nn.SiLU


class GEGLU(GatedMLP):
    """GEGLU: ``y = W2 (gelu(x Wg + bg) ⊙ (x Wu + bu)) + b2``, with ``approximate="none"`` (exact
    erf GELU) or ``"tanh"``.

    The gate activation is fixed; an ``act_layer`` argument (e.g. the ``nn.GELU`` that timm's
    ``Block`` passes) is accepted and ignored. Signature and layout: see :class:`GatedMLP`.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Any = None,
        norm_layer: Callable[..., nn.Module] | None = None,
        bias: bool | tuple[bool, bool] = True,
        drop: float | tuple[float, float] = 0.0,
        use_conv: bool = False,
        *,
        packed: bool = True,
        fused: bool | None = None,
        init: InitFn | None = None,
        approximate: str = "none",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        del act_layer  # fixed by the variant
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GEGLU approximate must be 'none' or 'tanh', got {approximate!r}")
        super().__init__(
            in_features,
            hidden_features,
            out_features,
            act_layer=partial(nn.GELU, approximate=approximate),
            norm_layer=norm_layer,
            bias=bias,
            drop=drop,
            packed=packed,
            fused=fused,
            use_conv=use_conv,
            init=init,
            device=device,
            dtype=dtype,
            **kwargs,
        )


#: Variant name -> constructor with the timm signature.
VARIANTS: dict[str, Callable[..., nn.Module]] = {
    "glu": GLU,
    "bilinear": Bilinear,
    "reglu": ReGLU,
    "geglu": GEGLU,
    "swiglu": SwiGLU,
    "relu": partial(MLP, act_layer=nn.ReLU),
    "gelu": partial(MLP, act_layer=nn.GELU),
    "silu": partial(MLP, act_layer=nn.SiLU),
}
GATED_VARIANTS = frozenset({"glu", "bilinear", "reglu", "geglu", "swiglu"})


def _check_variant(variant: str) -> str:
    if not isinstance(variant, str) or variant.lower() not in VARIANTS:
        raise ValueError(f"unknown MLP variant {variant!r}; expected one of {sorted(VARIANTS)}")
    return variant.lower()


def _block_keywords(name: str) -> set[str]:
    """The keywords :func:`make_mlp` passes to the block of ``name`` beside its widths."""
    target = VARIANTS[name]
    cls: type = target.func if isinstance(target, partial) else target  # type: ignore[assignment]
    accepted = {  # each class's own keywords and those it passes on to its bases (align_to)
        n
        for c in cls.__mro__
        if c.__module__ == __name__ and "__init__" in vars(c)
        for n, p in inspect.signature(vars(c)["__init__"]).parameters.items()
        if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD
    } - {"self", "in_features", "hidden_features", "out_features", "act_layer"}
    if name == "gelu":
        accepted.add("approximate")
    return accepted


def _keyword_defaults(name: str) -> dict[str, Any]:
    """The default of each keyword :func:`make_mlp` passes to the block of ``name`` (those
    with one): a keyword given at its default builds the same block as one left out."""
    target = VARIANTS[name]
    cls: type = target.func if isinstance(target, partial) else target  # type: ignore[assignment]
    defaults: dict[str, Any] = {}
    for c in reversed(cls.__mro__):  # (a subclass's default wins)
        if c.__module__ == __name__ and "__init__" in vars(c):
            for n, p in inspect.signature(vars(c)["__init__"]).parameters.items():
                if p.default is not p.empty:
                    defaults[n] = p.default
    if name == "gelu":
        defaults["approximate"] = "none"
    return {k: v for k, v in defaults.items() if k in _block_keywords(name)}


def _check_keywords(name: str, kwargs: Mapping[str, Any]) -> None:
    """Refuse keywords the block of ``name`` does not take: the block classes accept and ignore
    unknown ones with a warning (timm's ``Block`` passes its own), but in a direct call to the
    factory, or through ``swap_mlp(**module_kwargs)``, an unknown keyword is a typo
    (``multple_of``) or a setting of another variant (``approximate`` for ``"swiglu"``) that
    would otherwise be dropped with only a warning per block."""
    accepted = _block_keywords(name)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        hints = [
            f"{k!r} -> {close[0]!r}?"
            for k in unknown
            if (close := difflib.get_close_matches(k, accepted, n=1))
        ]
        raise TypeError(
            f"make_mlp({name!r}) got unexpected keyword argument(s) {unknown}"
            + (f" ({', '.join(hints)})" if hints else "")
            + f"; a {name!r} block takes {sorted(accepted)}"
        )


def is_gated_variant(variant: str) -> bool:
    """Whether ``variant`` (a key of :data:`VARIANTS`, any case) names a gated block.

    Raises:
        ValueError: an unknown variant.
    """
    return _check_variant(variant) in GATED_VARIANTS


def make_mlp(
    variant: str,
    in_features: int,
    hidden_features: int,
    out_features: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build the block named ``variant`` (see :data:`VARIANTS`).

    ``hidden_features`` is the gated width for gated variants. An ``act_layer`` in ``kwargs`` is
    rejected, since the variant name fixes the activation (the block classes themselves accept
    and ignore it, as timm's ``Block`` passes one); ``approximate="tanh"`` selects the tanh GELU
    for ``"geglu"`` and ``"gelu"``.
    """
    name = _check_variant(variant)
    if "act_layer" in kwargs:
        raise TypeError(f"make_mlp({name!r}): the variant fixes the activation; drop act_layer")
    _check_keywords(name, kwargs)
    if name == "gelu" and kwargs.get("approximate", "none") == "none":
        kwargs.pop("approximate", None)  # the default: nothing to pass on (MLP would warn)
    elif name == "gelu":
        approximate = kwargs.pop("approximate")
        if approximate not in ("none", "tanh"):
            raise ValueError(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}")
        return MLP(
            in_features,
            hidden_features,
            out_features,
            act_layer=partial(nn.GELU, approximate=approximate),
            **kwargs,
        )
    return VARIANTS[name](in_features, hidden_features, out_features, **kwargs)


def _bias_flags(bias: bool | tuple[bool, bool]) -> tuple[int, int]:
    b1, b2 = _pair(bias, "bias")
    return int(bool(b1)), int(bool(b2))


def mlp_num_params(
    in_features: int,
    hidden_features: int,
    out_features: int | None = None,
    bias: bool | tuple[bool, bool] = True,
    gated: bool = False,
) -> int:
    """Closed-form parameter count of :class:`MLP` / :class:`GatedMLP` (no norm layer)."""
    slope, const = _param_line(in_features, out_features, bias, gated)
    return slope * _check_width(hidden_features, "hidden_features") + const


def _param_line(
    in_features: int, out_features: int | None, bias: bool | tuple[bool, bool], gated: bool
) -> tuple[int, int]:
    """``P(h) = slope·h + const`` for a block of width ``h``."""
    d_in = _check_width(in_features, "in_features")
    d_out = _check_width(out_features or in_features, "out_features")
    b1, b2 = _bias_flags(bias)
    k = 2 if gated else 1
    return k * (d_in + b1) + d_out, b2 * d_out


def closest_width(target: float, slope: int, const: int, multiple_of: int = 1) -> int:
    """The positive multiple of ``multiple_of`` whose ``slope·h + const`` is closest to
    ``target`` (ties go to the smaller width).

    Exact rational arithmetic (:class:`fractions.Fraction`): a float quotient loses the nearest
    width once it passes 2**53.
    """
    m = _check_width(multiple_of, "multiple_of")
    # (integers exactly, numpy's too; other numpy and tensor scalars through float: Fraction
    # takes only Rational, float, Decimal and str)
    if isinstance(target, numbers.Integral):
        goal = Fraction(int(target))
    elif isinstance(target, numbers.Rational | float | decimal.Decimal | str):
        goal = Fraction(target)
    else:
        goal = Fraction(float(target))
    lo = max(m, math.floor((goal - const) / (slope * m)) * m)
    hi = max(m, lo + m)
    return int(lo if abs(slope * lo + const - goal) <= abs(slope * hi + const - goal) else hi)


def gated_hidden_features(
    in_features: int,
    hidden_features: int,
    out_features: int | None = None,
    bias: bool | tuple[bool, bool] = True,
    multiple_of: int = 1,
) -> int:
    """Gated width whose :class:`GatedMLP` parameter count is closest to that of an :class:`MLP`
    of width ``hidden_features`` (same in/out/bias), among positive multiples of ``multiple_of``.

    Solves ``(2·in + out + 2·b1)·h + b2·out = (in + out + b1)·H + b2·out`` for ``h`` and rounds;
    the count error is at most ``multiple_of·(2·in + out + 2·b1)/2`` when the exact ``h`` is at
    least ``multiple_of/2``; below that the smallest positive multiple, ``multiple_of``, is
    returned, and the error is that of ``h = multiple_of`` (larger than the bound).
    """
    target = mlp_num_params(in_features, hidden_features, out_features, bias, gated=False)
    slope, const = _param_line(in_features, out_features, bias, gated=True)
    return closest_width(target, slope, const, multiple_of)


def dense_hidden_features(
    in_features: int,
    gated_hidden_features: int,
    out_features: int | None = None,
    bias: bool | tuple[bool, bool] = True,
    multiple_of: int = 1,
) -> int:
    """Inverse of :func:`gated_hidden_features`: the non-gated width whose :class:`MLP` parameter
    count is closest to that of a :class:`GatedMLP` of gated width ``gated_hidden_features``."""
    target = mlp_num_params(in_features, gated_hidden_features, out_features, bias, gated=True)
    slope, const = _param_line(in_features, out_features, bias, gated=False)
    return closest_width(target, slope, const, multiple_of)
