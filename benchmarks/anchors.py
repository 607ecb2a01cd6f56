"""Reference methods ("anchors") that ``benchmarks/bench_ntk.py`` measures glu-probe against.

1. :func:`tutorial_dense_ntk` -- the dense ``torch.func`` method of the PyTorch NTK tutorial
   (https://pytorch.org/tutorials/intermediate/neural_tangent_kernels.html, "Jacobian
   contraction"): ``vmap`` over per-sample ``jacrev`` of ``functional_call``, then
   ``einsum('Naf,Mbf->NMab', J1, J2)`` per parameter, stacked and summed; for K(x, x) the
   per-sample Jacobian is computed once and used for both factors.  Followed by
   ``torch.linalg.eigvalsh`` it is bench_ntk's section-3 anchor for the exact condition number
   (speed and peak memory).  (bench_ntk also prints the tutorial's function called verbatim
   with x1 = x2, which computes the Jacobian twice, for information only.)
2. :func:`curvlinops_condition_number` -- curvlinops' matrix-free Jacobian operator ``J``
   (``JacobianLinearOperator``) and its adjoint composed into ``J Jᵀ``, wrapped as a SciPy
   ``LinearOperator``, with ``scipy.sparse.linalg.eigsh`` (ARPACK, seeded start vector) for the
   largest and the smallest eigenvalue: bench_ntk's section-4 anchor for the condition number
   (at the loosest ``tol`` that gives κ to 1e-4).

Rows follow glu-probe's convention (``docs/design.md``): the model output is a tensor
``(N, ..., O)`` (or a tuple / dict / HF ``ModelOutput`` holding the logits); ``"full"`` takes
every output scalar as a row, ``"pntk"`` one row per sample (per token for sequence outputs),
``g = Σ_o f_o / √O``; a callable maps the output ``(N, ...)`` to rows ``(N, R)``.

Run ``python benchmarks/anchors.py`` for a self-check of both against float64 ``eigh``.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

__all__ = [
    "EigshResult",
    "curvlinops_condition_number",
    "model_rows",
    "tutorial_dense_ntk",
]

Output = str | Callable[[Tensor], Tensor]


def _pick_logits(out: Any) -> Tensor:
    """The logits of a model output: a tensor, ``.logits``, ``out['logits']`` or ``out[0]``."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, Mapping):
        if "logits" in out:
            return out["logits"]
        out = list(out.values())
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"cannot find the logits in a model output of type {type(out).__name__}")


def model_rows(out: Any, output: Output = "pntk") -> Tensor:
    """Rows ``(N, R)`` of a batched model output, as glu-probe defines them."""
    y = _pick_logits(out)
    if callable(output):
        rows = output(y)
        return rows.reshape(rows.shape[0], -1)
    if y.ndim == 1:
        y = y[:, None]
    if output == "full":
        return y.reshape(y.shape[0], -1)
    if output == "pntk":
        return (y.sum(-1) / math.sqrt(y.shape[-1])).reshape(y.shape[0], -1)
    raise ValueError(f"output must be 'pntk', 'full' or a callable, got {output!r}")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (dropout off, BatchNorm running stats), restored afterwards."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, t in flags.items():
            m.training = t


def _sdpa_math() -> contextlib.AbstractContextManager[Any]:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - old torch
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def _trainable(model: nn.Module, params: Iterable[str] | None) -> dict[str, Tensor]:
    named: dict[str, Tensor] = {k: v for k, v in model.named_parameters() if v.requires_grad}
    if params is not None:
        wanted = list(params)
        missing = [k for k in wanted if k not in named]
        if missing:
            raise ValueError(f"unknown or frozen parameters: {missing}")
        named = {k: named[k] for k in wanted}
    if not named:
        raise ValueError("the model has no trainable parameters")
    return named


def _call(model: nn.Module, params: Mapping[str, Tensor], x: Any) -> Any:
    if isinstance(x, Mapping):
        return functional_call(model, dict(params), args=(), kwargs=dict(x))
    if isinstance(x, tuple):
        return functional_call(model, dict(params), x)
    return functional_call(model, dict(params), (x,))


