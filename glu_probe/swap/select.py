"""Which modules a swap replaces.

The walk that asks the adapters, the name and class heuristics that flag MLP-like modules no
adapter recognises (so that a swap never leaves one behind silently), and the ``include`` /
``exclude`` path filters of :func:`~glu_probe.swap.core.swap_mlp`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from torch import nn

from .._warnings import external_stacklevel
from .base import MLPAdapter

_CANDIDATE_NAME = re.compile(
    r"^(mlp|mlps|ffn|ffns|feed_?forward|intermediate|mlp_block|block_sparse_moe|moe|experts)$",
    re.I,
)


_HEAD_CLASS = re.compile(r"(head$|classifier)", re.I)


_CANDIDATE_CLASS = re.compile(
    r"(mlp|feedforward|feed_forward|ffn|intermediate|swiglu|geglu|sparsemoe|moeblock|moelayer"
    r"|moe$|experts$|dense\w*actdense|densereludense)",
    re.I,
)


def _walk(
    module: nn.Module, prefix: str, adapters: list[MLPAdapter]
) -> Iterator[tuple[str, nn.Module, MLPAdapter | None]]:
    """Yield ``(path, module, adapter)`` for matched blocks (not descending into them) and
    ``(path, module, None)`` for every other module."""
    for adapter in adapters:
        if adapter.matches(module):
            yield prefix, module, adapter
            return
    yield prefix, module, None
    for name, child in module.named_children():
        yield from _walk(child, f"{prefix}.{name}" if prefix else name, adapters)


def _uncovered_weights(module: nn.Module, inner: list[str]) -> list[str]:
    """Names of ``module``'s matrix (or larger) parameters outside the blocks at ``inner``.

    Vectors (norm scales, biases, gates' scalars) do not count: a wrapper may add a norm."""
    out = []
    for name, param in module.named_parameters():
        if param.ndim >= 2 and not any(name.startswith(q + ".") for q in inner):
            out.append(name)
    return out


def _is_head(module: nn.Module) -> bool:
    """Classifier / prediction heads (timm's ``NormMlpClassifierHead``, ...): not MLP blocks."""
    return bool(_HEAD_CLASS.search(type(module).__name__))


def _holds_mlp_layers(module: nn.Module) -> bool:
    """A block that holds its feed-forward layers itself as ``mlp_*`` Linear children, with no
    ``mlp`` child (timm's ``ParallelScalingBlock``: ``mlp_out_proj``, its input projection fused
    into ``in_proj``). It was never counted as MLP-like: a ViT with such blocks and a swappable
    attention-pool MLP was swapped there alone, with success and no unrecognised block (review,
    session 20)."""
    children = dict(module.named_children())
    if "mlp" in children:
        return False
    return any(n.startswith("mlp_") and isinstance(c, nn.Linear) for n, c in children.items())


def _looks_like_mlp(path: str, module: nn.Module, adapters: Sequence[MLPAdapter] = ()) -> bool:
    if any(a.resembles(module) for a in adapters):
        return True
    if _is_head(module):
        return False
    if _holds_mlp_layers(module):
        return True
    last = path.rpartition(".")[2]
    return bool(_CANDIDATE_NAME.match(last) or _CANDIDATE_CLASS.search(type(module).__name__))


#: ``include`` / ``exclude`` of :func:`swap_mlp`: a regular expression (string or compiled)
#: matched against a block's whole path, an iterable of them, or a callable
#: ``(path, module) -> bool``.
PathFilter = (
    str | re.Pattern[str] | Iterable[str | re.Pattern[str]] | Callable[[str, nn.Module], bool]
)


def _path_matcher(
    name: str, spec: PathFilter, known: set[str]
) -> list[tuple[str, Callable[[str, nn.Module], bool]]]:
    """``(label, test)`` per pattern of an ``include`` / ``exclude`` argument (one for a
    callable), to tell which matched nothing. A string pattern matches a path it equals, or
    that it matches as a regular expression; one that is not a regular expression must be one
    of the ``known`` paths."""
    if callable(spec):
        fn = spec
        label = getattr(fn, "__qualname__", None) or repr(fn)
        return [(f"callable {label}", lambda path, module: bool(fn(path, module)))]
    if isinstance(spec, str | re.Pattern):
        items: list[Any] = [spec]
    elif isinstance(spec, Iterable) and not isinstance(spec, bytes | bytearray):
        items = list(spec)  # (once: a generator)
    else:
        items = [spec]
    if not all(
        isinstance(p, str) or (isinstance(p, re.Pattern) and isinstance(p.pattern, str))
        for p in items
    ):
        raise TypeError(
            f"swap_mlp: {name} must be a regular expression (a string or a compiled pattern), "
            f"an iterable of them or a callable (path, module) -> bool, got {spec!r}"
        )
    tests: list[tuple[str, Callable[[str, nn.Module], bool]]] = []
    for p in items:
        if isinstance(p, re.Pattern):
            tests.append((p.pattern, _regex_test(None, p)))
            continue
        try:
            compiled: re.Pattern[str] | None = re.compile(p)
        except re.error as err:
            if p not in known:
                raise ValueError(
                    f"swap_mlp: {name} pattern {p!r} is not a regular expression ({err}) nor "
                    "the path of a block"
                ) from None
            compiled = None
        tests.append((p, _regex_test(p, compiled)))
    return tests


def _regex_test(
    literal: str | None, compiled: re.Pattern[str] | None
) -> Callable[[str, nn.Module], bool]:
    def test(path: str, _module: nn.Module) -> bool:
        return path == literal or (compiled is not None and compiled.fullmatch(path) is not None)

    return test


def _first_paths(found: Sequence[tuple[Any, ...]]) -> str:
    return ", ".join(f[0] for f in found[:4]) + (", ..." if len(found) > 4 else "")


def _select_blocks(
    model: nn.Module,
    found: list[tuple[str, nn.Module, MLPAdapter]],
    suspects: Sequence[tuple[str, nn.Module, str, list[str]]],
    paths_of: dict[int, list[str]],
    include: PathFilter | None,
    exclude: PathFilter | None,
) -> tuple[list[tuple[str, nn.Module, MLPAdapter]], list[str], set[str]]:
    """The recognised blocks ``include`` / ``exclude`` keep, the paths they leave out (blocks and
    MLP-like modules no adapter recognises), and the paths of the latter that they leave out
    (those holding no kept block), which are then not unrecognised blocks. A block is matched
    under each name its parent gives it (``layer.ffn = layer.mlp``); a block found at several
    paths (shared across layers) is kept or left out at all of them."""
    if include is None and exclude is None:
        return found, [], set()

    def names(path: str, module: nn.Module) -> list[str]:
        holder = model.get_submodule(path.rpartition(".")[0])
        aliases = [
            q
            for q in paths_of.get(id(module), [])
            if q != path and model.get_submodule(q.rpartition(".")[0]) is holder
        ]
        return [path, *aliases]

    candidates = [(p, m, names(p, m)) for p, m, _ in found]
    candidates += [(p, m, names(p, m)) for p, m, _, _ in suspects]
    known = {q for _, _, qs in candidates for q in qs}
    chosen = {p: True for p, _, _ in candidates}
    for name, spec, want in (("include", include, True), ("exclude", exclude, False)):
        if spec is None:
            continue
        tests = _path_matcher(name, spec, known)
        used: set[int] = set()
        for path, module, qs in candidates:
            hits = [i for i, (_, test) in enumerate(tests) if any(test(q, module) for q in qs)]
            used.update(hits)
            if bool(hits) is not want:
                chosen[path] = False
        unused = [label for i, (label, _) in enumerate(tests) if i not in used]
        if unused:
            shown = _first_paths(found)
            if callable(spec):
                message = (
                    f"the {name} {unused[0]} matches no recognised MLP block (it is called "
                    f"with each block's path and module, e.g. {shown})"
                )
            else:
                message = (
                    f"{name} pattern(s) {unused} match no recognised MLP block (patterns are "
                    f"matched against the whole path, e.g. {shown})"
                )
            warnings.warn(f"swap_mlp: {message}", UserWarning, stacklevel=external_stacklevel())
    by_module: dict[int, list[str]] = {}
    for path, module, _ in found:
        by_module.setdefault(id(module), []).append(path)
    for paths in by_module.values():
        if len({chosen[p] for p in paths}) > 1:
            raise ValueError(
                f"swap_mlp: the block at {paths} is one module shared by these paths; include "
                "or exclude all of them"
            )
    kept = [f for f in found if chosen[f[0]]]
    if not kept:
        raise ValueError(
            f"swap_mlp: include/exclude leave none of the {len(found)} recognised block(s) to "
            f"swap ({_first_paths(found)})"
        )
    left_out = {
        p
        for p, _, _, inner in suspects
        if not chosen[p] and not any(chosen.get(q, False) for q in inner)
    }
    return kept, [p for p, _, _ in found if not chosen[p]] + sorted(left_out), left_out


def _custom_linears(module: nn.Module) -> str:
    """A note naming the ``nn.Linear`` subclasses with their own ``forward`` among a block's
    layers (Falcon's ``FalconLinear``): the built-in adapters take plain layers only, since a
    subclass's forward may compute something else."""
    names = sorted(
        {
            type(m).__name__
            for m in module.children()
            if isinstance(m, nn.Linear) and type(m).forward is not nn.Linear.forward
        }
    )
    if not names:
        return ""
    return f", whose layers are {', '.join(names)}: nn.Linear subclasses with their own forward"
