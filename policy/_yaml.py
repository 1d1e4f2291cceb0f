"""The one YAML reader of policies and trust stores: plain data only, in bounded time and memory.

A policy reaches a decider from a file and from the governance topic, where one message is read by
every decider before its signatures are checked: whatever its bytes are, they must end in one
PolicyError naming the source and the problem, never in an exception that stops the process.
PyYAML's ``safe_load`` is not enough for that: its composer recurses once per nesting level (5,000
levels raise RecursionError), aliases turn a small file into a huge one (billion laughs), a
duplicate key silently replaces the first, ``.nan`` and ``.inf`` pass as numbers, an integer of
4,301 digits raises ValueError, and a malformed explicit ``!!timestamp`` raises AttributeError. So
the document is composed by a loader that refuses depth, size, anchors and aliases as it goes, and
built into Python values here, from a closed set of tags, refusing what is not plain data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import yaml
from yaml.constructor import SafeConstructor

from nexuscore.kernel.errors import PolicyError

# Ample for any real policy (the default is under 10 KiB); checked before any parsing.
MAX_DOCUMENT_BYTES = 1 << 20
# A policy is at most about six levels deep; the limit is checked before each level is composed,
# far below where Python's recursion limit would be reached.
MAX_DEPTH = 64
# Every node costs the pure-Python loader about 500 bytes and 20 microseconds: this many (the
# default policy has about 550) keeps the worst document to tens of MiB and about a second.
MAX_NODES = 50_000
# Longer than any amount, count or duration a policy needs, short enough that converting the text
# is cheap (a sexagesimal int such as 1:2:3:... multiplies once per part).
MAX_NUMBER_CHARS = 40

_TAG = "tag:yaml.org,2002:"
_Build = Callable[[SafeConstructor, yaml.ScalarNode], object]
# The scalars plain data needs. Everything else (!!binary, !!set, !!omap, !!merge from a << key,
# !!python/..., local !tags) is refused rather than given a meaning.
_SCALARS: dict[str, _Build] = {
    _TAG + "null": SafeConstructor.construct_yaml_null,
    _TAG + "bool": SafeConstructor.construct_yaml_bool,
    _TAG + "int": SafeConstructor.construct_yaml_int,
    _TAG + "float": SafeConstructor.construct_yaml_float,
    _TAG + "str": SafeConstructor.construct_yaml_str,
    _TAG + "timestamp": SafeConstructor.construct_yaml_timestamp,
}
_NUMBERS = (_TAG + "int", _TAG + "float")
# What the converters above raise on text their tag does not fit (an explicit !!int "x", a
# !!timestamp that is no date, a month 13): the document's fault, so refused like the rest.
_CONVERSION_ERRORS = (ValueError, LookupError, TypeError, AttributeError, ArithmeticError)


class _Unsafe(yaml.MarkedYAMLError):
    """Well-formed YAML that is refused: more than plain data, or more of it than allowed."""

    def __init__(self, problem: str, where: yaml.Node | yaml.Event) -> None:
        mark = where.start_mark
        super().__init__(problem=problem, problem_mark=mark if isinstance(mark, yaml.Mark) else None)


class _Loader(yaml.SafeLoader):
    """The pure-Python SafeLoader (the C one composes in C, out of reach) with a guarded composer."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event: yaml.Event = self.peek_event()  # type: ignore[no-untyped-call]  # untyped in the stubs
        if isinstance(event, yaml.NodeEvent) and event.anchor is not None:
            # Refused outright: shared nodes are how a few lines expand to gigabytes.
            raise _Unsafe("anchors and aliases (& and *) are not allowed", event)
        if self._depth >= MAX_DEPTH:
            raise _Unsafe(f"nested deeper than {MAX_DEPTH} levels", event)
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise _Unsafe(f"more than {MAX_NODES} values", event)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def read_document(path: Path) -> bytes:
    """The file's bytes, but never more than one byte over the limit, so that a huge (or endless)
    file is refused without being read into memory. OSError is the caller's to describe."""
    with path.open("rb") as f:
        return f.read(MAX_DOCUMENT_BYTES + 1)


