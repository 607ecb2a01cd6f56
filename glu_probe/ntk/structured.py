"""The exact NTK with structured Linear-layer blocks: Kronecker factors instead of Jacobian rows.

For a ``nn.Linear`` layer y = x Wᵀ + b that sees tokens t = 1..T of sample s(r) (T = 1 for an
MLP on vectors), the Jacobian row of output row r with respect to W is a sum of outer products,

    ∂g_r/∂W = Σ_t G_{r,t} A_{s(r),t}ᵀ,   G_{r,t} = ∂g_r/∂y_t (out numbers),  A_{s,t} = x_t (in),

and ∂g_r/∂b = Σ_t G_{r,t}. So the layer's block of K = J Jᵀ needs only the factors G (n·T·out
numbers) and A (N·T·in) instead of its n·in·out Jacobian entries (Novak, Sohl-Dickstein &
Schoenholz 2022, "Fast finite width neural tangent kernel": structured derivatives):

    K_W[r, r'] = Σ_{t,t'} (G_{r,t}·G_{r',t'}) (A_{s(r),t}·A_{s(r'),t'}),

computed either as a Hadamard product of the two Gram matrices summed over token pairs
((n·T)²·(in+out) flops; for T = 1 simply (G Gᵀ) ⊙ (A Aᵀ)), or by expanding the rows
E_r = G_rᵀ A_{s(r)} a panel at a time and taking their Gram (n·T·in·out + n²·in·out flops),
whichever costs less. A patchify ``nn.Conv2d`` (stride = kernel, no padding or dilation, one
group) is a Linear map of its non-overlapping patches: T = its output positions, in = C·kh·kw.
Every other parameter (embeddings, norms, other convolutions, GPT-2's ``Conv1D``) keeps its
per-sample Jacobian rows. K is the same matrix as the row-based strategy's,
up to rounding: G, A and the remaining rows come from one per-sample ``vmap(jacrev)`` pass (taps
ε added to each layer's output; G = ∂g/∂ε at ε = 0; A is returned as an auxiliary output), so
nothing is recomputed, and the weight-gradient products of the Linear layers are never formed
per sample unless expanding is cheaper.

Which layers qualify: plain ``nn.Linear`` and patchify ``nn.Conv2d`` modules (``forward`` not
overridden) whose weight is
selected, not shared with another module (tied embeddings), and which run exactly once per
forward pass (a layer applied twice, or whose weight is used functionally, as
``nn.MultiheadAttention`` does with ``out_proj``, keeps its rows), and only where the factors take
less memory than the rows. A check guards the rest, on every sample: for two seeded random unit
vectors u, uᵀKu must equal ‖Jᵀu‖², where Jᵀu comes from one plain VJP of the whole probe batch's
rows (one batched forward and backward pass, see :func:`_agrees`). A mismatch beyond rounding (a
weight used outside its layer's forward, on any sample) makes the caller fall back to the
row-based strategy with a warning.
"""

from __future__ import annotations

import collections
import math
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .._settings import plain_settings
from .._warnings import external_stacklevel
from .functional import FloatTrace, LiveTensorBytes, ProbeFunction, all_finite

__all__ = ["structured_ntk"]

#: Floor of the transient workspace (Gram blocks, one vmapped call's outputs), in bytes.
MIN_TRANSIENT_BYTES = 2**20
#: The transient workspace is this fraction (1/divisor) of the stored factors and rows.
TRANSIENT_DIVISOR = 12


@dataclass
class _GroupPlan:
    """One pass of the structured strategy: the layers it taps (indices), whether it also takes
    the remaining parameters' rows, its samples per vmapped call, its rows per backward pass
    (``None``: all of a sample's), its Gram workspace in elements, and the widening chunk of
    the remaining rows' Gram (:func:`~glu_probe.ntk.dense._gram`)."""

    members: list[int]
    with_rest: bool
    chunk: int
    row_chunk: int | None
    work: int
    rest_chunk: int


@dataclass
class _Layer:
    module: nn.Linear | nn.Conv2d
    weight: int  # index into probe.params
    bias: int | None  # index into probe.params (a selected bias), else None
    in_shape: tuple[int, ...]  # one sample's input to the layer (leading batch dim 1 included)
    out_shape: tuple[int, ...]

    @property
    def patchify(self) -> bool:
        """A ``Conv2d`` with stride = kernel: a Linear map of non-overlapping patches."""
        return isinstance(self.module, nn.Conv2d)

    @property
    def tokens(self) -> int:
        if self.patchify:
            return math.prod(self.out_shape[2:])
        return math.prod(self.in_shape[:-1])

    @property
    def fan_in(self) -> int:
        if self.patchify:
            return self.module.weight[0].numel()
        return self.in_shape[-1]

    @property
    def fan_out(self) -> int:
        return self.out_shape[1] if self.patchify else self.out_shape[-1]

    def input_rows(self, x: Tensor) -> Tensor:
        """The layer's inputs (m samples, as recorded) as (m, T, fan_in) token vectors: for a
        patchify ``Conv2d`` its patches, flattened in the weight's (C, kh, kw) order."""
        if not self.patchify:
            return x.reshape(-1, self.tokens, self.fan_in)
        c, ho, wo = self.in_shape[1], self.out_shape[2], self.out_shape[3]
        kh, kw = self.module.weight.shape[2:]
        x = x.reshape(-1, c, *self.in_shape[2:])[:, :, : ho * kh, : wo * kw]
        x = x.reshape(-1, c, ho, kh, wo, kw).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(-1, self.tokens, self.fan_in)

    def output_rows(self, g: Tensor) -> Tensor:
        """Derivatives with respect to the layer's output (rows as computed) as (m, T, out)."""
        if not self.patchify:
            return g.reshape(-1, self.tokens, self.fan_out)
        return g.reshape(-1, self.fan_out, self.tokens).transpose(1, 2)


def _is_patchify(m: nn.Module) -> bool:
    """A plain ``nn.Conv2d`` whose windows do not overlap and cover no padding (stride =
    kernel, no padding, no dilation, one group): ViT/Swin patch embeddings, ConvNeXt stems."""
    return (
        isinstance(m, nn.Conv2d)
        and type(m).forward is nn.Conv2d.forward
        and type(m)._conv_forward is nn.Conv2d._conv_forward  # no weight standardisation etc.
        and "forward" not in vars(m)
        and "_conv_forward" not in vars(m)
        and tuple(m.stride) == tuple(m.kernel_size)
        and m.padding in ((0, 0), "valid")
        and tuple(m.dilation) == (1, 1)
        and m.groups == 1
    )


