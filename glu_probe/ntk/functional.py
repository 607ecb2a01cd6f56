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
import functools
import math
import operator
import re
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeGuard, TypeVar, cast

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .._warnings import external_stacklevel

__all__ = [
    "OutputSpec",
    "ParamFilter",
    "ProbeFunction",
    "pick_output",
    "select_parameters",
]

OutputSpec = str | Callable[[Any], Tensor]
ParamFilter = (
    None | str | re.Pattern[str] | Sequence[str] | nn.Module | Callable[[str, nn.Parameter], bool]
)


#: Characters that make a ``params=`` string a regular expression (``.`` alone does not: it is
#: the separator of dotted names).
_REGEX_CHARS = frozenset("^$*+?{}[]\\|()")


def _name_matcher(spec: str | re.Pattern[str]) -> Callable[[str], bool]:
    """A test of one dotted parameter name for a string or pattern filter (see
    :func:`select_parameters`)."""
    if isinstance(spec, re.Pattern):
        pattern = spec
    elif spec.startswith("re:"):
        pattern = re.compile(spec[3:])
    elif any(c in _REGEX_CHARS for c in spec):
        pattern = re.compile(spec)
    else:
        needle = "." + spec.strip(".") + "."
        return lambda name: needle in "." + name + "."
    return lambda name: pattern.search(name) is not None


def check_param_filter(params: Any) -> None:
    """A ``ValueError`` unless ``params`` is a filter :func:`select_parameters` takes: ``None``,
    a string (a valid regular expression where it is one), a compiled pattern, a sequence of
    names, a sub-module or a callable."""
    if params is None or isinstance(params, (nn.Module, re.Pattern)) or callable(params):
        return
    if isinstance(params, str):
        try:
            _name_matcher(params)
        except re.error as err:
            msg = f"params={params!r} is not a valid regular expression: {err}"
            raise ValueError(msg) from None
        return
    if isinstance(params, Sequence) and all(isinstance(n, str) for n in params):
        if len(params) == 0:  # (selects nothing: found only at the first probe before)
            raise ValueError("params=[] selects no parameter; give names, or None for all")
        return
    raise ValueError(
        "params must be None, a name or regular expression (str or re.Pattern), a sequence of "
        "parameter names, a sub-module of the model or a callable (name, param) -> bool; got "
        f"{params!r}"
    )


def _float64_share(model: nn.Module) -> tuple[bool, bool]:
    """Whether any, and whether all, floating parameters (trainable or not) and buffers of
    ``model`` are float64."""
    dtypes = [t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    wide = [d == torch.float64 for d in dtypes]
    return any(wide), bool(wide) and all(wide)


def default_probe_dtype(model: nn.Module, params: ParamFilter = None) -> torch.dtype:
    """The probe precision used when none is given: ``torch.float32``, or ``torch.float64`` for
    a float64 model (every floating parameter and buffer float64; ``params`` is checked, not
    used: frozen parameters and buffers are cast to the probe's dtype too).

    A probe in float32 rounds the model's parameters, buffers and floating inputs to float32: K
    is then the kernel of a perturbed model, which the reported residuals (rounding of the
    products or rows) do not cover. For a float32 model nothing is rounded; a float64 part was
    made float64 on purpose, and rounding its inputs can change K by more than the residuals say
    (review, session 23: inputs 1e4 + 1e-2·N(0, 1) lost 5% of their spread, λ_max 80x outside
    its residual, κ 6.6% off, with no warning). ``dtype=torch.float32`` still probes such a model
    in float32 when asked, with a warning (:func:`warn_narrowed`). A model of float64 and other
    parts (a float64 layer before a float32 head: 390x its residual) gets float32, with that
    warning too: the probe casts every tensor to one dtype, and such a model often casts between
    its parts in its forward, which float64 throughout would break.
    """
    select_parameters(model, params)  # (a bad filter is refused here as in the probe)
    return torch.float64 if _float64_share(model)[1] else torch.float32


def warn_narrowed(model: nn.Module, dtype: torch.dtype, what: str) -> None:
    """Warn that a probe in ``dtype`` (narrower than float64) rounds a model holding float64
    tensors (attributed to the first frame outside glu-probe)."""
    some, every = _float64_share(model)
    if dtype != torch.float64 and some:
        fix = (
            "leave dtype at its default or pass torch.float64"
            if every
            else "pass torch.float64 where the model runs with every tensor in float64"
        )
        warnings.warn(
            f"the model holds float64 parameters or buffers but {what}={dtype} probes it in "
            f"{str(dtype).removeprefix('torch.')}: they and the inputs are rounded, a change of "
            "the model that the reported residuals do not cover (they bound the rounding of the "
            f"products or rows only); {fix}",
            UserWarning,
            stacklevel=external_stacklevel(),
        )


def pruned_names(module: nn.Module) -> list[str]:
    """Names of ``module``'s tensors pruned by ``torch.nn.utils.prune``: its forward pre-hook
    (a ``BasePruningMethod``, or a ``PruningContainer`` of them) names them, and ``<name>_orig``
    is the parameter (a module's own ``x_orig`` beside an ``x_mask`` buffer is no alias;
    re-review, session 28)."""
    from torch.nn.utils import prune

    names = []
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, prune.BasePruningMethod):
            name = hook._tensor_name
            if name + "_orig" in module._parameters and name not in module._parameters:
                names.append(name)
    return names


class ParamSelectionError(ValueError):
    """:func:`select_parameters`' refusal of a ``params`` filter, with its ``reason``:
    ``"nothing"`` (no trainable parameter selected), ``"names"`` (a list of names some of which
    are not the model's) or ``"foreign"`` (a module that holds none of the model's parameters).
    Callers that apply one filter to several models (a PairedModule's members) tell the cases
    apart by it, not by the message."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:  # (pickled with its reason: spawned DDP ranks)
        return type(self), (str(self), self.reason)


def select_parameters(model: nn.Module, params: ParamFilter = None) -> dict[str, nn.Parameter]:
    r"""The trainable parameters of ``model`` selected by ``params``, by their canonical names.

    Only parameters with ``requires_grad=True`` count. ``params`` may be

    * ``None``: all of them;
    * a plain string (letters, digits, ``_`` and ``.``): whole dotted components of the name,
      ``"mlp"`` selects ``h.0.mlp.c_fc.weight``, ``"h.1"`` (or ``"h.1."``) selects the parameters
      of block ``h.1`` but not of ``h.10`` or ``h.11``, ``"fc2"`` not ``fc21``; a full name
      selects that parameter;
    * a regular expression, searched anywhere in the name (``re.search``): a compiled
      ``re.Pattern``, a string prefixed with ``"re:"`` (``"re:fc"`` selects ``fc1`` and ``fc2``),
      or a string with a regex metacharacter other than ``.`` (``r"^fc2\."``), which cannot be
      part of a parameter name;
    * a list of exact names;
    * a sub-module of ``model`` (an ``nn.Module``): its parameters (``params=model.blocks[3]``);
    * a callable ``(name, param) -> bool``.

    A parameter registered under several names (tied weights: GPT-2's ``lm_head.weight`` is
    ``transformer.wte.weight``) is selected when the filter accepts any of its names, and is
    returned once, under its canonical name (the first in ``model.named_parameters()``). A
    weight pruned by ``torch.nn.utils.prune`` (``weight_orig`` beside a ``weight_mask`` buffer)
    also answers to its unpruned name (``"net.0.weight"``).
    """
    check_param_filter(params)
    canonical: dict[int, str] = {}
    named: list[tuple[str, nn.Parameter]] = []
    for n, p in model.named_parameters():
        if p.requires_grad:
            canonical[id(p)] = n
            named.append((n, p))
    aliases: dict[str, list[str]] = {n: [] for n, _ in named}
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) in canonical:
            aliases[canonical[id(p)]].append(n)
    # torch.nn.utils.prune (Lightning's ModelPruning) re-registers a pruned ``weight`` as the
    # parameter ``weight_orig`` beside a ``weight_mask`` buffer: the names of the unpruned
    # model keep selecting it (a monitor's params="net.0.weight" matched nothing after the
    # first pruning; review, session 28).
    for prefix, module in model.named_modules():
        for base in pruned_names(module):
            p = module._parameters[base + "_orig"]
            if p is not None and id(p) in canonical:
                aliases[canonical[id(p)]].append(f"{prefix}.{base}" if prefix else base)
    if params is None:
        chosen = named
    elif isinstance(params, nn.Module):
        # (before the callable test: a module is callable, and was called as a filter)
        own = {id(p) for p in params.parameters()}
        if not own.intersection(id(p) for _, p in model.named_parameters()):
            raise ParamSelectionError(
                f"params= is a {type(params).__name__} that holds none of the model's "
                "parameters; pass a sub-module of the model (or names, a pattern or a callable)",
                "foreign",
            )
        chosen = [(n, p) for n, p in named if id(p) in own]
    elif callable(params):
        fn = params
        chosen = [(n, p) for n, p in named if any(fn(a, p) for a in aliases[n])]
    elif isinstance(params, (str, re.Pattern)):
        match = _name_matcher(params)
        chosen = [(n, p) for n, p in named if any(match(a) for a in aliases[n])]
    else:
        wanted = set(params)
        available = {a for n in aliases for a in aliases[n]}
        missing = [n for n in params if n not in available]
        if missing:
            raise ParamSelectionError(
                f"params= names not found among the trainable parameters: {missing[:5]}; "
                f"available names start with {sorted(available)[:5]}",
                "names",
            )
        chosen = [(n, p) for n, p in named if wanted.intersection(aliases[n])]
    if not chosen:
        hint = ""
        if isinstance(params, nn.Module):
            hint = " (its parameters are all frozen)"
        elif isinstance(params, str):
            hint = (
                " (a plain string matches whole dotted components of the names, e.g. 'mlp' or "
                "'h.1'; for a substring or regular expression pass 're:...' or re.compile(...); "
                f"names start with {[n for n, _ in named[:3]]})"
            )
        raise ParamSelectionError(
            "no trainable parameters selected: the model has no parameter with requires_grad=True"
            + ("" if params is None else f" that matches params={params!r}{hint}")
            + "; unfreeze some parameters or change the params= filter",
            "nothing",
        )
    complex_ = [n for n, p in chosen if p.is_complex()]
    if complex_:
        # The probe runs in a real dtype: a cast would drop the imaginary parts (another
        # model's K, reported as converged).
        raise ValueError(
            f"complex parameters are not supported by the NTK probe: {complex_[:5]}; hold them "
            "as real tensors (torch.view_as_real) or leave them out with the params= filter"
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


class ProbePaddingError(ValueError):
    """Every token of a probe batch is padding: with ``drop_padding`` no row of K is left."""


class ProbeSplitError(ValueError):
    """A probe whose samples are not independent cannot be split into parts (chunks of the
    batch, or shards across ranks): the parts' products would not be the batch's."""


class ProbeInputError(ValueError, RuntimeError):
    """The model failed on probe inputs that disagree on the batch size (a ``ValueError``; also
    a ``RuntimeError``, the type of the model's own error, for callers that catch that)."""


#: Keys of a dict batch that hold one entry per sample (Hugging Face model inputs): their
#: leading dimension must be the batch size (or 1), see :func:`_check_batch_sizes`.
PER_SAMPLE_KEYS = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "inputs_embeds",
    "pixel_values",
    "pixel_mask",
    "input_values",
    "input_features",
    "decoder_input_ids",
    "decoder_attention_mask",
    "decoder_inputs_embeds",
    "labels",
)


def _batch_source(inputs: Any) -> tuple[str, Tensor] | None:
    """The tensor whose leading dimension is the batch size, and its name.

    The rule: a tensor input is the batch; in a dict, the first per-sample key
    (:data:`PER_SAMPLE_KEYS`, e.g. ``input_ids``) holding a tensor with a dimension, else the
    first tensor value with a dimension; in a tuple or list, the first tensor with a dimension.
    Every tensor whose leading dimension equals that size is batched (split per sample and
    between chunks); every other tensor is an unbatched constant passed whole to every sample.
    Where no value at the top level is such a tensor, nested dicts, tuples and lists are
    searched in order by the same rule (``{"xs": (a, b)}``: ``a``).
    """
    return _batch_source_in(inputs, "inputs")


def _batch_source_in(inputs: Any, where: str) -> tuple[str, Tensor] | None:
    if isinstance(inputs, Tensor):
        return where, inputs
    if isinstance(inputs, Mapping):
        for key in PER_SAMPLE_KEYS:
            v = inputs.get(key)
            if isinstance(v, Tensor) and v.ndim > 0:
                return f"{where}[{key!r}]", v
        items: Any = [(f"{where}[{k!r}]", v) for k, v in inputs.items()]
    elif isinstance(inputs, (tuple, list)):
        items = [(f"{where}[{i}]", v) for i, v in enumerate(inputs)]
    else:
        return None
    for name, v in items:
        if isinstance(v, Tensor) and v.ndim > 0:
            return name, v
    for name, v in items:  # (nested containers, after every tensor of this level)
        if isinstance(v, (Mapping, tuple, list)) and (found := _batch_source_in(v, name)):
            return found
    return None


