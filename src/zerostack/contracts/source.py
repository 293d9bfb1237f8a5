"""Reading a template's YAML while keeping where every value came from (line, column),
so that an error deep in a template names the spot a user must edit."""

from __future__ import annotations

from typing import Any

import yaml

from zerostack.contracts.errors import TemplateError

MAX_TEMPLATE_BYTES = 256 * 1024
MAX_DEPTH = 24

Path = tuple[str | int, ...]


class Source:
    """A parsed template document and the position of every key and value in it."""

    def __init__(self, data: dict[str, Any], marks: dict[Path, tuple[int, int]]) -> None:
        self.data = data
        self.marks = marks

    def mark(self, path: Path) -> tuple[int | None, int | None]:
        """(line, column) of `path`, or of its nearest enclosing value that has one."""
        p = tuple(path)
        while p:
            if p in self.marks:
                return self.marks[p]
            p = p[:-1]
        return self.marks.get((), (None, None))

    def error(self, message: str, path: Path) -> TemplateError:
        line, column = self.mark(path)
        return TemplateError(message, line=line, column=column,
                             path=".".join(str(p) for p in path))


def _convert(node: yaml.Node, path: Path, marks: dict[Path, tuple[int, int]],
             depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise TemplateError(f"nested deeper than {MAX_DEPTH} levels",
                            line=node.start_mark.line + 1, column=node.start_mark.column + 1)
    marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise TemplateError("mapping keys must be plain text",
                                    line=key_node.start_mark.line + 1,
                                    column=key_node.start_mark.column + 1)
            key = str(_scalar(key_node))
            if key in out:
                raise TemplateError(f"key {key!r} appears twice",
                                    line=key_node.start_mark.line + 1,
                                    column=key_node.start_mark.column + 1)
            out[key] = _convert(value_node, (*path, key), marks, depth + 1)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(v, (*path, i), marks, depth + 1) for i, v in enumerate(node.value)]
    assert isinstance(node, yaml.ScalarNode)
    return _scalar(node)



def _scalar(node: yaml.ScalarNode) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    except yaml.YAMLError as exc:
        raise TemplateError(f"bad value: {exc}", line=node.start_mark.line + 1,
                            column=node.start_mark.column + 1) from None
    finally:
        loader.dispose()


def parse(text: str) -> Source:
    """Parse one YAML document (no aliases, no tags beyond the safe ones) with marks."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_TEMPLATE_BYTES:
        raise TemplateError(f"template is larger than {MAX_TEMPLATE_BYTES} bytes")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise TemplateError(f"YAML: {exc.problem or exc.context}",
                            line=mark.line + 1 if mark else None,
                            column=mark.column + 1 if mark else None) from None
    except yaml.YAMLError as exc:
        raise TemplateError(f"YAML: {exc}") from None
    if node is None:
        raise TemplateError("the template is empty")
    if "*" in text and _has_alias(node):
        raise TemplateError("YAML aliases (*name) are not allowed in templates",
                            line=node.start_mark.line + 1)
    marks: dict[Path, tuple[int, int]] = {}
    data = _convert(node, (), marks, 0)
    if not isinstance(data, dict):
        raise TemplateError("a template is a YAML mapping (name:, version:, parameters: ...)",
                            line=1, column=1)
    return Source(data, marks)


def _has_alias(node: yaml.Node) -> bool:
    # composed nodes share objects for aliases: a node seen twice is an alias
    seen: set[int] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if id(n) in seen:
            return True
        seen.add(id(n))
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                todo.extend((k, v))
        elif isinstance(n, yaml.SequenceNode):
            todo.extend(n.value)
    return False
