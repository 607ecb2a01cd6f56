"""Matrix-free NTK products ``V -> K V = J (Jᵀ V)``.

Jᵀ U is a vector-Jacobian product (reverse mode) and J T a Jacobian-vector product (forward
mode), both from :mod:`torch.func` and both vectorised over the k columns of the block with
:func:`torch.vmap`, so one call costs about one batched backward plus one batched forward-mode
pass instead of k of each.

When the probe batch is not chunked, one linearisation is built per operator and reused by every
product: the ``vjp_fn`` of :func:`torch.func.vjp` (the saved forward residuals) and a JVP that
recomputes the primal forward once per product (shared by the k columns). For long iterations
(``linearize``) both maps are then *traced* once (:func:`trace_linear_map`, the same make_fx +
constant folding as :func:`torch.func.linearize`, with the activation-derivative ops decomposed
so that φ'(primal) is folded into a constant): a product then runs only the ops that depend on
the vectors, never the primal forward and never an activation derivative. With
``chunk_size`` the probe batch is processed ``chunk_size`` samples at a time and nothing is kept
between products, which bounds memory by one chunk's activations at the price of recomputing the
forward pass of each chunk.

Tracing costs about as much as 10–200 untraced products (CPU, 2026-11-28: 0.4–3.6 s for the
benchmark's MLP, ViT and GPT-2) and saves 1–55% per product, so the default traces only where
the caller's bound on the products still to come (:attr:`NTKOperator.expected_products`) leaves
at least :attr:`NTKOperator.TRACE_MIN_REMAINING` of them. On a GPU a small model's product is
bound by kernel launches and Python dispatch, not arithmetic: there the product of one block
width is captured once in a CUDA graph (:class:`torch.cuda.CUDAGraph`) and replayed, checked
against the eager product it replaces (``cuda_graphs``).

Error: a product is exact up to floating-point rounding of the chosen ``dtype`` (float32 by
default, TF32 disabled, so the relative error is of order n_params·2⁻²⁴ at worst and typically
far smaller; ``dtype=torch.float64`` for more).
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from .._warnings import external_stacklevel
from .functional import (
    OutputSpec,
    ParamFilter,
    ProbeFunction,
    ProbeSplitError,
    allows_autograd,
    default_probe_dtype,
    warn_narrowed,
)

__all__ = ["MatrixFreeUnavailableError", "NTKOperator", "trace_linear_map"]

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Models whose NTK product could not be captured in a CUDA graph: later operators on them run
#: eagerly from the start (``ntk_spectrum`` builds one operator per call, and a capture that
#: cannot work costs a sync, a garbage collection and an emptied allocator cache each time).
_UNGRAPHABLE: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _warn_outside(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the first frame outside glu-probe (the user's call),
    wherever inside the package it is raised (a product runs deep inside ``block_lanczos``)."""
    level, frame = 1, sys._getframe(0)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR + os.sep):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    warnings.warn(message, category, stacklevel=external_stacklevel())


def _fold_decompositions() -> dict[Any, Any]:
    """Decompositions of the elementwise activation-derivative ops, for constant folding.

    ``gelu_backward(g, x)`` and its kin are single aten ops whose eager kernels recompute the
    activation's derivative from ``x`` at every call. Decomposed, they become ``g * φ'(x)`` with
    a ``φ'(x)`` that depends on the (constant) primal only, which constant folding evaluates
    once. Only these ops are decomposed: the rest of the graph keeps its fused kernels.
    """
    from torch._decomp import get_decompositions

    aten = torch.ops.aten
    ops = [
        aten.gelu_backward,
        aten.silu_backward,
        aten.sigmoid_backward,
        aten.tanh_backward,
        aten.threshold_backward,
        aten.hardtanh_backward,
        aten.elu_backward,
        aten.leaky_relu_backward,
        aten.softplus_backward,
        aten.mish_backward,
        aten.hardswish_backward,
        aten.hardsigmoid_backward,
    ]
    return get_decompositions([op for op in ops if op is not None])


