r"""The paper's two-layer NTK analysis, reproduced and checked.

Reference: *The Devil is in the Condition Numbers: Why is GLU Better than non-GLU Structure?*
(equation numbers below follow the paper's appendix).

Models (paper, Sec. 3 / App. B, with no $1/\sqrt{m}$ in the forward pass)

* ReLU: $z(x) = V\,\phi(Wx)$, ReGLU: $z(x) = V\,(\phi(Wx) \odot Ux)$,
  $\phi = \mathrm{ReLU}$, $W, U \in \mathbb{R}^{m\times d}$ with entries
  $\mathcal{N}(0, 1/d)$, $V \in \mathbb{R}^{1\times m}$ with entries
  $\mathcal{N}(0, 1/m)$, inputs $x \sim \mathcal{N}(0, I_d)$.

With this parameterisation the NTK (gradients w.r.t. all of W, U, V, no learning-rate scaling)
has the paper's coefficients exactly; we checked the derivation term by term:

* ReLU (Lemma, eq. 10): $K = \alpha XX^\top + \beta rr^\top + \gamma D$ with
  $\alpha = \tfrac14 + \tfrac{m}{4d}$, $\beta = \tfrac{m}{2\pi d}$,
  $\gamma = \tfrac14 + \tfrac{m}{4d} - \tfrac{m}{2\pi d}$.
* ReGLU (eq. 11): $\tilde K = \tilde\alpha (XX^\top)\odot(XX^\top) +
  \tilde\beta (rr^\top)\odot(XX^\top) + \tilde\gamma D^2$ with
  $\tilde\alpha = \tfrac{m}{4d^2} + \tfrac{1}{2d}$,
  $\tilde\beta = \tfrac{1}{2\pi d} + \tfrac{m}{2\pi d^2}$,
  $\tilde\gamma = \tfrac{1}{2d} - \tfrac{1}{2\pi d} + \tfrac{m}{4d^2} - \tfrac{m}{2\pi d^2}$.

Here $r_i = \lVert x_i\rVert$ and $D = \mathrm{diag}(\lVert x_i\rVert^2)$: these are
the only definitions under which eq. (10)/(11) reproduce the diagonal and off-diagonal entries of
eq. (14)/(15) (diagonal $(\tfrac{m}{2d} + \tfrac12)\lVert x_i\rVert^2$ and
$(\tfrac{m}{2d^2} + \tfrac1d)\lVert x_i\rVert^4$).

The closed forms for the extreme eigenvalues (Thms. on $\lambda_1$ and $\lambda_n$)
are `paper_lambda_max` and `paper_lambda_min`; Prop. 4.1's linearised loss is
`expected_loss_curve`. `empirical_ntk` is the exact NTK of a finite network from the
analytic gradients of "step 1" of the paper's proof (independent of autograd), and
`expected_ntk` its infinite-width expectation from the arc-cosine kernels (Cho & Saul)
before the Taylor expansion. `theory_table` / `crossing_experiment` put them side by
side (used by ``examples/two_layer_ntk.py`` and ``glu-probe theory``).
"""

from __future__ import annotations

import decimal
import io
import itertools
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, overload

import numpy as np
import torch
from torch import Tensor, nn

from ._rng import stream_seed
from ._warnings import external_stacklevel
from .activation_math import act as _act
from .activation_math import act_grad as _act_grad

__all__ = [
    "DENSE_KINDS",
    "GATED_KINDS",
    "KINDS",
    "PAPER_KINDS",
    "Bounds",
    "KernelCoefficients",
    "TwoLayer",
    "crossing_experiment",
    "crossing_hypotheses",
    "crossing_verdicts",
    "empirical_ntk",
    "expected_loss_curve",
    "expected_ntk",
    "format_crossing_table",
    "format_theory_table",
    "gaussian_inputs",
    "linearized_train",
    "make_target",
    "mean_crossings",
    "nngp_kernel",
    "paper_coefficients",
    "paper_condition_number",
    "paper_kernel",
    "paper_lambda_max",
    "paper_lambda_min",
    "predict_crossing",
    "theory_table",
    "theory_verdicts",
    "train_two_layer",
    "two_layer",
]

# kind -> (activation name, gated?)
_KIND_SPEC: dict[str, tuple[str, bool]] = {
    "relu": ("relu", False),
    "gelu": ("gelu", False),
    "silu": ("silu", False),
    "reglu": ("relu", True),
    "glu": ("sigmoid", True),
    "swiglu": ("silu", True),
    "geglu": ("gelu", True),
    "bilinear": ("identity", True),
}
KINDS: tuple[str, ...] = tuple(_KIND_SPEC)
"""Every model kind `two_layer` builds."""
DENSE_KINDS: tuple[str, ...] = tuple(k for k, (_, g) in _KIND_SPEC.items() if not g)
"""Non-gated kinds: $z = V\\phi(Wx)$."""
GATED_KINDS: tuple[str, ...] = tuple(k for k, (_, g) in _KIND_SPEC.items() if g)
"""Gated kinds: $z = V(\\phi(Wx) \\odot Ux)$."""
PAPER_KINDS: tuple[str, ...] = ("relu", "reglu")
"""The kinds the paper has closed forms for."""


def _check_kind(kind: str, allowed: Sequence[str] = KINDS) -> tuple[str, bool]:
    if kind not in allowed:
        extra = ""
        if kind in _KIND_SPEC:
            extra = (
                " The paper's closed forms exist only for 'relu' and 'reglu'; for other kinds use "
                "expected_ntk() or empirical_ntk()."
            )
        raise ValueError(f"unknown kind {kind!r}; expected one of {list(allowed)}.{extra}")
    return _KIND_SPEC[kind]


def _check_pos_int(**kw: Any) -> None:
    for name, v in kw.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


# Random streams of the experiments: glu_probe._rng.stream_seed keys (experiment, role, ...).
_CROSS_INPUTS, _CROSS_TARGET, _CROSS_NETWORK = (0, 0), (0, 1), (0, 2)  # crossing_experiment
_TABLE_INPUTS, _TABLE_NETWORK = (1, 0), (1, 1)  # theory_table


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