def _batch_size(inputs: Any) -> int:
    """The probe batch size (the rule: :func:`_batch_source`)."""
    if isinstance(inputs, Tensor) and inputs.ndim == 0:
        raise ValueError("the probe input is a 0-d tensor; it needs a leading batch dimension")
    found = _batch_source(inputs)
    if found is None:
        raise TypeError(
            "the probe inputs hold no tensor: pass a tensor, a tuple of tensors or a dict of "
            "tensors"
        )
    return int(found[1].shape[0])


def _named_tensors(inputs: Any, prefix: str = "inputs") -> Iterator[tuple[str, Tensor]]:
    """Every tensor of the (nested) inputs with a readable name (``inputs['attention_mask']``,
    ``inputs[1]``, ``inputs.x``), in the order of :func:`_map_tensors`."""
    if isinstance(inputs, Tensor):
        yield prefix, inputs
    elif isinstance(inputs, Mapping):
        for k, v in inputs.items():
            yield from _named_tensors(v, f"{prefix}[{k!r}]")
    elif isinstance(inputs, tuple) and hasattr(inputs, "_fields"):
        for field, v in zip(inputs._fields, inputs, strict=True):
            yield from _named_tensors(v, f"{prefix}.{field}")
    elif isinstance(inputs, (tuple, list)):
        for i, v in enumerate(inputs):
            yield from _named_tensors(v, f"{prefix}[{i}]")


def _odd_leading(inputs: Any, n: int) -> list[tuple[str, tuple[int, ...]]]:
    """Tensors treated as unbatched constants although their leading dimension is neither the
    batch size ``n`` nor 1 (names and shapes): a legitimate constant (a (T, T) mask, a table) or
    a per-sample input of another batch size; only the model can tell."""
    return [
        (name, tuple(t.shape))
        for name, t in _named_tensors(inputs)
        if t.ndim > 0 and t.shape[0] not in (1, n)
    ]


def _batch_origin(inputs: Any, n: int) -> str:
    found = _batch_source(inputs)
    where = (
        "" if found is None or found[0] == "inputs" else f" (the leading dimension of {found[0]})"
    )
    return f"the batch size is {n}{where}"


def _check_batch_sizes(inputs: Any, n: int) -> None:
    """Raise on inputs that clearly disagree on the batch size.

    Only per-sample dict keys (:data:`PER_SAMPLE_KEYS`: ``input_ids``, ``attention_mask``, ...)
    are checked up front: their leading dimension must be ``n`` (or 1, broadcast). Any other
    tensor whose leading dimension is not ``n`` is an unbatched constant (a shared position
    tensor, a (T, T) mask, a lookup table); if the model then fails, the validating forward
    pass names those tensors (:meth:`ProbeFunction._check`).
    """
    if n <= 1 or not isinstance(inputs, Mapping):
        return
    bad = [
        (f"inputs[{k!r}]", tuple(v.shape))
        for k, v in inputs.items()
        if k in PER_SAMPLE_KEYS
        and isinstance(v, Tensor)
        and v.ndim > 0
        and v.shape[0] not in (1, n)
    ]
    if bad:
        listed = ", ".join(f"{name} has shape {shape}" for name, shape in bad)
        raise ValueError(
            f"the probe inputs disagree on the batch size: {_batch_origin(inputs, n)}, but "
            f"{listed}; per-sample inputs ({', '.join(PER_SAMPLE_KEYS[:3])}, ...) need the "
            "same leading (batch) dimension"
        )


F = TypeVar("F", bound=Callable[..., Any])


class _CallScope(threading.local):
    depth = 0
    memo: dict[Any, Any] | None = None


_CALL = _CallScope()


@contextlib.contextmanager
def _call_scope() -> Iterator[None]:
    """One public call (``ntk_matrix``, ``ntk_spectrum``, an ``NTKOperator`` method): the
    outermost opens a memo (:func:`call_memo`) that lives until it returns."""
    outer = _CALL.depth == 0
    if outer:
        _CALL.memo = {}
    _CALL.depth += 1
    try:
        yield
    finally:
        _CALL.depth -= 1
        if outer:
            _CALL.memo = None


def call_memo() -> dict[Any, Any] | None:
    """A memo for the length of the current outermost public call (``None`` outside one):
    for facts about the model that cannot change within a call but may between two calls
    that share a probe (a module attribute the user sets)."""
    return _CALL.memo


