r"""Spectral density and effective rank of a symmetric positive semi-definite kernel.

* :func:`effective_rank` -- the entropy effective rank of Roy & Vetterli (2007),
  ``erank(K) = exp(H(p))`` with ``p_i = λ_i / Σ_j λ_j`` over the positive eigenvalues and
  ``H(p) = -Σ_i p_i log p_i`` (natural log).  ``1 ≤ erank ≤ rank(K)``; it equals ``n`` for
  ``K ∝ I_n`` and ``1`` for rank one.
* :func:`spectral_density` -- a normalised histogram of the eigenvalues (of ``log10 λ`` by
  default), i.e. an estimate of the spectral density ``φ(t) = (1/n) Σ_i δ(t - λ_i)``; the
  paper's "more compact eigenvalue distribution" is its width.
* :func:`slq_density` -- stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017, SIAM J. Matrix
  Anal. Appl. 38(4)): for unit random probes ``v_l`` (Rademacher, ``l = 1..n_v``), ``m`` Lanczos
  steps on ``K`` from ``v_l`` give a tridiagonal ``T_l = U Θ U^T``; its eigenvalues ``θ_k`` are
  Gauss quadrature nodes and ``τ_k = U_{1k}^2`` the weights for the measure
  ``μ_l(t) = Σ_i (q_i^T v_l)^2 δ(t - λ_i)``, whose mean over random ``v_l`` is ``φ``.  Hence

  .. math::
      \operatorname{tr} f(K) = n\,\mathbb E\,[v^T f(K) v]
      \approx \frac{n}{n_v}\sum_{l=1}^{n_v}\sum_{k=1}^{m} τ^{(l)}_k f(θ^{(l)}_k).

  The quadrature is exact for polynomials ``f`` of degree ``≤ 2m-1`` (so the moments
  ``v^T K^j v`` are reproduced exactly for ``j < 2m``); the only error left is the Hutchinson
  sampling error, of standard deviation ``sqrt(2/n_v)·||f(K)||_F`` minus the diagonal part for
  Rademacher probes.  :func:`slq_trace` and :func:`slq_effective_rank` evaluate such traces.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .._warnings import external_stacklevel

__all__ = [
    "effective_rank",
    "slq_density",
    "slq_effective_rank",
    "slq_trace",
    "spectral_density",
]


def _count(name: str, value: object) -> None:
    """A positive ``int`` (not a ``bool``: ``n_probes=True`` ran as 1, ``n_steps=True`` failed
    inside torch; review, session 22)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _eigs_f64(eigenvalues: Tensor, name: str = "eigenvalues") -> Tensor:
    lam = torch.as_tensor(eigenvalues).detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    if lam.numel() == 0:
        raise ValueError(f"{name} is empty")
    if not bool(torch.isfinite(lam).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return lam


def effective_rank(eigenvalues: Tensor) -> float:
    r"""Entropy effective rank ``exp(-Σ p_i log p_i)``, ``p = λ/Σλ`` over positive ``λ``.

    Roy & Vetterli, "The effective rank: a measure of effective dimensionality", EUSIPCO 2007.
    Non-positive eigenvalues (zeros, and the rounding negatives of a PSD kernel) carry no mass and
    are left out; this equals the limit ``p_i log p_i -> 0`` for ``λ_i -> 0``.

    Raises:
        ValueError: empty input, NaN/Inf, or no positive eigenvalue.
    """
    lam = _eigs_f64(eigenvalues)
    pos = lam[lam > 0]
    if pos.numel() == 0:
        raise ValueError(
            "effective_rank needs at least one positive eigenvalue (got max "
            f"{float(lam.max()):.3g}): the kernel is zero or negative"
        )
    p = pos / pos.max()  # (scaled first: a sum of three 1e308s overflowed to a NaN rank)
    p = p[p > 0]  # (eigenvalues 1e330 times below the largest underflow to 0: 0·log 0 was NaN)
    p = p / p.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def spectral_density(
    eigenvalues: Tensor,
    *,
    bins: int = 50,
    log: bool = True,
    weights: Tensor | None = None,
    range: tuple[float, float] | None = None,
) -> tuple[Tensor, Tensor]:
    """Normalised histogram of a spectrum: ``(edges, density)``.

    ``density[j]`` is the fraction of eigenvalues (or of ``weights``, e.g. SLQ quadrature
    weights) in bin ``j`` divided by the bin width, so ``Σ density·diff(edges) = 1``.  With
    ``log=True`` (default) the histogram is over ``log10 λ``; non-positive eigenvalues have no
    logarithm and are left out with a warning that says how many.

    Args:
        eigenvalues: 1-D eigenvalues (or SLQ nodes).
        bins: number of bins.
        log: histogram ``log10 λ`` instead of ``λ``.
        weights: optional non-negative weights, same length as ``eigenvalues``.
        range: ``(low, high)`` of the histogram (in ``log10`` units when ``log``); default the
            data range. Values outside it are left out with a warning that says how many, and
            the density stays a fraction of *all* of them (``Σ density·diff(edges)`` is then
            the fraction inside), so spectra drawn on one shared range compare.

    Returns:
        ``edges`` ``(bins + 1,)`` and ``density`` ``(bins,)``, float64 CPU tensors.
    """
    _count("bins", bins)
    if range is not None:
        try:
            r_lo, r_hi = (float(v) for v in range)
        except (TypeError, ValueError):
            raise ValueError(f"range must be a pair (low, high), got {range!r}") from None
        if not (math.isfinite(r_lo) and math.isfinite(r_hi) and r_lo < r_hi):
            # (torch raised its own RuntimeError, or widened (1, 1) to (0.5, 1.5) silently)
            raise ValueError(f"range must be finite with low < high, got {range!r}")
    lam = _eigs_f64(eigenvalues)
    w = None
    if weights is not None:
        w = _eigs_f64(weights, "weights")
        if w.shape != lam.shape:
            raise ValueError(f"weights has shape {tuple(w.shape)}, expected {tuple(lam.shape)}")
        if bool((w < 0).any()):
            raise ValueError("weights must be non-negative")
    if log:
        keep = lam > 0
        n_drop = int((~keep).sum())
        if n_drop == lam.numel():
            raise ValueError("spectral_density(log=True) needs positive eigenvalues; got none")
        if n_drop:
            warnings.warn(
                f"spectral_density(log=True) leaves out {n_drop} non-positive eigenvalue(s) "
                f"(smallest {float(lam.min()):.3g}); use log=False to include them",
                stacklevel=external_stacklevel(),
            )
        lam = lam[keep].log10()
        if w is not None:
            w = w[keep]
    if w is not None and float(w.sum()) <= 0:
        raise ValueError("weights sum to zero")
    if range is None:
        lo, hi = float(lam.min()), float(lam.max())
        if hi <= lo:  # a single distinct value: centre a unit-width window on it
            lo, hi = lo - 0.5, hi + 0.5
        range = (lo, hi)
    lo, hi = float(range[0]), float(range[1])
    inside = (lam >= lo) & (lam <= hi)
    n_out = int((~inside).sum())
    total = float(w.sum()) if w is not None else float(lam.numel())
    if n_out:
        warnings.warn(
            f"spectral_density: {n_out} of {lam.numel()} values lie outside range={range} and "
            "are left out (the density is a fraction of all of them)",
            stacklevel=external_stacklevel(),
        )
    counts, edges = torch.histogram(lam, bins=bins, range=(lo, hi), weight=w)
    density = counts / (total * edges.diff())
    return edges, density


def _rademacher(n: int, k: int, gen: torch.Generator) -> Tensor:
    """±1 probes, drawn on the generator's device (a CUDA generator draws there), returned on
    the CPU."""
    draw = torch.randint(0, 2, (n, k), generator=gen, dtype=torch.float64, device=gen.device)
    return draw.mul_(2).sub_(1).cpu()


def slq_density(
    matvec: Callable[[Tensor], Tensor],
    n: int,
    *,
    n_probes: int = 8,
    n_steps: int = 30,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    probes: Tensor | None = None,
    deflate: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Stochastic Lanczos quadrature: nodes and weights of the spectral measure of ``K``.

    Runs ``n_probes`` independent single-vector Lanczos recursions side by side, so every step
    is one call ``matvec(V)`` with ``V`` of shape ``(n, n_probes)``: ``n_probes·n_steps``
    single-vector products in ``n_steps`` calls.  Each recursion is fully reorthogonalised (two
    Gram--Schmidt passes, hand-written because it is batched over probes) and stops early on
    breakdown (its Krylov space is invariant: the quadrature is then exact).

    Returns:
        ``(nodes, weights)``, float64 CPU tensors of equal length (``≤ n_probes·n_steps``):
        the quadrature nodes ``θ`` of all probes and their weights ``τ/n_probes`` (they sum to
        1 without deflation; with ``deflate``, the deflated pairs weigh 1/n each and the probes'
        weights are scaled by their mass outside them, so the sum is 1 only in expectation:
        0.98–1.02 measured).  ``Σ w f(θ)`` estimates ``tr f(K)/n``; see :func:`slq_trace`,
        :func:`slq_effective_rank`, and :func:`spectral_density` with ``weights=``.

    Args:
        matvec: ``(n, b) -> (n, b)`` products with the symmetric ``K``.
        n: dimension.
        n_probes: number of random probes (Rademacher, normalised).
        n_steps: Lanczos steps per probe (capped at ``n``).
        generator: random source for the probes (default: private generator seeded 0; the
            global RNG is untouched).
        dtype: working dtype of the vectors.
        device: working device of the vectors.
        probes: optional ``(n, n_probes)`` start vectors instead of random ones (normalised
            here); useful to reproduce an estimate.
        deflate: optional ``(values (k,), vectors (n, k))``: known eigenpairs (e.g. converged
            Ritz pairs of the top of the spectrum) taken out of the sampling. With ``Q`` the
            orthonormalised vectors and ``P = I - Q Qᵀ``, the result is the exact part
            ``Σ_i f(values_i)`` (each value a node of weight ``1/n``) plus SLQ on ``P K P`` from
            the projected probes ``P v``, weighted by ``‖P v̂‖²`` so that the estimate of
            ``tr(P f(K) P)`` stays unbiased. This is deflation as variance reduction (Gambhir,
            Stathopoulos & Orginos 2017, SIAM J. Sci. Comput. 39(2)): a few dominant eigenvalues
            (the rank-one spike of a ReLU NTK) otherwise dominate the Hutchinson variance. The
            pairs are taken as exact: a residual ``r_i`` shifts ``f(values_i)`` by about
            ``|f'|·r_i``.
    """
    _count("n", n)
    _count("n_steps", n_steps)
    if probes is None:
        _count("n_probes", n_probes)
        gen = generator
        if gen is None:
            gen = torch.Generator()
            gen.manual_seed(0)
        v = _rademacher(n, n_probes, gen)
    else:
        v = torch.as_tensor(probes).detach().to(dtype=torch.float64)
        if v.ndim == 1:
            v = v[:, None]
        if v.ndim != 2 or v.shape[0] != n:
            raise ValueError(f"probes must have shape (n, k) with n={n}, got {tuple(v.shape)}")
        if not bool(torch.isfinite(v).all()) or bool((v.norm(dim=0) == 0).any()):
            raise ValueError("probes must be finite and non-zero")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    dev = torch.device(device) if device is not None else v.device
    p = v.shape[1]
    v = v / v.norm(dim=0)
    probe_mass = torch.ones(p, dtype=torch.float64)
    apply = matvec
    exact_nodes = torch.zeros(0, dtype=torch.float64)
    steps = min(n_steps, n)
    if deflate is not None:
        exact_nodes, basis_q = _deflation_basis(deflate, n)
        if exact_nodes.numel() == n:  # everything is known: no sampling left
            return exact_nodes, torch.full((n,), 1.0 / n, dtype=torch.float64)
        v = v - basis_q @ (basis_q.T @ v)
        probe_mass = v.norm(dim=0).square()
        if bool((probe_mass <= 1e-24).any()):
            raise ValueError("a probe lies in the deflated subspace; use random probes")
        v = v / v.norm(dim=0)
        q_dev = basis_q.to(device=dev, dtype=dtype)

        def deflated(x: Tensor) -> Tensor:  # P K P
            x = x - q_dev @ (q_dev.T @ x)
            y = matvec(x)
            if not isinstance(y, Tensor) or y.shape != x.shape:
                return y  # let the shape check below report it
            y = y.detach().to(device=dev, dtype=dtype)
            return y - q_dev @ (q_dev.T @ y)

        apply = deflated
        steps = min(n_steps, n - exact_nodes.numel())
    q = v.to(device=dev, dtype=dtype)
    basis = torch.zeros(steps, n, p, dtype=dtype, device=dev)
    alpha = torch.zeros(steps, p, dtype=torch.float64)
    beta = torch.zeros(steps, p, dtype=torch.float64)
    length = torch.full((p,), steps, dtype=torch.long)
    active = torch.ones(p, dtype=torch.bool)
    eps = torch.finfo(dtype).eps
    scale = 0.0
    for j in range(steps):
        basis[j] = q
        w = apply(q)
        if not isinstance(w, Tensor) or w.shape != (n, p):
            raise ValueError(f"matvec must map an ({n}, {p}) tensor to ({n}, {p})")
        if not bool(torch.isfinite(w).all()):
            raise ValueError("matvec returned NaN or Inf")
        w = w.detach().to(device=dev, dtype=dtype)
        scale = max(scale, float(w.norm(dim=0).max()))
        a = (q * w).sum(0)
        alpha[j] = a.to(torch.float64).cpu()
        # full reorthogonalisation against each probe's own basis, twice
        for _ in range(2):
            c = torch.einsum("snp,np->sp", basis[: j + 1], w)
            w = w - torch.einsum("snp,sp->np", basis[: j + 1], c)
        if j + 1 == steps:
            break
        b = w.norm(dim=0)
        b64 = b.to(torch.float64).cpu()
        broke = active & (b64 <= 10 * eps * max(scale, 1e-300) * math.sqrt(n))
        length[broke] = j + 1
        active &= ~broke
        if not bool(active.any()):
            break
        beta[j] = torch.where(active, b64, torch.zeros_like(b64))
        act = active.to(dev)
        q = torch.where(act, w / torch.where(act, b, torch.ones_like(b)), torch.zeros_like(w))
    nodes, weights = [], []
    for i in range(p):
        k = int(length[i])
        t = torch.diag(alpha[:k, i])
        if k > 1:
            off = beta[: k - 1, i]
            t = t + torch.diag(off, 1) + torch.diag(off, -1)
        th, u = torch.linalg.eigh(t)
        nodes.append(th)
        weights.append(u[0].square() * probe_mass[i] / p)
    if exact_nodes.numel():
        nodes.insert(0, exact_nodes)
        weights.insert(0, torch.full_like(exact_nodes, 1.0 / n))
    return torch.cat(nodes), torch.cat(weights)


def _deflation_basis(deflate: tuple[Tensor, Tensor], n: int) -> tuple[Tensor, Tensor]:
    """Validated ``(values, orthonormal vectors)`` of ``deflate`` in float64 on the CPU."""
    try:
        values, vectors = deflate
    except (TypeError, ValueError):
        raise ValueError("deflate must be a pair (values (k,), vectors (n, k))") from None
    vals = torch.as_tensor(values).detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    vecs = torch.as_tensor(vectors).detach().to(device="cpu", dtype=torch.float64)
    if vecs.ndim == 1:
        vecs = vecs[:, None]
    if vals.numel() > n:
        raise ValueError(f"deflate has {vals.numel()} pairs, more than n = {n}")
    if vecs.ndim != 2 or vecs.shape != (n, vals.numel()):
        raise ValueError(
            f"deflate vectors must have shape (n, k) = ({n}, {vals.numel()}), "
            f"got {tuple(vecs.shape)}"
        )
    if not (bool(torch.isfinite(vals).all()) and bool(torch.isfinite(vecs).all())):
        raise ValueError("deflate values and vectors must be finite")
    q, r = torch.linalg.qr(vecs)
    diag = r.diagonal().abs()
    # (relative to the largest: all zero passed, and a zero vector became an arbitrary unit
    # vector taken as an exact eigenpair; review, session 22)
    if vals.numel() and (float(diag.max()) == 0.0 or float(diag.min()) < 1e-8 * float(diag.max())):
        raise ValueError("deflate vectors are zero or linearly dependent")
    return vals, q


def _nodes_and_weights(nodes: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    th = _eigs_f64(nodes, "nodes")
    w = _eigs_f64(weights, "weights")
    if th.shape != w.shape:
        raise ValueError("nodes and weights must have the same length")
    if bool((w < 0).any()):  # (quadrature weights are non-negative; they were taken as given)
        raise ValueError("weights must be non-negative")
    return th, w


def slq_trace(
    nodes: Tensor, weights: Tensor, n: int, fn: Callable[[Tensor], Tensor] | None = None
) -> float:
    """SLQ estimate of ``tr f(K) = n·Σ_k w_k f(θ_k)`` (``f`` = identity by default: the trace)."""
    th, w = _nodes_and_weights(nodes, weights)
    vals = th if fn is None else torch.as_tensor(fn(th), dtype=torch.float64)
    return float(n * (w * vals).sum())


def slq_effective_rank(nodes: Tensor, weights: Tensor, n: int) -> float:
    r"""SLQ estimate of :func:`effective_rank` of the ``n x n`` kernel.

    With ``S = tr K`` and ``E = tr(K log K)`` (positive eigenvalues only),
    ``H(p) = log S - E/S``, so ``erank = S·exp(-E/S)``.  Both traces are SLQ estimates,
    ``S ≈ n·s`` and ``E ≈ n·e`` with ``s = Σ w θ`` and ``e = Σ w θ log θ`` over positive nodes,
    so ``erank ≈ n·s·exp(-e/s)``.  A ratio of estimates: slightly biased, consistent as the
    number of probes grows.
    """
    th, w = _nodes_and_weights(nodes, weights)
    pos = th > 0
    s = float((w[pos] * th[pos]).sum())
    if s <= 0:
        raise ValueError("slq_effective_rank needs positive quadrature nodes with weight")
    e = float((w[pos] * th[pos] * th[pos].log()).sum())
    return n * s * math.exp(-e / s)