class TwoLayer(nn.Module):
    r"""The paper's two-layer network: $z(x) = V\phi(Wx)$ or
    $z(x) = V(\phi(Wx)\odot Ux)$.

    Attributes ``W``, ``U`` (``None`` for dense kinds) and ``V`` are `torch.nn.Linear`
    layers (``W.weight``: (m, d), ``V.weight``: (out, m)). Build it with `two_layer`.
    """

    U: nn.Linear | None

    def __init__(
        self,
        kind: str,
        d: int,
        m: int,
        out: int = 1,
        bias: bool = False,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        act, gated = _check_kind(kind)
        _check_pos_int(d=d, m=m, out=out)
        self.kind, self.activation, self.gated = kind, act, gated
        self.d, self.m, self.out, self.bias = d, m, out, bias
        fk: dict[str, Any] = {"dtype": dtype, "device": device}
        self.W = nn.Linear(d, m, bias=bias, **fk)
        self.U = nn.Linear(d, m, bias=bias, **fk) if gated else None
        self.V = nn.Linear(m, out, bias=bias, **fk)

    def hidden(self, x: Tensor) -> Tensor:
        """The hidden features $\\phi(Wx)$ (or $\\phi(Wx)\\odot Ux$)."""
        h = _act(self.activation, self.W(x))
        if self.U is not None:
            h = h * self.U(x)
        return h

    def forward(self, x: Tensor) -> Tensor:
        return self.V(self.hidden(x))

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, d={self.d}, m={self.m}, out={self.out}, bias={self.bias}"


def two_layer(
    kind: str,
    d: int,
    m: int,
    *,
    out: int = 1,
    bias: bool = False,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> TwoLayer:
    r"""Build the paper's two-layer model with the paper's initialisation.

    ``kind``: ``"relu"`` ($z = V\phi(Wx)$, the paper's non-GLU model), ``"reglu"``
    ($z = V(\phi(Wx)\odot Ux)$, the paper's GLU model), and as extensions the dense
    ``"gelu"``, ``"silu"`` and the gated ``"glu"`` (sigmoid), ``"swiglu"``, ``"geglu"``,
    ``"bilinear"`` (identity).

    Initialisation (paper): $W_{ks}, U_{ks} \sim \mathcal{N}(0, 1/d)$,
    $V_{ok} \sim \mathcal{N}(0, 1/m)$; biases (only with ``bias=True``, not in the paper)
    start at zero. There is no $1/\sqrt m$ factor in the forward pass: this is the
    parameterisation whose NTK has the paper's $\alpha,\beta,\gamma$ (see the module doc).

    ``generator`` or ``seed`` (not both) make the draw reproducible without touching the global
    RNG.
    """
    if generator is not None and seed is not None:
        raise ValueError("pass either generator or seed, not both")
    if seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    dev = torch.device("cpu" if device is None else device)
    # nn.Linear's own (discarded) init draws from the global RNG: fork it so building a model
    # never changes the caller's random stream.
    forked = (
        [dev.index if dev.index is not None else torch.cuda.current_device()]
        if dev.type == "cuda"
        else []
    )
    with torch.random.fork_rng(devices=forked, device_type=dev.type):
        model = TwoLayer(kind, d, m, out, bias, dtype=dtype, device=dev)

    def draw(shape: tuple[int, ...], std: float) -> Tensor:
        where = generator.device if generator is not None else "cpu"  # a CUDA generator too
        return torch.randn(shape, generator=generator, dtype=torch.float64, device=where) * std

    with torch.no_grad():
        model.W.weight.copy_(draw((m, d), 1.0 / math.sqrt(d)))
        if model.U is not None:
            model.U.weight.copy_(draw((m, d), 1.0 / math.sqrt(d)))
        model.V.weight.copy_(draw((out, m), 1.0 / math.sqrt(m)))
        for lin in (model.W, model.U, model.V):
            if lin is not None and lin.bias is not None:
                lin.bias.zero_()
    return model


def gaussian_inputs(
    n: int, d: int, *, seed: int | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """The paper's inputs: ``n`` rows $x_i \\sim \\mathcal{N}(0, I_d)$, float64."""
    _check_pos_int(n=n, d=d)
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    return torch.randn(n, d, generator=generator, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Closed forms
# ---------------------------------------------------------------------------------------------


class KernelCoefficients(NamedTuple):
    """The paper's (alpha, beta, gamma): ReLU eq. 10, or (alpha~, beta~, gamma~): ReGLU eq. 11."""

    alpha: float
    beta: float
    gamma: float


class Bounds(NamedTuple):
    """A closed-form two-sided estimate ``lower <~ value <~ upper`` (a tuple: unpacks)."""

    lower: float
    upper: float

    @property
    def mid(self) -> float:
        """Arithmetic midpoint of the bounds."""
        return 0.5 * (self.lower + self.upper)

    def contains(self, value: float) -> bool:
        """Whether ``lower <= value <= upper``."""
        return self.lower <= value <= self.upper


def paper_coefficients(kind: str, d: int, m: int) -> KernelCoefficients:
    r"""The paper's kernel coefficients.

    ReLU (eq. 10): $\alpha = \tfrac14 + \tfrac{m}{4d}$, $\beta = \tfrac{m}{2\pi d}$,
    $\gamma = \tfrac14 + \tfrac{m}{4d} - \tfrac{m}{2\pi d}$.

    ReGLU (eq. 11): $\tilde\alpha = \tfrac{m}{4d^2} + \tfrac{1}{2d}$,
    $\tilde\beta = \tfrac{1}{2\pi d} + \tfrac{m}{2\pi d^2}$,
    $\tilde\gamma = \tfrac{1}{2d} - \tfrac{1}{2\pi d} + \tfrac{m}{4d^2}
    - \tfrac{m}{2\pi d^2}$.
    """
    _check_kind(kind, PAPER_KINDS)
    _check_pos_int(d=d, m=m)
    pi = math.pi
    if kind == "relu":
        return KernelCoefficients(
            alpha=0.25 + m / (4 * d),
            beta=m / (2 * pi * d),
            gamma=0.25 + m / (4 * d) - m / (2 * pi * d),
        )
    return KernelCoefficients(
        alpha=m / (4 * d**2) + 1 / (2 * d),
        beta=1 / (2 * pi * d) + m / (2 * pi * d**2),
        gamma=1 / (2 * d) - 1 / (2 * pi * d) + m / (4 * d**2) - m / (2 * pi * d**2),
    )


def _as_inputs(X: Tensor | np.ndarray) -> Tensor:
    Xt = torch.as_tensor(X).detach().to(torch.float64)
    if Xt.dim() != 2:
        raise ValueError(f"X must be a 2-D (n, d) matrix of inputs, got shape {tuple(Xt.shape)}")
    if Xt.shape[0] < 1 or Xt.shape[1] < 1:
        raise ValueError(f"X must have at least one row and one column, got {tuple(Xt.shape)}")
    if not torch.isfinite(Xt).all():
        raise ValueError("X contains NaN or inf")
    return Xt


def paper_kernel(kind: str, X: Tensor | np.ndarray, m: int) -> Tensor:
    r"""The paper's approximate NTK matrix (float64, (n, n)).

    ReLU (eq. 10): $K = \alpha XX^\top + \beta rr^\top + \gamma D$.
    ReGLU (eq. 11): $\tilde K = \tilde\alpha (XX^\top)\odot(XX^\top) +
    \tilde\beta (rr^\top)\odot(XX^\top) + \tilde\gamma D^2$,
    with $r_i = \lVert x_i\rVert$, $D = \mathrm{diag}(\lVert x_i\rVert^2)$ and the
    coefficients of `paper_coefficients` (``d`` = number of columns of ``X``).

    This is the Taylor expansion in $\rho_{ij}$ of the infinite-width kernel, first order for
    ReLU and second order for ReGLU (eq. 14/15 with the ReLU $\rho_{ij}^2$ term dropped);
    `expected_ntk` is the kernel before that approximation.
    """
    Xt = _as_inputs(X)
    _check_pos_int(m=m)
    a, b, c = paper_coefficients(kind, Xt.shape[1], m)
    G = Xt @ Xt.T
    r = Xt.norm(dim=1)
    D = torch.diag(r * r)
    if kind == "relu":
        return a * G + b * torch.outer(r, r) + c * D
    return a * G * G + b * torch.outer(r, r) * G + c * D * D


@overload
def paper_lambda_max(kind: Literal["relu"], d: int, m: int, n: int) -> float: ...
@overload
def paper_lambda_max(kind: Literal["reglu"], d: int, m: int, n: int) -> Bounds: ...
@overload
def paper_lambda_max(kind: str, d: int, m: int, n: int) -> float | Bounds: ...
def paper_lambda_max(kind: str, d: int, m: int, n: int) -> float | Bounds:
    r"""The paper's closed form for the largest NTK eigenvalue (Thm. on $\lambda_1$).

    ReLU: $\lambda_1(K) \approx \tfrac{m}{2\pi} n + \tfrac d2 + \tfrac{(\pi-1)m}{2\pi}$
    (returns a float).

    ReGLU: $(\tfrac{m}{4d} + \tfrac12) n + \tfrac m2 - \tfrac{m}{2\pi} + d - \tfrac{d}{2\pi}
    \lesssim \lambda_1(\tilde K) \lesssim (\tfrac{m}{4d} + \tfrac{m}{2\pi d} + \tfrac12 +
    \tfrac{1}{2\pi}) n + \tfrac m2 + d$ (returns `Bounds`).

    Both come from replacing $\lVert x_i\rVert^2$ by $d$ (law of large numbers) and
    Weyl's inequality; they are approximations ($\approx$, $\lesssim$), not certified
    bounds.
    """
    _check_kind(kind, PAPER_KINDS)
    _check_pos_int(d=d, m=m, n=n)
    pi = math.pi
    if kind == "relu":
        return m / (2 * pi) * n + d / 2 + (pi - 1) * m / (2 * pi)
    lower = (m / (4 * d) + 0.5) * n + m / 2 - m / (2 * pi) + d - d / (2 * pi)
    upper = (m / (4 * d) + m / (2 * pi * d) + 0.5 + 1 / (2 * pi)) * n + m / 2 + d
    return Bounds(lower, upper)


def paper_lambda_min(kind: str, d: int, m: int, n: int) -> float:
    r"""The paper's closed form for the smallest NTK eigenvalue (Thm. on $\lambda_n$).

    ReLU: $\lambda_n(K) \approx \tfrac{m+d}{4}(s^2+1) - \tfrac{m}{2\pi}$;
    ReGLU: $\lambda_n(\tilde K) \approx \tfrac{m+2d}{4}(\tilde s^2+1) +
    \tfrac{m+d}{2\pi}(s^2-1)$, with $s = \max(0, 1-\sqrt{n/d})$ (the Marchenko-Pastur
    edge of $XX^\top$: $n$ samples of $d$ features) and $\tilde s = \max(0, 1-\sqrt{2n}/d)$
    (the same edge for $(XX^\top)\odot(XX^\top)$, whose rows $x_i\otimes x_i$ have about
    $d^2/2$ distinct features: $\sqrt{n/(d^2/2)} = \sqrt{2n}/d$).

    The paper's extracted text prints $\tilde s$ as "1 − √ 2n/d", which also reads as
    $1-\sqrt{2n/d}$; that reading puts $\tilde s = 0$ for every $n \ge d/2$ (where the
    Hadamard square is still far from singular). Against $\lambda_{min}$ of the proof's own
    kernel ($\tilde\alpha G\odot G + \tilde\beta d\,G + \tilde\gamma d^2 I$, $G = XX^\top$,
    $X$ = ``gaussian_inputs(n, d, seed=5)``) on $m \in \{200, 2000\}$,
    $n \in \{20, 40, 200, 800\}$ (session 21 review, re-measured in session 27;
    ``tests/test_theory.py``, ``tests/test_theory_s27.py``) that reading was 24–65% below it for
    $d \in \{100, 300\}$, where the formula with $1-\sqrt{2n}/d$ is within +3% … +30%; at
    $d = 10$ it was 22–23% below at $n = 20$ and 7–8% below at $n = 40$ (this formula: ±5%),
    and for $n \ge d^2/2 = 50$ both readings give $\tilde s = 0$, the same value.
    """
    _check_kind(kind, PAPER_KINDS)
    _check_pos_int(d=d, m=m, n=n)
    pi = math.pi
    s = max(0.0, 1.0 - math.sqrt(n / d))
    if kind == "relu":
        return (m + d) / 4 * (s * s + 1) - m / (2 * pi)
    st = max(0.0, 1.0 - math.sqrt(2 * n) / d)
    return (m + 2 * d) / 4 * (st * st + 1) + (m + d) / (2 * pi) * (s * s - 1)


@overload
def paper_condition_number(kind: Literal["relu"], d: int, m: int, n: int) -> float: ...
@overload
def paper_condition_number(kind: Literal["reglu"], d: int, m: int, n: int) -> Bounds: ...
@overload
def paper_condition_number(kind: str, d: int, m: int, n: int) -> float | Bounds: ...
def paper_condition_number(kind: str, d: int, m: int, n: int) -> float | Bounds:
    r"""$\kappa = \lambda_1/\lambda_n$ from `paper_lambda_max` and
    `paper_lambda_min`: a float for ReLU, `Bounds` (from the $\lambda_1$
    bounds) for ReGLU."""
    lmax = paper_lambda_max(kind, d, m, n)
    lmin = paper_lambda_min(kind, d, m, n)
    if isinstance(lmax, Bounds):
        return Bounds(lmax.lower / lmin, lmax.upper / lmin)
    return lmax / lmin


# ---------------------------------------------------------------------------------------------
# Exact finite-width and infinite-width kernels
# ---------------------------------------------------------------------------------------------


def empirical_ntk(
    model: TwoLayer,
    X: Tensor | np.ndarray,
    *,
    output: Literal["pntk", "full"] = "pntk",
    params: Iterable[str] | None = None,
) -> Tensor:
    r"""The exact NTK of a `two_layer` model from its analytic gradients, in float64.

    Step 1 of the paper's proof, written for all kinds, ``out`` outputs and optional biases. With
    pre-activations $p_k(x) = W_k x (+b^W_k)$, gate/feature
    $h_k = \phi(p_k)$ (dense) or $h_k = \phi(p_k)\,(U_k x + b^U_k)$ (gated):

    $$
    \partial z_o/\partial V_{o'k} = \delta_{oo'} h_k,\quad
    \partial z_o/\partial W_{ks} = V_{ok}\,\phi'(p_k)\,[U_k x]\,x_s,\quad
    \partial z_o/\partial U_{ks} = V_{ok}\,\phi(p_k)\,x_s,
    $$

    (the bracket only for gated kinds), so
    $K = \langle\nabla_V z_i,\nabla_V z_j\rangle + \langle\nabla_W z_i,\nabla_W z_j\rangle
    + \langle\nabla_U z_i,\nabla_U z_j\rangle$, e.g. for ReLU
    $K_{ij} = \sum_k \phi(W_kx_i)\phi(W_kx_j) + x_i^\top x_j \sum_k V_k^2
    \phi'(W_kx_i)\phi'(W_kx_j)$. A bias adds ``1`` to the $x_i^\top x_j$ factor of its
    layer (and ``1`` for the output bias).

    ``output="full"``: the (n*out, n*out) kernel of every output scalar, rows ordered
    ``i*out + o``; ``"pntk"`` (default, as in `glu_probe.ntk`): the kernel of
    $\sum_o z_o/\sqrt{out}$, (n, n). Identical for ``out == 1``.
    ``params``: parameter names (``"W.weight"``, ``"V.bias"``, ...) to differentiate w.r.t.;
    default every parameter with ``requires_grad``. Exact up to float64 round-off; this is the
    ground truth the autograd-based `glu_probe.ntk` is tested against.
    """
    if not isinstance(model, TwoLayer):
        raise TypeError(
            "empirical_ntk needs a model built by glu_probe.theory.two_layer(); for any other "
            f"model use glu_probe.ntk.ntk_matrix (got {type(model).__name__})"
        )
    if output not in ("pntk", "full"):
        raise ValueError(f"output must be 'pntk' or 'full', got {output!r}")
    named = dict(model.named_parameters())
    if params is None:
        chosen = {k for k, p in named.items() if p.requires_grad}
    else:
        chosen = set(params)
        unknown = chosen - set(named)
        if unknown:
            raise ValueError(f"unknown parameter names {sorted(unknown)}; valid: {sorted(named)}")
    Xt = _as_inputs(X)
    if Xt.shape[1] != model.d:
        raise ValueError(f"X has {Xt.shape[1]} features but the model expects d={model.d}")
    n, O = Xt.shape[0], model.out
    dd = torch.float64
    with torch.no_grad():
        W = model.W.weight.detach().to(dd).cpu()
        V = model.V.weight.detach().to(dd).cpu()
        pre = Xt @ W.T
        if model.W.bias is not None:
            pre = pre + model.W.bias.detach().to(dd).cpu()
        a, da = _act(model.activation, pre), _act_grad(model.activation, pre)
        if model.U is not None:
            u = Xt @ model.U.weight.detach().to(dd).cpu().T
            if model.U.bias is not None:
                u = u + model.U.bias.detach().to(dd).cpu()
            feat, gW, gU = a * u, da * u, a
        else:
            feat, gW, gU = a, da, None
        G = Xt @ Xt.T
        eyeO = torch.eye(O, dtype=dd)
        K = torch.zeros(n, O, n, O, dtype=dd)
        if "V.weight" in chosen:
            K += (feat @ feat.T)[:, None, :, None] * eyeO[None, :, None, :]
        if "V.bias" in chosen:
            K += eyeO[None, :, None, :]

        def hidden_block(g: Tensor, layer: str) -> None:
            factor = torch.zeros(n, n, dtype=dd)
            if f"{layer}.weight" in chosen:
                factor += G
            if f"{layer}.bias" in chosen:
                factor += 1.0
            if f"{layer}.weight" in chosen or f"{layer}.bias" in chosen:
                P = (g[:, None, :] * V[None, :, :]).reshape(n * O, -1)
                K.add_((P @ P.T).reshape(n, O, n, O) * factor[:, None, :, None])

        hidden_block(gW, "W")
        if gU is not None:
            hidden_block(gU, "U")
    if output == "full":
        return K.reshape(n * O, n * O)
    return K.sum(dim=(1, 3)) / O


_QUAD_HALF_WIDTH = 9.0  # standard-normal mass beyond |z| > 9 is ~2e-19
_QUAD_MAX_NODES = 801


def _trapezoid_nodes(sigma_max: float, nodes: int | None) -> tuple[Tensor, Tensor]:
    """Nodes/weights of the trapezoid rule for E[g(z)], z ~ N(0, 1), on [-9, 9].

    Hand-written on purpose: for a Gaussian-weighted integrand analytic in a strip the trapezoid
    rule converges like exp(-2 pi a / h) (Trefethen & Weideman 2014), much faster here than
    Gauss-Hermite, whose convergence is slow for sigmoid/erf-type factors (measured: 1e-4 relative
    error with 48 Gauss-Hermite nodes for GEGLU). With phi(sigma z): a strip of half-width
    a ~ pi/sigma for sigmoid/SiLU (poles at i*pi), and a growth exp(sigma^2 a^2 / 2) for GELU,
    giving an error ~ exp(-2 pi^2/(sigma h)) and exp(-2 pi^2/(h^2 (1 + sigma^2))); the automatic
    step keeps both below ~1e-16 (checked in the tests by doubling the nodes).
    """
    if nodes is None:
        sig = max(sigma_max, 1e-12)
        h = 0.9 * min(0.73 / math.sqrt(1 + sig * sig), 0.53 / sig)
        nodes = 2 * math.ceil(_QUAD_HALF_WIDTH / h) + 1
        if nodes > _QUAD_MAX_NODES:
            warnings.warn(
                f"inputs with ||x||/sqrt(d) up to {sigma_max:.3g} need {nodes} quadrature nodes "
                f"per dimension; using {_QUAD_MAX_NODES} (accuracy below float64 round-off is "
                "no longer guaranteed): rescale the inputs or pass quad_nodes",
                RuntimeWarning,
                stacklevel=external_stacklevel(),
            )
            nodes = _QUAD_MAX_NODES
    z = torch.linspace(-_QUAD_HALF_WIDTH, _QUAD_HALF_WIDTH, nodes, dtype=torch.float64)
    h = float(z[1] - z[0]) if nodes > 1 else 1.0
    w = h * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return z, w


def _gaussian_moments(act: str, X: Tensor, quad_nodes: int | None) -> tuple[Tensor, Tensor]:
    r"""$E[\phi(u)\phi(v)]$ and $E[\phi'(u)\phi'(v)]$ for
    $(u, v) = (w^\top x_i, w^\top x_j)$, $w \sim \mathcal N(0, I/d)$.

    ReLU: arc-cosine kernels of degree 1 and 0 (Cho & Saul 2009), as in the paper:
    $\tfrac{\sigma_i\sigma_j}{2\pi}(\sqrt{1-\rho^2} + (\pi-\arccos\rho)\rho)$ and
    $\tfrac{\pi - \arccos\rho}{2\pi}$, $\sigma_i = \lVert x_i\rVert/\sqrt d$.
    Identity: exact. Smooth activations (no closed form): a 2-D trapezoid rule over
    $u = \sigma_i z_1$, $v = \sigma_j(\rho z_1 + \sqrt{1-\rho^2} z_2)$, accurate to
    about float64 round-off (see `_trapezoid_nodes`).
    """
    d = X.shape[1]
    S = (X @ X.T) / d
    s = torch.sqrt(torch.clamp(torch.diagonal(S), min=0.0))
    ss = torch.outer(s, s)
    rho = torch.where(ss > 0, S / torch.where(ss > 0, ss, 1.0), torch.zeros_like(S)).clamp(-1, 1)
    # A point with itself: ρ = 1 exactly (rounded S/(σσ) can be 1 − 1 ulp, and arccos there
    # loses ~8 digits: the ReLU derivative kernel's diagonal came out 0.4999999976, not ½).
    diag = torch.arange(S.shape[0])
    rho[diag, diag] = torch.where(s > 0, 1.0, 0.0).to(rho.dtype)
    if act == "identity":
        return S, torch.ones_like(S)
    if act == "relu":
        theta = torch.arccos(rho)
        k1 = ss / (2 * math.pi) * (torch.sqrt(1 - rho * rho) + (math.pi - theta) * rho)
        k0 = (math.pi - theta) / (2 * math.pi)
        return k1, k0
    z, w = _trapezoid_nodes(float(s.max()), quad_nodes)
    ww = torch.outer(w, w)  # (Q, Q): z1 along dim 0, z2 along dim 1
    n, Q = X.shape[0], z.numel()
    iu, ju = torch.triu_indices(n, n)  # symmetric: evaluate each pair i <= j once
    E1 = torch.empty(iu.numel(), dtype=torch.float64)
    E0 = torch.empty(iu.numel(), dtype=torch.float64)
    chunk = max(1, int(2e6 // (Q * Q)))  # bounded memory: ~16 MB per temporary
    z1, z2 = z[None, :, None], z[None, None, :]
    for p0 in range(0, iu.numel(), chunk):
        i, j = iu[p0 : p0 + chunk], ju[p0 : p0 + chunk]
        r = rho[i, j][:, None, None]
        u = s[i][:, None, None] * z1  # (c, Q, 1)
        v = s[j][:, None, None] * (r * z1 + torch.sqrt(1 - r * r) * z2)  # (c, Q, Q)
        E1[p0 : p0 + chunk] = ((_act(act, u) * _act(act, v)) * ww).sum(dim=(1, 2))
        E0[p0 : p0 + chunk] = ((_act_grad(act, u) * _act_grad(act, v)) * ww).sum(dim=(1, 2))
    out = []
    for E in (E1, E0):
        M = torch.zeros(n, n, dtype=torch.float64)
        M[iu, ju] = E
        M[ju, iu] = E
        out.append(M)
    return out[0], out[1]


def expected_ntk(
    kind: str, X: Tensor | np.ndarray, m: int, *, quad_nodes: int | None = None
) -> Tensor:
    r"""The infinite-width expectation $E_\theta[K]$ of `empirical_ntk` at the paper's
    initialisation (no bias, ``out=1``), before any Taylor approximation, float64 (n, n).

    With $\kappa_1 = E_w[\phi(w^\top x_i)\phi(w^\top x_j)]$,
    $\kappa_0 = E_w[\phi'(w^\top x_i)\phi'(w^\top x_j)]$, $w\sim\mathcal N(0, I/d)$
    (arc-cosine kernels for ReLU, eq. 12-13; exact for the identity; a trapezoid rule accurate to
    ~1e-15 relative for GELU/SiLU/sigmoid, ``quad_nodes`` per dimension, automatic by default),
    and $G = XX^\top$:

    * dense: $E[K] = m\,\kappa_1 + G\odot\kappa_0$;
    * gated: $E[K] = m\,\kappa_1\odot G/d + G\odot G/d\odot\kappa_0 + G\odot\kappa_1$.

    A single network's NTK is an average of ``m`` i.i.d. unit contributions, so it deviates from
    this by $O(1/\sqrt m)$ relative (law of large numbers).
    """
    _, gated = _check_kind(kind)
    _check_pos_int(m=m)
    if quad_nodes is not None:
        _check_pos_int(quad_nodes=quad_nodes)
    Xt = _as_inputs(X)
    act = _KIND_SPEC[kind][0]
    k1, k0 = _gaussian_moments(act, Xt, quad_nodes)
    G = Xt @ Xt.T
    if not gated:
        return m * k1 + G * k0
    d = Xt.shape[1]
    return m * k1 * G / d + G * G / d * k0 + G * k1


def nngp_kernel(kind: str, X: Tensor | np.ndarray, *, quad_nodes: int | None = None) -> Tensor:
    r"""The covariance of the outputs at initialisation, $E_\theta[z(x_i) z(x_j)]$.

    Dense: $\kappa_1$; gated: $\kappa_1\odot XX^\top/d$ (notation of
    `expected_ntk`). This is the true $E[f_0 f_0^\top]$ entering the expected loss;
    Prop. 4.1 uses the NTK $K$ in its place (which is $\Theta(m)$ times larger).
    """
    _, gated = _check_kind(kind)
    if quad_nodes is not None:
        _check_pos_int(quad_nodes=quad_nodes)
    Xt = _as_inputs(X)
    k1, _ = _gaussian_moments(_KIND_SPEC[kind][0], Xt, quad_nodes)
    if not gated:
        return k1
    return k1 * (Xt @ Xt.T) / Xt.shape[1]


# ---------------------------------------------------------------------------------------------
# Prop. 4.1: linearised dynamics
# ---------------------------------------------------------------------------------------------


def _as_kernel(K: Tensor | np.ndarray, name: str = "K") -> Tensor:
    Kt = torch.as_tensor(K).detach().to(torch.float64).cpu()
    if Kt.dim() != 2 or Kt.shape[0] != Kt.shape[1]:
        raise ValueError(f"{name} must be a square (n, n) matrix, got shape {tuple(Kt.shape)}")
    if not torch.isfinite(Kt).all():
        raise ValueError(f"{name} contains NaN or inf")
    scale = float(Kt.abs().max()) if Kt.numel() else 0.0
    if float((Kt - Kt.T).abs().max()) > 1e-8 * max(scale, 1e-300):
        raise ValueError(f"{name} is not symmetric")
    return 0.5 * (Kt + Kt.T)


def _input_eps(X: Any) -> float:
    """Unit roundoff of ``X``'s floating dtype where it is narrower than float64, else 0."""
    dtype = getattr(X, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return torch.finfo(dtype).eps if dtype.is_floating_point and dtype.itemsize < 8 else 0.0
    if isinstance(dtype, np.dtype) and dtype.kind == "f" and dtype.itemsize < 8:
        return float(np.finfo(dtype).eps)
    return 0.0


def _check_psd_eigenvalues(lam: Tensor, name: str, what: str, input_eps: float = 0.0) -> None:
    # relative tolerance 1e-9 for float64 input; 10·eps of a narrower input's dtype (a float32
    # covariance, PSD up to its rounding, was refused at small n; review, session 27)
    tol = max(1e-9, 10.0 * input_eps) * max(float(lam.abs().max()), 1e-300) * lam.numel()
    if float(lam.min()) < -tol:
        raise ValueError(
            f"{name} is not positive semi-definite (smallest eigenvalue {float(lam.min()):.3e}); "
            f"{what} always is"
        )


def _eig_psd(K: Tensor, name: str = "K", input_eps: float = 0.0) -> tuple[Tensor, Tensor]:
    lam, vecs = torch.linalg.eigh(K)
    _check_psd_eigenvalues(lam, name, "an NTK matrix", input_eps)
    return lam.clamp(min=0.0), vecs


def _as_targets(Y: Tensor | np.ndarray, n: int, name: str = "Y") -> Tensor:
    Yt = torch.as_tensor(Y).detach().to(torch.float64).cpu()
    if Yt.dim() == 1:
        Yt = Yt[:, None]
    if Yt.dim() != 2 or Yt.shape[0] != n:
        raise ValueError(f"{name} must have shape (n,) or (n, k) with n={n}, got {tuple(Yt.shape)}")
    if not torch.isfinite(Yt).all():
        # (NaN targets gave NaN curves, and predict_crossing None: "no crossing"; review,
        # session 25)
        raise ValueError(f"{name} has NaN or Inf entries")
    return Yt


def _check_eta(eta: Any, name: str = "eta") -> float:
    """``eta`` as a float: a positive finite real scalar (int, float, Fraction, Decimal, numpy
    integer/float scalars, 0-d integer/float tensors and arrays, as ``0.5 / eigvalsh(K)[-1]``
    gives); bools, strings, complex numbers, timedeltas and arrays of more than one number are
    refused (True was taken as 1; review, session 25)."""
    if isinstance(eta, Tensor):
        real = eta.ndim == 0 and not eta.is_complex() and eta.dtype != torch.bool
    elif isinstance(eta, (np.ndarray, np.generic)):
        real = np.ndim(eta) == 0 and eta.dtype.kind in "iuf"
    else:
        real = isinstance(eta, (numbers.Real, decimal.Decimal)) and not isinstance(eta, bool)
    value = math.nan
    if real:
        try:
            value = float(eta)
        except (TypeError, ValueError, OverflowError, RuntimeError):  # (meta tensors, 1e400)
            value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {eta!r}")
    return value


def _check_reduction(reduction: Any) -> None:
    if reduction not in ("sum", "mean"):  # ("avg" was taken as "sum": review, session 25)
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def _check_eta_steps(eta: float, steps: int, lam_max: float) -> None:
    eta = _check_eta(eta)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    if eta * lam_max >= 2:
        what = "does not converge" if eta * lam_max == 2 else "diverges"
        warnings.warn(
            f"eta * lambda_max = {eta * lam_max:.3g} >= 2: kernel gradient descent {what} "
            f"(use eta < {2 / lam_max:.3g})",
            RuntimeWarning,
            stacklevel=external_stacklevel(),
        )


def _decay_curve(weights: Tensor, lam: Tensor, eta: float, steps: int) -> Tensor:
    """sum_i weights_i * |1 - eta*lam_i|^(2k), k = 0..steps, in chunks of k (bounded memory).

    The even power makes |.| exact; torch.pow of a non-negative base is accurate for any k
    (no repeated multiplication, no log of zero)."""
    base = (1.0 - eta * lam).abs()
    out = torch.empty(steps + 1, dtype=torch.float64)
    step = max(1, int(2**22 // max(1, lam.numel())))
    for k0 in range(0, steps + 1, step):
        k = torch.arange(k0, min(steps + 1, k0 + step), dtype=torch.float64)
        out[k0 : k0 + k.numel()] = (base[None, :] ** (2 * k[:, None])) @ weights
    return out


def expected_loss_curve(
    K: Tensor | np.ndarray,
    Y: Tensor | np.ndarray,
    eta: float,
    steps: int,
    *,
    init_cov: Tensor | np.ndarray | Literal["kernel"] | None = "kernel",
    reduction: Literal["sum", "mean"] = "sum",
) -> Tensor:
    r"""Prop. 4.1: $E[L_k] \propto \mathrm{Tr}[(I-\eta K)^{2k}K] + Y^\top(I-\eta K)^{2k}Y$,
    $k = 0..\text{steps}$ (float64 tensor of length ``steps + 1``).

    Derivation: kernel gradient descent on $L = \tfrac12\lVert f - Y\rVert^2$ with step
    $\eta$ gives $f_k - Y = (I-\eta K)^k (f_0 - Y)$, so with $E f_0 = 0$,
    $E f_0f_0^\top = C$: $E\lVert f_k - Y\rVert^2 = \mathrm{Tr}[(I-\eta K)^{2k}C] +
    Y^\top(I-\eta K)^{2k}Y$. The paper takes $C = K$ (``init_cov="kernel"``, default);
    pass the true output covariance (`nngp_kernel`) for the exact expectation, or ``None``
    for $f_0 = 0$; a matrix ``init_cov`` must be symmetric positive semi-definite (up to a
    relative $10^{-9} n$, or $10 n\varepsilon$ of a narrower input dtype, as ``K``), else
    ValueError. Step 0 is computed directly, $\lVert Y\rVert^2 + k\,\mathrm{Tr}\,C$, so
    curves from one start begin level. Computed from $K = \sum_i \lambda_i v_iv_i^\top$ as
    $\sum_i (v_i^\top C v_i + \lVert v_i^\top Y\rVert^2)|1-\eta\lambda_i|^{2k}$.
    ``reduction="mean"`` divides by ``n`` (the mean squared error). ``Y`` may be (n,) or (n, k)
    (k independent outputs, each with covariance C: the trace term is counted k times).
    Warns if $\eta\lambda_{max}\ge 2$ (divergence).
    """
    _check_reduction(reduction)
    Kt = _as_kernel(K)
    n = Kt.shape[0]
    Yt = _as_targets(Y, n)
    lam, vecs = _eig_psd(Kt, input_eps=_input_eps(K))
    _check_eta_steps(eta, steps, float(lam.max()))
    weights = ((vecs.T @ Yt) ** 2).sum(dim=1)
    start = (Yt**2).sum()
    if isinstance(init_cov, str):
        if init_cov != "kernel":
            raise ValueError(f"init_cov must be 'kernel', a matrix or None, got {init_cov!r}")
        weights = weights + lam * Yt.shape[1]
        start = start + Kt.diagonal().sum() * Yt.shape[1]
    elif init_cov is not None:
        C = _as_kernel(init_cov, "init_cov")
        if C.shape != Kt.shape:
            raise ValueError(f"init_cov has shape {tuple(C.shape)}, expected {tuple(Kt.shape)}")
        # (-10·I gave negative expected losses; review, session 27)
        lam_c = torch.linalg.eigvalsh(C)
        _check_psd_eigenvalues(lam_c, "init_cov", "a covariance matrix", _input_eps(init_cov))
        weights = weights + torch.einsum("ai,ab,bi->i", vecs, C, vecs) * Yt.shape[1]
        start = start + C.diagonal().sum() * Yt.shape[1]
    curve = _decay_curve(weights, lam, float(eta), int(steps))
    # Step 0 exactly, not through K's eigenbasis: two curves from one start (f0 = 0, one C)
    # then start level, where the rotation left them ~1e-14 apart and _crossing_step read a
    # 1-ulp lead as "b behind" (review, session 27)
    curve[0] = start
    return curve / n if reduction == "mean" else curve


def linearized_train(
    K: Tensor | np.ndarray,
    Y: Tensor | np.ndarray,
    eta: float,
    steps: int,
    *,
    f0: Tensor | np.ndarray | None = None,
    reduction: Literal["sum", "mean"] = "sum",
) -> Tensor:
    r"""Loss of kernel (linearised-network) gradient descent:
    $\lVert f_k - Y\rVert^2$ with $f_k - Y = (I-\eta K)^k(f_0 - Y)$, k = 0..steps.

    This is the prediction for one network (its actual $f_0$, default 0) in the lazy
    regime, with the same step rule as `train_two_layer` (GD on
    $\tfrac12\lVert f-Y\rVert^2$, step $\eta$). ``f0`` has the shape of ``Y`` ((n,) and (n, 1)
    are the same), else ValueError. ``reduction="mean"`` divides by n.
    """
    _check_reduction(reduction)
    Kt = _as_kernel(K)
    n = Kt.shape[0]
    Yt = _as_targets(Y, n)
    if f0 is None:
        R0 = -Yt
    else:
        F0 = _as_targets(f0, n, "f0")
        if F0.shape != Yt.shape:  # (they were broadcast against each other; review, session 27)
            raise ValueError(
                f"f0 and Y must have the same shape ((n,) and (n, 1) count as the same), got "
                f"{tuple(torch.as_tensor(f0).shape)} and {tuple(torch.as_tensor(Y).shape)}"
            )
        R0 = F0 - Yt
    lam, vecs = _eig_psd(Kt, input_eps=_input_eps(K))
    _check_eta_steps(eta, steps, float(lam.max()))
    weights = ((vecs.T @ R0) ** 2).sum(dim=1)
    curve = _decay_curve(weights, lam, float(eta), int(steps))
    curve[0] = (R0**2).sum()  # exactly (see expected_loss_curve)
    return curve / n if reduction == "mean" else curve


def _crossing_step(curve_a: Tensor | np.ndarray, curve_b: Tensor | np.ndarray) -> int | None:
    """First k with curve_b[k'] < curve_a[k'] for every k' >= k, provided curve_b > curve_a
    (strictly) at some earlier step (else there is no crossing and the answer is None). Ties say
    nothing about the order: leading ones (a shared start, as from one f0) do not make b "behind"
    (a b below from step 1 on was a crossing at step 1; review, session 27), and a tail where the
    two curves are equal (both decayed to 0.0, or to the same floor) is left out: a crossing at
    step 4 vanished once the horizon reached the underflow (review, session 25)."""
    a = torch.as_tensor(curve_a, dtype=torch.float64)
    b = torch.as_tensor(curve_b, dtype=torch.float64)
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(
            f"curves must be 1-D of equal length, got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    differ = (a != b).nonzero()
    if differ.numel() == 0:
        return None
    end = int(differ[-1]) + 1
    a, b = a[:end], b[:end]
    below = (b < a).tolist()
    if not below or not below[-1]:
        return None
    k = len(below) - 1
    while k > 0 and below[k - 1]:
        k -= 1
    return k if bool((b[:k] > a[:k]).any()) else None


def predict_crossing(
    K_a: Tensor | np.ndarray,
    K_b: Tensor | np.ndarray,
    Y: Tensor | np.ndarray,
    eta: float,
    steps: int,
    *,
    init_cov_a: Tensor | np.ndarray | Literal["kernel"] | None = "kernel",
    init_cov_b: Tensor | np.ndarray | Literal["kernel"] | None = "kernel",
) -> int | None:
    r"""The loss-crossing step predicted by Prop. 4.1.

    With $L^a_k, L^b_k$ from `expected_loss_curve` (same ``Y``, ``eta``), returns the
    first step $k \le$ ``steps`` from which $L^b$ stays strictly below $L^a$ up
    to ``steps``, provided $L^b > L^a$ (strictly) at some earlier step; ``None`` if there is no
    such crossing in the horizon (including when b is below from the start, or level with a and
    then below: a tie, such as a shared start, is not "behind"). A tail where the two curves are
    equal (both decayed to 0.0 in float64) is left out: it says nothing about the order.
    With ``K_a`` the non-GLU (ReLU) and ``K_b`` the GLU (ReGLU) kernel this is the crossing
    of the two Prop. 4.1 curves: ReLU ahead early, ReGLU overtaking. The paper's crossing
    *result* (App. C) derives it under further hypotheses, $Y^\top(K_a - K_b)Y \ge 0$,
    $d \ge 5$ and $n \ge 300$, which this function does not assume; `crossing_hypotheses`
    checks them.
    """
    Ka, Kb = _as_kernel(K_a, "K_a"), _as_kernel(K_b, "K_b")
    if Ka.shape != Kb.shape:
        raise ValueError(f"K_a and K_b differ in shape: {tuple(Ka.shape)} vs {tuple(Kb.shape)}")
    la = expected_loss_curve(Ka, Y, eta, steps, init_cov=init_cov_a)
    lb = expected_loss_curve(Kb, Y, eta, steps, init_cov=init_cov_b)
    return _crossing_step(la, lb)


def crossing_hypotheses(
    K_a: Tensor | np.ndarray, K_b: Tensor | np.ndarray, Y: Tensor | np.ndarray, d: int
) -> dict[str, Any]:
    r"""The hypotheses of the paper's crossing result (App. C, after Prop. 4.1) for kernels
    ``K_a`` (non-GLU, ReLU) and ``K_b`` (GLU, ReGLU) on targets ``Y`` of ``d``-dimensional inputs:
    $Y^\top(K_a - K_b)Y \ge 0$ (the non-GLU model leads early), $d \ge 5$ and $n \ge 300$.

    ``Y`` is one finite output column, (n,) or (n, 1) with n the kernels' size, and ``d`` a
    positive integer; anything else raises ValueError.
    Returns ``{"quadratic_form": Yᵀ(K_a − K_b)Y, "d": d, "n": n, "sign_ok", "d_ok", "n_ok",
    "all_hold"}``. A centred target (mean 0) removes ReLU's rank-one β·r rᵀ term from
    $Y^\top K_a Y$, which is what makes the form positive in the paper's argument: with the
    standardised targets of `crossing_experiment` it is often negative (in 8 of the 12 runs of
    docs/theory.md), and a crossing seen in such a run is one of the Prop. 4.1 curves, not an
    instance of the conditional result.
    """
    Ka, Kb = _as_kernel(K_a, "K_a"), _as_kernel(K_b, "K_b")
    if Ka.shape != Kb.shape:
        raise ValueError(f"K_a and K_b differ in shape: {tuple(Ka.shape)} vs {tuple(Kb.shape)}")
    # (a (3, 2) Y was flattened against 6 x 6 kernels, NaN gave sign_ok False, d = 7.9 was
    # stored as 7; review, session 27)
    _check_pos_int(d=d)
    n = Ka.shape[0]
    Yt = _as_targets(Y, n)
    if Yt.shape[1] != 1:
        raise ValueError(
            f"crossing_hypotheses takes one output column: Y of shape (n,) or (n, 1), "
            f"got {tuple(torch.as_tensor(Y).shape)}"
        )
    y = Yt[:, 0]
    q = float(y @ (Ka - Kb) @ y)
    out: dict[str, Any] = {"quadratic_form": q, "d": int(d), "n": n}
    # Python bools (a numpy d gave np.bool_, written to JSON as the string "False")
    out |= {"sign_ok": q >= 0, "d_ok": bool(d >= 5), "n_ok": n >= 300}
    out["all_hold"] = bool(out["sign_ok"] and out["d_ok"] and out["n_ok"])
    return out


def train_two_layer(
    model: nn.Module,
    X: Tensor | np.ndarray,
    Y: Tensor | np.ndarray,
    eta: float,
    steps: int,
    *,
    reduction: Literal["sum", "mean"] = "sum",
) -> Tensor:
    r"""Full-batch gradient descent on $L = \tfrac12\lVert f(X) - Y\rVert^2$:
    $\theta \leftarrow \theta - \eta\nabla_\theta L$ (the model is trained in place).

    Returns $\lVert f_k - Y\rVert^2$ for k = 0..steps (before each update; float64), the
    quantity `linearized_train` and `expected_loss_curve` predict with the same
    $\eta$ -- the linearisation of this update is exactly
    $f_{k+1} - Y = (I - \eta K)(f_k - Y)$. (A mean-squared-error loss
    $\tfrac{1}{2n}\lVert f-Y\rVert^2$ with learning rate $n\eta$ is the same update.)
    ``reduction="mean"`` divides the returned losses by n.
    """
    _check_reduction(reduction)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    p0 = params[0]
    Xt = torch.as_tensor(X).to(dtype=p0.dtype, device=p0.device)
    Yt = torch.as_tensor(Y).to(dtype=p0.dtype, device=p0.device)
    if Yt.dim() == 1:
        Yt = Yt[:, None]
    for name, t in (("X", Xt), ("Y", Yt)):
        if not torch.isfinite(t).all():  # (NaN losses without a word: review, session 25)
            raise ValueError(f"{name} has NaN or Inf entries")
    eta = _check_eta(eta)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    losses = torch.empty(steps + 1, dtype=torch.float64)
    for k in range(steps + 1):
        f = model(Xt)
        if f.shape != Yt.shape:
            raise ValueError(f"model output {tuple(f.shape)} does not match Y {tuple(Yt.shape)}")
        sq = ((f - Yt) ** 2).sum()
        losses[k] = float(sq.detach())
        if k == steps:
            break
        grads = torch.autograd.grad(0.5 * sq, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.sub_(eta * g)
    return losses / Xt.shape[0] if reduction == "mean" else losses


# ---------------------------------------------------------------------------------------------
# The reproduction table (examples/two_layer_ntk.py, `glu-probe theory`)
# ---------------------------------------------------------------------------------------------


def _extremes(K: Tensor) -> tuple[float, float, float]:
    """λ_max, λ_min and κ; κ = inf where λ_min is zero to rounding (at most λ_max·n·ε, the
    ``matrix_rank`` tolerance: a λ_min of +1.1e-16 gave κ = 1.6e17; review, session 25)."""
    lam = torch.linalg.eigvalsh(K)
    lmax, lmin = float(lam[-1]), float(lam[0])
    return lmax, lmin, (math.inf if _zero_to_rounding(lmin, lmax, K.shape[0]) else lmax / lmin)


def _zero_to_rounding(lmin: float, lmax: float, n: int) -> bool:
    """Whether ``lmin <= lmax * n * eps`` (float64), the floor of `_extremes`."""
    return lmin <= lmax * n * torch.finfo(torch.float64).eps


def _grid(v: int | Sequence[int], name: str) -> list[int]:
    vals = [v] if isinstance(v, (int, np.integer)) else list(v)
    if not vals:
        raise ValueError(f"{name} must not be empty")
    _check_pos_int(**{f"{name}[{i}]": x for i, x in enumerate(vals)})
    return [int(x) for x in vals]


def theory_table(
    d: int | Sequence[int],
    m: int | Sequence[int],
    n: int | Sequence[int],
    seed: int = 0,
    *,
    kinds: Sequence[str] = PAPER_KINDS,
) -> list[dict[str, Any]]:
    r"""Measure the NTK extremes against the paper, over the grid ``d x m x n``.

    For each setting the inputs $X \sim \mathcal N(0, I_d)^n$ are shared by both kinds (and by
    every ``m``) and one network per kind is drawn (`two_layer`). Each draw has its own random
    stream, derived from ``seed`` (a non-negative integer) and its role and setting by
    `numpy.random.SeedSequence` (spawn keys ``(1, 0, d, n)`` for ``X``, ``(1, 1, j, d, m, n)`` for
    the network of ``kinds[j]``), so draws of different roles, settings or seeds get unrelated
    streams (not offsets of one another, as before, when X could be a network's weights).
    Each row (one per setting and kind) holds $\lambda_{max}, \lambda_{min}, \kappa$ of

    * ``emp_*``: the exact empirical NTK (`empirical_ntk`),
    * ``inf_*``: the infinite-width kernel (`expected_ntk`),
    * ``ker_*``: the paper's approximate kernel (`paper_kernel`, eq. 10/11),
    * ``cf_*``: the paper's closed forms (`paper_lambda_max` / `paper_lambda_min`);
      for ReGLU ``cf_lambda_max`` is the bounds' midpoint, with ``cf_lambda_max_lower/upper``,
    * ``err_lambda_max`` / ``err_lambda_min`` / ``err_kappa``: signed relative error of the
      closed form vs the empirical value, (formula − emp) / emp (for ReGLU's $\lambda_{max}$: 0
      inside the bounds, else (nearer bound − emp) / emp, negative above the upper bound), and
      ``lambda_max_in_bounds``; ``err_lambda_min`` is ``inf`` where the measured
      $\lambda_{min}$ is zero to rounding, $\le \lambda_{max} n \varepsilon$ (a singular kernel,
      e.g. $n$ above the number of parameters; ``emp_kappa`` is then ``inf``), and then
      ``err_kappa`` is NaN (a finite formula against an infinite $\kappa$), printed ``nan`` by
      `format_theory_table`.
    """
    ds, ms, ns = _grid(d, "d"), _grid(m, "m"), _grid(n, "n")
    for k in kinds:
        _check_kind(k, PAPER_KINDS)
    rows: list[dict[str, Any]] = []
    for di, ni in itertools.product(ds, ns):
        X = gaussian_inputs(ni, di, seed=stream_seed(seed, *_TABLE_INPUTS, di, ni))
        for mi in ms:
            for j, kind in enumerate(kinds):
                net_seed = stream_seed(seed, *_TABLE_NETWORK, j, di, mi, ni)
                model = two_layer(kind, di, mi, seed=net_seed, dtype=torch.float64)
                row: dict[str, Any] = {"kind": kind, "d": di, "m": mi, "n": ni, "seed": seed}
                for tag, K in (
                    ("emp", empirical_ntk(model, X)),
                    ("inf", expected_ntk(kind, X, mi)),
                    ("ker", paper_kernel(kind, X, mi)),
                ):
                    lmax, lmin, kap = _extremes(K)
                    row |= {
                        f"{tag}_lambda_max": lmax,
                        f"{tag}_lambda_min": lmin,
                        f"{tag}_kappa": kap,
                    }
                cf_max = paper_lambda_max(kind, di, mi, ni)
                cf_min = paper_lambda_min(kind, di, mi, ni)
                emax, emin = row["emp_lambda_max"], row["emp_lambda_min"]
                if isinstance(cf_max, Bounds):
                    lo, hi = cf_max
                    row |= {"cf_lambda_max": cf_max.mid, "cf_lambda_max_lower": lo}
                    row |= {"cf_lambda_max_upper": hi, "lambda_max_in_bounds": lo <= emax <= hi}
                    # signed like the ReLU rows, (formula - emp) / emp with the nearer bound as
                    # the formula (it was unsigned; review, session 27)
                    nearer = hi if emax > hi else lo
                    row["err_lambda_max"] = 0.0 if lo <= emax <= hi else _rel_err(nearer, emax)
                else:
                    row |= {"cf_lambda_max": cf_max, "err_lambda_max": _rel_err(cf_max, emax)}
                row["cf_lambda_min"] = cf_min
                # (a formula λ_min <= 0, at d=1 say, predicts no finite κ; and a kernel that is 0
                # at d=m=n=1 divided by zero: review, session 22)
                row["cf_kappa"] = row["cf_lambda_max"] / cf_min if cf_min > 0 else math.nan
                # λ_min zero to rounding (the floor of _extremes, where emp_kappa is inf): a
                # +2.7e-32 gave an error of +1e34 % (review, session 27)
                singular = _zero_to_rounding(emin, emax, ni)
                row["err_lambda_min"] = math.inf if singular else _rel_err(cf_min, emin)
                row["err_kappa"] = _rel_err(row["cf_kappa"], row["emp_kappa"])
                rows.append(row)
    return rows


def _fmt(x: Any) -> str:
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, (int, np.integer)):
        return str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return f"{x:.4g}" if 1e-3 <= abs(x) < 1e6 or x == 0 else f"{x:.3e}"
    return str(x)


def _rel_err(value: float, reference: float) -> float:
    """``(value - reference) / reference``: ``inf`` against a measured value <= 0 (a singular
    kernel: its lambda_min is 0 up to rounding, so any positive formula is infinitely far off) and
    NaN, undefined, against an infinite or NaN one (a finite kappa formula against the infinite
    kappa of such a kernel)."""
    if not math.isfinite(reference):
        return math.nan
    return (value - reference) / reference if reference > 0 else math.inf


def _pct(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{100 * x:+.1f}%"


def _render(
    title: str, columns: Sequence[str], body: Sequence[Sequence[str]], markdown: bool
) -> str:
    if markdown:
        lines = [f"**{title}**", "", "| " + " | ".join(columns) + " |"]
        lines.append("|" + "|".join("---:" for _ in columns) + "|")
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right")
    for r in body:
        table.add_row(*r)
    buf = io.StringIO()
    Console(file=buf, width=max(100, 12 * len(columns)), color_system=None).print(table)
    return buf.getvalue()


def format_theory_table(rows: Sequence[dict[str, Any]], *, markdown: bool = False) -> str:
    """Render `theory_table` rows as text (a rich table, no colour) or a Markdown table.

    Columns: setting, then for $\\lambda_{max}$, $\\lambda_{min}$, $\\kappa$:
    empirical NTK / infinite-width kernel / paper kernel (eq. 10-11) / closed form and the
    closed form's relative error vs the empirical value."""
    cols = ["kind", "d", "m", "n"]
    for q in ("λmax", "λmin", "κ"):
        cols += [f"{q} emp", f"{q} inf", f"{q} kernel", f"{q} formula", f"{q} err"]
    body = []
    for r in rows:
        cf_max = (
            f"{_fmt(r['cf_lambda_max_lower'])}..{_fmt(r['cf_lambda_max_upper'])}"
            if "cf_lambda_max_lower" in r
            else _fmt(r["cf_lambda_max"])
        )
        body.append(
            [r["kind"], _fmt(r["d"]), _fmt(r["m"]), _fmt(r["n"])]
            + [_fmt(r[f"{t}_lambda_max"]) for t in ("emp", "inf", "ker")]
            + [cf_max, "in" if r.get("lambda_max_in_bounds") else _pct(r["err_lambda_max"])]
            + [_fmt(r[f"{t}_lambda_min"]) for t in ("emp", "inf", "ker", "cf")]
            + [_pct(r["err_lambda_min"])]
            + [_fmt(r[f"{t}_kappa"]) for t in ("emp", "inf", "ker", "cf")]
            + [_pct(r["err_kappa"])]
        )
    return _render("NTK extremes: empirical vs infinite-width vs paper", cols, body, markdown)


def theory_verdicts(rows: Sequence[dict[str, Any]]) -> list[str]:
    r"""Plain-language summary of `theory_table` rows: where the closed forms hold.

    One line per claim: the ReLU $\lambda_{max}$ formula's relative error range, how often
    the ReGLU $\lambda_{max}$ bounds contain the measured value, the $\lambda_{min}$
    formulas' error ranges, and whether the paper's headline ($\kappa$ smaller for ReGLU
    than for ReLU) holds for the measured kernels."""
    out: list[str] = []

    def rng(vals: list[float]) -> str:
        return f"{_pct(min(vals))} .. {_pct(max(vals))}"

    def ker_err(rs: list[dict[str, Any]]) -> list[float]:
        return [(r["cf_lambda_min"] - r["ker_lambda_min"]) / r["ker_lambda_min"] for r in rs]

    relu = [r for r in rows if r["kind"] == "relu"]
    reglu = [r for r in rows if r["kind"] == "reglu"]
    if relu:
        errs = [r["err_lambda_max"] for r in relu]
        worst = max(relu, key=lambda r: abs(r["err_lambda_max"]))
        out.append(
            f"ReLU lambda_max formula vs empirical NTK: error {rng(errs)} "
            f"(worst at d={worst['d']}, m={worst['m']}, n={worst['n']})."
        )
        out.append(
            "ReLU lambda_min formula vs empirical NTK: error "
            f"{rng([r['err_lambda_min'] for r in relu])}; vs the paper's own kernel: "
            f"{rng(ker_err(relu))}."
        )
    if reglu:
        inside = sum(bool(r["lambda_max_in_bounds"]) for r in reglu)
        ker_in = sum(
            r["cf_lambda_max_lower"] <= r["ker_lambda_max"] <= r["cf_lambda_max_upper"]
            for r in reglu
        )
        out.append(
            f"ReGLU lambda_max bounds contain the empirical value in {inside}/{len(reglu)} "
            f"settings and the paper kernel's in {ker_in}/{len(reglu)}."
        )
        out.append(
            "ReGLU lambda_min formula vs empirical NTK: error "
            f"{rng([r['err_lambda_min'] for r in reglu])}; vs the paper's own kernel: "
            f"{rng(ker_err(reglu))}."
        )
    pairs = {(r["d"], r["m"], r["n"]): r for r in relu}
    wins_emp = wins_cf = total = 0
    for r in reglu:
        a = pairs.get((r["d"], r["m"], r["n"]))
        if a is None:
            continue
        total += 1
        wins_emp += r["emp_kappa"] < a["emp_kappa"]
        wins_cf += r["cf_kappa"] < a["cf_kappa"]
    if total:
        out.append(
            f"kappa(ReGLU) < kappa(ReLU): measured in {wins_emp}/{total} settings, "
            f"closed forms in {wins_cf}/{total}."
        )
    return out


# ---------------------------------------------------------------------------------------------
# Prop. 4.1 experiment
# ---------------------------------------------------------------------------------------------


def make_target(
    X: Tensor, kind: Literal["teacher", "random"] = "teacher", *, seed: int = 0
) -> Tensor:
    r"""A regression target for ``X`` (float64, (n,)), standardised to mean 0 and variance 1.

    ``"teacher"``: a random width-64 tanh network $y = a^\top\tanh(Bx/\sqrt d)$ plus a
    quadratic term $x_1x_2$ (so the target has linear, quadratic and higher components);
    ``"random"``: i.i.d. $\mathcal N(0,1)$ labels.
    """
    Xt = _as_inputs(X)
    g = torch.Generator().manual_seed(int(seed))
    n, d = Xt.shape
    if n < 2:  # (one sample has no variance: the target was NaN; review, session 24)
        raise ValueError(f"make_target standardises over the samples and needs n >= 2, got {n}")
    if kind == "random":
        y = torch.randn(n, generator=g, dtype=torch.float64)
    elif kind == "teacher":
        B = torch.randn(64, d, generator=g, dtype=torch.float64)
        a = torch.randn(64, generator=g, dtype=torch.float64) / 8
        y = torch.tanh(Xt @ B.T / math.sqrt(d)) @ a
        if d >= 2:
            y = y + Xt[:, 0] * Xt[:, 1]
    else:
        raise ValueError(f"target must be 'teacher' or 'random', got {kind!r}")
    return (y - y.mean()) / y.std().clamp(min=1e-300)


@dataclass
class _Curves:
    paper: Tensor
    measured: Tensor
    nngp: Tensor
    linear: Tensor
    observed: Tensor


def crossing_experiment(
    d: int,
    m: int,
    n: int,
    *,
    seed: int = 0,
    steps: int = 2000,
    eta: float | None = None,
    eta_scale: float = 1.0,
    target: Literal["teacher", "random"] = "teacher",
    kinds: tuple[str, str] = ("relu", "reglu"),
    keep_curves: int = 0,
) -> dict[str, Any]:
    r"""Predicted vs observed loss crossing (Prop. 4.1) for one setting.

    Both models (``kinds[0]`` = a, ``kinds[1]`` = b; by default a = ReLU, the non-GLU model, and
    b = ReGLU, the GLU one; ``("reglu", "relu")`` asks whether ReLU overtakes ReGLU) are trained by
    `train_two_layer` with the same $\eta$ (default ``eta_scale / lambda_max`` of the
    larger of the two empirical NTKs) on the same $X\sim\mathcal N(0,I_d)^n$ and target.
    ``seed`` (a non-negative integer) fixes four independent random streams, derived by
    `numpy.random.SeedSequence` with spawn keys ``(0, 0)`` (inputs), ``(0, 1)`` (target) and
    ``(0, 2, i)`` (the network of ``kinds[i]``), unrelated to those of any other seed (before,
    seed s's target was seed s + 1's inputs), so runs over several seeds are independent draws
    (`mean_crossings` averages them). The streams do not depend on ``d, m, n``, ``steps`` or
    $\eta$: runs that differ only in ``eta_scale`` share their inputs, target and initial networks.
    Crossing steps (`predict_crossing` semantics: b overtakes a and stays ahead) from:

    * ``paper``: Prop. 4.1 with the paper's kernels (eq. 10/11) and $C = K$;
    * ``measured``: Prop. 4.1 with the measured empirical NTKs and $C = K$;
    * ``nngp``: the exact linearised expectation, $C$ = `nngp_kernel`;
    * ``linear``: `linearized_train` with each network's own $f_0$;
    * ``observed``: real gradient descent of the two networks.

    Returns a dict with ``crossing_<source>`` (int or None), ``eta``, kernel extremes, final
    mean-squared losses, ``hypotheses`` (`crossing_hypotheses` of the measured kernels, with the
    ReLU kernel as ``K_a`` whatever the order of ``kinds``: whether the paper's conditional
    crossing result applies to this setting), and with
    ``keep_curves > 0`` the curves (MSE) subsampled to that many points (``keep_curves > steps``
    keeps every step, as `mean_crossings` needs). ``n >= 2`` (the target is standardised).
    """
    _check_pos_int(d=d, m=m, n=n)
    # (checked before any training, and held as floats: a tensor eta came back in the results,
    # which then could not be written as JSON; review, session 25)
    eta_scale = _check_eta(eta_scale, "eta_scale")
    if eta is not None:
        eta = _check_eta(eta)
    bad = [k for k in kinds if k not in PAPER_KINDS]
    if len(kinds) == 2 and not bad and kinds[0] == kinds[1]:
        # (outputs are keyed by kind: the second network's overwrote the first's; review,
        # session 25)
        raise ValueError(
            f"crossing_experiment compares two different kinds, got kinds={tuple(kinds)!r}; "
            "for a same-kind control run train_two_layer on two seeds"
        )
    if len(kinds) != 2 or bad:
        # checked before any training: the "paper" source needs the paper's kernels
        raise ValueError(
            f"crossing_experiment compares with the paper's kernels, which exist for "
            f"{' and '.join(PAPER_KINDS)} only; got kinds={tuple(kinds)!r} (for other kinds, "
            "compare expected_loss_curve / linearized_train / train_two_layer directly)"
        )
    X = gaussian_inputs(n, d, seed=stream_seed(seed, *_CROSS_INPUTS))
    Y = make_target(X, target, seed=stream_seed(seed, *_CROSS_TARGET))
    models = [
        two_layer(k, d, m, seed=stream_seed(seed, *_CROSS_NETWORK, i), dtype=torch.float64)
        for i, k in enumerate(kinds)
    ]
    Ks = [empirical_ntk(mod, X) for mod in models]
    lmax = max(float(torch.linalg.eigvalsh(K)[-1]) for K in Ks)
    if eta is None:
        if not lmax > 0:  # every unit dead at init (tiny m): a bare ZeroDivisionError before
            raise ValueError(
                f"crossing_experiment: both networks' NTKs are 0 at init (d={d}, m={m}, n={n}: "
                "no unit active on any input), so the default eta = eta_scale / lambda_max is "
                "undefined; use a larger width m or give eta"
            )
        eta = eta_scale / lmax
    with torch.no_grad():
        f0 = [mod(X)[:, 0] for mod in models]
    sources: dict[str, Callable[[int, str], Tensor]] = {
        "paper": lambda i, k: expected_loss_curve(paper_kernel(k, X, m), Y, eta, steps),
        "measured": lambda i, k: expected_loss_curve(Ks[i], Y, eta, steps),
        "nngp": lambda i, k: expected_loss_curve(Ks[i], Y, eta, steps, init_cov=nngp_kernel(k, X)),
        "linear": lambda i, k: linearized_train(Ks[i], Y, eta, steps, f0=f0[i]),
        "observed": lambda i, k: train_two_layer(models[i], X, Y, eta, steps),
    }
    curves = {name: [fn(i, k) / n for i, k in enumerate(kinds)] for name, fn in sources.items()}
    out: dict[str, Any] = {"d": int(d), "m": int(m), "n": int(n), "seed": seed, "steps": steps}
    out |= {"eta": eta, "kinds": list(kinds), "target": target, "eta_lambda_max": eta * lmax}
    for i, (k, K) in enumerate(zip(kinds, Ks, strict=True)):
        lmx, lmn, kap = _extremes(K)
        out[f"{k}_lambda_max"], out[f"{k}_lambda_min"], out[f"{k}_kappa"] = lmx, lmn, kap
        out[f"{k}_final_mse_observed"] = float(curves["observed"][i][-1])
        out[f"{k}_final_mse_linear"] = float(curves["linear"][i][-1])
    for name, (ca, cb) in curves.items():
        out[f"crossing_{name}"] = _crossing_step(ca, cb)
    # The paper's hypothesis is Yᵀ(K_ReLU − K_ReGLU)Y >= 0 whichever model is "a" here (with
    # kinds=("reglu", "relu") the form was computed with the kernels swapped; review, session 27).
    i_relu = list(kinds).index("relu")
    out["hypotheses"] = crossing_hypotheses(Ks[i_relu], Ks[1 - i_relu], Y, d)
    if keep_curves > 0:
        idx = torch.unique(torch.linspace(0, steps, keep_curves).round().long())
        out["curve_steps"] = idx.tolist()
        out["curves"] = {
            name: {k: c[idx].tolist() for k, c in zip(kinds, pair, strict=True)}
            for name, pair in curves.items()
        }
    return out


def format_crossing_table(results: Sequence[dict[str, Any]], *, markdown: bool = False) -> str:
    """Render `crossing_experiment` results: one row per setting, the crossing step from
    each source, $\\eta\\lambda_{max}$ and the final observed MSE of both models."""
    seed_key = "seeds" if results and "seeds" in results[0] else "seed"
    cols = ["d", "m", "n", seed_key, "steps", "ηλmax", "paper", "measured K", "nngp C"]
    cols += ["linear f0", "observed", "final MSE a", "final MSE b"]
    body = []
    for r in results:
        ka, kb = r["kinds"]

        def c(v: int | None) -> str:
            return "none" if v is None else str(v)

        body.append(
            [_fmt(r[k]) for k in ("d", "m", "n", seed_key, "steps", "eta_lambda_max")]
            + [c(r[f"crossing_{s}"]) for s in ("paper", "measured", "nngp", "linear", "observed")]
            + [_fmt(r[f"{ka}_final_mse_observed"]), _fmt(r[f"{kb}_final_mse_observed"])]
        )
    title = "Loss crossing (step where b overtakes a): Prop. 4.1 predictions vs real GD"
    if results:
        title += f"  [a={results[0]['kinds'][0]}, b={results[0]['kinds'][1]}]"
    return _render(title, cols, body, markdown)


def crossing_verdicts(results: Sequence[dict[str, Any]]) -> list[str]:
    """Plain-language summary of `crossing_experiment` results: how far each prediction of
    the crossing step is from the crossing observed in real gradient descent."""
    labels = {
        "paper": "Prop. 4.1 with the paper's kernels (C = K)",
        "measured": "Prop. 4.1 with the measured NTKs (C = K)",
        "nngp": "exact linearised expectation (C = NNGP covariance)",
        "linear": "linearised dynamics with the networks' own f0",
    }
    out: list[str] = []
    obs = [r["crossing_observed"] for r in results]
    n_obs = sum(o is not None for o in obs)
    out.append(f"observed crossing (b overtakes a) in {n_obs}/{len(results)} runs: {obs}.")
    for key, label in labels.items():
        pred = [r[f"crossing_{key}"] for r in results]
        both = [(p, o) for p, o in zip(pred, obs, strict=True) if p is not None and o is not None]
        agree = sum((p is None) == (o is None) for p, o in zip(pred, obs, strict=True))
        line = f"{label}: {pred}; same existence as observed in {agree}/{len(results)} runs"
        if both:
            rel = [abs(p - o) / max(o, 1) for p, o in both]
            line += f", |pred - obs| / obs up to {100 * max(rel):.0f}%"
        out.append(line + ".")
    return out


def mean_crossings(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    r"""Crossings of seed-averaged curves: Prop. 4.1 is a statement about $E_\theta[L_k]$.

    Groups `crossing_experiment` results (run with ``keep_curves > steps``, i.e. every step kept)
    by ``(d, m, n, steps, eta_lambda_max)``, averages each source's two curves over the group
    (seeds draw new inputs, targets and networks, so this estimates the expectation over all of
    them) and returns one dict per group with ``seeds`` (the number of runs) and
    ``crossing_<source>`` of the averaged curves."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in results:
        if "curves" not in r or len(r["curve_steps"]) != r["steps"] + 1:
            raise ValueError("mean_crossings needs crossing_experiment(..., keep_curves=steps + 1)")
        # (target and kinds too: a teacher run and a random-target run were averaged together;
        # review, session 25)
        key = (
            r["d"], r["m"], r["n"], r["steps"], round(float(r["eta_lambda_max"]), 9),
            r.get("target"), tuple(r["kinds"]),
        )  # fmt: skip
        groups.setdefault(key, []).append(r)
    out: list[dict[str, Any]] = []
    for (d, m, n, steps, el, target, _), rs in groups.items():
        seeds = [r.get("seed") for r in rs]
        if len(set(seeds)) < len(seeds):
            raise ValueError(f"mean_crossings: runs of one setting repeat a seed ({seeds})")
        ka, kb = rs[0]["kinds"]
        row: dict[str, Any] = {"d": d, "m": m, "n": n, "steps": steps, "eta_lambda_max": el}
        row["target"] = target
        row |= {"seeds": len(rs), "kinds": [ka, kb]}
        for name in rs[0]["curves"]:
            ca = torch.tensor([r["curves"][name][ka] for r in rs], dtype=torch.float64).mean(0)
            cb = torch.tensor([r["curves"][name][kb] for r in rs], dtype=torch.float64).mean(0)
            row[f"crossing_{name}"] = _crossing_step(ca, cb)
            if name in ("observed", "linear"):
                row[f"{ka}_final_mse_{name}"] = float(ca[-1])
                row[f"{kb}_final_mse_{name}"] = float(cb[-1])
        out.append(row)
    return out