def _unsqueeze(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.unsqueeze(0)
    if isinstance(x, Mapping):
        return {k: _unsqueeze(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_unsqueeze(v) for v in x)
    return x


def tutorial_dense_ntk(
    model: nn.Module,
    inputs: Any,
    *,
    output: Output = "pntk",
    params: Iterable[str] | None = None,
) -> Tensor:
    """Dense empirical NTK ``K = J Jᵀ`` by the PyTorch tutorial's Jacobian contraction.

    The tutorial's ``empirical_ntk_jacobian_contraction`` with ``x1 = x2 = inputs``:
    per-sample Jacobians ``vmap(jacrev(fnet_single), (None, 0))``, flattened per parameter, then
    ``torch.stack([einsum('Naf,Mbf->NMab', j1, j2) ...]).sum(0)``; only the row map (``output``)
    is folded into ``fnet_single`` so that the rows match glu-probe's.  Runs in eval mode (flags
    restored) under the SDPA math backend; dtype and device are the model's.

    Args:
        model: the network; ``inputs`` is a batched tensor, tuple or dict of tensors.
        output: ``"pntk"``, ``"full"`` or a callable on the batched output (see module doc).
        params: names of the parameters to differentiate (default: all trainable).

    Returns:
        ``K`` of shape ``(N·R, N·R)``, rows ordered sample-major.
    """
    named = _trainable(model, params)
    detached = {k: v.detach() for k, v in named.items()}

    def fnet_single(p: dict[str, Tensor], x: Any) -> Tensor:
        return model_rows(_call(model, p, _unsqueeze(x)), output).squeeze(0)

    with _eval_mode(model), _sdpa_math():
        # x1 = x2 = inputs: the tutorial's second Jacobian is the first one
        jac1 = vmap(jacrev(fnet_single), (None, 0))(detached, inputs)
        jac1 = [j.flatten(2) for j in jac1.values()]
        jac2 = jac1
        result = torch.stack(
            [torch.einsum("Naf,Mbf->NMab", j1, j2) for j1, j2 in zip(jac1, jac2, strict=True)]
        )
        result = result.sum(0)
    n_samples, _, r, _ = result.shape
    return result.permute(0, 2, 1, 3).reshape(n_samples * r, n_samples * r)


class EigshResult(NamedTuple):
    """``(lambda_max, lambda_min, n_matvecs, seconds)`` of :func:`curvlinops_condition_number`."""

    lambda_max: float
    lambda_min: float
    n_matvecs: int
    seconds: float


class _RowModel(nn.Module):
    """``x -> rows (N, R)`` of the wrapped model (curvlinops differentiates a Module)."""

    def __init__(self, model: nn.Module, output: Output) -> None:
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, x: Any) -> Tensor:
        if isinstance(x, Mapping):
            out = self.model(**x)
        elif isinstance(x, tuple):
            out = self.model(*x)
        else:
            out = self.model(x)
        return model_rows(out, self.output)


def _batch_size(x: Any) -> int:
    if isinstance(x, Tensor):
        return int(x.shape[0])
    if isinstance(x, Mapping):
        return _batch_size(next(iter(x.values())))
    if isinstance(x, tuple):
        return _batch_size(x[0])
    raise TypeError(f"cannot read a batch size from {type(x).__name__}")


def curvlinops_condition_number(
    model: nn.Module,
    inputs: Any,
    *,
    output: Output = "pntk",
    params: Iterable[str] | None = None,
    tol: float = 1e-4,
    maxiter: int | None = None,
    seed: int = 0,
    ends_mode: str = "separate",
) -> EigshResult:
    """λ_max and λ_min of ``J Jᵀ`` with curvlinops' Jacobian operator and SciPy ``eigsh``.

    ``ends_mode="separate"``: two solves, ``which="LA"`` and ``"SA"``; ``"both"``: one solve
    for both ends (``k=2, which="BE"``). The benchmark takes whichever reaches its accuracy
    faster.

    ``J = curvlinops.JacobianLinearOperator(rows_model, params, [(inputs, dummy)])`` (the rows
    of :func:`model_rows` as the model output), ``J.adjoint()`` its transpose
    (``TransposedJacobianLinearOperator``), ``(J @ J.adjoint()).to_scipy(float64)`` the
    operator (only the SciPy wrapper is float64: the products run in the model's dtype, so pass
    a float64 model and inputs for a float64 comparison), and ``eigsh(k=1, which="LA")`` /
    ``eigsh(k=1, which="SA")`` with ARPACK's
    ``tol`` (relative accuracy of the Ritz value: ``||r|| ≤ tol·|θ|``) from the same
    deterministic start vector.  Shift-invert is not available matrix-free, so λ_min uses the
    plain ``"SA"`` mode.  curvlinops' determinism check is switched off (it costs extra passes
    that are not part of the eigensolve).  Runs in eval mode (flags restored).

    If ARPACK does not converge within ``maxiter`` (default ``10·n``), the best Ritz value it
    returned is used (NaN if none) and a ``RuntimeWarning`` says so.

    Returns:
        :class:`EigshResult` ``(lambda_max, lambda_min, n_matvecs, seconds)``: ``n_matvecs``
        counts single-vector products with ``J Jᵀ`` of both solves, ``seconds`` the wall time of
        building the operator and both solves.
    """
    from curvlinops import JacobianLinearOperator
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    rows_model = _RowModel(model, output)
    named = _trainable(model, params)
    plist = [p for p in named.values()]
    dev = plist[0].device
    count = [0]
    with _eval_mode(model), _sdpa_math():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        n_samples = _batch_size(inputs)
        dummy = torch.zeros(n_samples, device=dev)  # curvlinops wants (X, y) pairs
        jac = JacobianLinearOperator(
            rows_model,
            plist,
            [(inputs, dummy)],
            check_deterministic=False,
            num_data=n_samples,
            batch_size_fn=_batch_size,
        )
        kop = (jac @ jac.adjoint()).to_scipy(dtype=np.float64)
        n = kop.shape[0]

        def mv(v: np.ndarray) -> np.ndarray:
            count[0] += 1 if v.ndim == 1 else v.shape[1]
            return kop.matvec(v)

        def mm(v: np.ndarray) -> np.ndarray:
            count[0] += v.shape[1]
            return kop.matmat(v)

        op = LinearOperator((n, n), matvec=mv, matmat=mm, rmatvec=mv, dtype=np.float64)
        v0 = np.random.default_rng(seed).standard_normal(n)
        ends = []
        if ends_mode not in ("separate", "both"):
            raise ValueError(f"ends_mode must be 'separate' or 'both', got {ends_mode!r}")
        if ends_mode == "both" and n < 3:  # (eigsh needs k < n: two solves instead)
            ends_mode = "separate"
        if ends_mode == "both":
            # One ARPACK run for both ends (k=2, "BE"): about 0.57x the products of the two
            # separate runs on §4's ViT (review, session 24: the anchor did more work than
            # eigsh needs for κ).
            try:
                vals = np.sort(
                    eigsh(
                        op, k=2, which="BE", tol=tol, v0=v0, maxiter=maxiter,
                        return_eigenvectors=False,
                    )
                )  # fmt: skip
                ends = [float(vals[-1]), float(vals[0])]
            except ArpackNoConvergence as err:
                got = np.sort(np.asarray(err.eigenvalues))
                if got.size > 1:
                    ends = [float(got[-1]), float(got[0])]
                else:  # (λ_max converges first: a single converged value is taken for it)
                    ends = [float(got[0]) if got.size else math.nan, math.nan]
                warnings.warn(
                    f"eigsh(which='BE') did not converge after {count[0]} matvecs "
                    f"(tol={tol}, maxiter={maxiter}); using {ends}",
                    RuntimeWarning,
                    stacklevel=2,
                )
        for which in ("LA", "SA") if ends_mode == "separate" else ():
            try:
                vals = eigsh(
                    op, k=1, which=which, tol=tol, v0=v0, maxiter=maxiter, return_eigenvectors=False
                )
                ends.append(float(vals[0]))
            except ArpackNoConvergence as err:
                got = np.asarray(err.eigenvalues)
                ends.append(float(got[0]) if got.size else math.nan)
                warnings.warn(
                    f"eigsh(which={which!r}) did not converge after {count[0]} matvecs "
                    f"(tol={tol}, maxiter={maxiter}); using {ends[-1]}",
                    RuntimeWarning,
                    stacklevel=2,
                )
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
    return EigshResult(ends[0], ends[1], count[0], seconds)


def _selfcheck() -> None:  # pragma: no cover - manual script
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    x = torch.randn(12, 5)
    model64 = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    model64.load_state_dict(model.state_dict())
    for output in ("pntk", "full"):
        # float64 truth: explicit Jacobian of the rows, K = J Jᵀ, eigh
        p64 = {k: v.detach() for k, v in model64.named_parameters()}
        jac = jacrev(lambda p, o=output: model_rows(functional_call(model64, p, (x.double(),)), o))(
            p64
        )
        n_rows = next(iter(jac.values())).shape[:2].numel()
        jmat = torch.cat([j.reshape(n_rows, -1) for j in jac.values()], 1)
        ev = torch.linalg.eigvalsh(jmat @ jmat.T)
        lmax, lmin = float(ev[-1]), float(ev[0])
        t0 = time.perf_counter()
        k_tut = tutorial_dense_ntk(model, x, output=output)
        ev_t = torch.linalg.eigvalsh(k_tut.double())
        t_tut = time.perf_counter() - t0
        res = curvlinops_condition_number(model, x, output=output, tol=1e-8)
        print(
            f"[{output}] n={n_rows}  truth: lambda_max={lmax:.6e} lambda_min={lmin:.6e} "
            f"kappa={lmax / lmin:.6e}"
        )
        print(
            f"  tutorial dense:   lambda_max rel.err {abs(float(ev_t[-1]) - lmax) / lmax:.2e}, "
            f"lambda_min rel.err {abs(float(ev_t[0]) - lmin) / lmin:.2e}, "
            f"K max abs err {float((k_tut.double() - jmat @ jmat.T).abs().max()):.2e}, "
            f"{t_tut * 1e3:.1f} ms"
        )
        print(
            f"  curvlinops+eigsh: lambda_max rel.err {abs(res.lambda_max - lmax) / lmax:.2e}, "
            f"lambda_min rel.err {abs(res.lambda_min - lmin) / lmin:.2e}, "
            f"{res.n_matvecs} matvecs, {res.seconds * 1e3:.1f} ms"
        )


if __name__ == "__main__":
    _selfcheck()
