"""Turn any ``nn.Module`` and a probe batch into a pure function of its trainable parameters.

Let f(θ; x) be the model, x_1..x_N the probe batch and g the *row map*:

* ``output="pntk"`` (Mohamadi & Sutherland 2022): one row per sample, g_i = Σ_o f_o(x_i) / √O.
  For sequence outputs of shape (B, T, V) there is one row per token, g_{i,t} = Σ_v f_v / √V.
  Outputs with more than three dimensions are summed over every non-batch dimension.
* ``output="full"``: every output scalar is a row (N·O rows).
* a callable ``rows = fn(model_output)`` returning a tensor whose leading dimension is the batch
  (it is flattened in sample-major order, so a chunk of samples maps to a contiguous slice of rows).

:class:`ProbeFunction` exposes ``g`` as a pure function ``fn(params, inputs) -> rows`` (a 1-D
tensor) built on :func:`torch.func.functional_call`, so torch.func transforms (vjp, jvp, jacrev,
vmap) apply to it. The NTK is K = J Jᵀ with J = ∂g/∂θ over the selected trainable parameters.

The probe is side-effect free: inside :meth:`ProbeFunction.session` the model runs in eval mode
(configurable), the SDPA math backend is forced (fused attention kernels have no forward-mode AD),
TF32 is disabled, and the global RNG state is forked; afterwards every module's ``training`` flag
is restored exactly. Parameters are detached copies, so no ``.grad`` is ever written, and buffers
are passed as copies so running statistics are never updated.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "OutputSpec",
    "ParamFilter",
    "ProbeFunction",
    "pick_output",
    "select_parameters",
]

OutputSpec = str | Callable[[Any], Tensor]
ParamFilter = None | str | Sequence[str] | Callable[[str, nn.Parameter], bool]


def select_parameters(model: nn.Module, params: ParamFilter = None) -> dict[str, nn.Parameter]:
    """The trainable parameters of ``model`` selected by ``params``.

    Only parameters with ``requires_grad=True`` count. ``params`` may be ``None`` (all of them),
    a callable ``(name, param) -> bool``, a list of exact names, or a string that is matched as a
    substring or, failing that, as a regular expression (``re.search``) against each name.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        chosen = named
    elif callable(params):
        fn = params
        chosen = [(n, p) for n, p in named if fn(n, p)]
    elif isinstance(params, str):
        pattern = re.compile(params)
        chosen = [(n, p) for n, p in named if params in n or pattern.search(n)]
    else:
        wanted = list(params)
        available = {n for n, _ in named}
        missing = [n for n in wanted if n not in available]
        if missing:
            raise ValueError(
                f"params= names not found among the trainable parameters: {missing[:5]}; "
                f"available names start with {sorted(available)[:5]}"
            )
        chosen = [(n, p) for n, p in named if n in set(wanted)]
    if not chosen:
        raise ValueError(
            "no trainable parameters selected: the model has no parameter with requires_grad=True"
            + ("" if params is None else f" that matches params={params!r}")
            + "; unfreeze some parameters or change the params= filter"
        )
    return dict(chosen)


def pick_output(out: Any) -> Tensor:
    """The tensor to probe from a model output.

    A tensor is returned as is; a dict or HF ``ModelOutput`` gives its ``logits`` entry when
    present, else its first tensor value; a tuple or list gives its first tensor.
    """
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):
        if "logits" in out and isinstance(out["logits"], Tensor):
            return out["logits"]
        for v in out.values():
            if isinstance(v, Tensor):
                return v
    elif isinstance(out, (tuple, list)):
        for v in out:
            if isinstance(v, Tensor):
                return v
    raise TypeError(
        f"cannot find a tensor in the model output of type {type(out).__name__}; "
        "pass output=callable(model_output) -> rows"
    )


def _rows(out: Any, output: OutputSpec) -> Tensor:
    if callable(output):
        rows = output(out)
        if not isinstance(rows, Tensor):
            raise TypeError(f"the output= callable must return a tensor, got {type(rows).__name__}")
        return rows.reshape(-1)
    y = pick_output(out)
    if output == "full" or y.ndim <= 1:
        return y.reshape(-1)
    if output != "pntk":
        raise ValueError(f"output must be 'pntk', 'full' or a callable, got {output!r}")
    if y.ndim == 3:  # (B, T, V): one row per token
        return (y.sum(-1) / math.sqrt(y.shape[-1])).reshape(-1)
    width = math.prod(y.shape[1:])
    return y.reshape(y.shape[0], -1).sum(-1) / math.sqrt(width)