def _candidates(probe: ProbeFunction) -> list[tuple[nn.Linear | nn.Conv2d, int, int | None]]:
    """Plain, unshared ``nn.Linear`` and patchify ``nn.Conv2d`` modules whose weight is a
    selected parameter; none while a global forward hook is registered (it runs before the
    taps, which must see the layer's own output: called inside a probe session, where the
    hooks that only watch are out, see :meth:`ProbeFunction._classify_hooks`)."""
    if nn.modules.module._global_forward_hooks:
        return []
    index = {name: i for i, name in enumerate(probe.names)}
    uses: dict[int, int] = {}
    for _, p in probe.model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    found: list[tuple[nn.Linear | nn.Conv2d, int, int | None]] = []
    for name, m in probe.model.named_modules(remove_duplicate=False):
        linear = (
            isinstance(m, nn.Linear)
            and type(m).forward is nn.Linear.forward
            and "forward" not in vars(m)
        )
        if not (linear or _is_patchify(m)):
            continue
        prefix = f"{name}." if name else ""
        w = index.get(prefix + "weight")
        if w is None or uses.get(id(m.weight), 0) != 1:
            continue
        b = None
        if m.bias is not None:
            if uses.get(id(m.bias), 0) != 1:
                continue
            b = index.get(prefix + "bias")
        found.append((m, w, b))
    return found


