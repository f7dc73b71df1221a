"""Strict YAML loading for wattson's config files, with errors that say file, line and key path.

Both the main config and the web config go through here, so they refuse the same things the same
way: duplicate keys at any depth (PyYAML keeps the last one silently, which hides a mistake), text
that is not UTF-8, files over MAX_BYTES and alias bombs (config files are small; anything else is a
mistake or an attack, and parsing or validating it would take seconds to hours). Every failure is a
YamlFileError whose message is one line, "<file>:<line>: <key path>: <what>", and never quotes the
source text, which may hold a password hash or a private key.

The text is parsed once: the node tree (which knows the lines) is kept next to the data, so a later
validation error can be pointed at its line without parsing again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

MAX_BYTES = 1 << 20
# Values in the document once aliases are expanded. A few hundred bytes of nested aliases can stand
# for billions of values, which validation would then walk one by one.
MAX_EXPANDED_NODES = 100_000
FILE = "(file)"  # key path of problems with the file as a whole
SYNTAX = "(yaml)"  # key path of YAML syntax errors
TOP = "(top level)"

_MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlFileError(Exception):
    """A config file that cannot be used; str() is the one-line message."""

    def __init__(self, source: str, key_path: str, what: str, line: int | None = None) -> None:
        self.source, self.key_path, self.what, self.line = source, key_path, what, line
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {key_path}: {what}")


def key_path(loc: Sequence[Any]) -> str:
    """("a", "b", 0, "c") -> "a.b[0].c"; the empty path is "(top level)"."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int) and not isinstance(item, bool):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or TOP


@dataclass(frozen=True)
class YamlDocument:
    """One parsed file: the data, and the node tree to find the line of a key path."""

    source: str
    data: Any
    root: yaml.Node | None

    def line_of(self, loc: Sequence[Any]) -> int | None:
        """The line of the innermost key (or list item) of `loc` that exists in the file."""
        node, line = self.root, None
        for item in loc:
            if isinstance(node, yaml.MappingNode):
                for key_node, value_node in node.value:
                    if isinstance(key_node, yaml.ScalarNode) and key_node.value == str(item):
                        line, node = key_node.start_mark.line + 1, value_node
                        break
                else:
                    return line
            elif (isinstance(node, yaml.SequenceNode) and isinstance(item, int)
                  and 0 <= item < len(node.value)):
                node = node.value[item]
                line = node.start_mark.line + 1
            else:
                return line
        return line

    def error(self, loc: Sequence[Any], what: str) -> YamlFileError:
        """A problem found after loading (by validation or by using a value), placed at its line."""
        return YamlFileError(self.source, key_path(loc), what, self.line_of(loc))