def _batch_size(inputs: Any) -> int:
    if isinstance(inputs, Tensor):
        if inputs.ndim == 0:
            raise ValueError("the probe input is a 0-d tensor; it needs a leading batch dimension")
        return int(inputs.shape[0])
    values = inputs.values() if isinstance(inputs, Mapping) else inputs
    for v in values:
        if isinstance(v, Tensor) and v.ndim > 0:
            return int(v.shape[0])
    raise TypeError(
        "the probe inputs hold no tensor: pass a tensor, a tuple of tensors or a dict of tensors"
    )


def _map_tensors(inputs: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(inputs, Tensor):
        return fn(inputs)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: _map_tensors(v, fn) for k, v in inputs.items()})  # type: ignore[call-arg]
    if isinstance(inputs, tuple) and not hasattr(inputs, "_fields"):
        return tuple(_map_tensors(v, fn) for v in inputs)
    if isinstance(inputs, list):
        return [_map_tensors(v, fn) for v in inputs]
    return inputs


class ProbeFunction:
    """A model and a probe batch as a pure function of the selected trainable parameters.

    Args:
        model: any ``nn.Module``.
        inputs: a tensor (called as ``model(x)``), a tuple/list (``model(*x)``) or a dict
            (``model(**x)``, e.g. an HF batch). Integer tensors (token ids, masks) are carried as
            constants; floating tensors are cast to ``dtype``. Every tensor whose leading
            dimension equals the batch size is split when the batch is chunked.
        output: ``"pntk"``, ``"full"`` or a callable ``model_output -> rows``.
        params: parameter filter, see :func:`select_parameters`.
        dtype: floating dtype of the probe (parameters, floating buffers and inputs are cast).
            ``None`` keeps the model's dtype.
        eval_mode: run the model in eval mode (BatchNorm uses running statistics, dropout is off).
            With ``False`` the model's own flags are kept; buffers are still copies, so running
            statistics never change, and stochastic layers make K itself random.

    Raises:
        ValueError: empty batch, no trainable parameters, outputs that do not depend on the
            selected parameters, or NaN/Inf outputs.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Any,
        *,
        output: OutputSpec = "pntk",
        params: ParamFilter = None,
        dtype: torch.dtype | None = None,
        eval_mode: bool = True,
    ) -> None:
        if not (output in ("pntk", "full") or callable(output)):
            raise ValueError(f"output must be 'pntk', 'full' or a callable, got {output!r}")
        self.model = model
        self.output = output
        self.eval_mode = eval_mode
        selected = select_parameters(model, params)
        first = next(iter(selected.values()))
        self.dtype = dtype if dtype is not None else first.dtype
        if not self.dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {self.dtype}")
        self.device = first.device
        self.names: tuple[str, ...] = tuple(selected)
        self.params: tuple[Tensor, ...] = tuple(
            p.detach().to(self.dtype, copy=True) for p in selected.values()
        )
        # Frozen parameters and buffers are constants of the probe (copies: never mutated).
        self.constants: dict[str, Tensor] = {}
        for n, p in model.named_parameters():
            if n not in selected:
                self.constants[n] = self._cast(p.detach())
        self._buffer_names = []
        for n, b in model.named_buffers():
            self.constants[n] = self._cast(b.detach()).clone()
            self._buffer_names.append(n)
        self._source = (inputs, params)
        self.batch_size = _batch_size(inputs)
        if self.batch_size == 0:
            raise ValueError("the probe batch is empty (batch size 0); pass at least one sample")
        self.inputs = _map_tensors(inputs, lambda t: self._cast(t).to(self.device))
        self.n_params = sum(p.numel() for p in self.params)
        self.n_rows, self.rows_per_sample = self._check()

    def astype(self, dtype: torch.dtype, *, check: bool = True) -> ProbeFunction:
        """The same probe (model, original inputs, filter) in another dtype.

        ``check=False`` skips the validating forward pass that narrowing repeats (for callers
        that check the finiteness of their own results, as :func:`~glu_probe.ntk.ntk_matrix`
        does for K).
        """
        if dtype == self.dtype:
            return self
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        # Same model, rows and checks: only the tensors are re-cast, from the model's own
        # parameters and the original inputs (not from this probe's possibly rounded copies).
        # The validating forward pass of ``__init__`` is repeated only when narrowing: row
        # count, parameter dependence and finiteness do not change with a wider float type.
        new = copy.copy(self)
        new.dtype = dtype
        named = dict(self.model.named_parameters())
        new.params = tuple(named[n].detach().to(dtype, copy=True) for n in self.names)
        new.constants = {n: new._cast(t.detach()) for n, t in named.items() if n not in self.names}
        for n, b in self.model.named_buffers():
            new.constants[n] = new._cast(b.detach()).clone()
        new.inputs = _map_tensors(self._source[0], lambda t: new._cast(t).to(self.device))
        if check and torch.finfo(dtype).bits < torch.finfo(self.dtype).bits:
            new.n_rows, new.rows_per_sample = new._check()
        return new

    # ------------------------------------------------------------------ helpers
    def _cast(self, t: Tensor) -> Tensor:
        return t.to(self.dtype) if t.is_floating_point() else t

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Probe context: eval mode, SDPA math backend, no TF32, forked RNG; all restored after."""
        flags = [(m, m.training) for m in self.model.modules()]
        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            if self.eval_mode:
                self.model.eval()
            with (
                torch.random.fork_rng(devices=devices),
                torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH),
            ):
                yield
        finally:
            for m, t in flags:
                m.training = t
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32

    def call_model(self, params: Sequence[Tensor], inputs: Any) -> Any:
        """The raw model output at ``params`` (a tuple aligned with :attr:`names`)."""
        state = dict(self.constants)
        if not self.eval_mode:
            # Train-mode layers (BatchNorm) update buffers in place; torch.func forbids mutating
            # captured tensors, and the probe must not change the model, so each call gets copies.
            state.update({n: self.constants[n].clone() for n in self._buffer_names})
        state.update(zip(self.names, params, strict=True))
        if isinstance(inputs, Mapping):
            return torch.func.functional_call(self.model, state, args=(), kwargs=dict(inputs))
        if isinstance(inputs, (tuple, list)):
            return torch.func.functional_call(self.model, state, tuple(inputs))
        return torch.func.functional_call(self.model, state, (inputs,))

    def __call__(self, params: Sequence[Tensor], inputs: Any = None) -> Tensor:
        """g(θ; x): the 1-D row vector of the probe at ``params`` on ``inputs`` (default: all)."""
        out = self.call_model(params, self.inputs if inputs is None else inputs)
        return _rows(out, self.output)

    def chunk(self, start: int, stop: int) -> Any:
        """Samples ``start:stop`` of the probe inputs (batch-dimension tensors are sliced)."""
        n = self.batch_size

        def cut(t: Tensor) -> Tensor:
            return t[start:stop] if t.ndim > 0 and t.shape[0] == n else t

        return _map_tensors(self.inputs, cut)

    def sample_ranges(self, chunk_size: int | None) -> list[tuple[int, int]]:
        """Contiguous sample ranges of at most ``chunk_size`` samples (one range if ``None``)."""
        step = self.batch_size if chunk_size is None else max(1, int(chunk_size))
        return [(a, min(a + step, self.batch_size)) for a in range(0, self.batch_size, step)]

    def _check(self) -> tuple[int, int]:
        """One forward pass: row count, finiteness and dependence on the parameters."""
        with self.session(), torch.enable_grad():
            leaves = tuple(p.detach().requires_grad_(True) for p in self.params)
            rows = self(leaves)
        if rows.numel() == 0:
            raise ValueError("the probe produced no rows (empty output)")
        if not torch.isfinite(rows).all():
            bad = int((~torch.isfinite(rows)).sum())
            raise ValueError(
                f"the model output has {bad} NaN/Inf value(s) on the probe batch; "
                "the NTK is undefined there: check the inputs and the weights"
            )
        if not rows.requires_grad:
            raise ValueError(
                "the probe outputs do not depend on the selected parameters (K == 0): "
                "check the params= filter and that the output is computed from them"
            )
        if rows.numel() % self.batch_size:
            raise ValueError(
                f"{rows.numel()} rows is not a multiple of the batch size {self.batch_size}; "
                "the output= callable must give the same number of rows for every sample"
            )
        return int(rows.numel()), int(rows.numel()) // self.batch_size

    def row_range(self, start: int, stop: int) -> tuple[int, int]:
        """Rows belonging to samples ``start:stop``."""
        return start * self.rows_per_sample, stop * self.rows_per_sample