class _Taps:
    """Forward hooks that record each layer's input and add a tap ε to its output."""

    def __init__(self, modules: list[nn.Linear | nn.Conv2d]) -> None:
        self.modules = modules
        self.taps: dict[int, Tensor] | None = None
        self.inputs: dict[int, Tensor] = {}
        self.calls = [0] * len(modules)
        self.shapes: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> _Taps:
        # First among the module's forward hooks: a user's hook that changes the output (a
        # scale) then acts on the tapped output, ε included, as on the layer's. Registered
        # last, the tap came after the scale, the factors missed it and every probe fell back
        # to rows with a warning about a weight used outside its forward (review, session 29).
        # A forward pre-hook changes the layer's input before the tap reads it: it needs
        # nothing. Global forward hooks run before every module's own: see _candidates.
        for k, m in enumerate(self.modules):
            self._handles.append(m.register_forward_hook(self._hook(k), prepend=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, k: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
            self.calls[k] += 1
            x = args[0] if args else None
            if isinstance(x, Tensor):
                self.inputs[k] = x
                self.shapes[k] = (tuple(x.shape), tuple(out.shape))
            tap = None if self.taps is None else self.taps.get(k)
            return out if tap is None else out + tap

        return hook


def _layers(
    probe: ProbeFunction, leaves: list[Any], spec: Any, batched: list[bool]
) -> list[_Layer]:
    """The candidates that run exactly once on one sample, with their per-sample shapes."""
    found = _candidates(probe)
    if not found:
        return []
    sample = [t[:1] if flag else t for t, flag in zip(leaves, batched, strict=True)]
    with _Taps([m for m, _, _ in found]) as taps, torch.no_grad():
        probe(probe.params, pytree.tree_unflatten(sample, spec))
    out = []
    for k, (m, w, b) in enumerate(found):
        if taps.calls[k] != 1 or k not in taps.shapes:
            continue
        in_shape, out_shape = taps.shapes[k]
        if not in_shape or in_shape[0] != 1:
            continue
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            if len(in_shape) != 4 or out_shape[2:] != (in_shape[2] // kh, in_shape[3] // kw):
                continue
        elif in_shape[:-1] != out_shape[:-1]:
            continue
        out.append(_Layer(m, w, b, in_shape, out_shape))
    return out


def _balanced_groups(sizes: list[int], m: int, first_extra: int = 0) -> list[list[int]]:
    """Consecutive indices of ``sizes`` in at most ``m`` groups whose largest total (the first
    group's counting ``first_extra`` too) is as small as possible: the least cap for which
    greedy filling needs at most ``m`` groups, by bisection (greedy is optimal for a fixed
    order)."""

    def fill(cap: int) -> list[list[int]]:
        groups: list[list[int]] = [[]]
        total = first_extra
        for k, b in enumerate(sizes):
            if groups[-1] and total + b > cap:
                groups.append([])
                total = 0
            groups[-1].append(k)
            total += b
        return groups

    lo, hi = max([*sizes, 0]), sum(sizes) + first_extra
    while lo < hi:
        mid = (lo + hi) // 2
        if len(fill(mid)) <= m:
            hi = mid
        else:
            lo = mid + 1
    return fill(lo)


def _worth_it(layer: _Layer, n: int, samples: int) -> bool:
    """The factors (G: n·T·out, A: N·T·in) take less memory than the layer's Jacobian rows."""
    t, fi, fo = layer.tokens, layer.fan_in, layer.fan_out
    rows = n * (fi * fo + (fo if layer.bias is not None else 0))
    return n * t * fo + samples * t * fi < rows


def _hadamard_pays(layer: _Layer, n: int) -> bool:
    """Hadamard route ((n·T)²·(in+out) flops) cheaper than expanding the rows."""
    t, fi, fo = layer.tokens, layer.fan_in, layer.fan_out
    return (n * t) ** 2 * (fi + fo) <= n * t * fi * fo + n * n * fi * fo


def gram_flops(layers: list[_Layer], n: int, rest_numel: int) -> tuple[int, int]:
    """Multiply-adds of K's Gram products: (structured strategy, row strategy).

    Rows: n²·P (one GEMM over every parameter). Structured: per layer the cheaper of the
    Hadamard route ((n·T)²·(in+out)) and the expansion (n·T·in·out + n²·in·out), plus n² per
    remaining parameter."""
    rows = n * n * rest_numel
    structured = n * n * rest_numel
    for ly in layers:
        t, fi, fo = ly.tokens, ly.fan_in, ly.fan_out
        bias = fo if ly.bias is not None else 0
        rows += n * n * (fi * fo + bias)
        hadamard = (n * t) ** 2 * (fi + fo)
        expand = n * t * fi * fo + n * n * fi * fo
        structured += min(hadamard, expand) + n * n * bias
    return structured, rows


#: Per model, the probe signatures for which the cost test found the structured Gram not
#: cheaper enough (weak keys: forgotten with the model).
_NOT_CHEAPER: weakref.WeakKeyDictionary[nn.Module, set[Any]] = weakref.WeakKeyDictionary()


#: A memory profile per sample count c: the bytes alive after each operation are
#: ``fixed + c · per_sample`` (exactly so for batched operations), kept as the pairs
#: ``(fixed, per_sample)`` that can be the largest for some c (:func:`_peak_model`), and the
#: measured peak of a single sample (its operations may differ: ``mm`` instead of ``bmm``).
PeakModel = tuple[tuple[tuple[int, int], ...], int]

#: The measured peak models of the pass and the check (:func:`_peak_model`), per model
#: *structure* (module classes and their plain settings, parameter and buffer shapes and
#: dtypes) and probe signature: they depend on shapes only, so a monitor that probes the same
#: model every few steps, or a fresh copy of it each time (an EMA or deep copy), measures once
#: (two or three dispatch-mode passes: ~14 ms on an MLP 64-2048-1 at n = 256, ~150 ms on a
#: ViT). The settings are the modules' plain attributes and those of the settings objects they
#: hold (an HF config): a forward that branches on state held anywhere else (a global, a closure)
#: keeps the first measurement.
_MEASURED: collections.OrderedDict[Any, PeakModel] = collections.OrderedDict()


def _structure_key(probe: ProbeFunction) -> tuple[Any, ...]:
    """What a measured profile depends on (:data:`_MEASURED`): the probe's signature, output,
    flags and dtype, and the model's structure (computed once per call: it walks the model)."""
    model = probe.model
    return (
        _signature(probe, 0.0),
        _output_key(probe.output),
        probe.eval_mode,
        probe.dtype,
        tuple(
            (name, tuple(t.shape), t.dtype, t.requires_grad)
            for name, t in (*model.named_parameters(), *model.named_buffers())
        ),
        tuple((name, type(m), plain_settings(m, held=True)) for name, m in model.named_modules()),
    )


def _output_key(output: Any) -> Any:
    """The output spec itself where it is hashable (a callable kept alive in the key cannot
    have its ``id`` reused by a later one), else its ``id``."""
    try:
        hash(output)
    except TypeError:
        return id(output)
    return output


def _remembered(
    structure: tuple[Any, ...],
    what: tuple[Any, ...],
    measure: Callable[[], tuple[PeakModel, bool]],
) -> PeakModel:
    """``measure()``'s profile, remembered per :func:`_structure_key` and ``what`` (the 64 most
    recent) where it is complete (not bounded for want of room)."""
    key = (what, structure)
    if key in _MEASURED:
        _MEASURED.move_to_end(key)
        return _MEASURED[key]
    value, complete = measure()
    if complete:
        _MEASURED[key] = value
        if len(_MEASURED) > 64:
            _MEASURED.popitem(last=False)
    return value


def _peak_model(
    source: ProbeFunction, run: Callable[[int], Any], samples: int, room: int
) -> tuple[PeakModel, bool]:
    """The memory profile of ``run(c)`` (a chunk of c samples) as a function of c.

    ``run(c)`` is traced for two consecutive counts (:class:`~glu_probe.ntk.functional.
    LiveTensorBytes` with ``record``: the bytes alive after each operation, in the probe's
    session). A batched operation allocates ``fixed + c · per_sample`` bytes, so at the t-th
    operation the bytes alive are ``f_t + c · v_t``, with ``v_t = b_t − a_t`` and
    ``f_t = a_t − c₀ · v_t`` from the traces ``a`` (c₀ samples) and ``b`` (c₀ + 1); the peak of
    a chunk of c is the largest of these (:func:`_predicted_peak`). The counts are 1 and 2
    where their operations are the same, else 2 and 3 (one sample often takes other kernels:
    ``mm`` for ``bmm``) with one sample's own peak beside; where neither pair matches (a model
    that branches on the batch size), c times the largest per-sample peak seen. Needed because
    the activation estimate (:func:`~glu_probe.ntk.dense.activation_elements`) cannot see a
    shared weight's per-use gradients or the activation sets that BatchNorm and convolution
    backward passes keep per cotangent under ``vmap``, and one sample's peak alone cannot tell
    a chunk's fixed bytes (a VJP's parameter-sized gradients) from its per-sample ones."""

    def trace(c: int) -> tuple[list[int], int]:
        with source.session(), LiveTensorBytes(record=True) as live:
            run(c)
        assert live.trace is not None
        return live.trace, live.peak

    def fit(a: list[int], b: list[int], c0: int) -> tuple[tuple[int, int], ...]:
        best: dict[int, int] = {}  # per_sample -> the largest fixed part with it
        for x, y in zip(a, b, strict=True):
            v = max(y - x, 0)
            f = max(x - c0 * v, 0)
            if best.get(v, -1) < f:
                best[v] = f
        points: list[tuple[int, int]] = []
        for v in sorted(best, reverse=True):  # keep the pairs no other pair dominates
            if not points or best[v] > points[-1][0]:
                points.append((best[v], v))
        return tuple(points)

    # A trace is itself a chunk of the computation: it runs only where its peak is bounded
    # within ``room`` (bytes alive at f + c·v, f ≥ 0, are at most c/c₀ times those at c₀), else
    # the profile is that bound, and chunks stay below the count that was not traced.
    one, peak_one = trace(1)
    if samples < 2:
        return (((peak_one, 0),), peak_one), True
    if 2 * peak_one > room:
        return (((0, peak_one),), peak_one), False
    two, peak_two = trace(2)
    if len(one) == len(two):
        return (fit(one, two, 1), peak_one), True
    if samples < 3:
        return (((peak_two, 0),), peak_one), True
    if -(-3 * peak_two // 2) > room:  # (one sample took other kernels: from two on, 3/2)
        return (((0, -(-peak_two // 2)),), peak_one), False
    three, peak_three = trace(3)
    if len(two) == len(three):
        return (fit(two, three, 2), peak_one), True
    worst = max(peak_one, -(-peak_two // 2), -(-peak_three // 3))
    return (((0, worst),), peak_one), True


def _predicted_peak(model: PeakModel, c: int) -> int:
    """The peak bytes of a chunk of ``c`` samples (:func:`_peak_model`)."""
    points, one = model
    return one if c == 1 else max(f + c * v for f, v in points)


def _largest_chunk(model: PeakModel, room: int, most: int) -> int:
    """The most samples (at most ``most``; 0 if not even one) such that chunks of that many
    and fewer (a last, partial chunk) fit ``room`` bytes by :func:`_predicted_peak`."""
    points, one = model
    if one > room:
        return 0
    best = most
    for f, v in points:
        if f > room:
            return 1
        if v:
            best = min(best, (room - f) // v)
    return max(1, min(most, int(best)))


def _signature(probe: ProbeFunction, min_gain: float) -> tuple[Any, ...]:
    """What the cost test's verdict depends on: parameters, their shapes, the probe's shapes."""
    named = dict(probe.model.named_parameters())
    leaves = pytree.tree_leaves(probe.inputs)
    return (
        min_gain,
        probe.n_rows,
        probe.rows_per_sample,
        probe.batch_size,
        tuple((name, tuple(named[name].shape)) for name in probe.names),
        tuple(tuple(t.shape) for t in leaves if isinstance(t, Tensor)),
    )


def structured_ntk(
    probe: ProbeFunction,
    budget: int,
    jacobian_dtype: torch.dtype,
    chunk: int | None = None,
    min_gain: float | None = None,
    strict: bool = False,
    why: list[str] | None = None,
) -> Tensor | None:
    """K (n × n, ``probe.dtype``) with the structured Linear blocks, or ``None`` where the
    strategy does not apply (no qualifying layer, the factors do not fit ``budget`` bytes next to
    K, the model cannot be vmapped over samples; silently, the row strategy takes over) or its
    check fails (then with a warning). ``min_gain``: also ``None`` unless the row strategy's
    Gram takes at least ``min_gain`` times the structured one's multiply-adds
    (:func:`gram_flops`), the test of ``auto`` where the rows would fit. ``strict`` (a budget
    the user gave): also ``None`` where the pass, the workspace or the check would need more
    than the budget even at their smallest (one row of one sample, two blocks of a sample's
    rows); else those floors are taken. ``why``: where given, the reason for a ``None`` is
    appended to it (the error of ``strategy="structured"`` names it)."""
    from .dense import (
        ESTIMATE_MARGIN,
        _batched_leaves,
        _gram_sym,
        _vmap_args,
        activation_elements,
        gram_chunk_elements,
        jacobian_transient_bytes,
        row_chunk_for,
        row_chunked_jacrev,
    )

    def decline(reason: str) -> Tensor | None:
        """``None`` (the strategy does not apply), its reason kept in ``why``."""
        if why is not None:
            why.append(reason)
        return None

    n, r, s_total = probe.n_rows, probe.rows_per_sample, probe.batch_size
    if probe.draws_random:
        # (its vmapped pass refuses random operations, and its check would draw other numbers
        # than the factors: the rows draw one set per sample, see jacobian_rows)
        return decline(
            "the model draws random numbers in its forward pass (active dropout or stochastic "
            "depth with eval_mode=False)"
        )
    signature: tuple[Any, ...] | None = None
    if min_gain is not None:
        # The cost test needs the layers (one traced sample); its verdict depends only on the
        # model's structure and the probe's shapes, so a "not cheaper" is remembered per model
        # (a monitor probes the same shapes every few steps).
        signature = _signature(probe, min_gain)
        if signature in _NOT_CHEAPER.get(probe.model, ()):
            return decline("its Gram is not cheaper than the rows'")
    kdtype = probe.dtype
    k_item = torch.empty((), dtype=kdtype).element_size()
    source = probe.astype(jacobian_dtype, check=False)
    r_item = torch.empty((), dtype=jacobian_dtype).element_size()
    leaves, spec, batched = _batched_leaves(source)
    if not any(batched):
        return decline("no input has a sample dimension to run the factors' pass over")
    narrow = FloatTrace()  # the floating dtypes the model computes in
    with source.session():
        try:
            with narrow:
                found = _layers(source, leaves, spec, batched)
        except Exception:
            try:  # the dispatch mode itself may have failed: trace again without it
                found = _layers(source, leaves, spec, batched)
            except Exception as err:  # one sample alone does not run: the rows decide
                return decline(f"one sample alone does not run through the model ({err!r})")
            narrow.dtypes.add(torch.float32)  # unknown: allow float32 rounding in the check
        layers = [ly for ly in found if _worth_it(ly, n, s_total)]
        global_hooks = bool(nn.modules.module._global_forward_hooks)  # (see _candidates)
    if global_hooks:
        return decline(
            "a global forward hook (nn.modules.module.register_module_forward_hook) that is "
            "part of the model's function runs before the layers' taps"
        )
    if not layers:
        return decline(
            "no nn.Linear layer qualifies (a plain, unshared layer that runs once per forward "
            "pass and whose factors are smaller than its rows)"
        )
    structured = {ly.weight for ly in layers} | {ly.bias for ly in layers if ly.bias is not None}
    rest = [i for i in range(len(source.params)) if i not in structured]
    rest_numel = sum(source.params[i].numel() for i in rest)
    if min_gain is not None:
        cost, rows_cost = gram_flops(layers, n, rest_numel)
        if rows_cost < min_gain * cost:
            seen = _NOT_CHEAPER.setdefault(probe.model, set())
            if len(seen) >= 64:  # probes of ever new shapes: keep the memo bounded
                seen.clear()
            seen.add(signature)
            return decline("its Gram is not cheaper than the rows'")
    k_bytes = n * n * k_item
    rest_bytes = n * rest_numel * r_item
    hooks = _Taps([ly.module for ly in layers])
    params = list(source.params)
    dev, rdt = probe.device, jacobian_dtype

    def pass_fn(members: list[int], rest_g: list[int]) -> Callable[..., Any]:
        """One sample's rows of the parameters ``rest_g`` and the output gradients of the
        layers ``members`` (the taps), with those layers' inputs as auxiliary output."""

        def single(rest_p: tuple[Tensor, ...], taps_p: tuple[Tensor, ...], sample: Any) -> Any:
            it = iter(sample)
            full = [
                next(it).unsqueeze(0) if flag else leaf
                for leaf, flag in zip(leaves, batched, strict=True)
            ]
            theta = list(params)
            for i, t in zip(rest_g, rest_p, strict=True):
                theta[i] = t
            hooks.taps, hooks.inputs = dict(zip(members, taps_p, strict=True)), {}
            rows = source(tuple(theta), pytree.tree_unflatten(full, spec))
            return rows, tuple(hooks.inputs[k] for k in members)

        return single

    def run_pass(
        members: list[int], rest_g: list[int], row_chunk: int | None, a: int, b: int
    ) -> Any:
        """((rest rows, tap rows), layer inputs) of samples a:b (one sample if ``row_chunk``)."""
        jac = row_chunked_jacrev(pass_fn(members, rest_g), row_chunk, argnums=(0, 1), has_aux=True)
        taps = tuple(torch.zeros(layers[k].out_shape, dtype=rdt, device=dev) for k in members)
        rest_p = tuple(params[i] for i in rest_g)
        parts = [t[a:b] for t, flag in zip(leaves, batched, strict=True) if flag]
        if row_chunk is None:
            args, dims = _vmap_args(parts)
            return torch.vmap(jac, in_dims=(None, None, dims))(rest_p, taps, args)
        # one sample (b == a + 1), its rows a few at a time, no vmap
        return pytree.tree_map(
            lambda t: t.unsqueeze(0), jac(rest_p, taps, tuple(p[0] for p in parts))
        )

    everyone = list(range(len(layers)))
    all_rows = sum(
        n * ly.tokens * ly.fan_out // max(s_total, 1) + ly.tokens * ly.fan_in for ly in layers
    )
    all_rows = (all_rows + r * rest_numel) * r_item  # one sample's outputs of a full pass
    measured: PeakModel | None = None
    # (what measured profiles are remembered by: computed once, it walks the model)
    structure = _structure_key(source) if strict else ()
    if strict and all_rows + jacobian_transient_bytes(source, r_item, strict) <= budget:
        # A budget the user gave: the full pass's memory is measured per sample count
        # (_peak_model: a shared weight's per-use gradients and BatchNorm/convolution backward
        # passes exceed the activation estimate, up to 1.125x over before). Every pass over
        # fewer layers prunes its backward, so this bounds every group's vmapped call.
        def one_pass(c: int) -> None:
            # as the loop below runs it: the call, then its rows reshaped for the buffers (a
            # patchify layer's input rows are a copy)
            (_, j_taps), inputs = run_pass(everyone, rest, None, 0, c)
            for k, ly in enumerate(layers):
                ly.output_rows(j_taps[k])
                ly.input_rows(inputs[k])

        def measure_pass() -> tuple[PeakModel, bool]:
            with hooks:
                return _peak_model(source, one_pass, s_total, budget)

        try:
            measured = _remembered(structure, ("pass", tuple(everyone), tuple(rest)), measure_pass)
        except Exception as err:  # the pass itself would fail the same way: the rows decide
            return decline(f"the factors' pass fails when its memory is measured ({err!r})")
        finally:
            hooks.taps, hooks.inputs = None, {}

    def size(members: list[int], with_rest: bool, first: bool) -> _GroupPlan | None:
        """The sizes of one pass over the layers ``members`` (and the remaining parameters'
        rows if ``with_rest``), or ``None`` where they do not fit the budget. Three phases
        must each fit: the pass (K unless first, the stored factors and rows, one vmapped
        call's outputs and intermediates), the remaining rows' Gram (K, the stored buffers, its
        widening buffers on the mixed-precision path), the layers' Grams (K, the factors, a
        float64 copy of one layer's factors on the mixed path, the workspace: at least what
        :func:`_layer_gram` needs for two blocks of one sample's rows)."""
        group = [layers[k] for k in members]
        factors = sum(n * ly.tokens * ly.fan_out + s_total * ly.tokens * ly.fan_in for ly in group)
        stored = factors * r_item + (rest_bytes if with_rest else 0)
        # Workspace of the Gram: one expanded block of rows or one Hadamard Gram, K's dtype.
        work = max(
            [
                _hadamard_work(n, s_total, ly.tokens)
                if _hadamard_pays(ly, n)
                else n * ly.fan_in * ly.fan_out
                for ly in group
            ]
            + [1]
        )
        least = max([_least_work(ly, n, s_total) for ly in group] + [1])
        # Transient memory (the Gram's workspace, one vmapped call's outputs): half of what
        # the budget leaves next to K and the stored factors and rows, but at least a fraction
        # of the stored bytes. Larger blocks mean fewer re-expansions and vmapped calls (demo
        # ViT probe under a 256 MiB budget: 195 ms with a 1 MiB workspace, 90 ms with 64 MiB).
        # (The floor never exceeds the headroom itself: tiny budgets are kept too.)
        headroom = budget - k_bytes - stored
        floor = min(MIN_TRANSIENT_BYTES, max(headroom, 0))
        transient = max(stored // TRANSIENT_DIVISOR, floor, headroom // 2)
        if k_bytes + stored + min(work * k_item, transient) > budget:
            return None
        widen = (
            0
            if r_item == k_item
            else max(
                (n * ly.tokens * ly.fan_out + s_total * ly.tokens * ly.fan_in) * k_item
                for ly in group
            )
        )
        # The layers' Grams, after the remaining rows are freed: a hard limit, and the
        # workspace's floor.
        layer_room = budget - k_bytes - factors * r_item - widen
        if strict and layer_room < least * k_item:
            return None
        rest_chunk = gram_chunk_elements(source.device)
        if with_rest and r_item != k_item:  # the remaining rows' Gram widens them
            rest_room = (budget - k_bytes - stored) // (2 * k_item)
            if strict and rest_room < n:
                return None
            rest_chunk = max(n, min(rest_chunk, rest_room))
        # One sample's share of a vmapped call: its factors and rows, and its backward
        # intermediates (about (r + 1) times its activations, see activation_elements). The
        # first pass runs before K exists.
        sample_rows = (factors // max(s_total, 1) + (r * rest_numel if with_rest else 0)) * r_item
        trans = jacobian_transient_bytes(source, r_item, strict)
        pass_room = budget - stored - (0 if first else k_bytes)
        row_chunk, pass_chunk = None, chunk
        if pass_chunk is None:
            if measured is not None:
                # The full pass's measured profile (its rows included) bounds every group's
                # pass: it replaces the activation estimate (and its margin).
                pass_chunk = _largest_chunk(measured, pass_room, s_total)
                if pass_chunk >= 1:  # what the pass holds beside its rows, per sample
                    held = _predicted_peak(measured, pass_chunk) - pass_chunk * sample_rows
                    trans = max(-(-held // pass_chunk), 0)
            else:
                pass_chunk = min(s_total, pass_room // max(sample_rows + trans, 1))
            if pass_chunk < 1:  # one sample's backward alone does not fit: fewer rows a pass
                row_chunk = row_chunk_for(source, r_item, pass_room - sample_rows, strict)
                if not row_chunk:
                    if strict:
                        return None  # not even one row of one sample (or its rows) fits
                    row_chunk = None  # (the floor: one sample, all its rows)
                pass_chunk = 1
                if row_chunk is not None:
                    act = activation_elements(source) * r_item
                    trans = (row_chunk + 1) * math.ceil(act * (ESTIMATE_MARGIN if strict else 1))
        # The pass's intermediates are freed before the Grams, but the allocator may keep them.
        spare = budget - k_bytes - factors * r_item - widen - transient - pass_chunk * trans
        work_bytes = max(least * k_item, min(work * k_item, max(transient, spare), layer_room))
        return _GroupPlan(
            members, with_rest, pass_chunk, row_chunk, max(work_bytes // k_item, 1), rest_chunk
        )

    # The layers in as few passes as fit the budget: one pass stores every layer's factors (and
    # recomputes nothing); where they do not all fit, consecutive layers are split into m
    # groups of about equal bytes (balanced, so that every pass keeps room for large vmapped
    # chunks and Gram workspaces), and each group's pass recomputes the forward and the
    # backward down to its lowest tapped layer. The first group also takes the remaining
    # parameters' rows.
    sizes = [
        (n * ly.tokens * ly.fan_out + s_total * ly.tokens * ly.fan_in) * r_item for ly in layers
    ]

    def plan_for(m: int) -> list[_GroupPlan] | None:
        groups = _balanced_groups(sizes, m, first_extra=rest_bytes)
        trial = [size(g, i == 0 and bool(rest), i == 0) for i, g in enumerate(groups)]
        return [p for p in trial if p is not None] if all(trial) else None

    def narrowest(plan: list[_GroupPlan]) -> float:  # samples per vmapped call, at the least
        return min(p.chunk if p.row_chunk is None else 0.5 for p in plan)

    plans: list[_GroupPlan] | None = None
    for m in range(1, len(layers) + 1):
        plans = plan_for(m)
        if plans is not None:
            # One more group where that at least doubles the narrowest pass's chunks: fewer,
            # larger vmapped calls win over the recomputed forward (ViT d32 at n = 512 under
            # 34-36 MiB: one pass of 3-4 samples a call took 1.4x the time of two of 10-14).
            if m < len(layers) and narrowest(plans) < s_total:
                more = plan_for(m + 1)
                if more is not None and narrowest(more) >= 2 * narrowest(plans):
                    plans = more
            break
    if plans is None:  # not even one layer's factors fit beside K
        return decline(f"not even one layer's factors and pass fit {budget} bytes beside K")
    K: Tensor | None = None
    for plan in plans:
        group = [layers[k] for k in plan.members]
        rest_g = rest if plan.with_rest else []
        # The factors and rows of all samples, written a chunk at a time (no concatenated
        # copies).
        g_buf = [torch.empty(n, ly.tokens, ly.fan_out, dtype=rdt, device=dev) for ly in group]
        a_buf = [torch.empty(s_total, ly.tokens, ly.fan_in, dtype=rdt, device=dev) for ly in group]
        rest_buf = [torch.empty(n, *params[i].shape, dtype=rdt, device=dev) for i in rest_g]
        step = plan.chunk
        try:
            with source.session(), hooks:
                for a in range(0, s_total, step):
                    b = min(a + step, s_total)
                    (j_rest, j_taps), inputs = run_pass(plan.members, rest_g, plan.row_chunk, a, b)
                    for k, ly in enumerate(group):
                        g_buf[k][a * r : b * r] = ly.output_rows(j_taps[k])
                        a_buf[k][a:b] = ly.input_rows(inputs[k])
                    for i in range(len(rest_buf)):  # (no loop variable keeps a chunk alive)
                        rest_buf[i][a * r : b * r] = j_rest[i].reshape(-1, *j_rest[i].shape[2:])
                    del j_rest, j_taps, inputs
        except Exception as err:
            hooks.taps, hooks.inputs = None, {}
            # E.g. data-dependent control flow under vmap (HF padding masks): the row strategy
            # has the fallbacks for that (grouping samples by mask, ...) and warns where they
            # cost.
            return decline(f"the model cannot be vmapped over samples ({err!r})")
        hooks.taps, hooks.inputs = None, {}  # (the last call's activations: not kept alive)
        if K is None:  # K starts as the remaining rows' Gram (no zero matrix plus a copy)
            K = (
                _gram_sym(tuple(rest_buf), kdtype, chunk_elements=plan.rest_chunk)
                if rest_g
                else torch.zeros(n, n, dtype=kdtype, device=dev)
            )
        del rest_buf
        for ly in group:  # each layer's factors are freed once its block is added
            G = g_buf.pop(0).to(kdtype)  # (n, T, out)
            A = a_buf.pop(0).to(kdtype)  # (N, T, in): one per sample, not per row
            _layer_gram(G, A, ly, plan.work, out=K)
            del G, A
    assert K is not None
    chunk = plans[0].chunk  # (the projection check's fallback chunking below)
    if not all_finite(K):
        # The factors' Grams overflowed (or the model gives NaN): no check (it would only see
        # NaN and blame the layers), the row strategy decides, and raises if it is NaN too.
        return decline("the factors' Grams overflowed (non-finite)")
    tokens = max(ly.tokens for ly in layers)
    # The rows are only as precise as the model computes: some models run parts of their
    # forward pass in a narrower type than the probe's (LLaMA's RMSNorm in float32).
    eps = max([torch.finfo(source.dtype).eps] + [torch.finfo(d).eps for d in narrow.dtypes])
    # The check's VJP holds, per sample, its activations and their gradients for CHECK_VECTORS
    # cotangents, not r Jacobian rows and factors, and only K is alive beside it: its chunks are
    # sized for that (ViT d32, 64 samples of 8 rows, the default budget: one chunk instead of
    # 13, 17 ms instead of 43–58 ms).
    act_bytes = activation_elements(source) * r_item
    if act_bytes:  # (beside K: Jᵀ U summed so far and one chunk's, CHECK_VECTORS vectors each)
        vectors = 2 * CHECK_VECTORS * source.n_params * r_item
        room = max(0, budget - n * n * k_item - vectors)
        per_sample = (CHECK_VECTORS + 1) * act_bytes
        if strict and room < per_sample:  # the check's one-sample VJP does not fit
            return decline(f"the projection check's one-sample VJP does not fit {budget} bytes")
        check_chunk = max(1, min(s_total, room // per_sample))
        if strict:
            # Measured as the pass was (BatchNorm, convolutions: above the estimate): a chunk's
            # VJP, its Jᵀ U included, beside K, and, from the second chunk on, the sum of the
            # earlier chunks' Jᵀ U (CHECK_VECTORS parameter vectors).
            U = _check_vectors(n, K, source.dtype)
            free = budget - n * n * k_item
            try:
                profile = _remembered(
                    structure,
                    ("check", K.dtype),
                    lambda: _peak_model(
                        source,
                        lambda c: _projected_gram(source, U, c, K.dtype, c),
                        s_total,
                        free,
                    ),
                )
            except Exception as err:  # the check would fail the same way: the rows decide
                return decline(f"the projection check fails when measured ({err!r})")
            if _predicted_peak(profile, s_total) <= free:
                check_chunk = s_total  # one VJP: its Jᵀ U is the sum, nothing beside it
            elif _predicted_peak(profile, 1) + vectors > free:
                check_chunk = 0  # not even chunks of one sample beside the running sum
            elif s_total >= 6:
                # Chunks: traced as three chunks of c, for c = 1, 2 (or 2, 3): from the second
                # chunk on, the sum of the earlier ones sits beside the VJP, and the third shows
                # whatever an earlier chunk leaves alive (a loop variable once kept one
                # gradient: two traced chunks predicted more chunks 4 kB short).
                chunked = _remembered(
                    structure,
                    ("check-chunks", K.dtype),
                    lambda: _peak_model(
                        source,
                        lambda c: _projected_gram(source, U, c, K.dtype, 3 * c),
                        s_total // 3,
                        free,
                    ),
                )
                check_chunk = _largest_chunk(chunked, free, s_total // 3)
            else:  # (beside the VJP: the earlier chunks' sum, and room for one more vector)
                check_chunk = _largest_chunk(profile, free - vectors, s_total)
            del U
            if check_chunk < 1:  # not even one sample's VJP fits: the rows decide
                return decline(f"the projection check's one-sample VJP does not fit {budget} bytes")
    else:  # no estimate: r times the pass's chunk
        check_chunk = min(s_total, chunk * max(r, 1))
    if not _agrees(K, source, tokens, check_chunk, eps):
        return decline("its projection check could not run on the batch or disagreed with K")
    return K


def _least_work(layer: _Layer, n: int, samples: int) -> int:
    """The fewest workspace elements :func:`_layer_gram` needs for ``layer``: a block of one
    sample's r rows against all n (T = 1), or an expanded panel and a streamed block of r rows
    each with their product (T > 1), and the bias block's two row sums."""
    r = max(n // max(samples, 1), 1)
    t, fi, fo = layer.tokens, layer.fan_in, layer.fan_out
    bias = 2 * fo if layer.bias is not None else 0
    if t == 1:
        return r * (n + samples) + bias
    return 2 * r * (fi * fo + t * min(fi, fo)) + r * r + bias


def _hadamard_work(n: int, samples: int, tokens: int) -> int:
    """Elements the Hadamard route holds: G's and A's token Grams and their sum over tokens."""
    return (n * tokens) ** 2 + (samples * tokens) ** 2 + n * n


def _add_bias_block(G: Tensor, K: Tensor, work: int) -> None:
    """K += g gᵀ with g = Σ_t G_t (the bias's rows), within ``work`` elements: g itself where
    it fits (a view for T = 1), else pairs of row blocks whose sums are formed on the fly."""
    n, t, fo = G.shape
    if t == 1:
        K.addmm_(G[:, 0], G[:, 0].T)
        return
    if n * fo <= work:
        g = G.sum(1)
        K.addmm_(g, g.T)
        return
    q = max(1, work // (2 * fo))
    for a in range(0, n, q):
        ga = G[a : a + q].sum(1)
        for c in range(0, n, q):
            gc = ga if c == a else G[c : c + q].sum(1)
            K[a : a + q, c : c + q].addmm_(ga, gc.T)
            del gc


def _layer_gram(
    G: Tensor,
    A: Tensor,
    layer: _Layer,
    work: int,
    out: Tensor | None = None,
) -> Tensor:
    """The layer's block of K from its factors (module docstring), in G's dtype, added to
    ``out`` in place when given (and returned). G: (n, T, out), one per row; A: (N, T, in), one
    per sample; rows are sample-major, n / N per sample. ``work``: workspace elements."""
    n, t = G.shape[0], layer.tokens
    K = torch.zeros(n, n, dtype=G.dtype, device=G.device) if out is None else out
    s_count = A.shape[0]
    r = n // s_count  # rows are sample-major, r per sample: A's Grams broadcast over them
    if layer.bias is not None:
        _add_bias_block(G, K, work)
    if t == 1:
        # (G Gᵀ) ⊙ (A Aᵀ), A's sample Gram broadcast over each sample's r rows, a block of
        # whole samples' rows at a time (q × n of G's Gram, q/r × N of A's) within the workspace
        a0, g0 = A[:, 0], G[:, 0]
        q = min(n, max(r, work // (n + s_count) // r * r))
        for a in range(0, n, q):
            b = min(a + q, n)
            s0, s1 = a // r, b // r
            gg = g0[a:b] @ g0.T
            aa = (a0[s0:s1] @ a0.T).view(s1 - s0, 1, s_count, 1)
            gg.view(s1 - s0, r, s_count, r).mul_(aa)
            K[a:b].add_(gg)
            del gg, aa
        return K
    if _hadamard_pays(layer, n) and _hadamard_work(n, s_count, t) <= work:  # else the blocked
        # expansion, which keeps to the workspace
        af = A.reshape(-1, layer.fan_in)
        aa = (af @ af.T).view(s_count, 1, t, s_count, 1, t)
        gf = G.reshape(n * t, -1)
        gg = (gf @ gf.T).view(s_count, r, t, s_count, r, t).mul_(aa)
        return K.add_(gg.sum((2, 5)).view(n, n))
    # Expanded rows E_r = G_rᵀ A_s(r) (out × in): a *panel* of p rows is expanded once and
    # multiplied by the rows after it, streamed q at a time (q ≪ p), one triangle of K only.
    # An expansion is a batched product with inner dimension T (a few GMAC/s, bound by writing
    # its output), so each streamed row should meet many panel rows: with panel = block (the
    # old scheme) the rows were re-expanded n/(2·block) times (ViT d32, n = 512: 45 of its
    # 158 ms), and the small square GEMMs ran slower than tall ones.
    # Rows are sample-major (r per sample) and expand a block of whole samples at a time. A
    # batched product needs one operand copied per row: A's T·in numbers (each sample's tokens
    # repeated for its r rows) or G's T·out (transposed). The smaller one is copied (a patchify
    # conv's T·in can be many times its in·out), and counted in the workspace with the row's
    # in·out. The two routes order a row's in·out columns differently, which K does not see.
    r = n // A.shape[0]
    fi, fo = layer.fan_in, layer.fan_out
    copy_a = fi <= fo
    # Per expanded row: in·out numbers and its copied operand; per panel row also its q
    # columns of the product with a streamed block. At least one sample's r rows each.
    per_row = max(fi * fo + t * min(fi, fo), 1)
    q = max(r, min(GRAM_STREAM_ROWS, work // per_row // 5) // r * r)
    p = min(n, max(r, (work - q * per_row) // (per_row + q) // r * r))

    def expand(a: int, b: int) -> Tensor:
        s0, s1 = a // r, b // r
        if copy_a:  # (in × T) @ (T × out) per row, A's tokens broadcast over the r rows
            a_t = A[s0:s1].transpose(1, 2).unsqueeze(1)  # (samples, 1, in, T)
            return torch.matmul(a_t, G[a:b].view(s1 - s0, r, t, fo)).reshape(b - a, -1)
        g = G[a:b].reshape(s1 - s0, r, t, fo).transpose(2, 3).reshape(s1 - s0, r * fo, t)
        return torch.bmm(g, A[s0:s1]).reshape(b - a, -1)  # (out × T) @ (T × in) per row

    for a in range(0, n, p):
        b = min(a + p, n)
        ea = expand(a, b)
        c = a
        while c < n:
            if c < b:  # inside the panel: its rows up to the block, no expansion
                d = min(c + q, b)
                top, blk = ea[: d - a], ea[c - a : d - a]
            else:
                d = min(c + q, n)
                top, blk = ea, expand(c, d)
            off = top @ blk.T  # K[a : a + len(top), c:d]
            K[a : a + off.shape[0], c:d] += off
            # mirror the part strictly above the diagonal block (rows a..min(c, b))
            m = min(c, b) - a
            if m > 0:
                K[c:d, a : a + m] += off[:m].T
            c = d
            del top, blk, off  # (not alive while the next block is expanded)
        del ea  # (not alive while the next panel is expanded)
    return K


#: Rows streamed past an expanded panel at a time in :func:`_layer_gram` (the GEMMs are
#: panel × q; q = 64 keeps them near peak speed, 20 GMAC/s float64 on one core, while the panel
#: gets the rest of the workspace).
GRAM_STREAM_ROWS = 64


#: Seeded random unit vectors u of the projection check (:func:`_agrees`).
CHECK_VECTORS = 2
#: Safety factor of the projection check's rounding tolerance (see :func:`_agrees`).
CHECK_FACTOR = 8.0


def _check_vectors(n: int, K: Tensor, dtype: torch.dtype) -> Tensor:
    """The check's seeded random unit vectors (n × CHECK_VECTORS), in K's dtype and device,
    rounded through ``dtype`` (the rows')."""
    gen = torch.Generator().manual_seed(0x5EED)
    U = torch.randn(n, CHECK_VECTORS, generator=gen, dtype=torch.float64)
    return (U / U.norm(dim=0)).to(dtype).to(device=K.device, dtype=K.dtype)


def _projected_gram(
    source: ProbeFunction, U: Tensor, chunk: int, dtype: torch.dtype, samples: int | None = None
) -> Tensor:
    """(Jᵀ U)ᵀ (Jᵀ U) for the columns of ``U`` (n × k), accumulated in ``dtype``, from one batched
    VJP of the probe's rows per chunk of samples (no per-sample Jacobian, no factors). Holds k
    parameter-sized vectors in the rows' dtype (2k while a chunk's VJP is added). ``samples``:
    only the first ones (a measurement of one chunk's memory)."""
    from .dense import _gram

    cot = U.to(source.dtype).T.contiguous()  # (k, n)
    ranges = source.sample_ranges(chunk)
    if samples is not None:
        ranges = [(a, min(b, samples)) for a, b in ranges if a < samples]
    acc: list[Tensor] = []
    for a, b in ranges:
        inputs = source.chunk(a, b)
        ra, rb = source.row_range(a, b)
        vjp_fn = torch.func.vjp(lambda *p, x=inputs: source(p, x), *source.params)[1]
        try:
            grads = tuple(torch.vmap(vjp_fn)(cot[:, ra:rb]))
        except Exception:  # a model that cannot be vmapped: one backward pass per vector
            cols = [vjp_fn(c) for c in cot[:, ra:rb]]
            grads = tuple(torch.stack(g) for g in zip(*cols, strict=True))
        if not acc:
            # Autograd's outputs may share storage (a gradient that is a view of another's):
            # read them as they are, but copy them before adding other chunks in place.
            acc = list(grads) if len(ranges) == 1 else [g.clone() for g in grads]
        else:
            for i in range(len(acc)):  # (no loop variable keeps a gradient alive)
                acc[i].add_(grads[i])
        del grads, vjp_fn
    return _gram(tuple(acc), tuple(acc), dtype)


def _agrees(K: Tensor, source: ProbeFunction, tokens: int, chunk: int, eps_rows: float) -> bool:
    """K against plain reverse-mode derivatives of *all* samples, by random projection.

    For seeded random unit vectors u₁, u₂ ∈ ℝⁿ, UᵀKU (2 × 2, from the structured K) must equal
    (JᵀU)ᵀ(JᵀU), where JᵀU comes from one VJP of the whole probe batch's rows (per chunk of
    samples): one batched forward and backward pass, no Jacobian rows. A contribution that the
    factors miss (a Linear weight also used outside its layer's forward, on any sample) changes
    uᵀKu by an amount of the order of K's entries; rounding changes each entry K_ij by at most
    about (8·T·ε_rows + 4·√P·ε_K)·√(K_ii K_jj) on either side (T the layers' tokens, ε_rows
    that of the narrowest floating type the model computes in, ε_K that of K), hence uᵀKu by at
    most that factor times (Σ_i |u_i| √K_ii)², the tolerance used here. Measured err/tol on
    MLPs, token MLPs, timm ViTs and LLaMA: ≤ 2e-2 (float32 and float64 rows); the reproducer of
    a weight used outside its forward on half of the samples: 59 (float32 rows), 7e8 (float64).
    If the check cannot run (the model fails on the whole batch), the row strategy is used
    silently.
    """
    n = K.shape[0]
    U = _check_vectors(n, K, source.dtype)
    try:
        with source.session():
            ref = _projected_gram(source, U, chunk, K.dtype)
    except Exception:
        return False
    got = U.T @ K @ U
    s = U.abs().T @ K.diagonal().clamp(min=0).sqrt()  # Σ_i |u_i| √K_ii per vector
    eps_k = torch.finfo(K.dtype).eps
    factor = CHECK_FACTOR * tokens * eps_rows + 4 * math.sqrt(source.n_params) * eps_k
    tol = factor * torch.outer(s, s)
    err = (got - ref).abs()
    if bool((err <= tol).all()):
        return True
    worst = int(torch.argmax(err / tol.clamp(min=torch.finfo(K.dtype).tiny)))
    i, j = divmod(worst, CHECK_VECTORS)
    warnings.warn(
        f"structured NTK: a random projection uᵀKu of the structured K differs from the plain "
        f"Jacobian rows' ‖Jᵀu‖² by {float(err[i, j]):.3e} (tolerance {float(tol[i, j]):.3e}, "
        f"value {float(ref[i, j]):.6e}); a Linear layer's weight is probably used outside its "
        "forward pass (or, with eval_mode=False, a layer couples the samples). "
        "Using Jacobian rows instead",
        RuntimeWarning,
        stacklevel=external_stacklevel(),
    )
    return False
