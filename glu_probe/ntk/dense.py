"""Dense empirical NTK K = J Jᵀ, assembled in blocks under a memory budget.

The rows of J are computed a block of samples at a time with per-sample Jacobians
(``vmap(jacrev(f_single))``, as in the PyTorch NTK tutorial, one backward pass per row of one
sample), and K is accumulated block by block as Kᵢⱼ = Σ_p Jᵢ[p] Jⱼ[p]ᵀ (one GEMM per parameter
tensor, so the per-parameter Jacobians are never concatenated into a copy). Off the diagonal
panels only one triangle of blocks is computed and mirrored (K is symmetric), so the dominant
n²·P GEMM cost is about 0.6 of the tutorial's full ``einsum`` at the default budget.

Memory: a *panel* of rows is kept while the remaining row blocks are streamed past it and
recomputed, so at most ``panel + 2·block`` rows of J (block + its workspace) live at once, never
the whole Jacobian: the panel is capped at half of the rows. With ``memory_budget=None`` the
panel and blocks together are sized to 40% of the full Jacobian's bytes (the tutorial's
peak holds two full Jacobians, so this is about a fifth of it), capped at half of the free
device memory.
K itself (n² entries) counts against the budget.

When not even a few samples' Jacobian rows fit (large models: one GPT-2-small row is 124M
numbers), K is built column block by column block from matrix-free products K E = J (Jᵀ E) of
:class:`~glu_probe.ntk.NTKOperator`, which needs only a few parameter-sized vectors per column.

Accuracy: in float64 (default) every entry of K is exact up to rounding, |δK_ij| ≲ P·ε·‖J_i‖‖J_j‖
with ε = 2⁻⁵³, and ``torch.linalg.eigh`` is backward stable, so every eigenvalue is within
≈ n·ε·λ_max of the exact eigenvalue of the computed K (Weyl).

Mixed precision (``jacobian_dtype=torch.float32`` with a float64 K): the rows of J are computed in
float32 (the per-sample backward passes: 2–3× cheaper than float64 on CPU) and K is accumulated
from them in float64. A product of two float32 numbers is exact in float64, so K̃ = J̃ J̃ᵀ is the
exact Gram matrix of the rounded Jacobian J̃ = J + E up to float64 rounding, and Weyl's inequality
for singular values gives |σᵢ(J̃) − σᵢ(J)| ≤ ‖E‖₂ for every i. Hence
|λᵢ(K̃) − λᵢ(K)| ≤ 2·√λᵢ(K̃)·‖E‖₂ + ‖E‖₂², a relative error of about 2‖E‖₂/σ_min ∝ √κ, not κ
(a float32 K would give ε₃₂·κ). ‖E‖₂ itself is not computable without J;
:func:`jacobian_rounding_estimate` gives the estimate used by ``ntk_spectrum``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn, cast

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .._settings import plain_settings
from .._warnings import external_stacklevel
from .functional import (
    FloatTrace,
    OutputSpec,
    ParamFilter,
    ProbeFunction,
    all_finite,
    allows_autograd,
    call_memo,
    default_probe_dtype,
    generator_states,
    model_generators,
    probe_copy_bytes,
    refuse_small_budget,
)

__all__ = ["jacobian_rounding_estimate", "jacobian_rows", "ntk_matrix", "row_chunked_jacrev"]

#: Safety factor c of the rounding estimate ‖E‖₂ ≤ ‖E‖_F ≈ c·u·‖J‖_F (see
#: :func:`jacobian_rounding_estimate`); measured ‖E‖_F/‖J‖_F was 1.2–5.2 u on the demo models.
ROUNDING_FACTOR = 16.0


class Float64UnavailableError(RuntimeError):
    """The exact path could not run: the model has no float64 kernel for some operation, and
    the float32-rows fallback failed as well. That is the case where the samples are coupled
    (the operator strategy, whose products run in K's dtype) or a kernel has neither dtype;
    ``ntk_spectrum(method="auto")`` then takes the iterative path (float32 products)."""


class DenseBudgetError(ValueError):
    """``memory_budget`` cannot hold the dense path (K, its eigendecomposition, one product):
    ``method="auto"`` then takes the Lanczos path instead."""


def _batched_leaves(probe: ProbeFunction) -> tuple[list[Any], Any, list[bool]]:
    leaves, spec = pytree.tree_flatten(probe.inputs)
    batched = [
        isinstance(t, Tensor) and t.ndim > 0 and t.shape[0] == probe.batch_size for t in leaves
    ]
    return leaves, spec, batched


def row_chunked_jacrev(
    func: Callable[..., Any],
    row_chunk: int | None,
    *,
    argnums: int | tuple[int, ...] = 0,
    has_aux: bool = False,
) -> Callable[..., Any]:
    """``torch.func.jacrev(func, argnums=..., has_aux=...)`` computing at most ``row_chunk``
    rows (output entries) per vmapped backward pass, written into one preallocated result.

    One VJP records the forward pass; then ``vmap(vjp_fn)`` runs over ``row_chunk`` standard
    basis cotangents at a time. A call holds the rows once, the forward's saved activations and
    the backward intermediates of ``row_chunk`` cotangents: about ``(row_chunk + 1)`` times
    one sample's activations instead of ``(r + 1)`` (:func:`activation_elements`). Hand-written
    because ``jacrev``'s own ``chunk_size`` concatenates its chunks at the end, so the rows
    exist twice. ``row_chunk=None``: plain ``jacrev``. The in-place writes do not run under an
    outer ``vmap``: call it on one sample.
    """
    if row_chunk is None:
        return torch.func.jacrev(func, argnums=argnums, has_aux=has_aux)
    if row_chunk < 1:
        raise ValueError(f"row_chunk must be a positive int or None, got {row_chunk}")
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)

    def wrapper(*args: Any) -> Any:
        def partial(*primals: Any) -> Any:
            full = list(args)
            for i, x in zip(nums, primals, strict=True):
                full[i] = x
            return func(*full)

        primals = tuple(args[i] for i in nums)
        res: tuple[Any, ...] = torch.func.vjp(partial, *primals, has_aux=has_aux)
        out, vjp_fn = res[0], res[1]
        if not isinstance(out, Tensor):
            raise TypeError(
                "row_chunked_jacrev needs a function that returns one tensor (its rows), got "
                f"{type(out).__name__}; use torch.func.jacrev for pytree outputs"
            )
        r = out.numel()
        flat, spec = pytree.tree_flatten(primals)
        jac = [torch.empty(r, *p.shape, dtype=p.dtype, device=p.device) for p in flat]
        for c0 in range(0, r, row_chunk):
            c1 = min(c0 + row_chunk, r)
            basis = torch.zeros(c1 - c0, r, dtype=out.dtype, device=out.device)
            basis[torch.arange(c1 - c0), torch.arange(c0, c1)] = 1
            basis = basis.view(c1 - c0, *out.shape)
            if c1 - c0 == 1:
                grads = pytree.tree_leaves(vjp_fn(basis[0]))
                for dst, src in zip(jac, grads, strict=True):
                    dst[c0] = src
            else:
                grads = pytree.tree_leaves(torch.vmap(vjp_fn)(basis))
                for dst, src in zip(jac, grads, strict=True):
                    dst[c0:c1] = src
            del grads
        tree = pytree.tree_unflatten([j.view(*out.shape, *j.shape[1:]) for j in jac], spec)
        result = tree[0] if isinstance(argnums, int) else tree
        return (result, res[2]) if has_aux else result

    return wrapper


def _per_sample_jacobian(
    probe: ProbeFunction, row_chunk: int | None = None
) -> Callable[[slice | Tensor], tuple[Tensor, ...]]:
    """Rows of J for the samples ``sel`` (a slice or an index tensor) with ``vmap`` over samples
    of ``jacrev`` of one sample.

    An input whose selected samples are all equal (an all-ones attention mask, a shared position
    tensor, any input of a single sample) is passed once, unbatched, instead of being vmapped:
    the result is the same, and models that branch on such inputs (HF attention masks checked
    with ``.all()``) then run under ``vmap``. A single sample needs no ``vmap`` at all.
    ``row_chunk`` (:func:`row_chunked_jacrev`): a sample's rows are computed that many at a time
    (samples then go one at a time, without ``vmap``), for samples whose backward
    intermediates alone exceed the memory budget.
    """
    leaves, spec, batched = _batched_leaves(probe)

    def single(params: tuple[Tensor, ...], sample: tuple[Tensor, ...]) -> Tensor:
        it = iter(sample)
        full = [
            next(it).unsqueeze(0) if flag else leaf
            for leaf, flag in zip(leaves, batched, strict=True)
        ]
        return probe(params, pytree.tree_unflatten(full, spec))

    jac_one = row_chunked_jacrev(single, row_chunk)

    def rows(sel: slice | Tensor) -> tuple[Tensor, ...]:
        parts = [t[sel] for t, flag in zip(leaves, batched, strict=True) if flag]
        if row_chunk is not None and parts[0].shape[0] > 1:  # one sample at a time
            idx = torch.arange(probe.batch_size)[sel] if isinstance(sel, slice) else sel
            outs = [rows(idx[i : i + 1]) for i in range(len(idx))]
            return tuple(torch.cat(col) for col in zip(*outs, strict=True))
        if parts[0].shape[0] == 1:
            out = tuple(j.unsqueeze(0) for j in jac_one(probe.params, tuple(p[0] for p in parts)))
        else:
            args, dims = _vmap_args(parts)
            out = torch.vmap(jac_one, in_dims=(None, dims))(probe.params, args)
        return tuple(j.reshape(-1, *j.shape[2:]) for j in out)

    return rows


def _vmap_args(parts: list[Tensor]) -> tuple[tuple[Tensor, ...], tuple[int | None, ...]]:
    """The batched inputs of a chunk of samples for a ``vmap`` over samples, and their in_dims:
    an input whose samples are all equal is passed once, unbatched (see
    :func:`_per_sample_jacobian`)."""
    same = [bool((p == p[:1]).all()) for p in parts]
    if all(same):
        same[0] = False  # vmap needs one batched input; the rows may repeat
    dims = tuple(None if eq else 0 for eq in same)
    args = tuple(p[0] if eq else p for p, eq in zip(parts, same, strict=True))
    return args, dims


def _mask_groups(probe: ProbeFunction, a: int, b: int) -> list[Tensor]:
    """Samples ``a:b`` grouped by their mask-like inputs (integer or bool tensors of 0/1 values
    that differ between samples, as padding masks do); one group when there are none."""
    leaves, _, batched = _batched_leaves(probe)
    keys = []
    for t, flag in zip(leaves, batched, strict=True):
        if not flag or t.is_floating_point() or t.is_complex():
            continue
        part = t[a:b].reshape(b - a, -1)
        if bool(((part == 0) | (part == 1)).all()) and not bool((part == part[:1]).all()):
            keys.append(part.to(torch.int64))
    if not keys:
        return [torch.arange(a, b)]
    _, group = torch.unique(torch.cat(keys, dim=1), dim=0, return_inverse=True)
    return [torch.nonzero(group == g).flatten() + a for g in range(int(group.max()) + 1)]


def _chunk_jacobian(probe: ProbeFunction) -> Callable[[int, int], tuple[Tensor, ...]]:
    """Rows of J for samples ``a:b`` with ``jacrev`` of the chunk (models that reject vmap)."""

    def rows(a: int, b: int) -> tuple[Tensor, ...]:
        chunk = probe.chunk(a, b)
        return tuple(torch.func.jacrev(lambda p: probe(p, chunk))(probe.params))

    return rows


def jacobian_rows(
    probe: ProbeFunction, row_chunk: int | None = None
) -> Callable[[int, int], tuple[Tensor, ...]]:
    """A function ``(a, b) -> J rows of samples a:b`` (a tuple aligned with ``probe.params``).

    Uses per-sample ``vmap(jacrev)``. When the model cannot be vmapped over samples (data-dependent
    control flow on a per-sample input, e.g. an HF padding mask checked with ``.all()``), it uses
    the same ``vmap`` within groups of samples that share their masks (0/1 integer inputs, passed
    unbatched within a group; about as fast, so without a warning). If that fails too, it falls
    back, with a warning, to ``jacrev`` of one sample at a time (no ``vmap`` over samples: a
    Python loop), and if even that fails to ``jacrev`` of the whole chunk (each row then costs a
    backward pass through the whole chunk). Every level gives the same rows. ``row_chunk``: at
    most that many rows of a sample per backward pass (:func:`row_chunked_jacrev`), one sample
    at a time.

    A model that draws random numbers in its forward pass (:attr:`ProbeFunction.draws_random`:
    active dropout or stochastic depth with ``eval_mode=False``) gets its rows one sample at a
    time, sample ``i``'s numbers drawn from the global generators (CPU, and the probe's CUDA
    device) seeded with ``s + i``, where ``s`` is the first number that
    ``torch.randint(2**62, (1,))`` would draw from the global CPU generator's state at the
    first call (not advanced: the caller's RNG is left as it was), and from the model's own
    generators (:func:`~glu_probe.ntk.functional.model_generators`), the k-th of them seeded
    with the k-th number of ``torch.randint(2**62, (n,))`` drawn from a CPU generator seeded
    with ``s + i`` (n generators; their states are put back after). A sample's rows are then
    the same in every call that makes them, and K = J Jᵀ of one draw of J, positive
    semi-definite.
    Drawn anew per call, a sample's rows recomputed for another panel came from another
    network, and K had eigenvalues down to -18 (review, session 29); the same seed gives the
    same K.
    """
    per_sample = _per_sample_jacobian(probe, row_chunk)
    chunked = _chunk_jacobian(probe)
    r = probe.rows_per_sample

    def vmapped(a: int, b: int) -> tuple[Tensor, ...]:
        return per_sample(slice(a, b))

    def by_mask(a: int, b: int) -> tuple[Tensor, ...]:
        groups = _mask_groups(probe, a, b)
        outs = [per_sample(idx) for idx in groups]
        where = torch.argsort(torch.cat(groups))  # sample a+i is at position where[i]
        return tuple(
            torch.cat(col)
            .reshape(b - a, r, *col[0].shape[1:])[where]
            .reshape(-1, *col[0].shape[1:])
            for col in zip(*outs, strict=True)
        )

    def one_at_a_time(a: int, b: int) -> tuple[Tensor, ...]:
        parts = [per_sample(slice(i, i + 1)) for i in range(a, b)]
        return tuple(torch.cat(col) for col in zip(*parts, strict=True))

    chain = [vmapped, by_mask, one_at_a_time, chunked]
    names = [
        "per-sample vmap(jacrev)",
        "vmap(jacrev) within groups of samples with equal masks",
        "jacrev one sample at a time",
        "jacrev over each chunk",
    ]
    # verified: 0 not yet, 1 agrees, -1 rows without vmap. A verdict is remembered per model
    # and probe signature (a wrong batching rule is a property of the model's operations, not
    # of its weights): a monitor checks once per fit, not at every probe (~4 % of a small
    # ViT's ntk_matrix).
    memo = _ROWS_VERIFIED.setdefault(probe.model, {})
    key = _probe_signature(probe)
    state = {"level": 0, "verified": memo.get(key, 0)}
    seed: list[int] = []  # (s, drawn at the first call)
    # (the model's own generators, found once per call: the session's where rows run inside
    # one, else one walk of the modules; walked for every sample, a 1M-entry list attribute
    # cost 0.37 s per probe, review, session 29)
    own: list[list[torch.Generator]] = []

    def drawn(i: int) -> contextlib.AbstractContextManager[None]:
        if not seed:
            seed.append(_next_seed())
        if not own:
            own.append(
                list(probe._own_generators)
                or [g for g, _ in generator_states(model_generators(probe.model))]
            )
        return _seeded(probe.device, seed[0] + i, own[0])

    def rows(a: int, b: int) -> tuple[Tensor, ...]:
        if not probe.draws_random:
            return checked(a, b, contextlib.nullcontext)
        parts = []
        for i in range(a, b):
            draw = functools.partial(drawn, i)
            with draw():
                parts.append(checked(i, i + 1, draw))
        if len(parts) == 1:
            return parts[0]
        return tuple(torch.cat(col) for col in zip(*parts, strict=True))

    def checked(
        a: int, b: int, draw: Callable[[], contextlib.AbstractContextManager[Any]]
    ) -> tuple[Tensor, ...]:
        if not state["verified"]:
            # (on the block's first sample alone, before the block: its rows and the check's
            # pass held beside a full block went over the memory budget)
            ratio, tol = _rows_mismatch(probe, a, lambda: assembled(a, a + 1), draw)
            if tol < ratio < WRONG_ROWS and probe.dtype != torch.float64:
                ratio, tol = _wide_rows_mismatch(probe, a, ratio, tol, draw)
            state["verified"] = memo[key] = 1 if ratio <= tol else -1
            if len(memo) > 64:  # (probes of ever new shapes: bounded)
                memo.clear()
            if ratio > tol:
                warnings.warn(
                    f"jacobian_rows: the batched Jacobian rows ({names[state['level']]}) "
                    f"disagree with an unbatched reverse-mode pass (u·J for a random u: "
                    f"relative mismatch {ratio:.1e} > {tol:.1e}); an operation's vmap batching "
                    "rule is wrong for this model (torch.cdist's backward in torch 2.14), so "
                    "the rows are computed without vmap, one backward pass per row (slower, "
                    "right)",
                    RuntimeWarning,
                    stacklevel=external_stacklevel(),
                )
        if state["verified"] < 0:
            return _unbatched_rows(probe, a, b)
        return assembled(a, b)

    def assembled(a: int, b: int) -> tuple[Tensor, ...]:
        while state["level"] < len(chain) - 1:
            level = state["level"]
            try:
                return chain[level](a, b)
            except Exception as err:  # data-dependent control flow etc.
                state["level"] = level + 1
                if level > 0:  # grouping by masks (level 1) is as fast: not worth a warning
                    warnings.warn(
                        f"{names[level]} failed ({type(err).__name__}: {err}); falling back "
                        f"to {names[level + 1]} (slower, same result)",
                        RuntimeWarning,
                        stacklevel=external_stacklevel(),
                    )
        return chain[-1](a, b)

    return rows


def _next_seed() -> int:
    """The first number ``torch.randint(2**62, (1,))`` would draw from the global CPU
    generator, which is not advanced."""
    gen = torch.Generator()
    gen.set_state(torch.get_rng_state())
    return int(torch.randint(2**62, (1,), generator=gen))


def _generator_seeds(seed: int, n: int) -> list[int]:
    """The seeds of a model's ``n`` own generators for a block seeded with ``seed``
    (:func:`_seeded`): ``torch.randint(2**62, (n,))`` from a CPU generator seeded with
    ``seed``, one per generator and per sample, none the global generators' own seed."""
    gen = torch.Generator().manual_seed(seed)
    return [int(v) for v in torch.randint(2**62, (n,), generator=gen)] if n else []


@contextlib.contextmanager
def _seeded(
    device: torch.device, seed: int, generators: Sequence[torch.Generator] = ()
) -> Iterator[None]:
    """The global generators (the CPU's, and ``device``'s on CUDA) seeded with ``seed`` for
    the block, and ``generators`` (a model's own: :func:`model_generators`) with
    :func:`_generator_seeds`; all put back as they were after."""
    devices = [device] if device.type == "cuda" else []
    own = [(g, g.get_state()) for g in generators]
    with torch.random.fork_rng(devices=devices):
        try:
            torch.default_generator.manual_seed(seed)
            for d in devices:
                with torch.cuda.device(d):
                    torch.cuda.manual_seed(seed)
            for (g, _), s in zip(own, _generator_seeds(seed, len(own)), strict=True):
                g.manual_seed(s)
            yield
        finally:
            for g, state in own:
                g.set_state(state)


def _rows_mismatch(
    probe: ProbeFunction,
    i: int,
    sample_rows: Callable[[], tuple[Tensor, ...]],
    draw: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> tuple[float, float]:
    """(‖uᵀJ_i − Jᵀu‖ / ‖Jᵀu‖, its tolerance) for sample ``i``: its rows as
    :func:`jacobian_rows` assembles them (``sample_rows()``: vmapped backward passes) against
    an unbatched VJP of that sample alone with a seeded standard normal cotangent u (the
    global RNG untouched).

    vmap's batching rule of an operation can be wrong where its plain backward is right:
    torch.cdist's ``_cdist_backward`` in torch 2.14, whose per-row K was 20% off and whose
    dense λ_min came out −4e-14 for 2.8e-2 with a residual of 3e-12 (review, session 27).
    One sample's rows, then one one-sample forward and backward pass, each freed before the
    next (within the memory a block of rows takes), once per model and probe signature.
    Tolerance as the operator's adjointness check
    (:meth:`~glu_probe.ntk.operator.NTKOperator._check_adjoint`): √eps, 4·eps in 16-bit
    dtypes, eps of the model's coarsest arithmetic; a wrong batching rule is O(1) off.
    ``draw``: the random numbers of both passes (a model that draws them, see
    :func:`jacobian_rows`), entered for each."""
    r = probe.rows_per_sample
    gen = torch.Generator(device=probe.device).manual_seed(0x5EED)
    u = torch.randn(r, generator=gen, dtype=probe.dtype, device=probe.device)
    with draw():
        rows = sample_rows()
    got = torch.cat([torch.mv(J.reshape(r, -1).T, u.to(J.dtype)) for J in rows])
    del rows  # (before the reference pass: a budget sized for one block holds one of them)
    wide = torch.promote_types(got.dtype, torch.float32)  # (16-bit rows: float32 norms)
    got = got.to(wide)
    chunk = probe.chunk(i, i + 1)
    with draw():
        ref = torch.func.vjp(lambda *p: probe(p, chunk), *probe.params)[1](u)
    want = torch.cat([g.reshape(-1).to(wide) for g in ref])
    del ref
    diff = float(torch.linalg.vector_norm(got - want)) ** 2
    scale = float(torch.linalg.vector_norm(want)) ** 2
    tol = derivative_tolerance(probe)
    if scale == 0.0 or not math.isfinite(diff + scale):
        return 0.0, tol  # (K = 0 or non-finite rows: ntk_matrix's own checks say so)
    return math.sqrt(diff / scale), tol


#: A relative mismatch of batched against unbatched rows that rounding cannot explain in any
#: dtype (a wrong batching rule is O(1) off: torch.cdist's 0.2-0.8).
WRONG_ROWS = 0.1


def _wide_rows_mismatch(
    probe: ProbeFunction,
    i: int,
    ratio: float,
    tol: float,
    draw: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> tuple[float, float]:
    """:func:`_rows_mismatch` repeated on a float64 copy of the probe, for a mismatch above the
    probe's tolerance but below :data:`WRONG_ROWS`: rounding of an ill-conditioned float32 or
    16-bit forward (12 residual LayerNorm blocks: 1.2e-3 against √eps = 3.5e-4, both K equally
    far from float64 truth) shrinks there, a wrong batching rule does not (re-review, session
    27: the false verdict sent every later probe of the model to one backward pass per row).
    Where float64 does not run, the probe's own figures stand, the mismatch counted as rounding
    (``(0, tol)``): below :data:`WRONG_ROWS` it cannot be told from it."""
    try:
        wide = probe.astype(torch.float64, check=False)
        return _rows_mismatch(wide, i, lambda: _per_sample_jacobian(wide)(slice(i, i + 1)), draw)
    except (RuntimeError, TypeError, NotImplementedError) as err:
        from .operator import is_out_of_memory  # local: operator imports dense lazily

        if is_out_of_memory(err):
            raise
        return 0.0, tol


def _unbatched_rows(probe: ProbeFunction, a: int, b: int) -> tuple[Tensor, ...]:
    """Rows of J for samples ``a:b`` without vmap (:func:`_rows_mismatch`): one VJP per
    sample, applied to each of its r basis cotangents in turn; the whole chunk's VJP, row by
    row, where one sample does not run alone."""
    try:
        return _per_sample_jacobian(probe, row_chunk=1)(slice(a, b))
    except Exception:
        pass
    chunk = probe.chunk(a, b)
    res = torch.func.vjp(lambda *p: probe(p, chunk), *probe.params)
    out, vjp_fn = res[0], res[1]
    jac = [torch.empty(out.numel(), *p.shape, dtype=p.dtype, device=p.device) for p in probe.params]
    basis = torch.zeros(out.numel(), dtype=out.dtype, device=out.device)
    for i in range(out.numel()):
        basis.zero_()[i] = 1
        for dst, src in zip(jac, vjp_fn(basis.view_as(out)), strict=True):
            dst[i] = src
    return tuple(jac)


#: Elements of one converted column chunk in :func:`_gram` (float32 rows widened to float64 a
#: chunk at a time, so that the widened copy never holds more than this many numbers per side).
GRAM_CHUNK_ELEMENTS = 2**20
#: The same on CUDA. A chunk is one GEMM and two widening copies, and on a GPU each is a kernel
#: launch of a few microseconds' work at 2**20: a 64-row probe of a GPT-2-small-sized model
#: (86M parameters) ran 5,253 float64 GEMMs and 6,061 copies, and took 350 ms for 132 ms of GPU
#: time (H200, 2026-11-28, ``benchmarks/profile_probe.py``). 64x fewer chunks cost at most
#: 1 GiB of widening buffers, and only where the budget leaves 16x that (:func:`_widen_chunk`).
GRAM_CHUNK_ELEMENTS_CUDA = 2**26


def gram_chunk_elements(device: torch.device) -> int:
    """The cap on :func:`_gram`'s widening chunk on ``device``."""
    return GRAM_CHUNK_ELEMENTS_CUDA if device.type == "cuda" else GRAM_CHUNK_ELEMENTS


def _gram(
    a: tuple[Tensor, ...],
    b: tuple[Tensor, ...],
    dtype: torch.dtype | None = None,
    out: Tensor | None = None,
    chunk_elements: int = GRAM_CHUNK_ELEMENTS,
) -> Tensor:
    """``A Bᵀ`` of row blocks held one tensor per parameter, accumulated in ``dtype``; added
    into ``out`` (a block of K, possibly a strided view) in place when given, with no
    temporary of its size. Widening buffers hold at most ``chunk_elements`` numbers per side.

    Rows narrower than ``dtype`` (float32 rows of the mixed-precision path) are widened a column
    chunk at a time: a product of two float32 numbers is exact in float64, so the result is the
    float64 Gram matrix of the float32 rows without a float64 copy of the rows. The chunks pack
    the columns of consecutive parameters into one buffer, so that small parameters (biases,
    norms) do not each cost a small GEMM; a chunk holds as many columns as the widest parameter
    (the memory :func:`_plan` reserves for it), at most ``GRAM_CHUNK_ELEMENTS / rows``.
    """
    if dtype is None or all(x.dtype == y.dtype == dtype for x, y in zip(a, b, strict=True)):
        for x, y in zip(a, b, strict=True):
            x2, y2 = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
            out = x2 @ y2.T if out is None else out.addmm_(x2, y2.T)
        assert out is not None
        return out
    same = a is b or all(x is y for x, y in zip(a, b, strict=True))
    n_a, n_b = a[0].shape[0], b[0].shape[0]
    if not same and (
        all(x.dtype == dtype for x in a) or all(y.dtype == dtype for y in b)
    ):  # one side is wide already (a float64 panel beside float32 rows): widen only the other
        wide_a = all(x.dtype == dtype for x in a)
        narrow_n = n_b if wide_a else n_a
        widest = max(x[0].numel() for x in a)
        step = max(1, min(widest, chunk_elements // max(n_a, n_b)))
        buf = torch.empty(narrow_n, step, dtype=dtype, device=a[0].device)
        if out is None:
            out = torch.zeros(n_a, n_b, dtype=dtype, device=a[0].device)
        for x, y in zip(a, b, strict=True):
            x2, y2 = x.reshape(n_a, -1), y.reshape(n_b, -1)
            for c in range(0, x2.shape[1], step):
                w = min(step, x2.shape[1] - c)
                if wide_a:
                    buf[:, :w].copy_(y2[:, c : c + w])
                    out.addmm_(x2[:, c : c + w], buf[:, :w].T)
                else:
                    buf[:, :w].copy_(x2[:, c : c + w])
                    out.addmm_(buf[:, :w], y2[:, c : c + w].T)
        return out
    # As many columns as the widest parameter has (the chunk _plan reserves), at most
    # GRAM_CHUNK_ELEMENTS numbers per side.
    widest = max(x[0].numel() for x in a)
    step = max(1, min(widest, chunk_elements // max(n_a, n_b)))
    dev = a[0].device
    if out is None:
        out = torch.zeros(n_a, n_b, dtype=dtype, device=dev)
    buf_a = torch.empty(n_a, step, dtype=dtype, device=dev)
    buf_b = buf_a if same else torch.empty(n_b, step, dtype=dtype, device=dev)
    fill = 0
    for x, y in zip(a, b, strict=True):
        x2, y2 = x.reshape(n_a, -1), y.reshape(n_b, -1)
        c = 0
        while c < x2.shape[1]:
            w = min(step - fill, x2.shape[1] - c)
            buf_a[:, fill : fill + w].copy_(x2[:, c : c + w])  # widened here
            if not same:
                buf_b[:, fill : fill + w].copy_(y2[:, c : c + w])
            fill, c = fill + w, c + w
            if fill == step:
                out.addmm_(buf_a, buf_b.T)
                fill = 0
    if fill:
        out.addmm_(buf_a[:, :fill], buf_b[:, :fill].T)
    return out


#: Row count from which the Gram of a panel with itself is computed as three half-size blocks
#: (one triangle, 3/4 of the flops): measured 24% faster at 512 rows, slower at 64 (small GEMMs
#: run below the BLAS peak), so small panels keep the single GEMM.
SYMMETRIC_GRAM_ROWS = 256


def _gram_sym(
    a: tuple[Tensor, ...],
    dtype: torch.dtype | None = None,
    out: Tensor | None = None,
    chunk_elements: int = GRAM_CHUNK_ELEMENTS,
) -> Tensor:
    """A Aᵀ of the rows ``a`` (one tensor per parameter) in ``dtype``, one triangle when that
    pays off; written into ``out`` (a block of K, overwritten) when given. Widening buffers
    (narrower rows) hold at most 2·``chunk_elements`` numbers in all."""
    n = a[0].shape[0]
    if n < SYMMETRIC_GRAM_ROWS:
        if out is None:
            return _gram(a, a, dtype, chunk_elements=chunk_elements)
        return _gram(a, a, dtype, out=out.zero_(), chunk_elements=chunk_elements)
    h = n // 2
    top = tuple(x[:h] for x in a)
    bottom = tuple(x[h:] for x in a)
    K = torch.zeros(n, n, dtype=dtype or a[0].dtype, device=a[0].device) if out is None else out
    K.zero_()
    # into K's blocks: no block-sized temporaries
    _gram(top, top, dtype, out=K[:h, :h], chunk_elements=chunk_elements)
    _gram(bottom, bottom, dtype, out=K[h:, h:], chunk_elements=chunk_elements)
    _gram(bottom, top, dtype, out=K[h:, :h], chunk_elements=chunk_elements)
    K[:h, h:] = K[h:, :h].T
    return K


def jacobian_rounding_estimate(trace_k: float, dtype: torch.dtype) -> float:
    """Estimate of ‖E‖₂ for a Jacobian computed in ``dtype``: c·u·‖J‖_F = c·u·√(tr K).

    E = J̃ − J is the rounding error of the Jacobian rows. Each entry of a backward pass carries a
    relative error of a small multiple of the unit roundoff u, so ‖E‖_F ≈ c·u·‖J‖_F, and
    ‖E‖₂ ≤ ‖E‖_F. c = :data:`ROUNDING_FACTOR` (16) is about 3× the largest ratio measured on the
    demo models (two-layer, timm ViT, GPT-2, float32: ‖E‖_F/‖J‖_F = 1.2–5.2 u). It is an estimate
    from a rounding model, not a certificate; the actual eigenvalue errors measured were 10²–10⁴×
    below the bound it implies, because E is not aligned with the extreme singular vectors.
    """
    u = torch.finfo(dtype).eps / 2
    return ROUNDING_FACTOR * u * math.sqrt(max(trace_k, 0.0))


def _available_bytes(device: torch.device) -> int:
    """Memory on ``device`` that new tensors can take: on CUDA what the driver has free
    (``mem_get_info``) plus what PyTorch's caching allocator holds but no tensor uses (after a
    few training steps most of the card: the freed activations stay reserved); on the CPU the
    available physical pages."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0]) + max(0, int(cached))
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def checked_budget(memory_budget: Any) -> int:
    """``memory_budget`` as an int, or a ``ValueError`` unless it is a positive, finite number
    of bytes (not a bool)."""
    if (
        isinstance(memory_budget, bool)
        or not isinstance(memory_budget, (int, float))
        or not math.isfinite(memory_budget)
        or memory_budget <= 0
    ):
        raise ValueError(
            f"memory_budget must be a positive, finite number of bytes, got {memory_budget!r}"
        )
    return int(memory_budget)


def _budget(probe: ProbeFunction, itemsize: int, memory_budget: int | None) -> int:
    """Bytes for K plus live Jacobian blocks: the user's budget, or the default described above."""
    if memory_budget is not None:
        return checked_budget(memory_budget)
    n, row_bytes = probe.n_rows, probe.n_params * itemsize
    jacobian_part = max(int(0.4 * n * row_bytes), 4 * probe.rows_per_sample * row_bytes)
    return min(n * n * itemsize + jacobian_part, _budget_cap(probe))


def _budget_cap(probe: ProbeFunction) -> int:
    """The most a default budget takes: half of the free memory of the probe's device."""
    return _available_bytes(probe.device) // 2


#: Per model, the activation elements of one sample per probe signature (weak keys).
_ACTIVATIONS: weakref.WeakKeyDictionary[
    nn.Module, dict[Any, tuple[int, torch.dtype | None, int]]
] = weakref.WeakKeyDictionary()


def activation_elements(probe: ProbeFunction) -> int:
    """Floating-point elements one sample's forward pass allocates (0 if it cannot be traced;
    for a model that does not run on one sample alone, the whole batch's per sample, see
    :func:`traced_samples`).

    The per-sample ``vmap(jacrev)`` of r rows holds, per sample, about (r + 1) times this:
    the forward's activations, and their gradients for each of the r cotangents (measured on a
    timm ViT, r = 8: 1.2 r·a; on a convolutional net with 64×64 feature maps, r = 100:
    0.53 r·a; the bound errs on the safe side). Memory planning counts it next to the rows.
    Remembered per model and probe shapes (the trace runs every op through Python, a few ms
    on a small ViT, and a monitor probes the same shapes every few steps).
    """
    return _forward_trace(probe)[0]


def forward_rounding_dtype(probe: ProbeFunction) -> torch.dtype:
    """The least precise floating dtype the model's forward pass computes in on the probe:
    ``probe.dtype``, or a narrower one where the model casts internally (Hugging Face LLaMA,
    Mistral, Qwen, ... compute their RMSNorm, rotary embedding and softmax in float32 whatever
    the weights' dtype). A float64 probe of such a model is float64 only up to float32
    rounding, and its error bounds must say so (scale review, 2026-11-28: a LLaMA probe's λ_min
    was off by 1.5e-6 against a reported float64 residual of 1.8e-9). From the same trace as
    :func:`activation_elements` (remembered per model and probe shapes).

    Where no forward pass could be traced (:func:`forward_traced` is ``False``) the arithmetic
    is unknown, and a float64 probe is taken to compute in float32 (the narrowest dtype a model
    is known to cast to inside a float64 forward: autocast leaves float64 tensors alone), so
    that its bounds carry float32 rounding rather than claim float64 ones the model may not
    reach; a float32 or narrower probe keeps its own dtype (a model may still autocast to
    bfloat16 inside: unknown, and not assumed)."""
    _, narrow, samples = _forward_trace(probe)
    if not samples and probe.dtype == torch.float64:
        return torch.float32
    return narrow if narrow is not None else probe.dtype


def derivative_tolerance(probe: ProbeFunction, eps_factor: float = 4.0) -> float:
    """Relative tolerance of two derivative passes of the probe that should agree (forward
    against reverse mode, batched against unbatched rows): √eps of the forward's coarsest
    arithmetic (:func:`forward_rounding_dtype`), at most ``eps_factor``·eps in 16-bit dtypes
    (see :meth:`~glu_probe.ntk.operator.NTKOperator._check_adjoint` for the measurements)."""
    eps = torch.finfo(forward_rounding_dtype(probe)).eps  # (memoised probe trace)
    tol = math.sqrt(eps)
    if eps > torch.finfo(torch.float32).eps:  # (bfloat16, float16)
        tol = min(tol, eps_factor * eps)
    return tol


def forward_traced(probe: ProbeFunction) -> bool:
    """Whether :func:`forward_rounding_dtype` and :func:`activation_elements` come from a traced
    forward pass (``False``: the model ran neither on one sample nor on the whole batch under
    the trace; the first is then an assumption, the second 0)."""
    return _forward_trace(probe)[2] > 0


def traced_samples(probe: ProbeFunction) -> int:
    """Samples of the forward pass behind :func:`activation_elements`: 1, the batch size where
    the model does not run on one sample alone (its figure is then the batch's per sample,
    right only for passes over the whole batch), or 0 where nothing could be traced."""
    return _forward_trace(probe)[2]


def _forward_trace(probe: ProbeFunction) -> tuple[int, torch.dtype | None, int]:
    """(floating elements one sample's forward allocates, the least precise floating dtype its
    operations output where that is less precise than ``probe.dtype``, the samples of the
    traced pass: :func:`traced_samples`), remembered per model, output, parameters, input
    shapes, probe dtype and eval mode.

    One sample is traced, under ``no_grad``, and then with autograd on where that fails (a
    forward that differentiates inside itself, e.g. forces as −∂E/∂x). A model that does not run
    on one sample alone (train-mode BatchNorm with ``eval_mode=False``: batch statistics need
    two samples) is traced on the whole batch, and its elements divided by the batch size,
    rounded up: the memory plans multiply the per-sample figure by the samples of a pass, and
    such a probe's passes always hold the whole batch (it is never split), so they count at
    least what the trace saw. The one-sample failure used to be read as "no narrower
    arithmetic" and "no activations": a float64 probe of a model computing in float32 inside
    reported float64 residuals 5e5 times below its error, with no warning (review, session 27).
    Where no pass runs: (0, ``None``, 0)."""
    signature = _probe_signature(probe)
    memo = _ACTIVATIONS.setdefault(probe.model, {})
    if signature not in memo:
        attempts = [(probe.chunk(0, 1), 1)]
        if probe.batch_size > 1:
            attempts.append((probe.inputs, probe.batch_size))
        result: tuple[int, torch.dtype | None, int] = (0, None, 0)
        own = torch.finfo(probe.dtype).eps
        for inputs, samples in attempts:
            trace = _traced_pass(probe, inputs)
            if trace is None:
                continue
            coarser = [d for d in trace.dtypes if torch.finfo(d).eps > own]
            narrow = max(coarser, key=lambda d: torch.finfo(d).eps) if coarser else None
            result = (-(-trace.elements // samples), narrow, samples)
            break
        if len(memo) >= 64:  # probes of ever new shapes: keep the memo bounded
            memo.clear()
        memo[signature] = result
    return memo[signature]


#: Per model, :func:`jacobian_rows`' verdict on its batched rows per probe signature (1: they
#: agree with an unbatched pass, -1: rows without vmap; weak keys).
_ROWS_VERIFIED: weakref.WeakKeyDictionary[nn.Module, dict[Any, int]] = weakref.WeakKeyDictionary()


def _probe_signature(probe: ProbeFunction) -> tuple[Any, ...]:
    """What a per-model memo of the probe's forward keys on: output, parameter names, input
    shapes, probe dtype, eval mode and the modules' plain settings.

    Computed once per probe per public call (:func:`~.functional.call_memo`): walking every
    module's settings cost ~0.5 ms on the demo's ViT and GPT-2, and one ``ntk_spectrum`` asked
    9 times (review, session 28). Not across calls: a probe reused after the user changed a
    module attribute (``ntk_matrix(probe=p)``) must see the change (a per-instance memo kept a
    verdict on batched rows that a ``torch.cdist`` switch made wrong: K 20 % off; re-review,
    session 28)."""
    memo = call_memo()
    if memo is None:
        return _signature_of(probe)
    key = ("probe signature", id(probe), probe.dtype, probe.eval_mode, id(probe.inputs))
    if key not in memo:
        memo[key] = (probe, _signature_of(probe))  # (the probe held: its id stays unique)
    return cast(tuple[Any, ...], memo[key][1])


def _signature_of(probe: ProbeFunction) -> tuple[Any, ...]:
    return (
        probe.output if isinstance(probe.output, str) else id(probe.output),
        tuple(probe.names),
        tuple(tuple(t.shape) for t in pytree.tree_leaves(probe.inputs) if isinstance(t, Tensor)),
        probe.dtype,
        # (train mode runs other layers: the verdict of an eval_mode=True probe was reused for
        # a train-mode one, and the result depended on the call history; review, session 27)
        probe.eval_mode,
        # (a forward whose precision follows a Python attribute kept its first verdict: the
        # float64 bounds understated by 9 orders; review, session 25)
        tuple(
            (name, type(m), plain_settings(m, held=True)) for name, m in probe.model.named_modules()
        ),
    )


def _traced_pass(probe: ProbeFunction, inputs: Any) -> FloatTrace | None:
    """The :class:`FloatTrace` of one forward pass of the probe on ``inputs``: under
    ``no_grad``, else with autograd on (its parameters and inputs do not require grad, so
    nothing is recorded unless the forward asks for it); ``None`` where neither runs."""
    for grad in (False, True):
        trace = FloatTrace()
        try:
            with probe.session(), torch.set_grad_enabled(grad), trace:
                probe(probe.params, inputs)
        except Exception:
            continue
        return trace
    return None


#: Factor on the backward-pass estimates (:func:`jacobian_transient_bytes`,
#: :func:`row_chunk_for`) where the user gave a memory budget and nothing was measured: passes
#: that keep more than one activation set per cotangent ran over a budget sized by the bare
#: estimate (a Conv+BatchNorm net's one-sample pass, 1.03-1.06x, and its memory measurement
#: itself; a bias-only net's one-row backward, 1.004x). The default budget, sized for speed,
#: takes the bare estimate.
ESTIMATE_MARGIN = 1.5


def shared_gradient_elements(probe: ProbeFunction) -> int:
    """Elements of the per-use gradients of the probe's tied parameters (registered under k > 1
    names, e.g. an LM head tied to the embedding): autograd holds the k uses' gradients and
    their sum at once, k + 1 parameter-sized tensors per row where the row itself counts one.
    (A module called twice is not seen here: the structured strategy measures that case.)"""
    uses: dict[int, int] = {}
    for _, p in probe.model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    named = dict(probe.model.named_parameters())
    return sum(uses[id(named[n])] * named[n].numel() for n in probe.names if uses[id(named[n])] > 1)


def jacobian_transient_bytes(probe: ProbeFunction, itemsize: int, strict: bool = False) -> int:
    """Bytes one sample adds to a ``vmap(jacrev)`` call beyond its rows (see
    :func:`activation_elements`; ``strict``: a given budget, with :data:`ESTIMATE_MARGIN` and
    the tied parameters' per-use gradients, :func:`shared_gradient_elements`)."""
    act = activation_elements(probe) * itemsize
    r = probe.rows_per_sample
    if not strict:
        return (r + 1) * act
    shared = r * shared_gradient_elements(probe) * itemsize
    return (r + 1) * math.ceil(act * ESTIMATE_MARGIN) + shared


def _plan(
    probe: ProbeFunction,
    itemsize: int,
    budget: int,
    row_itemsize: int | None = None,
    widen: bool = False,
    strict: bool = False,
) -> tuple[int, int, int | None] | None:
    """(panel samples, block samples, rows per backward pass or ``None`` for all of a sample's)
    of the Jacobian strategy, or ``None`` if it does not fit.

    ``itemsize`` is K's, ``row_itemsize`` the Jacobian rows' (smaller on the mixed-precision
    path, whose rows are widened a chunk at a time, see :func:`_gram`). The panel (at most half
    of the samples) and two blocks (a streamed block and the workspace of the one being
    computed) must fit in the budget next to K; a single-sample probe needs only its own rows (its
    panel is one call's output, nothing is streamed). ``None`` also when the panel would hold
    less than 1/8 of the rows: the streamed recomputation would then cost more than the operator
    strategy. ``widen``: the streamed rows are narrower than the panel (a K-dtype panel on the
    mixed-precision path), so their Gram widens them a chunk at a time too. ``strict`` (a
    budget the user gave): ``None`` also where one sample's backward does not fit even a row
    at a time; else such a sample is differentiated whole.
    """
    n, r, s_total = probe.n_rows, probe.rows_per_sample, probe.batch_size
    row_itemsize = row_itemsize or itemsize
    row_bytes = probe.n_params * row_itemsize
    free = budget - n * n * itemsize
    if row_itemsize < itemsize or widen:  # the widened column chunks of _gram
        widest = n * max(p.numel() for p in probe.params)
        free -= 2 * min(_widen_chunk(probe, itemsize, budget), widest) * itemsize
    budget_samples = max(free, 0) // (row_bytes * r)
    if budget_samples < min(3, s_total):
        return None
    # A block's vmapped call also holds its samples' backward intermediates (trans each), which
    # can dwarf the rows (wide feature maps, many rows per sample): blocks shrink for them, down
    # to one sample. Below that nothing is declined: the operator strategy would cost far more
    # (a 3-conv net at 64×64 with 100 rows per sample: 464 s and 7 GiB, against 8 s).
    # The panel (and so whether every row fits, which `auto` asks) depends on the rows only.
    rows_block = max(1, min(budget_samples // 4, s_total))
    panel = max(rows_block, min(budget_samples - 2 * rows_block, math.ceil(s_total / 2)))
    if panel < s_total / 8:
        return None
    trans = jacobian_transient_bytes(probe, row_itemsize, strict)
    block = max(1, min(rows_block, (free // 4) // (row_bytes * r + trans)))
    if panel >= s_total > block and s_total * (row_bytes * r + trans) <= free // 2:
        # One panel holds every row: nothing is streamed beside it, so one call may make it
        # whole (its output is the panel: no buffer, no copy) where its rows and transients fit
        # half of what K leaves. The quarter rule above is for a block held beside a panel: a
        # 64-sample ViT probe under the monitor's budget ran as blocks of 56 and 8 samples into
        # a buffer, 65.7 ms against 53.1 ms in one call, at a higher peak (60 vs 40 MiB;
        # review, session 28).
        block = s_total
    # What the rows leave of the budget for a call's intermediates: the panel, and the block
    # being computed or streamed (none beside a panel that one call makes whole).
    resident = panel if block >= s_total else panel + block
    row_chunk = row_chunk_for(probe, row_itemsize, free - resident * row_bytes * r, strict)
    # (A smaller panel leaves more room for the backward pass: a larger budget must not be
    # refused where a smaller one was accepted.)
    least_panel = max(rows_block, math.ceil(s_total / 8))
    while row_chunk == 0 and strict and panel > least_panel:
        panel -= 1
        resident = panel if block >= s_total else panel + block
        row_chunk = row_chunk_for(probe, row_itemsize, free - resident * row_bytes * r, strict)
    if row_chunk == 0:
        if strict:
            return None  # not even one row of one sample per backward pass fits beside the rows
        row_chunk = None
    return panel, block, row_chunk


def _widen_chunk(probe: ProbeFunction, itemsize: int, budget: int) -> int:
    """Numbers per side of :func:`_gram`'s widening buffers on the mixed-precision path: at
    most :func:`gram_chunk_elements` (2**20 on the CPU, 2**26 on CUDA), and at most 1/16 of
    what the budget leaves beside K (a small budget is not spent on them), but at least one
    column of every row."""
    free = max(budget - probe.n_rows**2 * itemsize, 0)
    cap = gram_chunk_elements(probe.device)
    return max(probe.n_rows, min(cap, free // (16 * itemsize)))


def row_chunk_for(
    probe: ProbeFunction, itemsize: int, room: int, strict: bool = False
) -> int | None:
    """Rows of one sample per backward pass (:func:`row_chunked_jacrev`) such that a call's
    transient memory fits ``room`` bytes: ``None`` (all r rows in one vmapped pass) where one
    sample's (r + 1) activations fit, else the most that fit, or 0 where not even one row fits.
    Each chunk holds the forward's activations, its cotangents' backward intermediates (about
    one activation set each), the one-hot basis cotangents (r numbers each) and its own output
    rows before they are copied into place. ``strict``: a given budget, the activations counted
    with :data:`ESTIMATE_MARGIN`."""
    act = activation_elements(probe) * itemsize
    if strict:
        act = math.ceil(act * ESTIMATE_MARGIN)
    r = probe.rows_per_sample
    if (r + 1) * act <= room:
        return None
    if r < 2:
        return 0
    per_row = act + (probe.n_params + r) * itemsize  # (r: its one-hot basis cotangent)
    if strict:  # (a tied parameter's per-use gradients and their sum beside the row)
        per_row += shared_gradient_elements(probe) * itemsize
    return int(max(0, min(r - 1, (room - act) // max(per_row, 1))))


def _grid(start: int, stop: int, panel: int, block: int) -> Iterator[tuple[int, int]]:
    """The row calls ``(a, b)`` covering samples ``start:stop`` (``start`` a panel boundary):
    each panel's blocks of ``block`` samples, the last one cut at the panel's end, so that a
    sample is always made by the same call (see :func:`_jacobian_strategy`)."""
    for q0 in range(start, stop, panel):
        q1 = min(q0 + panel, stop)
        for a in range(q0, q1, block):
            yield a, min(a + block, q1)


def _jacobian_strategy(
    probe: ProbeFunction,
    panel: int,
    block: int,
    row_chunk: int | None,
    jacobian_dtype: torch.dtype,
    buf_dtype: torch.dtype | None = None,
    gram_chunk: int = GRAM_CHUNK_ELEMENTS,
) -> Tensor:
    n, r, s_total = probe.n_rows, probe.rows_per_sample, probe.batch_size
    # Every sample's rows are made by the same call, whether for its own panel or streamed
    # against another panel: the calls are the blocks of each panel, [q0 + j·block, ...) cut at
    # the panel's end (_grid). A vmapped call's rounding depends on its batch, and a sample's
    # float32 rows made in two different calls differ by ~1e-7 relative, so K was not the Gram
    # matrix of any one set of rows when the streamed blocks ran across panel boundaries (an
    # exactly singular K reported full rank and a finite κ, λ_min errors up to 500x the residual
    # the Gram bound gives: review, session 22).
    K = torch.empty(n, n, dtype=probe.dtype, device=probe.device)
    # K's finiteness is checked by ntk_matrix, so the narrowed copy needs no validating pass.
    source = probe.astype(jacobian_dtype, check=False)
    rows = jacobian_rows(source, row_chunk)
    with source.session():
        for p0 in range(0, s_total, panel):
            p1 = min(p0 + panel, s_total)
            if p1 - p0 <= block and (buf_dtype or probe.dtype) == jacobian_dtype:
                # One call makes the whole panel in the buffer's dtype: its output is the
                # buffer, no copy.
                buf = list(rows(p0, p1))
            else:
                # The panel's rows go into one preallocated buffer per parameter (in K's dtype,
                # or the rows' narrower one, see _assemble), so that its GEMMs are large
                # (small-output GEMMs run at a fraction of the BLAS peak) without a copy.
                buf = [
                    torch.empty(
                        (p1 - p0) * r, *p.shape, dtype=buf_dtype or probe.dtype, device=probe.device
                    )
                    for p in probe.params
                ]
                for a, b in _grid(p0, p1, panel, block):
                    for dst, src in zip(buf, rows(a, b), strict=True):
                        dst[(a - p0) * r : (b - p0) * r] = src
            ra, rb = p0 * r, p1 * r
            # (into K's blocks: no block temporaries)
            _gram_sym(tuple(buf), probe.dtype, out=K[ra:rb, ra:rb], chunk_elements=gram_chunk)
            for a, b in _grid(p1, s_total, panel, block):
                g = _gram(
                    tuple(buf),
                    rows(a, b),
                    probe.dtype,
                    out=K[ra:rb, a * r : b * r].zero_(),
                    chunk_elements=gram_chunk,
                )
                K[a * r : b * r, ra:rb] = g.T
                del g
            del buf
    return K


def _operator_strategy(
    probe: ProbeFunction, itemsize: int, budget: int, strict: bool = False
) -> Tensor:
    """K = [K e_1, ..., K e_n] from matrix-free products, a block of columns at a time.

    Memory: K, and per column about four parameter-sized vectors (Jᵀ U, the JVP tangents and
    their workspace) and two n-vectors (the basis block and its product); per column and per
    sample of a chunk of the probe batch about four activation sets (the VJP's and the JVP's
    intermediates, measured), and two more per sample for the forward passes. The column block
    (at most 64) and the batch chunk are sized to the budget, the block first narrowed where a
    single sample would not fit; the linearisation (traced constants of the whole batch, about
    four activation sets per sample) is kept only where it fits too. ``strict`` (a budget the
    user gave): a ``ValueError`` where one column of one sample does not fit.
    """
    from .operator import NTKOperator  # local: operator imports functional only

    n, s_total = probe.n_rows, probe.batch_size
    free = budget - n * n * itemsize
    per_col = (4 * probe.n_params + 2 * n) * itemsize
    act = activation_elements(probe) * itemsize

    def per_sample(c: int) -> int:
        return (4 * c + 2) * act

    if not strict:
        # The default budget sizes the column block by its parameter-sized vectors only, the
        # whole batch per product and one linearisation (GPT-2-small at n = 256 on an H100:
        # 15 s for K).
        cols = int(max(1, min(64, n, free // max(1, 4 * probe.n_params * itemsize))))
        chunk = None
        linearize = n > cols * NTKOperator.LINEARIZE_AFTER
    else:
        cols = int(max(1, min(64, n, free // max(1, 2 * per_col))))
        while cols > 1 and free - cols * per_col < per_sample(cols):
            cols = max(1, cols // 2)
        room = free - cols * per_col
        if room < per_sample(cols):
            raise ValueError(
                f"memory_budget is too small for the operator strategy: one column of one "
                f"sample needs {per_col + per_sample(1)} bytes beside K ({n * n * itemsize}), "
                f"{max(free, 0)} are left"
            )
        samples = int(min(s_total, room // max(1, per_sample(cols)))) if act else s_total
        chunk = None if samples >= s_total else samples
        linearize = (
            chunk is None
            and n > cols * NTKOperator.LINEARIZE_AFTER
            # (tracing also holds example tangents and folded copies of the parameters)
            and room
            >= per_sample(cols) * s_total + 4 * act * s_total + 6 * probe.n_params * itemsize
        )
    op = NTKOperator(None, None, probe=probe, chunk_size=chunk, linearize=linearize)
    K = torch.empty(n, n, dtype=probe.dtype, device=probe.device)
    try:
        a = 0
        while a < n:
            b = min(a + cols, n)
            basis = torch.zeros(n, b - a, dtype=probe.dtype, device=probe.device)
            basis[a:b] = torch.eye(b - a, dtype=probe.dtype, device=probe.device)
            try:
                K[:, a:b] = op.matvec(basis)
            except RuntimeError as err:
                # A model that draws random numbers in the probe (train-mode dropout or
                # stochastic depth with eval_mode=False): vmap refuses random ops in a block
                # of columns. Column by column every product draws the same masks (the probe
                # forks the RNG state alike for each), so the columns are those of one
                # network's K; the blocks crashed the fit with vmap's randomness error
                # (review, session 24).
                if cols == 1 or "randomness" not in str(err):
                    raise
                cols = 1
                continue
            finally:
                del basis
            a = b
    finally:
        op.release()  # its CUDA graph and linearisation now, not at garbage collection
    # J (Jᵀ E) is symmetric only up to rounding, and eigh reads one triangle: symmetrise in
    # place, a block pair at a time (no n × n temporary).
    for a in range(0, n, cols):
        for c in range(a, n, cols):
            upper = K[a : a + cols, c : c + cols]
            mean = (upper + K[c : c + cols, a : a + cols].T).mul_(0.5)
            upper.copy_(mean)
            K[c : c + cols, a : a + cols] = mean.T
    return K


@allows_autograd
def ntk_matrix(
    model: nn.Module | None,
    inputs: Any,
    *,
    output: OutputSpec = "pntk",
    params: ParamFilter = None,
    dtype: torch.dtype = torch.float64,
    memory_budget: int | None = None,
    eval_mode: bool = True,
    strategy: str = "auto",
    probe: ProbeFunction | None = None,
    jacobian_dtype: torch.dtype | None = None,
) -> Tensor:
    """The empirical NTK K = J Jᵀ (n × n, n = number of rows) as a dense tensor.

    Args:
        model: as for :class:`~glu_probe.ntk.NTKOperator`.
        inputs: as for :class:`~glu_probe.ntk.NTKOperator`.
        output: as for :class:`~glu_probe.ntk.NTKOperator`.
        params: as for :class:`~glu_probe.ntk.NTKOperator`.
        eval_mode: as for :class:`~glu_probe.ntk.NTKOperator`.
        dtype: precision of J and K (float64 default).
        memory_budget: bytes of tensors the call holds at once: K, the live Jacobian blocks,
            factors or product vectors, their workspaces and vmapped calls, and the probe's
            copies of the parameters and inputs (tested with an independent count of every
            allocation). ``None``:
            K plus 40% of the full Jacobian's bytes (at least 16 MiB for the structured
            strategy, whose factors replace the Linear layers' rows), capped at half of the
            free device memory.
        strategy: ``"structured"`` (:mod:`glu_probe.ntk.structured`: ``nn.Linear`` layers
            from their Kronecker factors, every other parameter from its rows; one per-sample
            pass, nothing recomputed), ``"jacobian"`` (per-sample Jacobian row blocks and
            GEMMs), ``"operator"`` (columns K eⱼ from matrix-free products: memory of a few
            parameter vectors per column, for models whose Jacobian rows do not fit) or
            ``"auto"`` (structured where the jacobian strategy would recompute rows, or where
            its Gram is :data:`STRUCTURED_MIN_GAIN` times cheaper than the rows' (MLPs on
            vectors), a layer qualifies and the factors fit; else jacobian when its panel fits
            the budget, else operator).
        probe: a prebuilt :class:`ProbeFunction` (then model/inputs/output/params are ignored).
        jacobian_dtype: precision of the Jacobian rows of the ``"jacobian"`` strategy (``None``:
            ``dtype``). ``torch.float32`` with a float64 ``dtype`` is the mixed-precision mode of
            the module docstring: float32 backward passes, K accumulated in float64, eigenvalue
            errors ≤ 2·√λ·‖E‖₂ + ‖E‖₂². The ``"operator"`` strategy always works in ``dtype``
            (its products accumulate in their own precision, which would cost ε·κ). A model
            that does not run in float64 (a cast inside its forward, a kernel without a float64
            version) gets float32 rows with a warning when ``dtype`` is float64 and
            ``jacobian_dtype`` was not narrowed (as :func:`~glu_probe.ntk.ntk_spectrum`).

    Returns:
        K on the model's device, in ``dtype``.

    Raises:
        ValueError: the budget cannot hold K itself, or a bad strategy; see also
            :class:`ProbeFunction` for bad models and inputs.
    """
    if strategy not in ("auto", "structured", "jacobian", "operator"):
        raise ValueError(
            f"strategy must be 'auto', 'structured', 'jacobian' or 'operator', got {strategy!r}"
        )
    if jacobian_dtype is not None and not (
        isinstance(jacobian_dtype, torch.dtype) and jacobian_dtype.is_floating_point
    ):
        raise ValueError(f"jacobian_dtype must be a floating torch dtype, got {jacobian_dtype!r}")
    if probe is not None and dtype is not None and dtype != probe.dtype:
        probe = probe.astype(dtype)  # (dtype was ignored with probe=: review, session 25)
    if probe is None:
        if model is None:
            raise ValueError("pass a model (or a prebuilt probe=)")
        if memory_budget is not None:
            memory_budget = checked_budget(memory_budget)
            refuse_small_budget(memory_budget, model, inputs, params, dtype)

        def build(probe_dtype: torch.dtype) -> ProbeFunction:
            return ProbeFunction(
                model,
                inputs,
                output=output,
                params=params,
                dtype=probe_dtype,
                eval_mode=eval_mode,
                memory_budget=memory_budget,
            )

        try:
            probe = build(dtype)
        except (RuntimeError, NotImplementedError, TypeError) as err:
            narrow = default_probe_dtype(model, params)
            if not _may_narrow_rows(err, dtype, None) or narrow == torch.float64:
                raise
            # A model that casts inside its forward (x.float()) fails its float64 validating
            # pass: validate in its own dtype, then K in float64 from float32 rows (as
            # ntk_spectrum's dense path; this raised torch's raw dtype error, review session 26)
            try:
                probe = build(narrow).astype(dtype)
            except Exception:
                raise err from None
            if _may_narrow_rows(err, dtype, jacobian_dtype):
                return _narrowed_rows(probe, memory_budget, strategy, err)
    try:
        return _assemble(probe, memory_budget, strategy, jacobian_dtype)[0]
    except (RuntimeError, NotImplementedError, TypeError) as err:
        if not _may_narrow_rows(err, probe.dtype, jacobian_dtype):
            raise
        return _narrowed_rows(probe, memory_budget, strategy, err)


def raise_float64_unavailable(err: BaseException, err32: BaseException, remedy: str) -> NoReturn:
    """Raise the error of an exact path that failed in float64 (``err``) and with float32
    Jacobian rows (``err32``): both messages and the ``remedy``. Only the float64 error was
    raised before (session 29: a QAT model's fake-quantize ops, float32-only, on coupled
    samples gave torch's bare "expected scalar type Float but found Double", even with
    ``jacobian_dtype=torch.float32``, whose rows the coupled samples' products do not use). A
    ``NotImplementedError`` (no derivative rule, products that cannot be formed: a
    :class:`~glu_probe.ntk.operator.MatrixFreeUnavailableError`), or an error whose text says
    nothing of a dtype (activation checkpointing's "saved tensor hooks", with its own advice), is
    not about the dtype and is raised as it is."""
    text = str(err)
    if isinstance(err, NotImplementedError) or not any(
        word in text for word in ("Double", "float64", "dtype", "scalar type")
    ):
        raise err from None  # (not about the dtype: e.g. a checkpointing error, as raised)

    def first(e: BaseException) -> str:
        return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"

    raise Float64UnavailableError(
        f"the exact path failed in float64 ({first(err)}) and with float32 Jacobian rows "
        f"({first(err32)}): the model has an operation without a float64 kernel, and where "
        "its samples are coupled (train-mode BatchNorm, observers updating buffers, ...) K "
        "comes from products in float64 whatever the rows' dtype; use " + remedy
    ) from err


def _may_narrow_rows(
    err: BaseException, dtype: torch.dtype, jacobian_dtype: torch.dtype | None
) -> bool:
    """``ntk_matrix``: whether a failure in float64 may be retried with float32 Jacobian rows
    (float64 K, rows at their default precision, not out of memory)."""
    from .operator import is_out_of_memory  # local: operator imports dense lazily

    return (
        dtype == torch.float64
        and jacobian_dtype in (None, torch.float64)
        and not is_out_of_memory(err)
    )


def _narrowed_rows(
    probe: ProbeFunction, memory_budget: int | None, strategy: str, err: BaseException
) -> Tensor:
    """K in float64 from float32 Jacobian rows, with ntk_spectrum's warning, for a model that
    does not run in float64; if that fails as well, the float64 error ``err`` is raised."""
    try:
        K = _assemble(probe, memory_budget, strategy, torch.float32)[0]
    except Exception as err32:
        raise_float64_unavailable(err, err32, "dtype=torch.float32 (a float32 K)")
    warnings.warn(
        f"ntk_matrix: the model does not run in float64 ({type(err).__name__}: "
        f"{str(err).splitlines()[0][:200]}); K used float32 Jacobian rows (mixed precision: K "
        "accumulated in float64, its entries carry the rows' float32 rounding). Pass "
        "jacobian_dtype=torch.float32 to choose this and silence the warning, or "
        "dtype=torch.float32 for a float32 K",
        RuntimeWarning,
        stacklevel=external_stacklevel(),
    )
    return K


#: ``auto`` where the Jacobian rows would fit: the structured strategy is tried when the rows'
#: Gram costs at least this many multiply-adds (below, both take a few ms and the rows' single
#: vmapped call wins on overhead) ...
STRUCTURED_MIN_ROWS_GRAM = 2**26
#: ... and is taken when its own Gram costs this many times fewer (:func:`gram_flops`). Measured
#: on one CPU core, float32 rows: MLPs on vectors (T = 1), where the Hadamard route costs
#: n²·(in+out) per layer instead of n²·in·out, run 26× (d 64, m 2048, n 256: 0.70 s -> 0.026 s)
#: to 100× (d 784, m 1024, n 128) faster; the demo ViT and GPT-2 probes, whose token pairs make
#: the structured Gram no cheaper, keep the rows.
STRUCTURED_MIN_GAIN = 4.0


def _structured_mode(
    probe: ProbeFunction, wide_plan: tuple[int, int, int | None] | None
) -> tuple[bool, float | None]:
    """``auto``: (try the structured strategy, ``min_gain`` for it).

    Where the row strategy would recompute rows (its panel cannot hold every sample), the
    structured one is taken whenever it applies. Where the rows all fit at once, it is taken
    only if its Gram is :data:`STRUCTURED_MIN_GAIN` times cheaper and the rows' Gram is large
    (:data:`STRUCTURED_MIN_ROWS_GRAM`): otherwise the rows' single vmapped call is as fast or
    faster (measured on the demo ViT and GPT-2 probes). A single sample has no rows to share."""
    if probe.batch_size < 2:
        return False, None
    if wide_plan is None or wide_plan[0] < probe.batch_size:
        return True, None
    n = probe.n_rows
    return n * n * probe.n_params >= STRUCTURED_MIN_ROWS_GRAM, STRUCTURED_MIN_GAIN


def _structured(
    probe: ProbeFunction,
    budget: int,
    memory_budget: int | None,
    itemsize: int,
    rows_dtype: torch.dtype,
    row_itemsize: int,
    required: bool,
    min_gain: float | None = None,
) -> Tensor | None:
    """K by the structured strategy, or ``None`` (``required``: a ValueError instead).
    ``itemsize`` is K's, ``row_itemsize`` that of ``rows_dtype``; ``min_gain`` as in
    :func:`~glu_probe.ntk.structured.structured_ntk`."""
    from .structured import structured_ntk

    n = probe.n_rows
    if memory_budget is None:
        # The structured strategy stores factors that replace (and are smaller than) the
        # Linear layers' rows: it may use K + 40% of J's bytes, as the row strategy (at least
        # 16 MiB: small problems need not be squeezed). 60% until 2026-11-27: the §3 ViT at
        # n = 512 then held 0.29x the PyTorch tutorial's peak RSS (target 0.25x); at 40%,
        # 0.22-0.24x at about the same time (0.83x vs 0.86x of the tutorial's, one noisy box).
        extra = max(int(0.4 * n * probe.n_params * row_itemsize), 2**24)
        # ... and the backward intermediates of a vmapped call over 1/8 of the samples (the
        # pass's chunks; ViT d32 at n = 512: 9 samples, 7 MB), which the budget now counts.
        extra += math.ceil(probe.batch_size / 8) * jacobian_transient_bytes(probe, row_itemsize)
        budget = max(budget, min(n * n * itemsize + extra, _budget_cap(probe)))
    why: list[str] = []
    K = structured_ntk(
        probe, budget, rows_dtype, min_gain=min_gain, strict=memory_budget is not None, why=why
    )
    if K is None and required:
        if probe.batch_size < 2 and not why:
            why.append("a single sample has no rows to share")
        given = "" if memory_budget is None else f" (memory_budget={memory_budget} bytes)"
        raise ValueError(
            f"strategy='structured' does not apply{given}: "
            f"{why[-1] if why else 'no reason recorded'}; strategy='auto' or 'jacobian' "
            "computes K from Jacobian rows instead"
        )
    return K


def _assemble(
    probe: ProbeFunction,
    memory_budget: int | None,
    strategy: str,
    jacobian_dtype: torch.dtype | None,
    reserved: int = 0,
) -> tuple[Tensor, torch.dtype]:
    """K by the chosen strategy, and the dtype its Jacobian rows were computed in (the probe's
    own for the operator strategy, whose products always run in ``probe.dtype``).
    ``reserved``: bytes the caller took out of the user's ``memory_budget`` before (the dense
    spectrum's eigendecomposition); error messages name the user's budget and the reserve."""
    itemsize = torch.empty((), dtype=probe.dtype).element_size()
    budget = _budget(probe, itemsize, memory_budget)
    stated = (
        f"memory_budget={budget + reserved} bytes (of which {reserved} are reserved for K's "
        "eigendecomposition)"
        if reserved
        else f"memory_budget={budget} bytes"
    )
    n = probe.n_rows
    if probe.per_sample_why is not None:
        # The row and structured strategies differentiate each sample alone: that is the
        # batch's Jacobian only where the samples are independent. The operator strategy's
        # products run over the whole batch (its chunking refuses to split such a probe).
        if strategy in ("jacobian", "structured"):
            raise ValueError(
                f"strategy={strategy!r} differentiates each sample alone, but "
                f"{probe.per_sample_why}; strategy='operator' (or 'auto') computes K from "
                "products over the whole batch"
            )
        if strategy == "auto":
            warnings.warn(
                f"{probe.per_sample_why}: K comes from matrix-free products over the whole "
                "batch (strategy='operator'), not from per-sample Jacobian rows, which would "
                "give another matrix",
                RuntimeWarning,
                stacklevel=external_stacklevel(),
            )
        strategy = "operator"
    rows_dtype = jacobian_dtype or probe.dtype
    row_itemsize = torch.empty((), dtype=rows_dtype).element_size()
    # The probe's own copies of the parameters and inputs (and their narrower copies for the
    # rows) live through the call: a given budget counts them, so that it bounds every tensor
    # the call holds (the default budget is the working memory, the copies come on top).
    copies = 0
    if memory_budget is not None:
        copies = probe_copy_bytes(probe)
        if rows_dtype != probe.dtype:
            copies += probe_copy_bytes(probe, row_itemsize)
    # One product: four parameter-sized vectors and two n-vectors, and (a given budget) one
    # sample's activations for its VJP and JVP (see _operator_strategy).
    product = 4 * probe.n_params * itemsize
    if memory_budget is not None:
        product += (2 * n + 6 * activation_elements(probe)) * itemsize
    need = n * n * itemsize + product + copies
    if budget < need:
        raise DenseBudgetError(
            f"{stated} cannot hold the dense NTK: K alone needs "
            f"{n * n * itemsize} bytes plus {product} for one product "
            f"and {copies} for the probe's copies of its parameters, buffers and inputs; give "
            f"at least {need + reserved} bytes, or use method='lanczos' (matrix-free)"
        )
    budget -= copies
    strict = memory_budget is not None
    plan = (  # K-dtype panel (its streamed rows widened where they are narrower)
        _plan(probe, itemsize, budget, widen=row_itemsize < itemsize, strict=strict)
        if strategy != "operator"
        else None
    )
    K: Tensor | None = None
    try_structured, min_gain = (
        _structured_mode(probe, plan) if strategy == "auto" else (strategy == "structured", None)
    )
    if try_structured:
        K = _structured(
            probe,
            budget,
            memory_budget,
            itemsize,
            rows_dtype,
            row_itemsize,
            strategy == "structured",
            min_gain,
        )
    if K is None:
        buf_dtype = probe.dtype
        if strategy != "operator" and row_itemsize < itemsize:
            # Narrower rows (mixed precision) can stay narrow in the panel, widened a chunk at
            # a time in the Gram: up to twice the rows per panel (less recomputation), half the
            # panel memory, and no widening copy of the panel (demo ViT/GPT-2 probes: 0–10%
            # faster in an interleaved A/B on one core), so it wins ties too.
            narrow = _plan(probe, itemsize, budget, row_itemsize, strict=strict)
            if narrow is not None and (plan is None or narrow[0] >= plan[0]):
                plan, buf_dtype = narrow, rows_dtype
        if strategy == "jacobian" and plan is None:
            raise ValueError(
                f"{stated} is too small for the Jacobian strategy (one "
                f"sample's rows need {probe.rows_per_sample * probe.n_params * row_itemsize} "
                "bytes, three samples (or all, if fewer) and a panel of 1/8 of the rows must fit "
                "next to K); use strategy='operator'"
            )
        if plan is not None:
            K = _jacobian_strategy(
                probe, *plan, rows_dtype, buf_dtype, _widen_chunk(probe, itemsize, budget)
            )
        else:
            rows_dtype = probe.dtype
            K = _operator_strategy(probe, itemsize, budget, strict)
    if not all_finite(K):
        raise ValueError("the NTK has NaN/Inf entries (the Jacobian overflowed); try float64")
    return K, rows_dtype