def allows_autograd(fn: F) -> F:
    """Run ``fn`` outside ``torch.inference_mode`` (a Lightning validation or test hook runs
    under it): the probe needs autograd, and its results are then ordinary tensors. The
    caller's autocast is off inside (:func:`_outer_autocast_off`). The outermost such call
    also scopes :func:`call_memo`."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        # (the caller's autocast off for the whole call: see _outer_autocast_off)
        cuda = ("cuda",) if torch.cuda.is_available() else ()
        with _call_scope(), _outer_autocast_off("cpu", *cuda):
            if not torch.is_inference_mode_enabled():
                return fn(*args, **kwargs)
            with torch.inference_mode(False):
                return fn(*args, **kwargs)

    return cast(F, wrapped)


@contextlib.contextmanager
def _outer_autocast_off(*device_types: str) -> Iterator[None]:
    """The caller's autocast off for ``device_types`` (those of ``"cpu"`` and ``"cuda"``;
    others have none to turn off here): the probe's float32 is float32, in its passes and in
    the linear algebra around them (Lanczos' reorthogonalisation, the Gram). Called from a
    ``training_step`` under ``"bf16-mixed"`` or an autocast eval loop, the probe's products
    ran in bfloat16 (λ_max 64x outside its residual; Lanczos failed on "expected scalar type
    BFloat16 but found Float" in its adjointness check), and the memoised forward trace, taken
    under autocast and keyed without it, then gave later probes outside autocast bfloat16
    bounds and κ = inf (review, session 29). A model's own ``torch.autocast`` blocks nest
    inside and still apply: they are its function."""
    with contextlib.ExitStack() as stack:
        for kind in dict.fromkeys(device_types):
            if kind in ("cpu", "cuda"):
                stack.enter_context(torch.autocast(device_type=kind, enabled=False))
        yield


def _eager_stance() -> contextlib.AbstractContextManager[Any]:
    """``torch.compile``d modules run eagerly inside the probe (torch >= 2.6).

    Traced through torch.func, a compiled sub-module made dynamo compile new graphs for the
    probe's shapes and wrappers, and the training step then ran other inductor kernels: the
    parameters of a fit with the NTK monitor differed by 4e-8 after 6 steps (review, session 20).
    Under the ``"force_eager"`` stance nothing is compiled, and the probe's K is the eager
    model's (the compiled one computes the same function)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:
        return contextlib.nullcontext()
    return cast(contextlib.AbstractContextManager[Any], set_stance("force_eager"))


def _warn_first_of_several(out: Any, output: OutputSpec, samples: int) -> None:
    """A tuple or list output with several tensors is probed on its first (``pick_output``):
    say so, since ``(aux, logits)`` would be probed on ``aux`` (review, session 18). The same
    for a dict (or an HF ``ModelOutput``) without ``logits``, naming the key probed (review,
    session 20: ``{"features": ..., "scores": ...}`` was probed on ``features`` silently)."""
    if not isinstance(output, str):
        return
    which = "the first"
    if isinstance(out, (tuple, list)):
        tensors = [t for t in out if isinstance(t, Tensor)]
    elif isinstance(out, Mapping) and not isinstance(out.get("logits"), Tensor):
        named = [(k, v) for k, v in out.items() if isinstance(v, Tensor)]
        tensors = [v for _, v in named]
        if named:
            which = f"the first, {named[0][0]!r}"
    else:
        return
    if len(tensors) > 1:
        warnings.warn(
            f"the model's output ({type(out).__name__}) holds {len(tensors)} tensors: the "
            f"probe's rows come from {which} (shape {tuple(tensors[0].shape)} for {samples} "
            "sample(s)); pass output=callable(model_output) -> rows to probe another",
            RuntimeWarning,
            stacklevel=external_stacklevel(),
        )


def _versions(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Identity and in-place version of every parameter and buffer, by name: an unchanged pair
    means the tensor was neither replaced nor written in place (an optimizer step bumps the
    version)."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return {n: (id(t), t._version) for n, t in named}


def _same_values(a: Tensor, b: Tensor) -> bool:
    """Same shape and values, NaNs in the same places equal (a NaN buffer is no change)."""
    return a.shape == b.shape and (
        torch.equal(a, b)
        or ((a.is_floating_point() or a.is_complex()) and torch.allclose(a, b, 0, 0, True))
    )


def _comparable(t: Tensor) -> bool:
    """A dense tensor with values (``torch.equal`` has no sparse, nested or meta kernels: a GCN's
    sparse adjacency buffer made every probe fail; re-review, session 28)."""
    return t.layout == torch.strided and not t.is_meta and not t.is_nested


def _active_dropout(model: nn.Module) -> bool:
    """A dropout layer in training mode with p > 0 (its passes are random): torch's dropout
    modules, and stochastic depth (timm's ``DropPath``, torchvision's ``StochasticDepth``),
    which the monitor's setup check missed, so a Lanczos probe ended the fit at its first
    probe instead (review, session 24)."""
    for m in model.modules():
        if not m.training:
            continue
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return True
        name = type(m).__name__
        if name == "DropPath" and float(getattr(m, "drop_prob", 0.0) or 0.0) > 0:
            return True
        if name == "StochasticDepth" and float(getattr(m, "p", 0.0) or 0.0) > 0:
            return True
    return False


def _warn_train_mode_layers(model: nn.Module) -> None:
    """``eval_mode=False``: say what train-mode BatchNorm and dropout do to K."""
    batch_norm = [
        type(m).__name__
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]
    dropout = [
        type(m).__name__
        for m in model.modules()
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0
    ]
    if batch_norm:
        warnings.warn(
            f"eval_mode=False with {batch_norm[0]} in training mode: batch statistics couple the "
            "samples, so K is that of the whole batch only: the dense path computes it from "
            "products over the whole batch (slower than per-sample Jacobian rows), and "
            "splitting the batch into chunks is refused; eval_mode=True (running statistics) "
            "keeps the samples independent",
            RuntimeWarning,
            stacklevel=external_stacklevel(),
        )
    if dropout:
        warnings.warn(
            f"eval_mode=False with active {dropout[0]}: K is random (a new mask per call); "
            "the Lanczos path refuses it (vmap forbids random operations), the dense path "
            "draws one mask per sample. eval_mode=True turns dropout off",
            RuntimeWarning,
            stacklevel=external_stacklevel(),
        )


def _module_backward_hooks(model: nn.Module) -> str | None:
    """What full backward hooks or backward pre-hooks ``model`` carries
    (``register_full_backward_hook``, ``register_full_backward_pre_hook``, or their global
    ``nn.modules.module.register_module_full_backward_*`` forms), in words; ``None`` if none.
    Old-style ``register_backward_hook`` hooks (on the module's ``grad_fn``) work under
    torch.func and are not counted."""
    from torch.nn.modules import module as module_mod

    hooked = [
        name or type(model).__name__
        for name, m in model.named_modules()
        # (getattr: a TorchScript module routes attribute reads through its C++ object)
        if getattr(m, "_backward_pre_hooks", None)
        or (getattr(m, "_backward_hooks", None) and getattr(m, "_is_full_backward_hook", None))
    ]
    global_hooks = bool(module_mod._global_backward_pre_hooks) or (
        bool(module_mod._global_backward_hooks) and module_mod._global_is_full_backward_hook is True
    )
    if not hooked and not global_hooks:
        return None
    found = []
    if hooked:
        found.append(
            "full backward hooks or backward pre-hooks (register_full_backward_hook / "
            f"register_full_backward_pre_hook) on the model's modules "
            f"{', '.join(repr(h) for h in hooked[:5])}"
            + (f" and {len(hooked) - 5} more" if len(hooked) > 5 else "")
        )
    if global_hooks:
        found.append(
            "a global module full backward hook or backward pre-hook (registered with "
            "nn.modules.module.register_module_full_backward_hook / _pre_hook), which applies "
            "to every module"
        )
    return " and ".join(found)


def _backward_hook_error(found: str) -> ValueError:
    """The clear error for module backward hooks that a probe pass meets (``found``: from
    :func:`_module_backward_hooks`).

    PyTorch runs those hooks through ``BackwardHookFunction``, an ``autograd.Function``
    without ``setup_context``, which no torch.func transform accepts: every probe pass raised
    torch's "In order to use an autograd.Function with functorch transforms ... it must
    override the setup_context staticmethod", about a Function the user never wrote, and the NTK
    monitor ended the fit at its first probe (review, session 27). The hooks cannot be skipped
    either: one that rescales gradients changes training's J."""
    return ValueError(
        f"the NTK probe cannot run with {found}: PyTorch runs these hooks "
        "through an autograd.Function without setup_context, which torch.func (the probe's "
        "vmap, vjp and jvp) cannot run, and they cannot be left out either (a hook that "
        "changes gradients changes training's Jacobian). Remove them while probing (the "
        "handles' remove()), or express a gradient rescaling in the forward pass (a "
        "tensor.register_hook on an activation, or a custom autograd.Function with "
        "setup_context), which the probe supports"
    )


def _meets_backward_hook(rows: Tensor) -> bool:
    """Whether the autograd graph of ``rows`` passes through a module backward hook
    (``BackwardHookFunctionBackward`` nodes). PyTorch inserts one only where the hooked
    module's inputs or outputs require grad: a hook on a frozen backbone, or outside the
    parameters the probe selects, is never met, and its probe runs (review, session 27)."""
    stack, seen = [rows.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ == "BackwardHookFunctionBackward":
            return True
        stack.extend(n for n, _ in node.next_functions)
    return False


def _normal(t: Tensor) -> Tensor:
    """``t`` detached, or a normal copy of an inference-mode tensor (autograd cannot save
    those). Detached: an input that requires grad (``inputs_embeds`` of an upstream layer, a
    saliency input) made the rows depend on it, so the check that they depend on the selected
    parameters passed for an unused head (K all zeros, no error), and K came back holding a
    graph to the caller's input (review, session 24)."""
    t = t.detach()
    return t.clone() if t.is_inference() else t


def _map_tensors(inputs: Any, fn: Callable[[Tensor], Tensor], *, plain: bool = False) -> Any:
    """``inputs`` with ``fn`` applied to every tensor of its (nested) dicts, tuples and lists.

    A namedtuple keeps its type (rebuilt from its fields: ``type(t)(*values)``, since its
    constructor does not take one iterable), so a model that reads ``batch.x`` sees the cast or
    sliced tensors; pytree (the dense and structured strategies) flattens it like a tuple.
    ``plain=True`` (the probe's own copies) turns every mapping pytree does not know (HF
    ``BatchEncoding``, a ``UserDict``) into a dict: pytree took the tokenizer's own output for
    one leaf with no sample dimension, and the dense path fell back to slow whole-batch rows
    with misleading warnings (review, session 24). The model is called with ``**inputs``
    either way.
    """
    if isinstance(inputs, Tensor):
        return fn(inputs)
    if isinstance(inputs, Mapping):
        items = {k: _map_tensors(v, fn, plain=plain) for k, v in inputs.items()}
        if plain and type(inputs) not in _pytree_nodes():
            return items
        return type(inputs)(items)  # type: ignore[call-arg]
    if isinstance(inputs, tuple):
        values = [_map_tensors(v, fn, plain=plain) for v in inputs]
        if hasattr(inputs, "_fields"):  # namedtuple
            return type(inputs)(*values)
        return tuple(values)
    if isinstance(inputs, list):
        return [_map_tensors(v, fn, plain=plain) for v in inputs]
    return inputs


def _pytree_nodes() -> Any:
    from torch.utils._pytree import SUPPORTED_NODES

    return SUPPORTED_NODES


def _drop_saved(_: Tensor) -> None:
    """Pack hook of the probe's validation forward: keep nothing for backward."""
    return None


def _no_backward(_: None) -> Tensor:
    """Unpack hook of the probe's validation forward: a backward pass inside the forward."""
    raise RuntimeError("the probe's validation forward keeps no tensors for a backward pass")


class FloatTrace(TorchDispatchMode):
    """What a (one-sample) forward pass computes in floating point: the dtypes of every
    operation's outputs, and the elements of the floating tensors it allocates (outputs that
    are not views of its inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()
        self.elements = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in pytree.tree_leaves((args, kwargs))
            if isinstance(t, Tensor)
        }
        for t in pytree.tree_leaves(out):
            if isinstance(t, Tensor) and t.is_floating_point():
                self.dtypes.add(t.dtype)
                if t.untyped_storage().data_ptr() not in inputs:
                    self.elements += t.numel()
        return out


def probe_copy_bytes(probe: ProbeFunction, itemsize: int | None = None) -> int:
    """Bytes of the tensors a probe holds of its own: its parameters, frozen parameters and
    buffers (constants), and floating inputs; with ``itemsize``, what the same tensors take
    in a dtype of that size (the narrower copy :meth:`ProbeFunction.astype` makes). Counted
    in full, copies or not (an upper bound). Buffers are also cloned once per forward pass
    (BatchNorm statistics must not change), so they count twice."""
    buffers = [
        probe.constants[n] for n in getattr(probe, "_buffer_names", ()) if n in probe.constants
    ]
    return _copies_bytes(
        [*probe.params, *probe.constants.values()], buffers, probe.inputs, itemsize
    )


def _copies_bytes(
    tensors: Sequence[Tensor], buffers: Sequence[Tensor], inputs: Any, itemsize: int | None
) -> int:
    """The counting rule of :func:`probe_copy_bytes` (and :func:`planned_copy_bytes`): every
    tensor once (floating ones at ``itemsize`` when given), buffers once more (cloned per
    forward pass), and the floating input tensors."""
    leaves = [t for t in pytree.tree_leaves(inputs) if isinstance(t, Tensor)]
    total = 0
    for t in [*tensors, *buffers, *(t for t in leaves if t.is_floating_point())]:
        total += t.numel() * (itemsize if itemsize and t.is_floating_point() else t.element_size())
    return total


def planned_copy_bytes(
    model: nn.Module, inputs: Any, params: ParamFilter, dtype: torch.dtype | None
) -> tuple[int, int, int]:
    """(:func:`probe_copy_bytes`, number of selected parameters, the probe's itemsize) of the
    probe that
    ``ProbeFunction(model, inputs, params=params, dtype=dtype)`` would build, computed before
    it copies anything: a budget too small for the copies is refused before they are made."""
    selected = select_parameters(model, params)
    first = next(iter(selected.values()))
    item = (dtype or first.dtype).itemsize  # (no tensor: nothing allocated before the check)
    buffers = list(model.buffers())
    frozen = [p for n, p in model.named_parameters() if n not in selected]
    total = _copies_bytes([*selected.values(), *frozen, *buffers], buffers, inputs, item)
    return total, sum(p.numel() for p in selected.values()), item


#: Instance flags that turn activation checkpointing on: timm's models (``grad_checkpointing``)
#: and Hugging Face's modules (``gradient_checkpointing``).
_CHECKPOINTING_FLAGS = ("grad_checkpointing", "gradient_checkpointing")


def _is_require_grads_hook(fn: Any) -> bool:
    """Hugging Face's ``make_inputs_require_grads`` forward hook."""
    return getattr(fn, "__name__", "") == "make_inputs_require_grads"


def _checkpointing_off(
    model: nn.Module,
) -> tuple[list[tuple[nn.Module, str]], list[tuple[dict[Any, Any], list[tuple[Any, Any]]]]]:
    """Turn off ``model``'s activation checkpointing for the probe's passes: the instance flags
    of :data:`_CHECKPOINTING_FLAGS` that are ``True``, and Hugging Face's
    ``make_inputs_require_grads`` forward hooks (``enable_input_require_grads``, registered by
    ``gradient_checkpointing_enable``: it calls ``requires_grad_()``, refused inside a torch.func
    transform, and changes no value). Returns what to put back: the flags switched off, and
    each hook dict a hook was taken out of with its items before (keys and order kept)."""
    flags: list[tuple[nn.Module, str]] = []
    hooks: list[tuple[dict[Any, Any], list[tuple[Any, Any]]]] = []
    for m in model.modules():
        own = vars(m)
        for name in _CHECKPOINTING_FLAGS:
            if own.get(name) is True:
                own[name] = False
                flags.append((m, name))
        forward_hooks = own.get("_forward_hooks")
        if isinstance(forward_hooks, dict):
            saved = list(forward_hooks.items())
            drop = [k for k, fn in saved if _is_require_grads_hook(fn)]
            if drop:
                hooks.append((forward_hooks, saved))
                for key in drop:
                    del forward_hooks[key]
    return flags, hooks


def _put_back(hook_dict: dict[Any, Any], saved: list[tuple[Any, Any]], taken: set[Any]) -> None:
    """Put the hooks ``taken`` out of ``hook_dict`` back at their places (``saved``: its items
    before): a hook removed meanwhile (a one-shot hook that removes itself) stays removed, one
    added stays last (re-review, session 23: a full snapshot revived a removed hook)."""
    now, before = dict(hook_dict), dict(saved)
    merged = [(k, now.get(k, fn)) for k, fn in saved if k in taken or k in now]
    merged += [(k, fn) for k, fn in now.items() if k not in before]
    hook_dict.clear()
    hook_dict.update(merged)


#: The forward hook registries of a module (``register_forward_pre_hook``,
#: ``register_forward_hook``, with or without ``with_kwargs`` / ``always_call``: those flags
#: live in side dicts keyed by the same ids, and a hook runs only if its id is in one of these).
_FORWARD_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks")

#: A hook's place: (its registry, its key, the hook).
_HookSite = tuple[dict[Any, Any], Any, Callable[..., Any]]


def _forward_hook_sites(modules: Sequence[nn.Module]) -> list[_HookSite]:
    """The user's forward hooks and forward pre-hooks on ``modules`` and the global ones
    (``nn.modules.module.register_module_forward_hook`` / ``_pre_hook``), in registry order.
    Not pruning's pre-hooks (``torch.nn.utils.prune``: they compute the weight, always part of
    the function), nor Hugging Face's ``make_inputs_require_grads`` (:func:`_checkpointing_off`
    takes it out of every pass)."""
    from torch.nn.utils import prune

    module_mod = nn.modules.module
    registries: list[dict[Any, Any]] = [
        module_mod._global_forward_pre_hooks,
        module_mod._global_forward_hooks,
    ]
    for m in modules:
        own = vars(m)
        for name in _FORWARD_HOOK_DICTS:
            registry = own.get(name)
            if isinstance(registry, dict) and registry:
                registries.append(registry)
    return [
        (registry, key, fn)
        for registry in registries
        for key, fn in list(registry.items())
        if not (isinstance(fn, prune.BasePruningMethod) or _is_require_grads_hook(fn))
    ]


def _version(t: Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # (an inference tensor has no version counter, nor in-place updates)
        return -1


def _state_of(module: Any) -> list[Any] | None:
    """The objects of ``module``'s attribute dict and of its parameter and buffer registries,
    by identity (``None``: not a module)."""
    if not isinstance(module, nn.Module):
        return None
    own = vars(module)
    state: list[Any] = [*own.keys(), *own.values()]
    for name in ("_parameters", "_buffers"):
        registry = own.get(name)
        if isinstance(registry, dict):
            state += [*registry.keys(), *registry.values()]
    return state


class _Watched:
    """A user's forward (pre-)hook during the probe's validating pass: called as it is, and
    recording whether it is part of the model's function: it returned a value (a replaced
    input or output), or changed a tensor it was given in place (its version counter), or its
    module's attributes, parameters or buffers (an old-style ``spectral_norm`` / ``weight_norm``
    pre-hook sets the weight), or registered a hook with autograd (:data:`_GRAD_REGISTRARS`, or
    a global module backward hook: a gradient scaling or reversal, which changes the backward
    pass and nothing that the forward computes)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.calls = 0
        self.returns = False
        self.mutates = False
        self.registers = False
        #: The gradient hooks it registered (``Tensor.register_hook``,
        #: ``register_multi_grad_hook``), each wrapped in a :class:`_GradHookRecord`.
        self.grad_hooks: list[_GradHookRecord] = []
        #: Whether it registered a hook that the probe cannot run in a plain reverse pass (a
        #: module backward hook, a post-accumulate-grad hook: never taken for a collector).
        self.opaque = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        versions = [_version(t) for t in tensors]
        module = args[0] if args else None
        state = _state_of(module)
        backward = _global_backward_hook_count()
        stack = _REGISTERING.stack
        stack.append(self)
        try:
            result = self.fn(*args, **kwargs)
        finally:
            stack.pop()
        self.calls += 1
        self.returns |= result is not None
        if _global_backward_hook_count() != backward:
            self.registers = self.opaque = True
        after = _state_of(module)
        self.mutates |= (
            any(_version(t) != v for t, v in zip(tensors, versions, strict=True))
            or (state is not None and after is not None and len(state) != len(after))
            or (state is not None and after is not None and any(map(operator.is_not, state, after)))
        )
        return result


#: Tensor methods that read values into Python (control flow on the gradient's values).
_VALUE_READS = frozenset(
    {
        Tensor.__bool__,
        Tensor.item,
        Tensor.tolist,
        Tensor.__float__,
        Tensor.__int__,
        Tensor.__index__,
        Tensor.numpy,
    }
)


class _ValueReads(TorchFunctionMode):
    """Notes whether the code under it read a tensor's values into Python (``bool(g.norm() >
    c)``, ``.item()``): a gradient hook that branches on the gradient may change it on other
    gradients than the one it was shown."""

    def __init__(self) -> None:
        super().__init__()
        self.read = False

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in _VALUE_READS:
            self.read = True
        return func(*args, **(kwargs or {}))


class _GradHookRecord:
    """A gradient hook that a watched forward hook registered (:func:`_noting`), called as it
    is, recording whether it was called and whether it may change the gradient: it returned a
    value other than a tensor it was given, changed one of them in place (its version counter,
    or its values: ``g.data.mul_(3)`` leaves the counter as it was), or read the gradient's
    values into Python (``if g.norm() > c: ...``: one pass cannot show that it only reads; a
    clipping hook that did nothing on the probe's one reverse pass was taken for a collector,
    K 0.5-3.7x off; fourth re-review, session 29). Returning its own argument (``return g``, a
    logger's pass-through) changes nothing."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.calls = 0
        self.changes = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        versions = [_version(t) for t in tensors]
        before = [t.detach().clone() for t in tensors]
        with _ValueReads() as reads:
            result = self.fn(*args, **kwargs)
        self.calls += 1
        self.changes |= (
            not (result is None or any(result is t for t in tensors))
            or reads.read
            or any(_version(t) != v for t, v in zip(tensors, versions, strict=True))
            or any(not torch.equal(b, t) for b, t in zip(before, tensors, strict=True))
        )
        return result


class _Registering(threading.local):
    #: The watched hooks running in this thread, innermost last.
    stack: list[_Watched]

    def __init__(self) -> None:
        self.stack = []


_REGISTERING = _Registering()

#: Where a forward hook registers a hook with autograd: a gradient hook on a tensor
#: (``Tensor.register_hook``: gradient scaling, DANN's gradient reversal), on a parameter's
#: accumulation, on a set of tensors, or a module backward hook. Each is wrapped while a
#: validating pass watches hooks (:func:`_registrations_watched`), and marks the watched hooks
#: running in its thread. Not seen: ``grad_fn.register_hook`` / ``register_prehook`` (methods
#: of C++ types, which cannot be wrapped) and a registrar bound by name before the pass
#: (``from torch.autograd.graph import register_multi_grad_hook``).
#: The third entry: where the registrar takes the gradient hook (its positional index and
#: keyword), which :func:`_noting` wraps in a :class:`_GradHookRecord`; ``None``: a hook the
#: probe does not run in its plain reverse pass (the forward hook is then always kept).
_GRAD_REGISTRARS: tuple[tuple[Any, str, tuple[int, str] | None], ...] = (
    (torch.Tensor, "register_hook", (1, "hook")),
    (torch.Tensor, "register_post_accumulate_grad_hook", None),
    (torch.autograd.graph, "register_multi_grad_hook", (1, "fn")),
    (nn.Module, "register_full_backward_hook", None),
    (nn.Module, "register_full_backward_pre_hook", None),
    (nn.Module, "register_backward_hook", None),
)

_REGISTRARS_LOCK = threading.Lock()
_REGISTRARS_USERS = [0]  # (threads inside _registrations_watched)


def _global_backward_hook_count() -> int:
    """How many global module backward hooks and pre-hooks are registered (a forward hook
    that registers one through ``nn.modules.module.register_module_full_backward_hook`` /
    ``_pre_hook``, whatever name it calls it by, changes this)."""
    from torch.nn.modules import module as module_mod

    return len(module_mod._global_backward_hooks) + len(module_mod._global_backward_pre_hooks)


def _noting(fn: Callable[..., Any], hook_at: tuple[int, str] | None) -> Callable[..., Any]:
    """``fn`` (a registrar of :data:`_GRAD_REGISTRARS`) marking the watched hooks running in
    this thread as registering, and handing on the gradient hook at ``hook_at`` wrapped in a
    :class:`_GradHookRecord` that each of them keeps (``hook_at`` ``None``: marked opaque)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        stack = _REGISTERING.stack
        if not stack:  # (another thread's, or a registration outside the watched hooks)
            return fn(*args, **kwargs)
        record = None
        if hook_at is not None:
            index, keyword = hook_at
            if len(args) > index and callable(args[index]):
                record = _GradHookRecord(args[index])
                args = (*args[:index], record, *args[index + 1 :])
            elif callable(kwargs.get(keyword)):
                record = _GradHookRecord(kwargs[keyword])
                kwargs = {**kwargs, keyword: record}
        for watch in stack:  # (an outer hook that ran this one: kept too)
            watch.registers = True
            if record is None:
                watch.opaque = True
            else:
                watch.grad_hooks.append(record)
        return fn(*args, **kwargs)

    wrapper.__glu_probe_original__ = fn  # type: ignore[attr-defined]
    return wrapper


@contextlib.contextmanager
def _registrations_watched() -> Iterator[None]:
    """The registrars of :data:`_GRAD_REGISTRARS` wrapped for the block (once for all threads
    that are inside one; the last to leave puts the originals back). A wrapper only marks the
    hooks watched in its own thread and calls the original: other threads' registrations work
    as ever."""
    with _REGISTRARS_LOCK:
        if _REGISTRARS_USERS[0] == 0:
            for owner, name, hook_at in _GRAD_REGISTRARS:
                setattr(owner, name, _noting(getattr(owner, name), hook_at))
        _REGISTRARS_USERS[0] += 1
    try:
        yield
    finally:
        with _REGISTRARS_LOCK:
            _REGISTRARS_USERS[0] -= 1
            if _REGISTRARS_USERS[0] == 0:
                for owner, name, _ in _GRAD_REGISTRARS:
                    wrapper = getattr(owner, name)
                    setattr(owner, name, getattr(wrapper, "__glu_probe_original__", wrapper))


@contextlib.contextmanager
def _watching(modules: Sequence[nn.Module]) -> Iterator[list[tuple[_HookSite, _Watched]]]:
    """Every hook of :func:`_forward_hook_sites` replaced by its :class:`_Watched` for the
    block (same key, same place), the hook itself put back after, also on errors; with hooks
    to watch, autograd's registrars are watched too (:func:`_registrations_watched`)."""
    watched = []
    for site in _forward_hook_sites(modules):
        registry, key, fn = site
        watch = _Watched(fn)
        registry[key] = watch
        watched.append((site, watch))
    try:
        with _registrations_watched() if watched else contextlib.nullcontext():
            yield watched
    finally:
        for (registry, key, fn), watch in watched:
            if registry.get(key) is watch:
                registry[key] = fn


def _take_out(
    sites: Sequence[_HookSite],
) -> list[tuple[dict[Any, Any], list[tuple[Any, Any]], set[Any]]]:
    """Take the hooks of ``sites`` that are still registered out of their registries; returns
    what :func:`_put_back` needs, per registry."""
    by_registry: dict[int, tuple[dict[Any, Any], list[tuple[Any, Any]], set[Any]]] = {}
    for registry, key, fn in sites:
        if registry.get(key) is not fn:
            continue  # (removed since, replaced, or out already: a nested session)
        entry = by_registry.get(id(registry))
        if entry is None:
            entry = by_registry[id(registry)] = (registry, list(registry.items()), set())
        entry[2].add(key)
    for registry, _, taken in by_registry.values():
        for key in taken:
            del registry[key]
    return list(by_registry.values())


def _reached(t: Tensor) -> set[int]:
    """The ids of the leaf tensors whose gradient ``t``'s autograd graph accumulates (the graph
    only: saved tensors are not needed)."""
    found: set[int] = set()
    seen: set[Any] = set()
    stack: list[Any] = [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):
            found.add(id(variable))
        stack.extend(child for child, _ in node.next_functions)
    return found


def _hook_name(site: _HookSite) -> str:
    fn = site[2]
    return repr(getattr(fn, "__qualname__", None) or type(fn).__name__)


def _lightning_module_types() -> tuple[type, ...]:
    """Lightning's ``LightningModule`` classes that are loaded (``lightning.pytorch`` and the
    older ``pytorch_lightning``): a model can only hold an instance of a loaded class, so
    nothing is imported."""
    found = []
    for name in ("lightning.pytorch.core.module", "pytorch_lightning.core.module"):
        cls = getattr(sys.modules.get(name), "LightningModule", None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def _no_log(*args: Any, **kwargs: Any) -> None:
    """``LightningModule.log`` / ``log_dict`` inside the probe's passes: nothing is logged."""


#: The LightningModule methods that a forward may call to log (``log_dict`` calls ``log``).
_LOG_METHODS = ("log", "log_dict")

_MISSING = object()


def _logging_off(modules: Sequence[nn.Module]) -> list[tuple[dict[str, Any], str, Any]]:
    """Shadow ``log`` and ``log_dict`` of every ``LightningModule`` in ``modules`` with an
    instance attribute that does nothing; returns what to put back (the instance's own
    attribute, or :data:`_MISSING`)."""
    types = _lightning_module_types()
    if not types:
        return []
    saved = []
    for m in modules:
        if isinstance(m, types):
            own = vars(m)
            for name in _LOG_METHODS:
                saved.append((own, name, own.get(name, _MISSING)))
                own[name] = _no_log
    return saved


def _logging_on(saved: list[tuple[dict[str, Any], str, Any]]) -> None:
    for own, name, value in reversed(saved):
        if value is _MISSING:
            own.pop(name, None)
        else:
            own[name] = value


def _rng_states(device: torch.device) -> list[Tensor]:
    """The global RNG states a pass on ``device`` may draw from (the CPU's, and the device's
    own on CUDA)."""
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


#: The attribute dicts of a module that hold the module's machinery, never a generator.
_NOT_HOLDERS = frozenset(
    {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"}
    | {name for name in vars(nn.Module()) if name.endswith("hooks")}
)

#: What a value of each type is to :func:`model_generators`: 1 a generator, 2 a list or
#: tuple, 3 a dict, 0 none of them (per type: ``isinstance(v, torch.Generator)`` took 0.25 µs,
#: 9 ms per session on a model of 1300 modules).
_KINDS: dict[type, int] = {}


def _kind(t: type) -> int:
    kind = _KINDS.get(t)
    if kind is None:
        kind = _KINDS[t] = (
            1
            if issubclass(t, torch.Generator)
            else 2
            if issubclass(t, (list, tuple))
            else 3
            if issubclass(t, dict)
            else 0
        )
    return kind


#: The largest list, tuple or dict attribute that :func:`model_generators` looks into (a
#: 1M-entry vocabulary list took 0.37 s a probe to walk; review, session 29).
_MAX_HOLDER = 64


def model_generators(
    model: nn.Module, modules: Sequence[nn.Module] | None = None
) -> list[tuple[str, torch.Generator]]:
    """The ``torch.Generator`` objects that ``model``'s modules (``modules``, where given:
    ``list(model.modules())``) hold as attributes, directly or in a list, tuple or dict
    attribute of at most 64 entries (one level deep), each once, in module order, with where
    it is held (``"noise.gen"``, ``"gens[1]"``): a model that draws its train-mode noise from
    its own generator (``torch.randn(..., generator=self.gen)``). Generators held deeper, in a
    larger container, in another object (a ``SimpleNamespace``), or only in a closure, are
    not found."""
    found: list[tuple[str, torch.Generator]] = []
    seen: set[int] = set()
    kinds = _KINDS
    named: Any = model.named_modules() if modules is None else (("", m) for m in modules)
    for prefix, m in named:
        own = getattr(m, "__dict__", None)
        if not isinstance(own, dict):
            continue
        for name, value in own.items():
            kind = kinds.get(type(value))
            if kind is None:
                kind = _kind(type(value))
            if not kind:
                continue
            if kind == 1:
                held: list[tuple[str, Any]] = [(name, value)]
            elif len(value) > _MAX_HOLDER:
                continue
            elif kind == 2:
                held = [(f"{name}[{k}]", v) for k, v in enumerate(value) if _kind(type(v)) == 1]
            elif name in _NOT_HOLDERS or not value:
                continue
            else:
                held = [(f"{name}[{k!r}]", v) for k, v in value.items() if _kind(type(v)) == 1]
            for where, g in held:
                if id(g) not in seen:
                    seen.add(id(g))
                    found.append((f"{prefix}.{where}" if prefix else where, g))
    if found and modules is not None:
        return model_generators(model)  # (rare: again, for the names)
    return found


def generator_states(
    generators: Sequence[tuple[str, torch.Generator]],
) -> list[tuple[torch.Generator, Tensor]]:
    """Each generator of :func:`model_generators` with its state, to put back with
    ``set_state``.

    Raises:
        ValueError: a generator whose state cannot be read (so the probe could neither put it
            back nor seed it), named by where the model holds it."""
    states = []
    for where, g in generators:
        try:
            states.append((g, g.get_state()))
        except RuntimeError as err:
            raise ValueError(
                f"the NTK probe cannot save and restore the model's own random generator "
                f"{where!r} (a torch.Generator on {g.device}: {err}), so its passes would "
                "advance it and change the training that follows: give the model a generator "
                "whose state can be read and set (get_state / set_state)"
            ) from err
    return states


#: The per-module registries a forward may add to or rebind (a buffer registered on the first
#: call, a submodule built lazily), restored with the module's attributes after a probe.
_REGISTRIES = ("_parameters", "_buffers", "_modules")

#: Attribute values a forward may leave behind when nothing else changed (a call counter, a
#: flag): immutable scalars, which hold no tensor of the probe's dtype or transforms.
_PLAIN = (bool, int, float, complex, str, bytes, type(None))

_Pairs = list[tuple[dict[str, Any], dict[str, Any]]]
#: What :func:`_restore_attributes` puts back: (live dict, shallow copy) pairs of the modules'
#: attribute dicts and of their non-empty registries, and the registries that were empty (most
#: buffer and leaf submodule registries: no copy to compare).
_Attributes = tuple[_Pairs, _Pairs, list[dict[str, Any]]]


def _attributes_of(modules: Sequence[nn.Module]) -> _Attributes:
    """Each module's attribute dict and its parameter, buffer and submodule registries, each
    with a shallow copy (values held by identity: no tensor is copied)."""
    own_dicts: _Pairs = []
    registries: _Pairs = []
    empty: list[dict[str, Any]] = []
    for m in modules:
        own = vars(m)
        own_dicts.append((own, own.copy()))
        for name in _REGISTRIES:
            registry = own.get(name)
            if not isinstance(registry, dict):  # (TorchScript modules wrap theirs)
                continue
            if registry:
                registries.append((registry, registry.copy()))
            else:
                empty.append(registry)
    return own_dicts, registries, empty


def _changed(pairs: _Pairs) -> _Pairs:
    """The pairs whose live dict differs from its copy: another length, or another object at
    some position (an entry added, removed or rebound; a key renamed shifts the values after
    it, unless they are all one object)."""
    is_ = operator.is_
    # (C-level, and without comparing the key sets, which cost 60% more: a probe enters many
    # sessions, and most leave every dict as it was)
    return [
        (live, before)
        for live, before in pairs
        if not (len(live) == len(before) and all(map(is_, live.values(), before.values())))
    ]


def _plain_change(live: dict[str, Any], before: dict[str, Any]) -> bool:
    """Every entry added, removed or rebound in ``live`` was and is a :data:`_PLAIN` value."""
    for key in live.keys() | before.keys():
        old, new = before.get(key), live.get(key)  # (missing: None, plain)
        if old is not new and not (isinstance(old, _PLAIN) and isinstance(new, _PLAIN)):
            return False
    return True


def _restore_attributes(attributes: _Attributes) -> None:
    """Put the dicts of :func:`_attributes_of` back as they were (keys added since dropped,
    values rebound since put back: the same objects, order kept) when a session left anything
    but plain scalars behind: a tensor, a module, an object, any registry entry. Then every
    module's dict goes back, not only the ones that hold tensors, so that the model's state
    stays consistent (a cached length with its table). A session that only rebound scalars (a
    call counter, as the forward passes did run) keeps them, as it keeps the hooks' effects. A
    value mutated in place (a cache dict a forward fills) is not seen."""
    own_dicts, registries, empty = attributes
    changed = _changed(own_dicts)
    moved = _changed(registries)
    grown = [registry for registry in empty if registry]
    if not moved and not grown and all(_plain_change(*pair) for pair in changed):
        return
    for live, before in changed + moved:
        live.clear()
        live.update(before)
    for registry in grown:
        registry.clear()


def _precision_knobs() -> list[Any]:
    """The per-backend ``fp32_precision`` settings of torch >= 2.9 (cuBLAS, cuDNN, oneDNN)."""
    b = torch.backends
    owners = [
        getattr(b.cuda, "matmul", None),
        getattr(getattr(b, "cudnn", None), "conv", None),
        getattr(getattr(b, "cudnn", None), "rnn", None),
        getattr(getattr(b, "mkldnn", None), "matmul", None),
        getattr(getattr(b, "mkldnn", None), "conv", None),
        getattr(getattr(b, "mkldnn", None), "rnn", None),
    ]
    return [o for o in owners if o is not None and hasattr(o, "fp32_precision")]


@contextlib.contextmanager
def ieee_float32() -> Iterator[None]:
    """float32 matmuls and convolutions in IEEE float32 inside the block (no TF32 on CUDA, no
    bf16 oneDNN kernels on the CPU), the user's settings restored after.

    On torch >= 2.9 through the ``fp32_precision`` settings: the legacy ``allow_tf32`` getters
    raise once those were used (``torch.backends.fp32_precision``, Hugging Face
    ``TrainingArguments(tf32=...)``), and setting the legacy flags back would leave a
    ``set_float32_matmul_precision("medium")`` process in a mixed state in which
    ``torch.get_float32_matmul_precision()`` raises. Older torch: the ``allow_tf32`` flags."""
    knobs = _precision_knobs()
    if knobs:
        saved = [o.fp32_precision for o in knobs]
        try:
            for o in knobs:
                o.fp32_precision = "ieee"
            yield
        finally:
            for o, v in zip(knobs, saved, strict=True):
                o.fp32_precision = v
        return
    legacy = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = legacy


def least_memory_budget(
    model: nn.Module, inputs: Any, params: ParamFilter, dtype: torch.dtype | None
) -> int:
    """The least ``memory_budget`` (bytes) that any NTK computation of ``model`` on ``inputs``
    accepts: the probe's copies of its parameters, buffers and inputs
    (:func:`planned_copy_bytes`) and four parameter-sized vectors (one product's, or one row
    block's Gram operands) at the probe's itemsize. Below it, :func:`refuse_small_budget`
    refuses; K and the Jacobian rows come on top."""
    copies, n_params, item = planned_copy_bytes(model, inputs, params, dtype)
    return copies + 4 * n_params * item


def refuse_small_budget(
    memory_budget: int | None,
    model: nn.Module,
    inputs: Any,
    params: ParamFilter,
    dtype: torch.dtype | None,
) -> None:
    """A ``ValueError`` before anything is copied or run where ``memory_budget`` cannot hold
    what every NTK computation holds at least: the probe's copies of its parameters, buffers and
    inputs, and four parameter-sized vectors (one product's, or one row block's Gram operands).
    Budgets above this may still be refused later, by what depends on the rows (K itself)."""
    if memory_budget is None:
        return
    least = least_memory_budget(model, inputs, params, dtype)
    if memory_budget < least:
        copies, n_params, item = planned_copy_bytes(model, inputs, params, dtype)
        raise ValueError(
            f"memory_budget={memory_budget} bytes is too small: the probe's copies of the "
            f"parameters, buffers and inputs take {copies} bytes and the computation needs at "
            f"least four parameter-sized vectors ({4 * n_params * item}) beside them; give at "
            f"least {least} bytes (K and the Jacobian rows come on top)"
        )


def all_finite(t: Tensor, block: int = 4096) -> bool:
    """``torch.isfinite(t).all()`` without its temporaries of t's size (``isfinite`` allocates
    ``abs(t)`` and three boolean masks). A finite sum proves every entry finite (a NaN or an
    infinity makes the sum NaN or infinite); only where the sum is not finite (non-finite
    entries, or finite ones whose sum overflows) are the entries checked, ``block`` at a time.
    """
    if bool(torch.isfinite(t.sum())):
        return True
    flat = t.reshape(-1)
    return all(
        bool(torch.isfinite(flat[a : a + block]).all()) for a in range(0, flat.numel(), block)
    )


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storage that operations inside the block allocate and that are alive
    at once (each storage counted once, released when its last tensor dies; views of the
    operations' inputs, such as the model's own parameters, are not allocations).

    The CPU counterpart of ``torch.cuda.max_memory_allocated`` for checking ``memory_budget``
    (tests, ``benchmarks/bench_ntk.py``), less the scratch that kernels allocate internally.
    The process's RSS also holds memory that the C allocator keeps after tensors are freed.
    """

    def __init__(self, record: bool = False) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        #: With ``record``: the bytes alive after each operation's allocations, in order (the
        #: memory profile that :func:`~glu_probe.ntk.structured._peak_model` fits per sample).
        self.trace: list[int] | None = [] if record else None

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    @staticmethod
    def _storage(t: Any) -> Any:
        """The real storage behind ``t``, or ``None`` (fake or meta tensors of a trace)."""
        from torch._subclasses.fake_tensor import FakeTensor

        if not isinstance(t, Tensor) or isinstance(t, FakeTensor) or t.is_meta:
            return None
        try:
            storage = t.untyped_storage()
            storage.data_ptr()
        except (RuntimeError, NotImplementedError):
            return None
        return storage

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = set()
        for t in pytree.tree_leaves((args, kwargs)):
            storage = self._storage(t)
            if storage is not None:
                inputs.add(storage.data_ptr())
        for t in pytree.tree_leaves(out):
            storage = self._storage(t)
            if storage is None:
                continue
            key = storage.data_ptr()
            if key in self.live or key in inputs or storage.nbytes() == 0:
                continue
            self.live[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._release, key)
        if self.trace is not None:
            self.trace.append(self.current)
        return out


def _sparse_embedding(m: nn.Module) -> TypeGuard[nn.Embedding | nn.EmbeddingBag]:
    """An ``nn.Embedding`` or ``nn.EmbeddingBag`` with ``sparse=True`` (sparse gradients)."""
    return isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse is True


@contextlib.contextmanager
def _mha_fastpath_off() -> Iterator[None]:
    """The native fast path of ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``
    off inside the block, the user's setting restored after (also on error).

    Its fused kernels (``_transformer_encoder_layer_fwd``, ``_native_multi_head_attention``)
    have no forward-mode AD: in eval mode every Lanczos product fell back, with a warning, to
    the slower reverse-mode J·u (review, session 28). The slow path computes the same function.
    ``torch.backends.mha`` is in torch 2.4 (the lower bound), not in 2.2: without it, nothing
    is changed."""
    try:
        from torch.backends import mha
    except ImportError:  # (older torch)
        mha = None  # type: ignore[assignment]
    get = getattr(mha, "get_fastpath_enabled", None)
    set_ = getattr(mha, "set_fastpath_enabled", None)
    if get is None or set_ is None:
        yield
        return
    before = get()
    set_(False)
    try:
        yield
    finally:
        set_(before)


def _no_eval_error(err: NotImplementedError) -> ValueError:
    """The clear error for a model whose ``eval()`` is not implemented: a module from
    ``torch.export`` (``ExportedProgram.module()``) raised torch's "Calling train() is not
    supported yet." from the probe's own restore, although the user called no train() (review,
    session 28)."""
    return ValueError(
        f"the NTK probe's eval_mode=True cannot switch this model to eval mode: its eval() "
        f"raises NotImplementedError ({err}). A module from torch.export "
        "(ExportedProgram.module()) runs its graph as it was exported, in the mode it was "
        "exported in: pass eval_mode=False to probe it as it is (export the model after "
        "model.eval() for eval-mode behaviour)"
    )


#: Wrappers whose forward is their ``.module``'s (with data-parallel bookkeeping around it): the
#: probe runs the wrapped module itself.
_PARALLEL_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def _unwrapped(model: nn.Module, params: ParamFilter) -> tuple[nn.Module, ParamFilter]:
    """The module a probe of ``model`` runs, and ``params`` for it.

    ``nn.DataParallel`` and ``DistributedDataParallel`` give their ``.module``: the same
    function of the same parameters (the wrappers scatter the batch across devices, or sync
    buffers and gradients, around that module's forward), which torch.func refused to run
    through (DataParallel: "The stateless API can't be used with nn.DataParallel module";
    review, session 28). A filter of names, patterns or a callable is applied to the wrapper's
    names (``module.0.weight``) and passed on as the module's own names. A TorchScript module
    is refused with a ``ValueError``: torch.func cannot run a compiled module at the top level
    (torch's "The stateless API can't be used with Jitted modules")."""
    if isinstance(model, torch.jit.ScriptModule):
        raise ValueError(
            f"the model is a TorchScript module ({type(model).__name__}, from torch.jit.script or "
            "torch.jit.trace), which the NTK probe does not support: it runs the model through "
            "torch.func (functional_call, vmap, jvp), which cannot run a compiled TorchScript "
            "module; probe the original nn.Module (the one scripted or traced), which computes "
            "the same function"
        )
    while isinstance(model, _PARALLEL_WRAPPERS):
        wrapper, model = model, model.module
        if params is not None and not isinstance(params, nn.Module):
            # (the wrapper's names are "module." + the module's, in the same order)
            params = [n.removeprefix("module.") for n in select_parameters(wrapper, params)]
    return model, params


class ProbeFunction:
    """A model and a probe batch as a pure function of the selected trainable parameters.

    The user's forward hooks that are part of the model's function (they return a value,
    change their arguments or module in place, or register a gradient hook) run in every pass;
    those that only watch (an activation collector) run in the validating forward pass alone,
    with plain tensors, and are taken out of the transformed passes (:meth:`_classify_hooks`).
    A ``LightningModule``'s ``self.log`` / ``log_dict`` log nothing inside the probe
    (:meth:`session`).

    Args:
        model: any ``nn.Module``. An ``nn.DataParallel`` or ``DistributedDataParallel`` wrapper
            is probed through its ``.module`` (the same function: :attr:`model` and the
            parameter :attr:`names` are then the wrapped module's, without ``module.``); a
            TorchScript module (``torch.jit.script`` / ``trace``) is refused.
        inputs: a tensor (called as ``model(x)``), a tuple/list/namedtuple (``model(*x)``) or a
            dict (``model(**x)``, e.g. an HF batch). Integer tensors (token ids, masks) are
            carried as they are; floating tensors are cast to ``dtype``. The batch size is the
            leading dimension of the first tensor (of a dict's first per-sample key such as
            ``input_ids``, see :func:`_batch_source`); every tensor whose leading dimension
            equals it is split per sample and when the batch is chunked, every other tensor is
            an unbatched constant. Per-sample dict keys of another batch size raise a
            ``ValueError`` (:func:`_check_batch_sizes`).
        output: ``"pntk"``, ``"full"`` or a callable ``model_output -> rows``.
        params: parameter filter, see :func:`select_parameters`.
        dtype: floating dtype of the probe (parameters, floating buffers and inputs are cast).
            ``None`` keeps the model's dtype.
        eval_mode: run the model in eval mode (BatchNorm uses running statistics, dropout is off).
            With ``False`` the model's own flags are kept; buffers are still copies, so running
            statistics never change, and stochastic layers make K itself random (the dense
            path's K is then J Jᵀ of one draw, see :func:`~glu_probe.ntk.dense.jacobian_rows`).
        memory_budget: bytes the probe may hold while it validates the batch: its copies of
            the parameters, buffers and inputs (:func:`probe_copy_bytes`) and the validating
            forward pass (``None``: the whole batch at once). Given, the batch is validated in
            chunks of
            samples sized by one sample's traced activations
            (:func:`~glu_probe.ntk.dense.activation_elements`), so that a budget given to
            :func:`~glu_probe.ntk.ntk_matrix` or :func:`~glu_probe.ntk.ntk_spectrum` also
            bounds the probe's construction.

    Raises:
        ValueError: empty batch, inputs that disagree on the batch size, no trainable
            parameters, outputs that do not depend on the selected parameters, NaN/Inf
            outputs, a TorchScript model, or ``eval_mode=True`` for a model that cannot be
            switched to eval mode (a module from ``torch.export``).
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
        memory_budget: int | None = None,
    ) -> None:
        if not (output in ("pntk", "full") or callable(output)):
            raise ValueError(f"output must be 'pntk', 'full' or a callable, got {output!r}")
        model, params = _unwrapped(model, params)
        self.model = model
        self.output = output
        self.eval_mode = eval_mode
        # Modules registered under several names (``ModuleList([blk] * 3)``, ``self.b = self.a``):
        # torch.func.functional_call does not restore their parameters after a call (torch
        # 2.14: the model keeps the probe's tensor copies, detached and in the probe's dtype),
        # so call_model puts them back itself.
        seen: dict[int, int] = {}
        for _, mod in model.named_modules(remove_duplicate=False):
            seen[id(mod)] = seen.get(id(mod), 0) + 1
        self._aliased = [m for m in model.modules() if seen[id(m)] > 1]
        if not eval_mode:
            _warn_train_mode_layers(model)
        with torch.inference_mode(False):  # copies usable by autograd even if called under it
            self._init_tensors(model, inputs, params, dtype)
        self._validation_budget = memory_budget
        #: Why a sample evaluated alone does not give its rows in the batch (``None``: it does);
        #: set by the validating forward pass, see :meth:`_independence`.
        self.per_sample_why: str | None = None
        #: The user's forward hooks that only watch, kept out of every pass after the
        #: validating one (``None``: not yet classified; see :meth:`_classify_hooks`).
        self._observers: list[_HookSite] | None = None
        #: Whether the model's forward pass draws random numbers (active dropout, stochastic
        #: depth, noise injection: the validating pass moved the global RNG state, or that of
        #: a generator the model holds, see :func:`model_generators`); the
        #: dense path's rows then draw per sample from a seeded generator
        #: (:func:`~glu_probe.ntk.dense.jacobian_rows`), so that K is J Jᵀ of one draw.
        self.draws_random = False
        #: The model's own generators (:func:`model_generators`) inside a :meth:`session`,
        #: each pass's draws from them undone after it (:meth:`call_model`), and whether a pass
        #: drew from one.
        self._own_generators: list[torch.Generator] = []
        self._draws_own = False
        self.n_rows, self.rows_per_sample = self._check()

    def _init_tensors(
        self, model: nn.Module, inputs: Any, params: ParamFilter, dtype: torch.dtype | None
    ) -> None:
        selected = select_parameters(model, params)
        first = next(iter(selected.values()))
        if any(p.is_meta for p in selected.values()):
            raise ValueError(
                "the model's parameters are on the meta device (shapes without values): load or "
                "initialise them (e.g. model.to_empty(device=...) and an init, or "
                "load_state_dict(..., assign=True)) before probing"
            )
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
        self._clone_buffers = False  # (set once a forward is seen to update a buffer in place)
        for n, p in model.named_parameters():
            if n not in selected:
                self.constants[n] = self._cast(p.detach())
        self._buffer_names = []
        for n, b in model.named_buffers():
            self.constants[n] = self._cast(b.detach()).clone()
            self._buffer_names.append(n)
        self._versions = _versions(model)  # (see _check_snapshot)
        self._source = (inputs, params)
        self.batch_size = _batch_size(inputs)
        if self.batch_size == 0:
            raise ValueError("the probe batch is empty (batch size 0); pass at least one sample")
        _check_batch_sizes(inputs, self.batch_size)
        self.inputs = _map_tensors(
            inputs, lambda t: _normal(self._cast(t).to(self.device)), plain=True
        )
        self.n_params = sum(p.numel() for p in self.params)

    def _check_snapshot(self) -> None:
        """Refuse a re-cast once the model's parameters or buffers changed: the probe holds the
        weights of its construction, and a re-cast from the live model mixed them (K at the new
        weights or the old, by jacobian_dtype alone; review, session 25)."""
        now = _versions(self.model)
        held = {**dict(zip(self.names, self.params, strict=True)), **self.constants}
        live = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}
        for n, tensor in live.items():
            # Only the tensors replaced or written in place since (new ones, such as a buffer a
            # forward registers on its first call, are not part of the snapshot), compared
            # with NaNs in the same places equal (a NaN buffer made a false "changed").
            snap = held.get(n)
            if snap is None or now.get(n) == self._versions.get(n):
                continue
            if not _same_values(self._cast(tensor.detach()).to(snap.device), snap):
                what = "parameter" if n in self.names else "buffer or frozen parameter"
                raise ValueError(
                    f"the model's {what} {n!r} changed since this probe was built: a probe "
                    "holds the weights of its construction; build a new one (or call ntk_matrix "
                    "/ ntk_spectrum with the model) after an optimizer step"
                )

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
        self._check_snapshot()
        # Same model, rows and checks: only the tensors are re-cast, from the model's own
        # parameters and the original inputs (not from this probe's possibly rounded copies).
        # The validating forward pass of ``__init__`` is repeated only when narrowing: row
        # count, parameter dependence and finiteness do not change with a wider float type.
        new = copy.copy(self)
        new.dtype = dtype
        with torch.inference_mode(False):
            named = dict(self.model.named_parameters())
            new.params = tuple(named[n].detach().to(dtype, copy=True) for n in self.names)
            new.constants = {
                n: new._cast(t.detach()) for n, t in named.items() if n not in self.names
            }
            for n, b in self.model.named_buffers():
                new.constants[n] = new._cast(b.detach()).clone()
            new.inputs = _map_tensors(
                self._source[0], lambda t: _normal(new._cast(t).to(self.device)), plain=True
            )
        if check and torch.finfo(dtype).bits < torch.finfo(self.dtype).bits:
            new.n_rows, new.rows_per_sample = new._check()
        return new

    # ------------------------------------------------------------------ helpers
    def _cast(self, t: Tensor) -> Tensor:
        return t.to(self.dtype) if t.is_floating_point() else t

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Probe context: eval mode, SDPA math backend, the ``nn.MultiheadAttention`` /
        ``nn.TransformerEncoderLayer`` fast path off, dense gradients for ``sparse=True``
        embeddings, IEEE float32 (no TF32, no bf16 oneDNN matmuls), forked RNG (the global
        generators, and the model's own: :func:`model_generators`); all restored
        after, and every module's attributes, parameters, buffers and submodules as they were
        at entry where a pass left a tensor (or anything but plain scalars) in them (see
        :func:`_restore_attributes`). The user's forward hooks that only watch
        (:meth:`_classify_hooks`) are taken out of their registries for the session, global
        ones too (for every thread, for that time), and put back at their places after, also on
        errors; every ``LightningModule``'s ``log`` and ``log_dict`` do nothing inside it
        (instance attributes, removed after: an instance's own attribute of that name is put
        back).

        Raises:
            ValueError: ``eval_mode=True`` and the model's ``eval()`` raises
                ``NotImplementedError`` (a module from ``torch.export``)."""
        modules = list(self.model.modules())
        flags = [(m, m.training) for m in modules]
        # What a forward leaves in the model's attributes goes with the session: a cache built
        # in the probe's dtype (a float64 position table the next float32 training step failed
        # on), a buffer registered on the first call, a tensor from inside a transform (review,
        # session 26). Each session is its own: a later pass of the same call, in another
        # dtype, builds its own cache instead of reusing a narrower one. Shallow copies: about
        # 1.2 ms per 1000 modules (GPT-2 on a 2-core box, twice a model.modules() walk), and
        # torch.func.functional_call has put its swapped tensors back by the exit.
        attributes = _attributes_of(modules)
        devices = [self.device] if self.device.type == "cuda" else []
        switched = False
        # Inside the user's ``torch.nn.utils.parametrize.cached()`` a parametrized weight is
        # computed once and reused: every probe pass then read the weight of the first call, not
        # the probe's parameters (weight_norm: K 5% off and a false λ_min bound, review session
        # 20). The probe turns the cache off for its passes and gives it back as it was.
        from torch.nn.utils import parametrize

        cache_level = getattr(parametrize, "_cache_enabled", None)
        if cache_level:
            parametrize._cache_enabled = 0
        # Gradient checkpointing recomputes the same forward: the probe's passes run without it
        # (torch.func has no saved-tensor hooks, so timm's set_grad_checkpointing(True) ended
        # the fit at the first probe; and Hugging Face's checkpointing registers a hook that
        # calls requires_grad_() on the embeddings' output, refused inside a transform; review,
        # session 23). Flags and hooks are given back as they were.
        checkpointing, hooks = _checkpointing_off(self.model)
        # The user's forward hooks that only watch (an activation collector) stay out of the
        # probe's passes after the validating one (see _classify_hooks): inside a transform they
        # were handed vmap's batched, forward-mode dual and float64 tensors, which escaped into
        # the user's list and crashed its torch.stack (review, session 29). And a
        # LightningModule's self.log in forward logs nothing here: the logged tensor escaped
        # from vmap into Lightning's results and ended the fit.
        observers = _take_out(self._observers or ())
        logging: list[tuple[dict[str, Any], str, Any]] = []
        # The model's own generators (torch.randn(..., generator=self.gen) in a train-mode
        # noise layer) are forked like the global ones: the probe advanced them, and an
        # eval_mode=False monitor changed the training that followed (review, session 29).
        generators: list[tuple[torch.Generator, Tensor]] = []
        own_before = self._own_generators
        # ``sparse=True`` embeddings only store their gradient as a sparse tensor, which
        # torch.func cannot handle (every probe failed on "aten::view ... SparseCPU"; review,
        # session 28): dense gradients inside the probe, the flags given back after.
        sparse = [m for m in modules if _sparse_embedding(m)]
        try:
            generators = generator_states(model_generators(self.model, modules))
            self._own_generators = [g for g, _ in generators]
            logging = _logging_off(modules)
            for emb in sparse:
                emb.sparse = False
            if self.eval_mode:
                switched = True
                try:
                    self.model.eval()
                except NotImplementedError as err:
                    switched = False  # (its train() refuses too)
                    raise _no_eval_error(err) from err
            with (
                ieee_float32(),
                _outer_autocast_off("cpu", self.device.type),
                torch.random.fork_rng(devices=devices),
                torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH),
                _mha_fastpath_off(),
                torch.inference_mode(False),  # e.g. a Lightning validation hook
                _eager_stance(),
            ):
                try:
                    yield
                except RuntimeError as err:
                    if "saved tensor hooks" not in str(err):
                        raise
                    raise RuntimeError(
                        f"{err} The model runs activation (gradient) checkpointing or another "
                        "saved-tensor hook in its forward, which torch.func cannot differentiate "
                        "through; the probe turns off timm's and Hugging Face's checkpointing "
                        "flags, but not a torch.utils.checkpoint call the model makes "
                        "unconditionally: make it conditional (e.g. on a flag or self.training, "
                        "with the probe's default eval_mode=True)"
                    ) from err
        finally:
            self._own_generators = own_before
            for g, state in generators:
                g.set_state(state)
            _logging_on(logging)  # (before the attribute restore: the session's own entries)
            for registry, saved_items, taken in reversed(observers):
                _put_back(registry, saved_items, taken)
            for m, name in checkpointing:
                vars(m)[name] = True
            for hook_dict, saved in hooks:
                _put_back(hook_dict, saved, {k for k, fn in saved if _is_require_grads_hook(fn)})
            if switched:
                # Back through the model's own train(): an override that switches more than
                # the flags (frozen BatchNorm, noise injection) undoes its eval() side effects.
                # Then every flag exactly as it was (mixed modes, flags set by hand).
                self.model.train(flags[0][1])
            for m, t in flags:
                m.training = t
            _restore_attributes(attributes)
            for emb in sparse:
                # (explicitly: the attribute restore keeps a session's plain scalars)
                emb.sparse = True
            if cache_level:
                parametrize._cache_enabled = cache_level

    def call_model(self, params: Sequence[Tensor], inputs: Any) -> Any:
        """The raw model output at ``params`` (a tuple aligned with :attr:`names`).

        Inside a :meth:`session`, the model's own generators (:func:`model_generators`) are
        put back after the pass as they were before it: every pass draws the same numbers
        from them (as the iterative path's products fork the global RNG for each pass), so
        the products of one call are those of one network."""
        own = self._own_generators
        if not own:
            return self._call_model(params, inputs)
        states = [g.get_state() for g in own]
        try:
            return self._call_model(params, inputs)
        finally:
            for g, state in zip(own, states, strict=True):
                after = g.get_state()
                if not torch.equal(after, state):
                    self._draws_own = True
                    g.set_state(state)

    def _call_model(self, params: Sequence[Tensor], inputs: Any) -> Any:
        state = dict(self.constants)
        # Forwards that update buffers in place (train-mode BatchNorm, but also a call counter
        # or a running estimate updated in eval mode): torch.func forbids mutating captured
        # tensors, and the probe's own copies must stay as built (a mutated copy once made the
        # first and last samples' validating passes disagree: a false "not independent"), so
        # such forwards get fresh copies per call (counted per pass in the memory plans). In
        # eval mode only once a forward is seen to mutate one: copying a large read-only buffer
        # per pass made a dense probe 14x slower (a 4000x8000 table; review, session 20).
        clone = self._clone_buffers or not self.eval_mode
        if clone:
            state.update({n: self.constants[n].clone() for n in self._buffer_names})
        versions = None if clone else [self.constants[n]._version for n in self._buffer_names]
        state.update(zip(self.names, params, strict=True))
        if isinstance(inputs, Mapping):
            args: tuple[Any, ...] = ()
            kwargs = dict(inputs)
        else:
            args, kwargs = (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), {}
        try:
            out = self._functional_call(state, args, kwargs)
        except RuntimeError as err:
            if "must override the setup_context staticmethod" in str(err):
                # (a module backward hook met inside a transform that the validating pass did
                # not meet, e.g. one registered since: torch's error names no module)
                found = _module_backward_hooks(self.model)
                if found is not None:
                    raise _backward_hook_error(found) from err
            if clone or "mutate a captured Tensor" not in str(err):
                raise
            self._buffers_mutated()  # (inside a transform, before any plain call saw it)
            return self._call_model(params, inputs)
        if versions and any(
            self.constants[n]._version != v
            for n, v in zip(self._buffer_names, versions, strict=True)
        ):
            self._buffers_mutated()
        return out

    def _copies_drifted(self) -> bool:
        """Whether a pass changed the probe's buffer copies (in eval mode, where they are not
        cloned per pass) from the model's buffers they were copied from.

        Some in-place updates leave the version counter that :meth:`call_model` checks as it
        was: the fused observer of QAT fake-quantisation (``torch.fused_moving_avg_obs_fake_
        quant``, the default ``prepare_qat``) updated its min/max and scale in the probe's
        copies at every pass, and K was another model's (19% off, Lanczos converged on a λ_max
        3e-3 off, no warning; review, session 28). Called once per probe, after the validating
        passes: the values of every buffer are compared then, not per product."""
        if self._clone_buffers or not self.eval_mode:
            return False
        live = dict(self.model.named_buffers())
        return any(
            n in live
            and _comparable(live[n])
            and _comparable(self.constants[n])
            and not _same_values(self.constants[n], self._cast(live[n].detach()))
            for n in self._buffer_names
        )

    def _buffers_mutated(self) -> None:
        """A forward updated a buffer in place: fresh copies per call from now on, and the
        probe's own copies back to the model's values."""
        self._clone_buffers = True
        for n, b in self.model.named_buffers():
            if n in self.constants:
                self.constants[n] = self._cast(b.detach()).clone()

    def _functional_call(self, state: dict[str, Tensor], args: Any, kwargs: Any) -> Any:
        if not self._aliased:
            return torch.func.functional_call(self.model, state, args, kwargs)
        saved = [(m, dict(m._parameters), dict(m._buffers)) for m in self._aliased]
        try:
            return torch.func.functional_call(self.model, state, args, kwargs)
        finally:
            for m, params_, buffers in saved:
                m._parameters.clear()
                m._parameters.update(params_)
                m._buffers.clear()
                m._buffers.update(buffers)

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
        """Contiguous sample ranges of at most ``chunk_size`` samples (one range if ``None``).

        A ``ValueError`` where that splits the batch of a probe whose samples are not
        independent (:attr:`per_sample_why`): the products of its parts would not be the
        batch's."""
        ranges = self._split(chunk_size)
        if len(ranges) > 1 and self.per_sample_why is not None:
            raise ProbeSplitError(
                f"the probe batch cannot be split into chunks of {ranges[0][1]} samples (to fit "
                f"memory_budget, or chunk_size): {self.per_sample_why}, so products over parts "
                "of the batch are not the batch's NTK. Give memory for the whole batch (a larger "
                "memory_budget, chunk_size=None), a smaller probe batch, or eval_mode=True where "
                "train-mode BatchNorm couples the samples"
            )
        return ranges

    def _split(self, chunk_size: int | None) -> list[tuple[int, int]]:
        step = self.batch_size if chunk_size is None else max(1, int(chunk_size))
        return [(a, min(a + step, self.batch_size)) for a in range(0, self.batch_size, step)]

    def _independence(self, rows: Tensor) -> str | None:
        """Whether the first and the last sample, each evaluated alone, give their rows in the
        batch (``rows``, the validating pass's): ``None`` if so, else why not. Per-sample
        Jacobians (the dense path's row and structured strategies) and products over parts of
        the batch are the batch's only where samples are independent. They are not where the
        forward pass couples the samples (batch statistics: train-mode BatchNorm, batch-mean
        centring, set pooling, attention or a cumulative sum across the batch) or where an input
        whose leading dimension equals the batch size is not one entry per sample (it is then
        split per sample). Two forward passes of one sample, no gradient, one synchronisation.

        Equal means within sqrt(ε) of the rows' scale, where the scale of a pNTK or full row is
        that of the outputs it sums (Σ|f_o|/√O: rows of a LayerNorm-ended feature extractor sum
        to rounding noise, and kernels for one sample round differently; review, session 18).
        A sample that gives NaN/Inf alone, on a batch that is finite, is not independent either.
        The last sample catches coupling that leaves the first unchanged (a cumulative sum over
        the batch); coupling that changes neither end is not seen. Where active dropout
        (``eval_mode=False``) makes every pass random there is no reference value: only whether
        a sample runs alone is checked."""
        n = self.batch_size
        if n < 2 or rows.numel() % n:
            return None
        # Active dropout (eval_mode=False): every pass is random, so only whether one sample
        # runs alone is checked (train-mode BatchNorm1d beside dropout: review, session 18).
        # (or any other forward that draws random numbers: a noise layer)
        compare = not self.draws_random and (self.eval_mode or not _active_dropout(self.model))
        r = rows.numel() // n
        tol = math.sqrt(torch.finfo(self.dtype).eps)
        bad: list[Tensor] = []
        for i in (0, n - 1):
            try:
                with self.session(), torch.no_grad():
                    out = self.call_model(self.params, self.chunk(i, i + 1))
                    one = _rows(out, self.output).detach().reshape(-1)
                    spread = (
                        _rows(pick_output(out).abs(), self.output).detach().abs().max()
                        if isinstance(self.output, str) and one.numel() == r
                        else None
                    )
            except torch.OutOfMemoryError:
                raise
            except Exception as err:
                text = " ".join(str(err).split())[:200]
                return (
                    "the model fails on one sample alone, so it cannot be differentiated sample "
                    f"by sample ({type(err).__name__}: {text})"
                )
            if not compare:
                continue
            if one.numel() != r:
                return (
                    f"one sample alone gives {one.numel()} rows, against {r} per sample in the "
                    "batch"
                )
            ref = rows.detach()[i * r : (i + 1) * r].to(one.dtype)
            scale = torch.maximum(ref.abs().max(), one.abs().max())
            if spread is not None:
                scale = torch.maximum(scale, spread.to(scale.dtype))
            diff = (one - ref).abs().max()
            bad.append(~torch.isfinite(one).all() | (diff > tol * scale))
        if not bad:
            return None
        flags = torch.stack(bad).tolist()  # (the one synchronisation)
        if not any(flags):
            return None
        which = "first" if flags[0] else "last"
        return (
            f"the probe's samples are not independent: the {which} sample's rows computed alone "
            "differ from its rows in the batch, or are not finite alone (the forward pass couples "
            "the samples, e.g. train-mode BatchNorm, batch-mean centring or standardisation, or "
            "an input whose leading dimension equals the batch size is not one entry per "
            "sample; or the model draws from a torch.Generator the probe cannot find, held "
            "deeper than one level in a container or created during the forward, so that its "
            "passes draw different numbers: hold it as a module attribute)"
        )

    def _check(self) -> tuple[int, int]:
        """One forward pass: row count, finiteness and dependence on the parameters."""
        odd = _odd_leading(self.inputs, self.batch_size)
        hint = ""
        if odd and self.batch_size > 1:
            hint = (
                f"; {_batch_origin(self._source[0], self.batch_size)}, and "
                + ", ".join(f"{name} (shape {shape})" for name, shape in odd)
                + " had another leading dimension, so they were passed whole to every sample "
                "as unbatched constants: if they hold one entry per sample, give them the same "
                "batch size"
            )
        try:
            rows = self._validation_rows()
        except (RuntimeError, IndexError) as err:
            if not hint or isinstance(err, (torch.OutOfMemoryError, NotImplementedError)):
                raise
            raise ProbeInputError(
                f"the model failed on the probe batch ({type(err).__name__}: {err}){hint}"
            ) from err
        # (module backward hooks that the probe's transforms would meet: refused here, with
        # the hooks named, instead of torch's setup_context error at the first pass; hooks it
        # never meets, on a frozen part, are no concern)
        found = _module_backward_hooks(self.model)
        if found is not None and rows.requires_grad and _meets_backward_hook(rows):
            raise _backward_hook_error(found)
        if rows.numel() == 0:
            raise ValueError("the probe produced no rows (empty output)")
        if rows.is_complex():
            raise ValueError(
                "the probe rows are complex: the NTK probe needs real rows; pass output= a "
                "callable that returns real ones (e.g. torch.view_as_real(out).flatten(1))"
            )
        if not torch.isfinite(rows).all():
            bad = int((~torch.isfinite(rows)).sum())
            raise ValueError(
                f"the model output has {bad} NaN/Inf value(s) on the probe batch; "
                "the NTK is undefined there: check the inputs and the weights"
            )
        if not rows.requires_grad:
            raise ValueError(
                "the probe outputs do not depend on the selected parameters (K == 0): "
                "check the params= filter and that the output is computed from them (and not "
                "cut from them: detach(), torch.no_grad(), or a reentrant "
                "torch.utils.checkpoint(..., use_reentrant=True) in the forward, which torch.func "
                "cannot see through)"
            )
        if rows.numel() % self.batch_size:
            rule = (
                "the output= callable must give the same number of rows for every sample"
                if callable(self.output)
                else f"output={self.output!r} reads the rows from the picked output tensor "
                "(the logits, else the first tensor), which must hold the batch in dim 0: a "
                "model returning (outputs, batch), or a dict whose first tensor is a 0-d loss, "
                "gives another count; pass output=<callable> that picks and shapes the rows"
            )
            raise ValueError(
                f"{rows.numel()} rows is not a multiple of the batch size {self.batch_size}; "
                + rule
                + hint
            )
        self.per_sample_why = self._independence(rows)
        if self._copies_drifted():
            # (every pass after the first ran on drifted copies, a retried or chunked
            # validating pass too: the rows and the one-sample passes again, on fresh copies)
            self._buffers_mutated()
            self.per_sample_why = self._independence(self._validation_rows())
        return int(rows.numel()), int(rows.numel()) // self.batch_size

    def _validation_rows(self) -> Tensor:
        """The rows of the whole batch, with autograd recording whether they depend on the
        parameters but saving no activations for a backward pass that never comes: their memory
        is freed as the forward goes, as under no_grad, instead of staying resident beside the
        dense path. A model that differentiates inside its forward (forces as −∂E/∂x, gradient
        penalties) needs its saved tensors: it gets a plain forward with autograd."""
        leaves = tuple(p.detach().requires_grad_(True) for p in self.params)
        chunks = self._validation_chunks()
        watch = self._observers is None
        with (
            self.session(),
            torch.enable_grad(),
            _watching(list(self.model.modules()) if watch else []) as watched,
        ):
            rng = _rng_states(self.device)
            rows = self._validation_pass(leaves, chunks)
            # (the session forked the RNG: the states compared are its own; a generator of the
            # model's own is put back after each pass, which records that it moved)
            moved = not all(map(torch.equal, rng, _rng_states(self.device)))
            self.draws_random |= moved or self._draws_own
        if watch:
            self._classify_hooks(watched, rows, leaves, chunks)
        return rows

    def _validation_pass(
        self,
        leaves: tuple[Tensor, ...],
        chunks: list[tuple[int, int]] | None,
        *,
        warn: bool = True,
    ) -> Tensor:
        try:
            with torch.autograd.graph.saved_tensors_hooks(_drop_saved, _no_backward):
                return self._rows_in(leaves, chunks, warn=warn)
        except Exception as err:
            # Any failure under the hooks (the hook's own error, torch.func transforms inside
            # forward that refuse saved-tensor hooks, a wrapper of either): the plain forward
            # decides, and its error is the one raised. Out of memory is not retried.
            if isinstance(err, torch.OutOfMemoryError):
                raise
        return self._rows_in(leaves, chunks, warn=warn)

    def _classify_hooks(
        self,
        watched: list[tuple[_HookSite, _Watched]],
        rows: Tensor,
        leaves: tuple[Tensor, ...],
        chunks: list[tuple[int, int]] | None,
    ) -> None:
        """Which of the user's forward hooks and forward pre-hooks (the model's modules' and
        the global ones) the probe's later passes run without (:attr:`_observers`), from what
        they did in the validating pass (:class:`_Watched`).

        A hook that returns a value (a scaled output, torch.ao's fake-quantizing observer),
        changes its arguments or its module in place, or registers a gradient hook that changes
        the gradient (a gradient scaling or reversal: ``out.register_hook(lambda g: -g)``,
        which changes the backward pass and no value of the forward) is part of the model's
        function: it stays, with a warning for a hook that returns None. Whether its gradient
        hooks change the gradient is seen by running them, in one plain forward and reverse
        pass (:meth:`_gradient_collectors`, only where a hook registered one): a hook whose
        gradient hooks all returned None and changed nothing in place (a gradient-norm
        collector) only watches; one that registers a hook the probe cannot run that way (a
        module backward hook, a post-accumulate-grad hook), or whose gradient hooks did not
        all run, stays. A hook that only watches (an
        activation-statistics collector) is taken out, provided that the validating pass's rows
        (at ``leaves``), repeated without those hooks (one more forward pass that saves nothing
        for a backward, only where there are such hooks), agree within √ε of the rows' scale
        (kernels that a hook's presence switches round differently) and depend on the same
        parameters, and on none of the validating pass's (a hook that stored its output where
        the forward reads it: the repeated pass read the stale tensor). A false disagreement
        only keeps the hooks, with a warning. So a collector sees the plain tensors of the
        probe's plain passes up to here (the validating pass, in the probe's dtype, and, where a
        memory budget is given, the one-sample pass that sizes it) and nothing of the
        transformed ones. A hook that is never called in the validating pass, or registered
        later, stays. Not seen: a hook that hands a detached copy of its input to the forward,
        whose values then agree, and one that registers a hook on a ``grad_fn`` (see
        :data:`_GRAD_REGISTRARS`)."""
        self._observers = []
        if rows.numel() == 0:  # (refused by _check)
            return
        registering = [
            (site, w) for site, w in watched if w.calls and w.registers and not w.returns
        ]
        if registering:
            for _, w in self._gradient_collectors(registering, chunks):
                w.registers = False  # (its gradient hooks only read the gradient)
        candidates = [
            site for site, w in watched if w.calls and not (w.returns or w.mutates or w.registers)
        ]
        kept = [
            (site, w)
            for site, w in watched
            if w.calls and not w.returns and (w.mutates or w.registers)
        ]
        if kept:
            what, remedy = [], []
            if any(w.mutates for _, w in kept):
                what.append("change their arguments or their module in place")
                remedy.append("return the changed value instead of changing it in place")
            if any(w.registers for _, w in kept):
                # (a gradient scaling or reversal: it changes training's J, so it stays)
                what.append(
                    "register a gradient hook that changes the gradient (or one the probe "
                    "could not run in a plain backward pass)"
                )
                remedy.append(
                    "register a gradient hook that only reads the gradient (a gradient-norm "
                    "collector) from a forward hook of its own, apart from one that changes it"
                )
            warnings.warn(
                f"{len(kept)} forward hook(s) of the model (e.g. {_hook_name(kept[0][0])}) "
                "return None but "
                f"{' or '.join(what)}: they are part of the model's function, so they run in "
                "the NTK probe's transformed passes, where they see vmap's batched and "
                "forward-mode dual tensors in the probe's dtype (a collector among them keeps "
                f"those); {' and '.join(remedy)} to let the probe tell them apart",
                RuntimeWarning,
                stacklevel=external_stacklevel(),
            )
        if not candidates:
            return
        self._observers = candidates
        fresh = tuple(p.detach().requires_grad_(True) for p in self.params)
        try:
            # (as the validating pass: with autograd, for a forward that differentiates inside,
            # and for the graph compared below)
            with self.session(), torch.enable_grad():
                without = self._validation_pass(fresh, chunks, warn=False)
            ref = rows.detach()
            tol = math.sqrt(torch.finfo(self.dtype).eps) * ref.abs().max()
            before, after = _reached(rows), _reached(without)
            why = (
                None
                if without.shape == ref.shape
                and bool(
                    torch.isfinite(without).all() & ((without.detach() - ref).abs().max() <= tol)
                )
                else "without them the model's output changed"
            )
            if why is None and (
                [id(p) in before for p in leaves] != [id(p) in after for p in fresh]
                or any(id(p) in after for p in leaves)
            ):
                why = "without them the output's dependence on the parameters changed"
            del without
        except torch.OutOfMemoryError:
            raise
        except Exception as err:
            why = f"the model failed without them ({type(err).__name__}: {str(err)[:200]})"
        if why is None:
            return
        self._observers = []
        warnings.warn(
            f"the model's forward hooks that return None (e.g. {_hook_name(candidates[0])}) "
            f"stay in the NTK probe's transformed passes, since {why}: there they see vmap's "
            "batched and forward-mode dual tensors in the probe's dtype (a collector among them "
            "keeps those)",
            RuntimeWarning,
            stacklevel=external_stacklevel(),
        )

    def _gradient_collectors(
        self,
        registering: list[tuple[_HookSite, _Watched]],
        chunks: list[tuple[int, int]] | None,
    ) -> list[tuple[_HookSite, _Watched]]:
        """Those of ``registering`` (forward hooks that registered a hook with autograd in the
        validating pass, which never runs backward) whose gradient hooks only read the
        gradient (a gradient-norm collector): one plain forward pass with autograd (the
        validating pass's first chunk, its hooks watched again) and one reverse pass of its
        rows' sum to fresh leaves, in which each gradient hook that those hooks register is
        called as it is (:class:`_GradHookRecord`: its values are plain tensors, in the
        probe's dtype). A forward hook is a collector where it registered only such gradient
        hooks (``Tensor.register_hook``, ``register_multi_grad_hook``), every one of them was
        called, and none returned a value or changed its gradient in place. None where the
        passes fail (the hooks then stay)."""
        fresh = tuple(p.detach().requires_grad_(True) for p in self.params)
        again: list[tuple[_HookSite, _Watched]] = []
        try:
            with (
                self.session(),
                torch.enable_grad(),
                _watching(list(self.model.modules())) as again,
            ):
                rows = self._rows_in(fresh, chunks[:1] if chunks else None, warn=False)
                if not rows.requires_grad:
                    return []
                torch.autograd.grad(rows.sum(), fresh, allow_unused=True)
        except torch.OutOfMemoryError:
            raise
        except Exception:
            return []
        by_site = {(id(site[0]), site[1]): w for site, w in again}
        collectors = []
        for site, w in registering:
            w2 = by_site.get((id(site[0]), site[1]))
            if (
                w2 is not None
                and not (w.opaque or w2.opaque or w2.returns or w2.mutates)
                and w2.grad_hooks
                and all(r.calls and not r.changes for r in w2.grad_hooks)
            ):
                collectors.append((site, w))
        return collectors

    def _validation_chunks(self) -> list[tuple[int, int]] | None:
        """Sample ranges of the validating forward under ``memory_budget`` (``None``: the
        whole batch): a forward pass that saves nothing holds at most one sample's allocated
        activations per sample of its chunk."""
        budget = self._validation_budget
        if budget is None or self.batch_size < 2:
            return None
        from .dense import activation_elements, traced_samples  # local: dense imports this

        item = torch.finfo(self.dtype).bits // 8
        act = activation_elements(self) * item
        if act == 0 or traced_samples(self) != 1:
            # (a model that does not run on one sample alone, e.g. train-mode BatchNorm: its
            # chunks might not run either, and batch statistics would differ; the figure is
            # the whole batch's per sample)
            return None
        from_copies = budget - probe_copy_bytes(self)
        chunk = max(1, min(self.batch_size, max(from_copies, 0) // act))
        return None if chunk >= self.batch_size else self._split(chunk)

    def _rows_in(
        self,
        leaves: tuple[Tensor, ...],
        chunks: list[tuple[int, int]] | None,
        *,
        warn: bool = True,
    ) -> Tensor:
        """The rows of the whole batch, or of its chunks concatenated (a row is the gradient's
        subject: it keeps its graph)."""
        parts = []
        for k, (a, b) in enumerate(chunks or [(0, self.batch_size)]):
            out = self.call_model(leaves, self.inputs if chunks is None else self.chunk(a, b))
            if k == 0 and warn:
                # (here, where every probe passes: in the one-sample independence check a probe
                # of one sample, the monitor's usual one for long sequences, was never warned
                # about; review, session 25)
                _warn_first_of_several(out, self.output, b - a)
            parts.append(_rows(out, self.output).reshape(-1))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def padding_keep(self) -> Tensor | None:
        """Which rows are real tokens: for ``output="pntk"`` per-token rows (a sequence output)
        of a dict batch with a ``(batch, tokens)`` ``attention_mask`` of the rows' token count,
        ``False`` where the mask is 0 (a padded token), as a bool tensor over the rows (CPU);
        ``None`` where nothing is padded or the rows are not per token. A padded token's row
        is the kernel at a position no loss sees (a review's GPT-2, 2 sequences of 16 tokens,
        one padded after 6: κ 300 with its 10 padded rows, 121 without; left padding 462 and
        85), so :func:`~glu_probe.ntk.ntk_spectrum` leaves them out by default. An
        encoder-decoder's rows are its decoder's tokens, masked by ``decoder_attention_mask``
        or by its ``labels`` (``docs/ntk.md``, "Padded tokens", gives the rule).

        Raises:
            ValueError: every token is padding (no row is real).
        """
        if self.output != "pntk":
            return None
        source = self._source[0]
        if not isinstance(source, Mapping):
            return None
        # Which mask (re-reviews, session 23: a T5 whose decoder length equalled the encoder's
        # lost real decoder rows by the encoder's padding). Decoder inputs in the batch: its
        # rows are the decoder's (its own mask, else the labels, else every row).
        # Labels alone, in a model holding an encoder-decoder: the decoder built from them
        # (labels != -100 are real). Otherwise the encoder's own mask (an encoder probed alone,
        # also inside a wrapper of the whole model; BART's decoder fed its shifted input_ids is
        # masked by attention_mask too, one position off at the padding's edge: known limit).
        labels = source.get("labels")
        real = (
            labels != -100
            if isinstance(labels, Tensor) and not labels.is_floating_point()
            else None
        )
        if real is not None and not bool(real.any()):
            real = None  # (labels all ignored: no word on which rows are real)
        key, mask = "attention_mask", source.get("attention_mask")
        if any(k in source for k in ("decoder_input_ids", "decoder_inputs_embeds")) or (
            "decoder_attention_mask" in source
        ):
            key, mask = "decoder_attention_mask", source.get("decoder_attention_mask")
            if mask is None and real is not None:
                key, mask = "labels", real
        elif real is not None and any(
            getattr(getattr(m, "config", None), "is_encoder_decoder", False) is True
            and isinstance(getattr(m, "decoder", None), nn.Module)
            for m in self.model.modules()
        ):
            key, mask = "labels", real
        if (
            not isinstance(mask, Tensor)
            or mask.dim() != 2
            or tuple(mask.shape) != (self.batch_size, self.rows_per_sample)
        ):
            return None
        keep = (mask != 0).reshape(-1).cpu()
        if not bool(keep.any()):
            raise ProbePaddingError(
                f"every token of the probe batch is padding ({key}: no real token): no row is "
                "real; give a probe with real tokens (with left padding, a probe cut to its "
                "first tokens, as NTKSpectrumMonitor's max_rows does, can hold padding only: "
                "max_rows=None), or pass drop_padding=False"
            )
        return None if bool(keep.all()) else keep

    def row_range(self, start: int, stop: int) -> tuple[int, int]:
        """Rows belonging to samples ``start:stop``."""
        return start * self.rows_per_sample, stop * self.rows_per_sample
