"""Griffe extension: render Sphinx cross-reference roles in docstrings as (linked) code.

The package's docstrings use Sphinx inline roles (:func:`name`, :class:`~pkg.mod.Name`,
:meth:`Class.method`, :attr:, :mod:, :exc:, :data:, :obj:, optionally with the ``py:``
domain), which MkDocs' Markdown would show literally. This extension, loaded by
mkdocstrings' Python handler (``extensions:`` in ``mkdocs.yml``), rewrites every such role
once the package is loaded:

- the target is resolved like Sphinx does, in the scope of the documented object (its
  members, then its parents' up to the package root), then in the package's top-level
  namespace, then as a unique suffix of an object path in the package;
- a target inside the package becomes an *optional* autoref, raw HTML that mkdocs-autorefs
  resolves after rendering (``<autoref identifier="pkg.mod.Name" optional
  class="sphinx-role">`Name`</autoref>``): a link when that object is rendered somewhere on
  the site, plain code otherwise, never a warning;
- any other target (``torch.nn.Module``, an unresolvable name) becomes plain inline code.

The display text follows Sphinx: the last component for ``~target``, the title of
``title <target>``, otherwise the target as written. Fenced code blocks and double-backtick
literals are left alone. This is documentation-build tooling, not part of the library.
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

import griffe

_logger = griffe.get_logger("griffe_sphinx_roles")

ROLE_RE = re.compile(
    r"(?P<literal>``.+?``)"
    r"|:(?:py:)?(?P<role>func|class|meth|attr|mod|data|exc|obj|const|type):`(?P<content>[^`]+)`",
    re.DOTALL,
)
_EXPLICIT_TITLE_RE = re.compile(r"^(?P<title>.+?)\s*<(?P<target>[^<>]+)>$", re.DOTALL)
_FENCE_RE = re.compile(r"^\s*(```|~~~)")

ROLE_CLASS = "sphinx-role"
"""Class of the links made from roles (next to mkdocs-autorefs' own)."""

_RESOLUTION_ERRORS = (griffe.AliasResolutionError, griffe.CyclicAliasError, ValueError)


def _code(text: str) -> str:
    """Markdown inline code for `text`, whatever backticks it holds."""
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx cross-reference roles in all docstrings of a loaded package."""

    def __init__(self, packages: list[str] | None = None) -> None:
        """Initialize the extension.

        Args:
            packages: Names of the top-level packages whose docstrings are rewritten
                (default: every package this loader loads).
        """
        super().__init__()
        self.packages = set(packages) if packages else None
        self.stats: Counter[str] = Counter()
        self._by_suffix: dict[str, list[str]] = {}

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Rewrite the roles in every docstring of `pkg` once its tree is complete."""
        if self.packages is not None and pkg.name not in self.packages:
            return
        objects = list(_walk(pkg))
        self._by_suffix = {}
        for obj in objects:
            self._by_suffix.setdefault(obj.name, []).append(obj.path)
        for obj in objects:
            if obj.docstring is not None and ":" in obj.docstring.value:
                obj.docstring.value = self._rewrite(obj, pkg, obj.docstring.value)
                # Drop a parse cached before the rewrite (none is, at load time).
                obj.docstring.__dict__.pop("parsed", None)
        _logger.debug(
            "Sphinx roles in %s: %s internal, %s external, %s unresolved",
            pkg.name,
            self.stats["internal"],
            self.stats["external"],
            self.stats["unresolved"],
        )

    def _rewrite(self, obj: griffe.Object, pkg: griffe.Module, text: str) -> str:
        """`text` with the roles outside fenced code blocks rewritten."""
        out: list[str] = []
        prose: list[str] = []
        in_fence = False
        for line in text.split("\n"):
            if _FENCE_RE.match(line):
                if not in_fence and prose:
                    out.append(self._rewrite_prose(obj, pkg, "\n".join(prose)))
                    prose = []
                in_fence = not in_fence
                out.append(line)
            elif in_fence:
                out.append(line)
            else:
                prose.append(line)
        if prose:
            out.append(self._rewrite_prose(obj, pkg, "\n".join(prose)))
        return "\n".join(out)

    def _rewrite_prose(self, obj: griffe.Object, pkg: griffe.Module, text: str) -> str:
        def replace(match: re.Match[str]) -> str:
            if match["literal"]:
                return match[0]
            return self._render_role(obj, pkg, match["content"])

        return ROLE_RE.sub(replace, text)

    def _render_role(self, obj: griffe.Object, pkg: griffe.Module, content: str) -> str:
        content = " ".join(content.split())
        explicit = _EXPLICIT_TITLE_RE.match(content)
        if explicit:
            title, target = explicit["title"], explicit["target"].strip()
        else:
            title, target = None, content
        short = target.startswith("~")
        written = target.lstrip("~!").replace(" ", "")
        target = written.removesuffix("()")
        if title is None:
            title = written.rsplit(".", 1)[-1] if short else written.lstrip(".")
        identifier = self._resolve(obj, pkg, target)
        if identifier is None:
            self.stats["unresolved"] += 1
            return _code(title)
        if identifier.split(".", 1)[0] != pkg.name:
            self.stats["external"] += 1
            return _code(title)
        self.stats["internal"] += 1
        attrs = f'identifier="{identifier}" optional class="{ROLE_CLASS}"'
        return f"<autoref {attrs}>{_code(title)}</autoref>"

    def _resolve(self, obj: griffe.Object, pkg: griffe.Module, target: str) -> str | None:
        """The canonical path of `target` as named in `obj`'s docstring, or None."""
        if target.startswith("."):
            return self._by_unique_suffix(target.lstrip("."))
        first, _, rest = target.partition(".")
        if first == pkg.name:
            # Fully qualified, as Sphinx tries first (and not a submodule named like the package).
            path = _descend(pkg, rest.split(".") if rest else [])
            if path is not None:
                return path
        scope: griffe.Object | None = obj
        found: griffe.Object | griffe.Alias | None = None
        while scope is not None:
            if first in scope.members:
                found = scope.members[first]
                break
            if scope.name == first:
                found = scope
                break
            scope = scope.parent
        if found is None and first in pkg.members:
            found = pkg.members[first]
        if found is not None:
            path = _descend(found, rest.split(".") if rest else [])
            if path is not None:
                return path
        return self._by_unique_suffix(target)

    def _by_unique_suffix(self, target: str) -> str | None:
        last = target.rsplit(".", 1)[-1]
        matches = [p for p in self._by_suffix.get(last, []) if p.endswith("." + target)]
        if len(matches) != 1:
            return None
        return matches[0]


def _walk(obj: griffe.Object) -> Iterator[griffe.Object]:
    """`obj` and all its real (non-alias) members, recursively."""
    yield obj
    for member in obj.members.values():
        if isinstance(member, griffe.Object):
            yield from _walk(member)


def _descend(found: griffe.Object | griffe.Alias, parts: list[str]) -> str | None:
    """The canonical path of `found` followed by the member names `parts`."""
    current = found
    for index, part in enumerate(parts):
        if isinstance(current, griffe.Alias):
            try:
                target: griffe.Object | griffe.Alias = current.final_target
            except _RESOLUTION_ERRORS:
                # Outside the loaded packages (torch, ...): keep the dotted path as written.
                return ".".join([current.target_path, *parts[index:]])
        else:
            target = current
        members = target.members
        if part not in members and target.is_class:
            with contextlib.suppress(*_RESOLUTION_ERRORS):
                members = target.all_members
        if part not in members:
            return None
        current = members[part]
    if isinstance(current, griffe.Alias):
        try:
            return current.final_target.path
        except _RESOLUTION_ERRORS:
            return current.target_path
    return current.path