def decode_document(document: bytes, source: str) -> str:
    """The document as text, or PolicyError if it is too large or not UTF-8."""
    if len(document) > MAX_DOCUMENT_BYTES:
        raise PolicyError(f"{source}: larger than the limit of {MAX_DOCUMENT_BYTES} bytes")
    try:
        return document.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{source}: not UTF-8 text (invalid byte at offset {exc.start})") from None


def load_yaml(text: str, source: str) -> object:
    """The single YAML document in ``text`` as plain data (None if empty), or one PolicyError."""
    # Counting characters first keeps a huge string from being encoded just to be measured.
    if len(text) > MAX_DOCUMENT_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_DOCUMENT_BYTES:
        raise PolicyError(f"{source}: larger than the limit of {MAX_DOCUMENT_BYTES} bytes")
    try:
        # The reader checks every character as the loader is made: that is already parsing.
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            return None if node is None else _build(loader, node)
        finally:
            loader.dispose()
    except _Unsafe as exc:
        raise PolicyError(f"{source}: refused YAML: {_describe(exc)}") from None
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not valid YAML: {_describe(exc)}") from None


def _build(loader: _Loader, node: yaml.Node) -> object:
    """Plain data from a composed node. Recursive, but the composer stopped at MAX_DEPTH."""
    if isinstance(node, yaml.MappingNode) and node.tag == _TAG + "map":
        return _mapping(loader, node)
    if isinstance(node, yaml.SequenceNode) and node.tag == _TAG + "seq":
        return [_build(loader, item) for item in node.value]
    if isinstance(node, yaml.ScalarNode):
        return _scalar(loader, node)
    raise _Unsafe(f"tag {_shown(node.tag)} is not allowed", node)


def _mapping(loader: _Loader, node: yaml.MappingNode) -> dict[object, object]:
    out: dict[object, object] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            raise _Unsafe("a mapping key must be a plain value, not a list or a mapping", key_node)
        key = _scalar(loader, key_node)
        # PyYAML lets the last of two equal keys win without a word; in a policy that hides a
        # change from a reviewer reading the first.
        if key in out:
            raise _Unsafe(f"duplicate key {_shown(key)}", key_node)
        out[key] = _build(loader, value_node)
    return out


def _scalar(loader: _Loader, node: yaml.ScalarNode) -> object:
    build = _SCALARS.get(node.tag)
    if build is None:
        raise _Unsafe(f"tag {_shown(node.tag)} is not allowed", node)
    if node.tag in _NUMBERS and len(node.value) > MAX_NUMBER_CHARS:
        raise _Unsafe(f"a number of {len(node.value)} characters (at most {MAX_NUMBER_CHARS})", node)
    try:
        value = build(loader, node)
    except _CONVERSION_ERRORS:
        raise _Unsafe(f"{_shown(node.value)} is not a valid {_shown(node.tag)}", node) from None
    if isinstance(value, float) and not math.isfinite(value):
        # NaN is unequal to itself and infinity to every bound: neither is a price or a limit.
        raise _Unsafe(f"{_shown(node.value)} is not a finite number", node)
    return value


def _shown(value: object) -> str:
    """A short, one-line rendering of a value taken from the document, for a message."""
    text = value if isinstance(value, str) else repr(value)
    if text.startswith(_TAG):
        text = "!!" + text[len(_TAG) :]
    return repr(text if len(text) <= 40 else text[:40] + "…")


def _describe(exc: yaml.YAMLError) -> str:
    """PyYAML's error on one line: where, what, and while doing what."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return " ".join(str(exc).split())
    mark = exc.problem_mark or exc.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = exc.problem or exc.context or "malformed document"
    context = f" ({exc.context})" if exc.context and exc.problem else ""
    return " ".join(f"{where}{what}{context}".split())