def _example_like(tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Random example inputs for tracing (a private generator: the global RNG is untouched)."""
    gen = torch.Generator(device=tensors[0].device).manual_seed(0)
    return tuple(
        torch.randn(t.shape, generator=gen, dtype=t.dtype, device=t.device) for t in tensors
    )


def _fuse_accumulations(gm: Any) -> int:
    """Rewrite the traced graph's sums of products into accumulating kernels; returns the count.

    A linearised product is full of ``add(x, mm(A, B))`` (a Linear layer's JVP is
    ``t_b + dW·a + W·t_a``, on token batches through 3-D views), ``add(bmm, bmm)`` (attention's
    ``dQ·Kᵀ + Q·dKᵀ``) and ``add(mul, mul)`` (LayerNorm's and the activations' JVPs). They become
    ``addmm`` / ``baddbmm`` / ``addcmul``: the GEMM accumulates its operand in its epilogue (a
    bias vector: cuBLASLt's on CUDA), the multiply-add is one pass instead of two. Measured on
    the timm ViT of ``bench_ntk.py`` §2 (CPU, 1 thread, 2026-11-28): 32 rewrites, the product
    5–8% faster in an in-process A/B. torch.compile would fuse more, but compiles for seconds
    per model and probe shape; these rewrites are exact up to summation order.

    Out of place only: nothing is written, so inputs, folded constants and shared results are
    safe whatever aliases them, and all three ops have vmap batching rules (the operator vmaps
    the map over block columns; an in-place first version fell back to a per-column loop there,
    with a warning per product, and could not write a batched sum into an unbatched operand).
    Unbatched calls run an in-place copy instead where that is safe (:func:`_in_place_copy`).
    """
    import torch.fx as fx

    aten = torch.ops.aten
    views = (aten.view.default, aten._unsafe_view.default)

    def meta(n: Any) -> Any:
        return n.meta.get("val") if isinstance(n, fx.Node) else None

    graph = gm.graph
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.add.Tensor or node.kwargs:
            continue
        if len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
            continue
        out = meta(node)
        if not isinstance(out, Tensor) or node.args[0] is node.args[1]:  # (x + x: left alone)
            continue
        for acc, other in (node.args, node.args[::-1]):
            av, ov = meta(acc), meta(other)
            if not isinstance(av, Tensor) or not isinstance(ov, Tensor):
                continue
            if other.op != "call_function" or len(other.users) != 1:
                continue
            if av.dtype != out.dtype or ov.dtype != out.dtype:
                continue
            if other.target in (aten.bmm.default, aten.mul.Tensor):
                if av.shape != out.shape or ov.shape != out.shape:
                    continue
                if not all(isinstance(a, fx.Node) for a in other.args):
                    continue
                op = aten.baddbmm if other.target is aten.bmm.default else aten.addcmul
                with graph.inserting_before(node):
                    new = graph.call_function(op.default, (acc, *other.args))
                new.meta["val"] = out
                node.replace_all_uses_with(new)
                graph.erase_node(node)
                graph.erase_node(other)
                count += 1
                break
            mm, view = other, None
            if mm.target in views:
                view, mm = mm, mm.args[0]
                if not isinstance(mm, fx.Node) or len(mm.users) != 1:
                    continue
            if mm.op != "call_function" or mm.target is not aten.mm.default:
                continue
            mv = meta(mm)
            if not isinstance(mv, Tensor) or ov.shape != out.shape or mv.dtype != out.dtype:
                continue
            rows, cols = mv.shape
            if av.dim() == 1 and av.shape[0] == cols == out.shape[-1]:
                flat = acc  # a bias vector, broadcast over the rows as before
            elif av.shape == out.shape and av.is_contiguous():
                flat = acc  # the same elements in the mm's (rows, cols) order
                base = acc.args[0] if acc.op == "call_function" and acc.target in views else None
                if isinstance(meta(base), Tensor) and tuple(meta(base).shape) == (rows, cols):
                    flat = base  # a 3-D view of a 2-D result: the result itself
            else:
                continue
            with graph.inserting_before(node):
                if flat is acc and av.dim() != 1 and tuple(av.shape) != (rows, cols):
                    flat = graph.call_function(views[0], (acc, [rows, cols]))
                new = graph.call_function(aten.addmm.default, (flat, *mm.args))
                new.meta["val"] = mv  # shape, dtype and layout: what later rewrites read
                result = new
                if view is not None:
                    result = graph.call_function(views[0], (new, list(out.shape)))
                    result.meta["val"] = out
            node.replace_all_uses_with(result)
            graph.erase_node(node)
            if view is not None:
                graph.erase_node(view)
            graph.erase_node(mm)
            count += 1
            break
    if count:
        graph.eliminate_dead_code()  # the 3-D views whose 2-D results are now read directly
        graph.lint()
        gm.recompile()
    return count


def _in_place_copy(gm: Any) -> Any:
    """A copy of the traced map whose accumulations write into their accumulator, for
    unbatched calls (one column); ``None`` where nothing qualifies.

    The out-of-place ``addmm`` / ``baddbmm`` of :func:`_fuse_accumulations` first copy their
    accumulator into a new output (ATen's out-of-place form), a full pass over a Linear layer's
    output per rewrite: on the timm ViT of ``bench_ntk.py`` §2 two of the JVP's four copies of
    the 2080x256 MLP activation. Where the accumulator is an intermediate that this op alone
    reads, made by an op that allocates its result (a GEMM, a sum, a product: never a view of
    something else, an input or a folded constant), overwriting it is safe and the copy goes.
    Under :func:`torch.vmap` these in-place ops have no batching rule (a per-column fallback
    with a warning), so the operator keeps the out-of-place map for blocks of columns.

    The copy shares the folded constants with ``gm`` (no second copy of the activations).
    Written by hand: torch.fx has no in-place reuse pass, and Inductor's (which has) compiles for
    seconds per model and probe shape.
    """
    import torch.fx as fx

    aten = torch.ops.aten
    in_place = {
        aten.addmm.default: aten.addmm_.default,
        aten.baddbmm.default: aten.baddbmm_.default,
        aten.addcmul.default: aten.addcmul_.default,
    }
    fresh = {  # ops whose output is new storage (no alias of an argument)
        aten.mm.default,
        aten.addmm.default,
        aten.bmm.default,
        aten.baddbmm.default,
        aten.add.Tensor,
        aten.sub.Tensor,
        aten.mul.Tensor,
        aten.addcmul.default,
    }
    views = (aten.view.default, aten._unsafe_view.default)
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in in_place:
            continue
        acc = node.args[0]
        if not isinstance(acc, fx.Node) or len(acc.users) != 1:
            continue
        owner: Any = acc
        if owner.op == "call_function" and owner.target in views:  # a view of a fresh result
            owner = owner.args[0]
            if not isinstance(owner, fx.Node) or len(owner.users) != 1:
                continue
        if any(a is acc or a is owner for a in node.args[1:]):
            # also an operand (addmm(g, g, M) of a residual through a frozen map: one user,
            # read twice): ATen's in-place form is wrong when the output overlaps an operand
            # (review, session 20: float32 products 3.8e-6 off, passing the trace check)
            continue
        if owner.op != "call_function" or owner.target not in fresh:
            continue
        av, out = acc.meta.get("val"), node.meta.get("val")
        if not isinstance(av, Tensor) or not isinstance(out, Tensor):
            continue
        if tuple(av.shape) != tuple(out.shape) or av.dtype != out.dtype:
            continue  # (a broadcast accumulator, such as a bias vector, stays out of place)
        node.target = in_place[node.target]
        count += 1
    if not count:
        return None
    graph.lint()
    return fx.GraphModule(gm, graph)


def _refuse_constant_mutations(gm: Any) -> None:
    """Raise if the folded graph mutates a value that lives across its calls.

    A model that updates an activation in place (``h += c``, a residual ``out += identity``)
    leaves that in-place op in the traced linear map, applied to the folded primal value: every
    call would add ``c`` once more, so the products drift (relative errors 0.5, 1.0, 1.6, 2.1 on
    four calls of a two-layer net in a review, 2026-11-28), and a one-call check cannot see it.
    Such maps are refused here; the caller keeps the untraced products, which are right.

    What lives across calls: the folded constants (``get_attr`` nodes) and views of them. A
    constant that is first overwritten whole (``fill_``, ``zero_``, ``copy_``) before anything
    reads it holds the same value at every call, whatever the previous call left in it, and so
    do the in-place updates that follow on it: the decomposed backward of SiLU and Mish folds an
    ``empty_like`` into a constant, then fills it with 1 and subtracts the sigmoid in place.
    Refusing that dropped the traced products of every SiLU model (session 21 review).
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    dependent = {n for n in gm.graph.nodes if n.op == "placeholder"}  # on the inputs
    persistent = {n for n in gm.graph.nodes if n.op == "get_attr"}  # folded constants
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)
            continue
        schema = getattr(node.target, "_schema", None)
        if schema is None:
            # Python-level ops (operator.getitem on the folded constants' tuple) hand out the
            # constants themselves
            if any(a in persistent for a in node.all_input_nodes):
                persistent.add(node)
            continue
        if schema.is_mutable:
            written = [
                value
                for arg, value in _schema_bound(schema, node)
                if arg.alias_info is not None and arg.alias_info.is_write
            ]
            if (
                node.target in _OVERWRITES
                and len(written) == 1
                and written[0] in persistent
                and min(order[u] for u in written[0].users) == order[node]
            ):
                continue  # its first use overwrites it whole: fresh at every call, as its output
            if any(w in persistent for w in written):
                raise RuntimeError(
                    f"the traced map mutates a constant in place ({node.target}): an in-place "
                    "update of an activation in the model's forward"
                )
        returns = schema.returns
        # a view (or the mutated argument itself) of a constant is that constant
        aliases = bool(returns) and returns[0].alias_info is not None
        if aliases and any(a in persistent for a in node.all_input_nodes):
            persistent.add(node)


_aten = torch.ops.aten
#: In-place ops that overwrite the whole of their first argument (``copy_`` broadcasts its
#: source over it).
_OVERWRITES = (
    _aten.fill_.Scalar,
    _aten.fill_.Tensor,
    _aten.zero_.default,
    _aten.copy_.default,
)


def _schema_bound(schema: Any, node: Any) -> list[tuple[Any, Any]]:
    """``(schema argument, value)`` pairs of an FX node's call (positional, then keyword)."""
    pairs = list(zip(schema.arguments, node.args, strict=False))
    by_name = {a.name: a for a in schema.arguments}
    pairs += [(by_name[k], v) for k, v in node.kwargs.items() if k in by_name]
    return pairs


def trace_linear_map(fn: Callable[..., Any], example: Sequence[Tensor]) -> Callable[..., Any]:
    """``fn`` (linear in its tensor arguments, everything else fixed) as a folded FX graph.

    What :func:`torch.func.linearize` does for a JVP, for any such map (here also the VJP of the
    probe): :func:`~torch.fx.experimental.proxy_tensor.make_fx` records the aten ops of one call,
    with the activation-derivative ops decomposed (:func:`_fold_decompositions`), and
    :func:`~torch.fx.experimental.const_fold.split_const_subgraphs` evaluates once every
    subgraph that does not depend on the arguments (the primal forward pass, the activation
    derivatives). A call then runs only the argument-dependent ops: for a GELU MLP the matvec
    drops from ~4x to ~2.7x a forward pass on CPU (benchmarks/RESULTS_ntk.md §2).

    The trace is checked against ``fn`` on ``example`` (relative error ≤ 1e-4 in float32,
    1e-10 in float64); a mismatch raises, and callers keep ``fn``.
    """
    from torch.fx.experimental import const_fold
    from torch.fx.experimental.proxy_tensor import make_fx

    with warnings.catch_warnings():
        # make_fx's constant folding warns about get_attr nodes it creates itself.
        warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node")
        graph = make_fx(fn, decomposition_table=_fold_decompositions())(*example)
        folded = const_fold.split_const_subgraphs(graph)
    _refuse_constant_mutations(folded)
    _fuse_accumulations(folded)
    ref = torch.utils._pytree.tree_leaves(fn(*example))
    got = torch.utils._pytree.tree_leaves(folded(*example))
    tol = 1e-10 if example[0].dtype == torch.float64 else 1e-4
    scale = max(float(r.abs().max()) for r in ref) if ref else 0.0
    if len(ref) != len(got) or any(
        r.shape != g.shape or float((r - g).abs().max()) > tol * max(scale, 1e-30)
        for r, g in zip(ref, got, strict=False)
    ):
        raise RuntimeError("the traced map disagrees with the original on a random input")
    single = _in_place_copy(folded)
    if single is not None:
        # The same ops as the out-of-place map, accumulating in place: equal to rounding, so
        # checked much tighter than the trace (a wrong in-place write hides under 1e-4).
        exact = 64 * torch.finfo(example[0].dtype).eps
        outs = torch.utils._pytree.tree_leaves(single(*example))
        if len(outs) == len(got) and all(
            o.shape == g.shape and float((o - g).abs().max()) <= exact * max(scale, 1e-30)
            for o, g in zip(outs, got, strict=True)
        ):
            # read by _batched for one column; a plain attribute, not a registered submodule
            folded.__dict__["unbatched"] = single
    return folded


def _load_jvp_decompositions() -> None:
    """Load torch's forward-mode decompositions (what the first ``make_dual`` of a process
    does) with their ``torch.jit.script is deprecated`` warning silenced: on torch >= 2.10
    it fires once per scripted decomposition (18 times under an "always" filter), and the NTK
    monitor relayed it as if the probed model had caused it (scale review, 2026-11-28). Only
    that message of that loading step is silenced, in either category: torch 2.11 raises it as
    a DeprecationWarning, 2.14 as a FutureWarning."""
    load = getattr(torch.autograd.forward_ad, "_maybe_load_decompositions", None)
    if load is None:
        return
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings(
                "ignore", message=r".*torch\.jit\.script.* is deprecated", category=category
            )
        load()


def _missing_forward_ad(err: BaseException) -> bool:
    """An operation without a forward-mode derivative (PyTorch's NotImplementedError text)."""
    text = str(err)
    return any(s in text for s in ("forward AD", "forward mode AD", "forward-mode"))


class MatrixFreeUnavailableError(NotImplementedError):
    """J·u cannot be formed matrix-free for this model: forward mode is missing or disagrees
    with reverse mode, and so does the reverse-mode fallback (the VJP of u ↦ Jᵀu, a double
    backward), or it cannot run, or its check could not be confirmed in a dtype wider than the
    probe's. The products would be wrong (or impossible, or unverified). Where the probe's
    samples are independent, the dense path (``ntk_spectrum(method="dense")``,
    ``ntk_matrix(strategy="jacobian")``), which needs first-order reverse mode only, is not
    affected. Where they are not (a coupled batch: train-mode BatchNorm with
    ``eval_mode=False``, :attr:`~glu_probe.ntk.functional.ProbeFunction.per_sample_why`), the
    dense path's K comes from these same products and per-sample rows are not the batch's:
    no path forms K for that model and batch (``eval_mode=True`` makes the samples
    independent, and the dense path then works)."""


def _without_products_advice(probe: ProbeFunction) -> str:
    """What to use where the matrix-free products cannot be formed (see
    :class:`MatrixFreeUnavailableError`): the dense path, unless the batch is coupled."""
    if probe.per_sample_why is None:
        return (
            "Use ntk_spectrum(method='dense') or ntk_matrix(strategy='jacobian') (K from "
            "first-order reverse-mode Jacobian rows, training's J)"
        )
    # (the dense path of a coupled batch runs these same products: advising it sent the user
    # into the same error; review, session 27)
    return (
        f"No path can form K for this model and batch: {probe.per_sample_why}, so the dense "
        "path (method='dense', strategy='auto') computes K from these same products, and "
        "per-sample Jacobian rows (strategy='jacobian') do not give the batch's K. Probe "
        "with eval_mode=True (running statistics: independent samples, whose K the dense "
        "path forms from first-order reverse-mode rows)"
    )


def _jvp_through_vjp(
    f: Callable[..., Tensor], params: Sequence[Tensor], rows: int
) -> Callable[..., Tensor]:
    """``t ↦ J t`` of ``f`` at ``params`` without forward-mode AD: the VJP of the linear map
    u ↦ Jᵀu with cotangent t, which is (Jᵀ)ᵀ t = J t at any u (here 0). One forward and two
    backward passes per call, written by hand because torch.func has no such fallback of its
    own."""
    like = params[0]

    def jt(u: Tensor) -> tuple[Tensor, ...]:
        vjp_fn = torch.func.vjp(f, *params)[1]
        return tuple(vjp_fn(u))

    def jvp_fn(*t: Tensor) -> Tensor:
        u0 = torch.zeros(rows, dtype=like.dtype, device=like.device)
        back = torch.func.vjp(jt, u0)[1]
        return back(tuple(t))[0]

    return jvp_fn


T = TypeVar("T")


def agreed(build: Callable[[], T], process_group: Any, model: nn.Module) -> T:
    """``build()`` on every rank of ``process_group``, which then agree on success before any
    collective: a rank whose probe shard fails (non-finite outputs, out of memory, an empty
    shard) raises its own error, and every other rank raises too, instead of waiting in the
    next all-gather until the collective timeout (30 minutes with gloo). One MAX all-reduce of a
    status code; nothing without a group."""
    if process_group is None:
        return build()
    import torch.distributed as dist

    result: T | None = None
    failure: BaseException | None = None
    try:
        result = build()
    except Exception as err:
        failure = err
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if dist.get_backend(process_group) == "gloo":
        device = torch.device("cpu")
    agree_on_failure(failure, process_group, device, "NTK probe", "setting up its probe shard")
    assert result is not None
    return result


def agree_on_failure(
    err: BaseException | None, process_group: Any, device: torch.device, who: str, stage: str
) -> None:
    """Raise ``err`` here, and a matching error on every other rank, before any collective.

    No group: just re-raise. With one: a MAX all-reduce of a status code (0 ok, 1 out of memory,
    2 other). The failing rank re-raises its own exception; the others raise a RuntimeError
    saying which kind, with "out of memory" in the text for an OOM so that callers (the
    monitor's halve-and-retry) treat it alike on every rank.
    """
    if process_group is None:
        if err is not None:
            raise err
        return
    import torch.distributed as dist

    code = 0 if err is None else (1 if is_out_of_memory(err) else 2)
    status = torch.tensor([code], dtype=torch.int32, device=device)
    dist.all_reduce(status, op=dist.ReduceOp.MAX, group=process_group)
    worst = int(status.item())
    if err is not None:
        raise err
    if worst:
        what = "out of memory on another rank" if worst == 1 else "another rank failed"
        raise RuntimeError(f"{who}: {what} during {stage} (see its error); every rank stops here")


#: How out-of-memory errors read where they are a plain RuntimeError: CUDA's older text, and the
#: CPU allocator's ("DefaultCPUAllocator: can't allocate memory ... (Cannot allocate memory)";
#: a refused CPU allocation ended the fit instead of halving the chunk: review, session 18).
_OOM_TEXTS = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_out_of_memory(err: BaseException) -> bool:
    """``err`` is an out-of-memory error (``torch.OutOfMemoryError``, or a RuntimeError that says
    so: the CPU allocator's, CUDA's older text)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(t in text for t in _OOM_TEXTS)


def _missing_vmap(err: BaseException) -> bool:
    """A custom ``autograd.Function`` without a vmap rule (PyTorch's RuntimeError text)."""
    return isinstance(err, RuntimeError) and "does not have vmap support" in str(err)


def _by_columns(fn: Callable[..., Any], k: int) -> Callable[..., Any]:
    """``fn`` applied to the k columns one at a time, stacked as ``vmap(fn)`` would be."""
    one = _batched(fn, 1)

    def columns(*args: Tensor) -> Any:
        outs = [one(*(a[i : i + 1] for a in args)) for i in range(k)]
        if isinstance(outs[0], Tensor):
            return torch.cat(outs)
        return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))

    return columns


def _pairwise(fn: Callable[..., Any], *args: Tensor) -> Any:
    """``vmap(fn)`` over the leading dimension of ``args``, or one slice at a time where vmap
    cannot run ``fn`` (a custom ``autograd.Function`` without a vmap rule; a random operation,
    i.e. active dropout: ``fn`` then draws the same numbers per slice). For the adjointness
    check, which must not fail where the products themselves would run."""
    try:
        return _batched(fn, args[0].shape[0])(*args)
    except RuntimeError as err:
        if not (_missing_vmap(err) or "randomness" in str(err)):
            raise
    return _by_columns(fn, args[0].shape[0])(*args)


def _batched(fn: Callable[..., Any], k: int) -> Callable[..., Any]:
    """``vmap(fn)``; for a single column, ``fn`` on the squeezed column (vmap has a fixed cost),
    or a traced map's in-place copy where it has one (:func:`_in_place_copy`)."""
    if k > 1:
        return torch.vmap(fn)
    one = getattr(fn, "unbatched", fn)

    def single(*args: Tensor) -> Any:
        out = one(*(a[0] for a in args))
        if isinstance(out, Tensor):
            return out.unsqueeze(0)
        return tuple(o.unsqueeze(0) for o in out)

    return single


class _GraphedProduct:
    """One block width's local product ``U -> (J Jᵀ U)`` captured in a CUDA graph.

    Written by hand because the product runs inside torch.func transforms that
    :func:`torch.cuda.make_graphed_callables` does not take (it wants modules or functions
    whose outputs require grad). This is the capture recipe of the CUDA-graphs notes of the
    PyTorch docs: capture on a side stream that has already run the product eagerly (the
    warm-up), with static input and output buffers. It captures on the *current* stream, which
    the operator makes its own stream: the linearisation was built there too, and autograd runs
    each backward op on the stream of its forward op, so the VJP's kernels land in the capture.
    The replay reads the input buffer and the linearisation's tensors at their captured
    addresses, which the operator keeps alive and unchanged.
    """

    def __init__(self, key: tuple[int, bool], fn: Callable[[Tensor], Tensor], U: Tensor) -> None:
        self.key = key
        self.static_in = U.clone()
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the capture must not make the user's other threads (a DataLoader's
        # pin-memory thread) fail their CUDA calls; kernels that autograd's worker thread
        # launches on the capture stream are captured all the same
        with torch.cuda.graph(
            self.graph,
            stream=torch.cuda.current_stream(U.device),
            capture_error_mode="thread_local",
        ):
            self.static_out = fn(self.static_in)

    def __call__(self, U: Tensor) -> Tensor:
        self.static_in.copy_(U)
        self.graph.replay()
        return self.static_out.clone()


class NTKOperator:
    """The empirical NTK K = J Jᵀ of a model on a probe batch, as a matrix-free operator.

    J is reverse mode's (training's) J. Before the first product a few random pairs check that
    forward mode agrees (:meth:`_check_adjoint`); a model that computes parameter-dependent
    values under ``torch.no_grad()`` or rescales gradients with hooks inside its forward does
    not, and then gets reverse-mode products (J·u as a VJP of a VJP), with a ``RuntimeWarning``,
    once the same pairs showed that those agree with reverse mode; where they do not either (a
    custom ``autograd.Function`` with a ``@once_differentiable`` backward), or cannot run, a
    product raises :class:`MatrixFreeUnavailableError` (the dense path is then the way).

    Args:
        model: any ``nn.Module``.
        inputs: probe inputs (tensor, tuple or dict; see :class:`ProbeFunction`).
        output: ``"pntk"``, ``"full"`` or a callable ``model_output -> rows``.
        params: parameter filter (see :func:`~glu_probe.ntk.functional.select_parameters`).
        dtype: probe precision; ``None`` (default): float32, or float64 for a float64 model
            (:func:`~glu_probe.ntk.functional.default_probe_dtype`). TF32 is disabled inside.
        chunk_size: process the probe batch this many samples at a time (bounds memory; the
            linearisation is then recomputed per product). ``None``: one chunk, cached.
        eval_mode: run BatchNorm/dropout in eval mode (default).
        process_group: a ``torch.distributed`` group. Each rank holds its own shard of the probe
            batch; :meth:`matvec` takes and returns the *full* (n, k) block (n = rows of all
            ranks, concatenated in rank order), Jᵣᵀ Vᵣ is all-reduced, so every rank runs the
            identical Krylov iteration. Collective: every rank must call :meth:`matvec` together.
        linearize: trace the JVP and the VJP once (:func:`trace_linear_map`) so later products
            skip the primal forward and the activation derivatives (faster per product, but
            tracing costs about as much as a few hundred small products). ``None`` (default):
            switch to it after :attr:`LINEARIZE_AFTER` block products, i.e. only for long
            iterations. Unchunked operators only.
        probe: a prebuilt :class:`ProbeFunction` (then model, inputs, output, params, dtype and
            eval_mode are taken from it).
        cuda_graphs: capture the product of a block width in a CUDA graph once it has run
            :attr:`GRAPH_AFTER` times in a row, and replay it from then on (one graph at a
            time, dropped as soon as a product of another width runs; a replay on a second,
            random block is checked against the eager product before the graph is used, and a
            capture that fails falls back to eager products with a ``RuntimeWarning``, for this
            model from then on). ``None`` (default): on for unchunked, unsharded operators in
            eval mode on a CUDA device, as :attr:`CUDA_GRAPHS` says; decided at the first
            product. The graph holds one product's workspace until :meth:`release` (which
            ``ntk_spectrum`` and ``ntk_matrix`` call before they return) or garbage collection.

    Attributes:
        n: number of rows of K (all ranks).
        n_matvecs: number of columns multiplied so far (a (n, k) block counts k).
        expected_products: the caller's upper bound on the block products this operator will
            run in all (``None``: unknown). With ``linearize=None`` the operator traces only
            if at least :attr:`TRACE_MIN_REMAINING` of them are still to come.
        n_graph_replays: block products served by a CUDA graph replay so far.
        adjoint_mismatch: the adjointness check's estimate of ‖J_f − J_r‖_F / ‖J‖_F (forward
            against reverse mode; ``None`` until it ran, or where forward mode is not used).
        fallback_mismatch: the same estimate for the reverse-mode fallback's J (``None`` until
            the fallback was checked, or where it is not used).
    """

    LINEARIZE_AFTER = 16
    #: Least block products still to come for the default to trace (tracing costs 10–200
    #: untraced products and saves 1–55% of each; CPU, 2026-11-28).
    TRACE_MIN_REMAINING = 64
    #: Block products of one width before it is captured in a CUDA graph.
    GRAPH_AFTER = 2
    #: Process-wide default for ``cuda_graphs=None``.
    CUDA_GRAPHS = True
    #: Traced block products of each kind (vmapped, column by column) that a CPU operator times
    #: before it keeps the faster for that block width. On the CPU, 4-column blocks of a traced
    #: map ran 1.4–1.8x slower per column vmapped than column by column on an MLP and a timm ViT
    #: (vmap turns their GEMMs into ``bmm`` and splits ``addmm``), and about as fast on GPT-2
    #: (2-core box, 2026-11-28); on CUDA, products are vmapped (and graph-replayed).
    BLOCK_TRIALS = 2
    #: Random pairs (u, w) of the adjointness check (:meth:`_check_adjoint`).
    ADJOINT_PAIRS = 4
    #: C of the adjointness check's tolerance C·eps in bfloat16 and float16 (√eps in float32
    #: and float64; :meth:`_check_adjoint`).
    ADJOINT_EPS_FACTOR = 4.0

    @allows_autograd
    def __init__(
        self,
        model: nn.Module | None,
        inputs: Any,
        *,
        output: OutputSpec = "pntk",
        params: ParamFilter = None,
        dtype: torch.dtype | None = None,
        chunk_size: int | None = None,
        eval_mode: bool = True,
        process_group: Any = None,
        linearize: bool | None = None,
        probe: ProbeFunction | None = None,
        cuda_graphs: bool | None = None,
    ) -> None:
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")
        if probe is None:
            if model is None:
                raise ValueError("pass a model (or a prebuilt probe=)")
            model_ = model
            if dtype is None:
                dtype = default_probe_dtype(model_, params)
            # (a model of float64 and float32 parts gets float32 by default, with the warning;
            # stacklevel: past allows_autograd's wrapper, to the caller)
            warn_narrowed(model_, dtype, "NTKOperator: dtype")
            probe = agreed(
                lambda: ProbeFunction(
                    model_, inputs, output=output, params=params, dtype=dtype, eval_mode=eval_mode
                ),
                process_group,
                model_,
            )
        self.probe = probe
        self.dtype = probe.dtype
        self.device = self.probe.device
        self.process_group = process_group
        self.n_matvecs = 0
        self._ranges = self._agreed_ranges(chunk_size)
        self._cache: list[tuple[Callable[..., Any], Callable[..., Any]]] | None = None
        self.linearize = linearize
        self._traced = False
        self._n_products = 0
        self.expected_products: int | None = None
        self.cuda_graphs = cuda_graphs
        self._graph: _GraphedProduct | None = None
        self._graphs_on: bool | None = None  # decided at the first product
        self._last_key: tuple[int, bool] | None = None
        self._run = 0  # products of _last_key in a row
        self._stream: Any = None
        self.n_graph_replays = 0
        # False once an operation without a forward-mode derivative was met, or forward and
        # reverse mode were seen to disagree (_check_adjoint): J·u by VJPs from then on.
        self._forward_ad = True
        self._adjoint_checked = False
        self._check_width = 1  # (the first product's block width: the check's, at most)
        self.adjoint_mismatch: float | None = None
        # True once the reverse-mode fallback was checked (_verify_fallback), and its refusal
        # where it failed (raised by every product from then on)
        self._fallback_checked = False
        self._refused: MatrixFreeUnavailableError | None = None
        self.fallback_mismatch: float | None = None
        # False once vmap met a custom autograd.Function without a vmap rule (columns then).
        self._vmap_ok = True
        # CPU, traced maps: per block width, the timed trials of each way, then the choice
        self._block_trials: dict[int, dict[str, list[float]]] = {}
        self.block_mode: dict[int, str] = {}
        _load_jvp_decompositions()
        self.n_local = self.probe.n_rows
        if process_group is not None:
            import torch.distributed as dist

            world = dist.get_world_size(process_group)
            counts = [torch.zeros(1, dtype=torch.long, device=self.device) for _ in range(world)]
            mine = torch.tensor([self.n_local], dtype=torch.long, device=self.device)
            dist.all_gather(counts, mine, group=process_group)
            self._counts = [int(c.item()) for c in counts]
            rank = dist.get_rank(process_group)
            self.offset = sum(self._counts[:rank])
            self.n = sum(self._counts)
        else:
            self._counts = [self.n_local]
            self.offset = 0
            self.n = self.n_local

    def rechunk(self, chunk_size: int | None) -> None:
        """Process this rank's samples ``chunk_size`` at a time from now on (``None``: one
        chunk). Local to the rank (no collective: chunks are summed before the all-reduce);
        drops the cached linearisation."""
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")
        self._ranges = self._agreed_ranges(chunk_size)
        self.release()

    def _agreed_ranges(self, chunk_size: int | None) -> list[tuple[int, int]]:
        """This rank's sample ranges. A probe whose samples are not independent may not be
        split (:class:`~glu_probe.ntk.functional.ProbeSplitError`): not into chunks, and not
        across ranks either. Under a process group every rank learns of a refusal on any rank
        before the next collective (one all-reduce): a rank-local error left the others waiting
        in the row-count all-gather until the collective timeout (review, session 18)."""
        err: ProbeSplitError | None = None
        ranges: list[tuple[int, int]] = []
        try:
            ranges = self.probe.sample_ranges(chunk_size)
            if self.process_group is not None and self.probe.per_sample_why is not None:
                raise ProbeSplitError(
                    f"a probe sharded across ranks evaluates each rank's samples apart, but "
                    f"{self.probe.per_sample_why}; probe on one rank (the monitor's "
                    "shard_probe=False) or make the samples independent (eval_mode=True where "
                    "train-mode BatchNorm couples them)"
                )
        except ProbeSplitError as exc:
            err = exc
        if self.process_group is None:
            if err is not None:
                raise err
            return ranges
        import torch.distributed as dist

        device = self.device
        if dist.get_backend(self.process_group) == "gloo":
            device = torch.device("cpu")
        agree_on_failure(err, self.process_group, device, "NTK probe", "splitting its batch")
        return ranges

    def release(self) -> None:
        """Drop the CUDA graph (and the workspace its memory pool holds) and the cached
        linearisation (the probe batch's saved activations) now, rather than when the garbage
        collector finds the operator (its cached maps refer back to it). Later products
        rebuild what they need."""
        self._graph = None
        self._last_key, self._run = None, 0
        self._cache = None
        self._traced = False
        self._block_trials, self.block_mode = {}, {}

    @property
    def n_params(self) -> int:
        """Number of selected trainable parameters (columns of J)."""
        return self.probe.n_params

    # ------------------------------------------------------------------ linearisation
    def _linearised_jvp(self, start: int, stop: int) -> Callable[..., Any]:
        chunk = self.probe.chunk(start, stop)
        params = self.probe.params

        def jvp(*t: Tensor) -> Tensor:
            return torch.func.jvp(lambda *p: self.probe(p, chunk), params, t)[1]

        if not self._forward_ad:
            return self._jvp(start, stop)
        try:
            return trace_linear_map(jvp, _example_like(params))
        except Exception as err:  # make_fx tracing fails on some models
            if isinstance(err, NotImplementedError) and _missing_forward_ad(err):
                self._no_forward_ad(err)
                self.linearize = False
                return self._jvp(start, stop)
            warnings.warn(
                f"tracing the JVP failed ({type(err).__name__}: {err}); keeping "
                "torch.func.jvp, which recomputes the forward pass per product",
                RuntimeWarning,
                stacklevel=external_stacklevel(),
            )
            self.linearize = False
            return self._jvp(start, stop)

    def _traced_vjp(self, vjp_fn: Callable[..., Any], start: int, stop: int) -> Callable[..., Any]:
        """``vjp_fn`` as a traced, constant-folded linear map (``vjp_fn`` itself on failure)."""
        a, b = self.probe.row_range(start, stop)
        example = _example_like((torch.empty(b - a, dtype=self.dtype, device=self.device),))
        try:
            # (a lambda: make_fx reads the signature, and vjp_fn has keyword-only extras)
            traced = trace_linear_map(lambda u: vjp_fn(u), example)
        except Exception as err:
            warnings.warn(
                f"tracing the VJP failed ({type(err).__name__}: {err}); keeping the autograd "
                "vjp, which recomputes activation derivatives per product",
                RuntimeWarning,
                stacklevel=external_stacklevel(),
            )
            return vjp_fn
        return traced

    def _linearisations(
        self, width: int = 1
    ) -> list[tuple[Callable[..., Any], Callable[..., Any]]] | None:
        """The cached (vjp_fn, jvp_fn) of the single chunk, or ``None`` when chunked.
        ``width``: the block width of the product that asks."""
        if self._refused is not None:  # (its products would be wrong: never run them)
            raise MatrixFreeUnavailableError(str(self._refused))
        if not self._adjoint_checked:  # (before anything is built or traced from the JVP)
            self._check_width = width
            self._check_adjoint()
        self._verify_late_fallback()  # (a fallback taken by an earlier product)
        if len(self._ranges) > 1:
            return None
        a, b = self._ranges[0]
        if self._cache is None:
            with self.probe.session():
                vjp = self._vjp(a, b)
                if self.linearize is True:
                    self._cache = [(self._traced_vjp(vjp, a, b), self._linearised_jvp(a, b))]
                    self._traced = True
                else:
                    self._cache = [(vjp, self._jvp(a, b))]
        elif (
            self.linearize is None
            and not self._traced
            and self._n_products >= self.LINEARIZE_AFTER
            and (
                self.expected_products is None
                or self.expected_products - self._n_products >= self.TRACE_MIN_REMAINING
            )
        ):
            with self.probe.session():
                vjp = self._cache[0][0]
                self._cache = [(self._traced_vjp(vjp, a, b), self._linearised_jvp(a, b))]
            self._traced = True
        self._verify_late_fallback()  # (tracing the JVP may have met a missing rule)
        return self._cache

    def _check_adjoint(self) -> None:
        """Check once, before the first product, that forward mode (J w, ``torch.func.jvp``)
        and reverse mode (Jᵀ u, ``torch.func.vjp``) differentiate the same J: u·(J w) =
        (Jᵀ u)·w for :attr:`ADJOINT_PAIRS` seeded random pairs. Where they do not, J·u is
        computed by reverse mode only from then on (:meth:`_jvp_by_vjp`, also for a traced
        operator), with one ``RuntimeWarning``, once that fallback passed the same check on the
        same pairs (:meth:`_verify_fallback`; a :class:`MatrixFreeUnavailableError` where it
        does not). ``adjoint_mismatch`` records the estimate.

        They disagree on a forward that computes a parameter-dependent value under
        ``torch.no_grad()`` / ``set_grad_enabled(False)`` (forward-mode AD is not disabled by
        those) or registers a gradient hook (``tensor.register_hook``; forward mode never calls
        it): the products were then J_f J_rᵀ, not even symmetric, and Lanczos reported wrong
        eigenvalues as converged (review, session 26). Reverse mode is the J of training and
        of the dense path.

        Statistic: u and w have standard normal entries, so E[(uᵀ(J_f − J_r)w)²] =
        ‖J_f − J_r‖²_F and E|J w|² = E|Jᵀu|² = ‖J‖²_F; the ratio of the pairs' summed squares
        estimates δ = ‖J_f − J_r‖_F / ‖J‖_F (one pair alone is blind to a mismatch that its
        u or w happens to be nearly orthogonal to: half the seeds of a bfloat16-autocast model
        with a hook passed, K 2-4% off; review, session 26). Tolerance, with eps that of the
        model's coarsest arithmetic (:func:`~glu_probe.ntk.dense.forward_rounding_dtype`:
        float32 for a float64 probe of a model that casts inside): √eps, and in bfloat16 and
        float16 :attr:`ADJOINT_EPS_FACTOR`·eps = 4·eps. Rounding makes each product exact for
        a J perturbed by c·eps relative (c: depth, accumulation lengths, conditioning), which
        √eps leaves room for in float32 and float64 (c up to ~2,900 and ~7e7; measured over 4
        pairs: 0.6-5 on MLPs, a 20-layer tanh net, GPT-2 and ViT), while the mismatches above
        change J by O(1) relative amounts (0.09-0.12 in the float32 tests). In bfloat16 and float16
        √eps is only 11 and 32 eps, and mismatches below it changed K by 2-12%; there
        matmuls and reductions accumulate in float32, so c counts rounded op outputs and did
        not grow with depth (0.2-1.9 on the same models, GPT-2 up to 16 layers, ViT up to 8),
        against 4.6-450 for the review's mismatches: 4·eps leaves twice the largest c. An
        ill-conditioned forward can exceed either bound from rounding alone (the warning says
        so); its reverse-mode products are merely slower (their own check repeats itself in
        float64 where rounding trips it too: :meth:`_verify_fallback`). The JVP and the VJP
        draw the same random numbers (a model with active dropout is compared with itself),
        and the caller's RNG is untouched.

        Under a process group the pairs span all ranks' rows (u drawn for the whole batch,
        as unsharded), and the verdict is taken once, on sums all-reduced over ranks, so
        that every rank runs the same products (review, session 26: a per-rank verdict left
        one rank in forward mode, K 27% off). |Jᵀu|² is then the sum of the ranks' own
        |Jᵣᵀuᵣ|² (same expectation, ‖J‖²_F; no parameter-sized collective).

        Cost, once per operator: per group of pairs one forward, one backward and one
        forward-mode pass, vmapped over the group's pairs; a group is as wide as the first
        product's block (at most ADJOINT_PAIRS: never wider than the products the caller
        planned memory for), and the pairs are the same whatever the width; where the
        fallback is taken, the same again with its double backward in place of forward mode.
        """
        if not self._forward_ad:  # (reverse mode only already: its own check)
            self._adjoint_checked = True
            self._verify_fallback(collective=True)
            return
        k = self.ADJOINT_PAIRS
        missing, ratio = self._adjoint_estimate(by_vjp=False, collective=True)
        # (only now: a check that failed, out of memory say, runs again at the next product,
        # on every rank alike)
        self._adjoint_checked = True
        if missing is not None:
            self._no_forward_ad(missing)
            self._verify_fallback(collective=True)
            return
        if ratio is None:
            return  # (non-finite rows or K = 0: the caller's errors say so)
        tol = self._adjoint_tol()
        self.adjoint_mismatch = ratio
        if self.adjoint_mismatch > tol:
            self._forward_ad = False
            warnings.warn(
                "NTKOperator: forward-mode and reverse-mode derivatives of this model disagree "
                f"(u·(J w) against (Jᵀu)·w for {k} random pairs: relative mismatch "
                f"‖J_f − J_r‖/‖J‖ ≈ {self.adjoint_mismatch:.1e} > {tol:.1e}); its forward "
                "likely computes a parameter-dependent value under torch.no_grad() or "
                "set_grad_enabled(False), or registers a gradient hook (register_hook), which "
                "reverse mode (training's J) respects and forward mode does not; severe "
                "rounding (an ill-conditioned forward, e.g. LayerNorm of nearly equal entries) "
                "can cause it too, where dtype=torch.float64 helps. J·u is computed as the VJP "
                "of u ↦ Jᵀu instead (reverse mode only; one forward and two backward passes "
                "per product)",
                RuntimeWarning,
                stacklevel=external_stacklevel(),
            )
            self._verify_fallback(collective=True)

    def _adjoint_tol(self) -> float:
        """The adjointness checks' tolerance (see :meth:`_check_adjoint`)."""
        from .dense import derivative_tolerance  # local: dense imports this module

        return derivative_tolerance(self.probe, self.ADJOINT_EPS_FACTOR)

    def _adjoint_estimate(
        self, by_vjp: bool, collective: bool
    ) -> tuple[BaseException | None, float | None]:
        """(the error of an operation without a forward-mode derivative, if one was met; the
        estimate of ‖J_w − J_r‖_F / ‖J‖_F, ``None`` where the sums are not finite or K is 0)
        over :attr:`ADJOINT_PAIRS` pairs, J w by forward mode or, ``by_vjp``, by the
        reverse-mode fallback (:meth:`_jvp_by_vjp`). ``collective``: the sums and any failure
        agreed on by every rank of the process group (every rank calls it together); else this
        rank's rows only (the identity holds for each rank's block of J alike)."""
        k = self.ADJOINT_PAIRS
        width = max(1, min(k, self._check_width))
        # rows: u·(J w), (Jᵀu)·w, |J w|², |Jᵀu|² per pair (sums in float64: their cancellation
        # must not pass for a mismatch; the products stay in the probe's dtype)
        sums = torch.zeros(4, k, dtype=torch.float64, device=self.device)
        missing: BaseException | None = None
        failure: BaseException | None = None
        try:
            missing = self._adjoint_sums(sums, width, by_vjp)
        except Exception as err:  # (agreed on below, before the collective)
            failure = err
        flag = torch.tensor([0.0 if missing is None else 1.0], dtype=torch.float64)
        if self.process_group is not None and collective:
            import torch.distributed as dist

            device = self.device
            if dist.get_backend(self.process_group) == "gloo":
                device = torch.device("cpu")
            agree_on_failure(failure, self.process_group, device, "NTKOperator", "its J check")
            both = torch.cat([sums.reshape(-1).to(device), flag.to(device)])
            dist.all_reduce(both, group=self.process_group)
            sums, flag = both[:-1].reshape(4, k).cpu(), both[-1:].cpu()
        elif failure is not None:
            raise failure
        if float(flag) > 0:
            return missing or NotImplementedError(
                "another rank's model has no forward-mode AD rule"
            ), None
        u_jw, jtu_w, jw_sq, jtu_sq = (row.cpu() for row in sums)
        mismatch = math.sqrt(float((u_jw - jtu_w).square().sum()))
        scale = math.sqrt(max(float(jw_sq.sum()), float(jtu_sq.sum())))
        if not (math.isfinite(mismatch) and math.isfinite(scale)) or scale == 0.0:
            return None, None
        return None, mismatch / scale

    def _verify_fallback(self, collective: bool) -> None:
        """Check the reverse-mode fallback (:meth:`_jvp_by_vjp`) as :meth:`_check_adjoint`
        checks forward mode, on the same pairs and with the same tolerance, before its products
        are used; a :class:`MatrixFreeUnavailableError` where it disagrees too or cannot run
        (raised again by every later product: :meth:`_linearisations`).

        The fallback differentiates the backward pass: where a backward is not differentiable
        in its incoming gradient (a custom ``autograd.Function`` whose backward is
        ``@once_differentiable``, the usual decorator of custom CUDA-op Functions), torch.func
        raises nothing and drops that path from the double backward, so J·u missed the
        Jacobian columns behind the Function, and Lanczos reported λ_max 17.05 for 23.57 with
        ``converged=True`` (review, session 27). Computing J·w from n explicit reverse-mode
        rows instead would cost n backward passes per product, more than the dense path's
        n for all of K: the dense path is the way there, and the error says so.

        Rounding can make the fallback disagree too: the double backward of an op is not the
        exact transpose of its backward (LayerNorm's differ by ~1% in float32 on an
        ill-conditioned forward, whose forward mode is 3% off). Where a probe narrower than
        float64 fails the check, it is repeated on a float64 copy of the probe (the same
        pairs), or, where the model does not run in float64 (an op without a float64 kernel,
        e.g. ``grouped_mm`` of mixture-of-experts layers), on a float32 copy of a 16-bit probe:
        rounding shrinks by orders of magnitude there, a dropped path does not. The fallback is
        kept if that passes. Where no wider dtype runs, the mismatch can be neither confirmed
        nor cleared, and the products are refused with an error that says so (not blaming a
        non-differentiable backward it could not tell from rounding). ``fallback_mismatch``
        records the estimate in the probe's dtype. ``collective``: as for
        :meth:`_adjoint_estimate` (a fallback taken by the agreed check is verified on every
        rank together; one taken later, by one rank's product, on that rank's rows)."""
        try:
            _, ratio = self._adjoint_estimate(by_vjp=True, collective=collective)
        except RuntimeError as err:  # (NotImplementedError is one)
            text = str(err)
            if not ("derivative for" in text and "_backward" in text):
                raise
            # no double backward (nn.EmbeddingBag, ctc_loss): the fallback cannot run at all
            self._refused = MatrixFreeUnavailableError(
                f"NTKOperator: J·u cannot be formed matrix-free for this model ({err}): an "
                "operation has neither a forward-mode derivative nor a double backward (e.g. "
                f"nn.EmbeddingBag). {_without_products_advice(self.probe)}"
            )
            raise self._refused from err
        self.fallback_mismatch = ratio
        tol = self._adjoint_tol()
        if ratio is None or ratio <= tol:
            self._fallback_checked = True
            return
        reason, confirmed = "", True
        # (float64, then float32 for a 16-bit probe: the widest dtype the model runs in; a
        # bfloat16 MoE's grouped_mm has no float64 kernel, and its fallback, 5e-2 off in
        # bfloat16 from rounding alone and 8e-7 in float32, was refused: review, session 27)
        own = torch.finfo(self.dtype).eps
        wider = [d for d in (torch.float64, torch.float32) if torch.finfo(d).eps < own]
        failed: list[str] = []
        for wide_dtype in wider:
            try:
                wide, wide_tol = self._wide_fallback_estimate(collective, wide_dtype)
            except (RuntimeError, TypeError) as err:  # (no kernel in that dtype for some op)
                if is_out_of_memory(err):
                    raise  # (checked again at the next product)
                failed.append(f"{str(wide_dtype).removeprefix('torch.')}: {type(err).__name__}")
                continue
            if wide is None or wide <= wide_tol:
                self._fallback_checked = True  # (rounding of the probe's dtype alone)
                return
            reason = (
                f", in {str(wide_dtype).removeprefix('torch.')} too ({wide:.1e} > {wide_tol:.1e})"
            )
            break
        else:
            confirmed = not wider  # (a float64 probe: measured in the widest dtype already)
        self._fallback_checked = True
        measured = (
            "the reverse-mode fallback (J·u as the VJP of u ↦ Jᵀu, a double backward) "
            f"disagrees with reverse mode too (u·(J w) against (Jᵀu)·w for "
            f"{self.ADJOINT_PAIRS} random pairs: relative mismatch ≈ {ratio:.1e} > {tol:.1e}"
        )
        if confirmed:
            self._refused = MatrixFreeUnavailableError(
                "NTKOperator: J·u cannot be formed matrix-free for this model: forward mode is "
                f"unavailable or disagrees with reverse mode, and {measured}{reason}). An "
                "operation's backward is not differentiable: typically a custom "
                "autograd.Function whose backward is @once_differentiable, whose path "
                "torch.func drops from a double backward without an error, or a gradient hook "
                "that is not linear in its gradient (clipping, clamping); or the model draws "
                "from a torch.Generator the probe cannot find (held deeper than one level in a "
                "container, or created during the forward), so its passes draw different "
                "numbers: hold it as a module attribute. Its products would "
                f"be wrong. {_without_products_advice(self.probe)}; or give the Function a "
                "jvp staticmethod that agrees with its backward (forward-mode products)"
            )
        else:
            name = str(self.dtype).removeprefix("torch.")
            self._refused = MatrixFreeUnavailableError(
                "NTKOperator: J·u cannot be formed matrix-free for this model: forward mode is "
                f"unavailable or disagrees with reverse mode, and {measured} in "
                f"{name}), which could not be confirmed in a wider dtype (the model does not "
                f"run there: {'; '.join(failed)}). Rounding of {name} alone (an "
                "ill-conditioned forward) can cause it, "
                "as can an operation whose backward is not differentiable (a custom "
                "autograd.Function with a @once_differentiable backward, a gradient hook that "
                "is not linear in its gradient), or a torch.Generator of the model's that the "
                "probe cannot find (held deeper than one level in a container, or created "
                "during the forward: hold it as a module attribute); the products are "
                f"not used unverified. {_without_products_advice(self.probe)}"
            )
        raise self._refused

    def _wide_fallback_estimate(
        self, collective: bool, dtype: torch.dtype = torch.float64
    ) -> tuple[float | None, float]:
        """(the fallback's estimate, its tolerance) on a ``dtype`` copy of the probe, over the
        same pairs and chunks (see :meth:`_verify_fallback`)."""
        (a, b), chunks = self._ranges[0], len(self._ranges)
        # (collective: every rank is here together, the verdict above being agreed; else this
        # rank's rows alone, without a process group)
        group = self.process_group if collective else None
        wide = NTKOperator(
            None,
            None,
            probe=self.probe.astype(dtype),
            chunk_size=None if chunks == 1 else b - a,
            process_group=group,
            cuda_graphs=False,
        )
        wide._check_width = self._check_width
        _, ratio = wide._adjoint_estimate(by_vjp=True, collective=collective)
        return ratio, wide._adjoint_tol()

    def _verify_late_fallback(self) -> None:
        """:meth:`_verify_fallback` for a fallback taken after the check, by a product that met
        an operation without a forward-mode derivative (this rank's rows: no collective)."""
        if self._adjoint_checked and not self._forward_ad and not self._fallback_checked:
            self._verify_fallback(collective=False)

    def _adjoint_pairs(self, pairs: range) -> tuple[tuple[Tensor, ...], Tensor]:
        """The check's pairs ``pairs``: w (stacked per parameter) and this rank's rows of u,
        each pair from its own seeded private generator (the same pairs whatever the group
        width; the global RNG untouched; per tensor seeds would repeat w's entries across
        parameters of the same shape). u is drawn for all ranks' rows: the pairs of an
        unsharded operator on the whole batch."""
        m = len(pairs)
        w = tuple(p.new_empty((m, *p.shape)) for p in self.probe.params)
        u = torch.empty(m, self.n, dtype=self.dtype, device=self.device)
        for j, i in enumerate(pairs):
            gen = torch.Generator(device=self.device).manual_seed(0x5EED + i)
            for t in w:
                t[j].normal_(generator=gen)
            u[j].normal_(generator=gen)
        return w, u[:, self.offset : self.offset + self.n_local]

    def _adjoint_sums(self, sums: Tensor, width: int, by_vjp: bool = False) -> BaseException | None:
        """This rank's part of :meth:`_check_adjoint`'s sums, added into ``sums`` (4, k); the
        error of an operation without a forward-mode derivative, if one was met. ``by_vjp``:
        J w by the reverse-mode fallback (:func:`_jvp_through_vjp`) instead of forward mode."""
        k = sums.shape[1]
        params = self.probe.params
        devices = [self.device] if self.device.type == "cuda" else []
        with self.probe.session():
            for g in range(0, k, width):  # (groups of pairs, each one block wide)
                m = min(width, k - g)
                w, u = self._adjoint_pairs(range(g, g + m))
                jtu: list[Tensor] = []
                for a, b in self._ranges:
                    chunk = self.probe.chunk(a, b)
                    ra, rb = self.probe.row_range(a, b)

                    def f(*p: Tensor, chunk: Any = chunk) -> Tensor:
                        with torch.random.fork_rng(devices=devices):  # (every pass alike)
                            return self.probe(p, chunk)

                    vjp_fn = torch.func.vjp(f, *params)[1]
                    part = _pairwise(vjp_fn, u[:, ra:rb].contiguous())
                    del vjp_fn
                    try:
                        if by_vjp:
                            jw = _pairwise(_jvp_through_vjp(f, params, rb - ra), *w)
                        else:
                            jw = _pairwise(lambda *t, f=f: torch.func.jvp(f, params, t)[1], *w)
                    except NotImplementedError as err:
                        if by_vjp or not _missing_forward_ad(err):
                            raise
                        return err
                    if not jtu:  # (own storage: autograd's gradients may share memory)
                        jtu = [t.detach().clone() for t in part]
                    else:
                        for x, y in zip(jtu, part, strict=True):
                            x.add_(y)
                    jw = jw.reshape(m, -1)
                    sums[0, g : g + m] += (u[:, ra:rb] * jw).sum(1, dtype=torch.float64)
                    sums[2, g : g + m] += jw.square().sum(1, dtype=torch.float64)
                for x, t in zip(jtu, w, strict=True):
                    sums[1, g : g + m] += (x * t).reshape(m, -1).sum(1, dtype=torch.float64)
                    sums[3, g : g + m] += x.square().reshape(m, -1).sum(1, dtype=torch.float64)
        return None

    def _vjp(self, start: int, stop: int) -> Callable[..., Any]:
        chunk = self.probe.chunk(start, stop)
        return torch.func.vjp(lambda *p: self.probe(p, chunk), *self.probe.params)[1]

    def _jvp(self, start: int, stop: int) -> Callable[..., Any]:
        chunk = self.probe.chunk(start, stop)
        params = self.probe.params
        if not self._forward_ad:
            return self._jvp_by_vjp(chunk, start, stop)

        def jvp_fn(*t: Tensor) -> Tensor:
            if self._forward_ad:
                try:
                    return torch.func.jvp(lambda *p: self.probe(p, chunk), params, t)[1]
                except NotImplementedError as err:
                    if not _missing_forward_ad(err):
                        raise
                    self._no_forward_ad(err)
            return self._jvp_by_vjp(chunk, start, stop)(*t)

        return jvp_fn

    def _jvp_by_vjp(self, chunk: Any, start: int, stop: int) -> Callable[..., Any]:
        """J t without forward-mode AD: the VJP of the linear map u ↦ Jᵀu, applied to t
        (:func:`_jvp_through_vjp`).

        For models with an operation that has no forward-mode derivative (transformers'
        grouped-GEMM mixture-of-experts layers, custom autograd Functions without ``jvp``), or
        whose forward mode disagrees with reverse mode (:meth:`_check_adjoint`). It is right
        only where every backward is itself differentiable: :meth:`_verify_fallback` checks
        that before its products are used.
        """
        a, b = self.probe.row_range(start, stop)
        return _jvp_through_vjp(lambda *p: self.probe(p, chunk), self.probe.params, b - a)

    def _no_forward_ad(self, err: BaseException) -> None:
        if self._forward_ad:
            self._forward_ad = False
            warnings.warn(
                f"NTKOperator: {str(err).splitlines()[0][:200]} — J·u is computed as the VJP of "
                "u ↦ Jᵀu instead (one forward and two backward passes per product)",
                RuntimeWarning,
                stacklevel=external_stacklevel(),
            )

    def _all_reduce(self, acc: list[Tensor], k: int) -> list[Tensor]:
        import torch.distributed as dist

        flat = torch.cat([x.reshape(k, -1) for x in acc], dim=1)
        dist.all_reduce(flat, group=self.process_group)
        sizes = [x[0].numel() for x in acc]
        return [c.reshape(x.shape) for c, x in zip(flat.split(sizes, dim=1), acc, strict=True)]

    # ------------------------------------------------------------------ products
    @allows_autograd
    def matvec(self, V: Tensor) -> Tensor:
        """K V for a (n, k) block (or a length-n vector), in the operator's dtype and device."""
        vector = V.ndim == 1
        if V.shape[0] != self.n:
            raise ValueError(
                f"matvec expects {self.n} rows, got a tensor of shape {tuple(V.shape)}"
            )
        V = V.reshape(self.n, -1).to(device=self.device, dtype=self.dtype)
        k = V.shape[1]
        local = V[self.offset : self.offset + self.n_local]
        if self.process_group is None:
            if self._graphs_on is None:
                self._graphs_on = self._graphs_wanted()
            if self._graphs_on and len(self._ranges) == 1:
                out = self._on_own_stream(local, k)
            else:
                # unsharded: both maps in one probe session (entering one costs ~0.5 ms)
                maps = self._linearisations(k)
                with self.probe.session():
                    out = self._block_product(local, k, maps)
            # (a product that met an operation without a forward-mode rule finished by the
            # fallback: checked before its result is used)
            self._verify_late_fallback()
            self.n_matvecs += k
            self._n_products += 1
            return out.reshape(-1) if vector else out
        # Sharded (the rest of this method): a rank that fails in its local part (e.g. out of
        # memory) must not leave the others waiting in (or, worse, pairing a later call with)
        # the all-reduce; every rank first agrees on success (_agree), then all raise together
        # or all go on.
        acc: list[Tensor] = []
        err: BaseException | None = None
        cached: Any = None
        try:
            cached = self._linearisations(k)
            with self.probe.session():
                acc = self._local_vjp(local, k, cached)
        except Exception as e:
            err = e
        self._agree(err, "Jᵀv")
        if self.process_group is not None:
            acc = self._all_reduce(acc, k)
        outs: list[Tensor] = []
        try:
            with self.probe.session():
                outs = self._local_jvp(tuple(acc), k, cached)
            self._verify_late_fallback()  # (local: its error is agreed on just below)
        except Exception as e:
            err = e
        self._agree(err, "J(Jᵀv)")
        out_local = torch.cat(outs, dim=1).T  # (n_local, k)
        out = self._gather(out_local.contiguous())
        self.n_matvecs += k
        self._n_products += 1
        return out.reshape(-1) if vector else out

    __matmul__ = matvec

    # ------------------------------------------------------------------ CUDA graphs
    def _graphs_wanted(self) -> bool:
        """Whether this unsharded operator replays products from CUDA graphs (asked once, at
        the first product: the linearisation must be built on the operator's own stream, where
        the capture runs, since autograd runs each backward op on its forward op's stream). Not
        in train mode (``eval_mode=False``): a replay of a product that draws random numbers
        would advance the caller's CUDA generator."""
        on = self.CUDA_GRAPHS if self.cuda_graphs is None else self.cuda_graphs
        return (
            bool(on)
            and self.device.type == "cuda"
            and self.probe.eval_mode
            and self.probe.model not in _UNGRAPHABLE
        )

    def _on_own_stream(self, local: Tensor, k: int) -> Tensor:
        """:meth:`_graph_product` on the operator's own CUDA stream, ordered after and before
        the caller's work (a graph cannot be captured on the default stream)."""
        caller = torch.cuda.current_stream(self.device)
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        self._stream.wait_stream(caller)
        try:
            # (the probe's device made current too: a capture begins on the current device)
            with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
                return self._graph_product(local, k)
        finally:
            caller.wait_stream(self._stream)

    def _block_product(self, local: Tensor, k: int, maps: Any) -> Tensor:
        """:meth:`_eager_product`, except on the CPU for a traced map and a block of k > 1
        columns: vmapped or one column at a time, whichever ran faster in
        :attr:`BLOCK_TRIALS` timed products of each (``block_mode`` records the choice per
        width). Written by hand: vmap has no such switch, and which is faster depends on the
        model (both compute the same product)."""
        if k == 1 or self.device.type != "cpu" or not self._traced or maps is None:
            return self._eager_product(local, k, maps)
        mode = self.block_mode.get(k)
        if mode is not None:
            return self._product_by(mode, local, k, maps)
        trials = self._block_trials.setdefault(k, {"vmap": [], "columns": []})
        mode = "vmap" if len(trials["vmap"]) <= len(trials["columns"]) else "columns"
        t0 = time.perf_counter()
        out = self._product_by(mode, local, k, maps)
        trials[mode].append(time.perf_counter() - t0)
        if min(len(t) for t in trials.values()) >= self.BLOCK_TRIALS:
            self.block_mode[k] = min(trials, key=lambda m: min(trials[m]))
        return out

    def _product_by(self, mode: str, local: Tensor, k: int, maps: Any) -> Tensor:
        if mode == "vmap":
            return self._eager_product(local, k, maps)
        cols = [self._eager_product(local[:, i : i + 1], 1, maps) for i in range(k)]
        return torch.cat(cols, dim=1)

    def _eager_product(self, local: Tensor, k: int, cached: Any) -> Tensor:
        """J Jᵀ U of this rank's rows, unsharded: the (n_local, k) block."""
        acc = self._local_vjp(local, k, cached)
        outs = self._local_jvp(tuple(acc), k, cached)
        return torch.cat(outs, dim=1).T.contiguous()

    def _graph_product(self, local: Tensor, k: int) -> Tensor:
        """K U: a CUDA graph replay once the width ``k`` has run :attr:`GRAPH_AFTER` times in
        a row, else the eager product.

        The call that completes the run computes the product eagerly (what it returns), then
        captures it. Before the graph is used, a replay on a second, random block must
        reproduce the eager product of that block (relative error ≤ 1e-4 in float32, 1e-10 in
        float64): a replay on the capture's own input would also pass for a graph that missed
        work done outside the capture. Otherwise the graph is dropped, the model is not
        captured again, a ``RuntimeWarning`` says so, and products run eagerly."""
        cached = self._linearisations(k)  # (may trace: never inside a capture)
        key = (k, self._traced)
        if self._graph is not None and self._graph.key == key:
            self.n_graph_replays += 1
            return self._graph(local)
        # one graph at a time, and its pool is freed before another product's workspace is
        # taken (the memory budgets count one product's)
        self._graph = None
        with self.probe.session():
            eager = self._eager_product(local, k, cached)
        self._run = self._run + 1 if key == self._last_key else 1
        self._last_key = key
        if (
            self._run < self.GRAPH_AFTER
            or self.probe.model in _UNGRAPHABLE  # (a capture of it failed)
            or not bool(eager.isfinite().all())
        ):
            return eager  # (a non-finite product is the caller's error to report, not a graph's)
        try:
            gen = torch.Generator(device=self.device).manual_seed(0x6A)
            check = torch.randn(local.shape, generator=gen, dtype=local.dtype, device=self.device)
            with self.probe.session():
                # (the check's eager product first: never beside the graph's workspace)
                want = self._eager_product(check, k, cached)
                graph = _GraphedProduct(key, lambda U: self._eager_product(U, k, cached), local)
                got = graph(check)
            tol = 1e-10 if self.dtype == torch.float64 else 1e-4
            scale = float(want.abs().max())
            diff = float((got - want).abs().max())
            if not diff <= tol * max(scale, 1e-30):
                raise RuntimeError(f"a replay differs from the eager product by {diff:.3e}")
        except Exception as err:
            _UNGRAPHABLE.add(self.probe.model)
            first = str(err).splitlines()[0][:200] if str(err) else ""
            _warn_outside(
                f"NTKOperator: capturing the product in a CUDA graph failed "
                f"({type(err).__name__}: {first}); products of this model run eagerly from "
                "now on (cuda_graphs=False skips the attempt)",
                RuntimeWarning,
            )
            return eager
        self._graph = graph
        return eager

    def _local_vjp(self, local: Tensor, k: int, cached: Any) -> list[Tensor]:
        """Jᵀ U of this rank's rows, summed over chunks: (k, *param.shape) tensors."""
        acc: list[Tensor] = []
        for i, (a, b) in enumerate(self._ranges):
            ra, rb = self.probe.row_range(a, b)
            u = local[ra:rb].T.contiguous()
            vjp_fn = cached[i][0] if cached is not None else self._vjp(a, b)
            part = self._vmapped(vjp_fn, k)(u)
            if not acc:
                # Own storage for the running sum: autograd may return gradients that share
                # memory (timm's cls_token gradient is a view of pos_embed's for a one-sample
                # chunk), and summing in place into those would count a chunk twice.
                acc = [t.clone() for t in part] if len(self._ranges) > 1 else list(part)
            else:
                for x, y in zip(acc, part, strict=True):
                    x.add_(y)
            del vjp_fn
        return acc

    def _local_jvp(self, tangents: tuple[Tensor, ...], k: int, cached: Any) -> list[Tensor]:
        """J T on this rank's rows, one (k, rows) tensor per chunk."""
        outs = []
        for i, (a, b) in enumerate(self._ranges):
            jvp_fn = cached[i][1] if cached is not None else self._jvp(a, b)
            outs.append(self._vmapped(jvp_fn, k)(*tangents))
        return outs

    def _vmapped(self, fn: Callable[..., Any], k: int) -> Callable[..., Any]:
        """:func:`_batched`, or the k columns one at a time once vmap met a custom
        ``autograd.Function`` without a vmap rule (a ``setup_context`` Function with neither
        ``vmap`` nor ``generate_vmap_rule=True``), with one ``RuntimeWarning``: the same
        product, k passes instead of one batched pass. Such a Function crashed block products
        (k > 1) with torch's own error, while single columns ran (review, session 26)."""
        if k == 1:
            return _batched(fn, 1)
        if not self._vmap_ok:
            return _by_columns(fn, k)
        batched = _batched(fn, k)

        def call(*args: Tensor) -> Any:
            if self._vmap_ok:
                try:
                    return batched(*args)
                except RuntimeError as err:
                    if not _missing_vmap(err):
                        raise
                    self._vmap_ok = False
                    warnings.warn(
                        f"NTKOperator: {str(err).splitlines()[0][:200]} — block products run "
                        "one column at a time instead (the same product, without vmap's "
                        "batching)",
                        RuntimeWarning,
                        stacklevel=external_stacklevel(),
                    )
            return _by_columns(fn, k)(*args)

        return call

    def _agree(self, err: BaseException | None, stage: str) -> None:
        """:func:`agree_on_failure` for one product of this operator."""
        agree_on_failure(err, self.process_group, self.device, "NTKOperator", stage)

    def _gather(self, out_local: Tensor) -> Tensor:
        if self.process_group is None:
            return out_local
        import torch.distributed as dist

        width = max(self._counts)
        k = out_local.shape[1]
        padded = out_local.new_zeros(width, k)
        padded[: self.n_local] = out_local
        parts = [torch.empty_like(padded) for _ in self._counts]
        dist.all_gather(parts, padded, group=self.process_group)
        return torch.cat([p[:c] for p, c in zip(parts, self._counts, strict=True)], dim=0)

    @allows_autograd
    def forward_rows(self) -> Tensor:
        """g(θ) on this rank's shard (one plain forward pass; for timing and checks)."""
        with self.probe.session(), torch.no_grad():
            return self.probe(self.probe.params)

    def __repr__(self) -> str:
        return (
            f"NTKOperator(n={self.n}, n_params={self.n_params}, dtype={self.dtype}, "
            f"chunks={len(self._ranges)}, n_matvecs={self.n_matvecs})"
        )