def read(path: str) -> YamlDocument:
    """Read and parse a config file: UTF-8, at most MAX_BYTES, no duplicate keys."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)  # never more: the path may name a device or a huge file
    except OSError as exc:
        raise YamlFileError(path, FILE, f"cannot read: {exc.strerror or type(exc).__name__}") from None
    if len(raw) > MAX_BYTES:
        raise YamlFileError(path, FILE, f"larger than {MAX_BYTES // (1 << 20)} MiB; config files are small, "
                                        "is this the right file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise YamlFileError(path, FILE, f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at column {column} "
                                        f"(byte offset {exc.start})", line) from None
    return parse(text, path)


def parse(text: str, source: str) -> YamlDocument:
    """Parse YAML text (safe tags only) once into data and the node tree it came from."""
    loader: yaml.SafeLoader | None = None
    try:
        loader = yaml.SafeLoader(text)  # checks every character first: ReaderError
        root = loader.get_single_node()
        if root is None:
            return YamlDocument(source, None, None)
        _check_keys_and_size(loader, root, source)
        data = loader.construct_document(root)
    except YamlFileError:
        raise
    except yaml.MarkedYAMLError as exc:
        # Not str(exc): PyYAML quotes the offending source line, which may hold a hash or a key.
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        if mark is None:
            raise YamlFileError(source, SYNTAX, f"invalid YAML: {problem}") from None
        raise YamlFileError(source, SYNTAX, f"invalid YAML: {problem} (column {mark.column + 1})",
                            mark.line + 1) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise YamlFileError(source, SYNTAX, f"invalid YAML: character #x{exc.character:04x} is not allowed "
                                            "in YAML text", line) from None
    except RecursionError:
        raise YamlFileError(source, SYNTAX, "invalid YAML: nested too deeply") from None
    except yaml.YAMLError:
        raise YamlFileError(source, SYNTAX, "invalid YAML") from None
    finally:
        if loader is not None:
            loader.dispose()
    return YamlDocument(source, data, root)


def _check_keys_and_size(loader: yaml.SafeLoader, root: yaml.Node, source: str) -> None:
    """Refuse duplicate keys (with both lines), recursive aliases and alias bombs, before constructing."""
    sizes: dict[int, int] = {}  # id(node) -> values below it once aliases are expanded
    open_nodes: set[int] = set()

    def walk(node: yaml.Node, loc: tuple[Any, ...], line: int) -> int:
        # `line`: where the key or item holding `node` is written; an alias's node starts at its anchor
        nid = id(node)
        if nid in sizes:
            return sizes[nid]  # an alias of a node already checked: count it, do not check it again
        if nid in open_nodes:
            raise YamlFileError(source, key_path(loc), "an alias refers to a node that contains it", line)
        open_nodes.add(nid)
        size = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, value_node in node.value:
                key_line = key_node.start_mark.line + 1
                if key_node.tag == _MERGE_TAG:
                    size += walk(value_node, loc, key_line)  # merged keys may be overridden: that is merging
                    continue
                key = _scalar_key(loader, key_node)
                child = loc + (key_node.value if isinstance(key_node, yaml.ScalarNode) else "?",)
                if key is not None:
                    first = seen.setdefault(key, key_node)  # by Python equality: 1 and true would be one key
                    if first is not key_node:
                        raise YamlFileError(source, key_path(child),
                                            f"duplicate key (first at line {first.start_mark.line + 1})", key_line)
                size += walk(key_node, child, key_line) + walk(value_node, child, key_line)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                fresh = id(item) not in sizes and id(item) not in open_nodes
                size += walk(item, loc + (i,), item.start_mark.line + 1 if fresh else line)
        open_nodes.discard(nid)
        sizes[nid] = size
        if size > MAX_EXPANDED_NODES:
            raise YamlFileError(source, key_path(loc), f"more than {MAX_EXPANDED_NODES} values (counting each "
                                                       "alias in full); config files are small", line)
        return size

    walk(root, (), root.start_mark.line + 1)


def _scalar_key(loader: yaml.SafeLoader, key_node: yaml.Node) -> Any:
    """A scalar key as the constructor will build it (so `1` and `01` are the same key); None otherwise."""
    if not isinstance(key_node, yaml.ScalarNode):
        return None  # a list or mapping as key: the constructor refuses it with its own error
    try:
        key = loader.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
        hash(key)
    except (TypeError, ValueError, OverflowError, yaml.YAMLError):
        return None  # the constructor reports it, at its place, when it builds the document
    return key


Describe = Callable[[ErrorDetails], tuple[Sequence[Any], str]]


def format_validation_error(exc: ValidationError, source: str, doc: YamlDocument | None,
                            describe: Describe) -> str:
    """One line for the first of pydantic's errors: "<file>:<line>: <key path>: <what>".

    `describe` turns one error into (location, message) in the caller's words; it decides what a
    message may quote, since only the caller knows which values are secret.
    """
    errors = exc.errors()
    loc, what = describe(errors[0])
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    line = doc.line_of(loc) if doc is not None else None
    return str(YamlFileError(source, key_path(loc), what + more, line))
