"""The expression sandbox templates are evaluated in: Jinja2's SandboxedEnvironment with
no loader (no I/O), no attribute access, a short list of filters and globals, bounded
loops, no macros or recursion, and bounded sizes of every value and of all output.

The rules (also in docs/templates.md):
- `{{ expr }}` as a whole YAML value keeps the expression's type (integer, bool, list);
  anything else is rendered as text.
- Names are the parameters, the derived values, and inside a part `index` and `count`.
- No attribute access (`x.y` reads key `y` of a mapping only); no method calls; use filters.
- `range(n)` gives at most MAX_RANGE numbers, and all loops of one expansion together at
  most MAX_STEPS iterations; `{% for %}` loops only over `range(...)`.
- No `macro`, `call`, `include`, `import`, `extends`, `block`, `set`, `with` or recursive
  loops.
- Every string or list an expression makes is at most MAX_VALUE long; every integer fits
  in 53 bits; the whole expansion produces at most MAX_OUTPUT characters.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, nodes
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.exceptions import TemplateError as JinjaError
from jinja2.sandbox import SandboxedEnvironment

from zerostack.contracts.errors import TemplateError
from zerostack.crypto import MAX_INT
from zerostack.workloads import parse_size

MAX_RANGE = 1024
MAX_STEPS = 100_000
MAX_VALUE = 64 * 1024
MAX_OUTPUT = 1 << 20
MAX_EXPRESSION = 4096

_WHOLE = re.compile(r"^\s*\{\{(.*)\}\}\s*$", re.DOTALL)

# Assignments are refused too: `{% set a = a ~ a %}` repeated doubles a value per step
# before any bound on values could see it (derived values are the way to name things).
_FORBIDDEN = (nodes.Macro, nodes.CallBlock, nodes.Include, nodes.Import, nodes.FromImport,
              nodes.Extends, nodes.Block, nodes.Scope, nodes.EvalContextModifier,
              nodes.Assign, nodes.AssignBlock, nodes.With)

_FILTERS = ("abs", "capitalize", "default", "first", "int", "join", "last", "length",
            "list", "lower", "upper", "max", "min", "replace", "round", "sort", "string",
            "sum", "title", "trim", "unique", "batch", "slice", "reverse", "count", "d",
            "select", "reject", "map")


def _weight(value: Any, limit: int = MAX_VALUE) -> int:
    """Characters and items in `value`, nested ones included (a list repeated inside a
    list counts every time); stops counting past `limit`."""
    total = 0
    todo = [value]
    while todo:
        v = todo.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, dict):
            total += len(v)
            todo.extend(v.keys())
            todo.extend(v.values())
        elif isinstance(v, (list, tuple)):
            total += len(v)
            todo.extend(v)
        else:
            total += 1
        if total > limit:
            return total
    return total


def _check_size(value: Any) -> Any:
    if isinstance(value, (str, list, tuple, dict)) and _weight(value) > MAX_VALUE:
        raise TemplateError(f"an expression made a value of more than {MAX_VALUE} items "
                            "or characters")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        raise TemplateError(f"an expression made the integer {str(value)[:30]}…, past 2^53 - 1")
    return value


class _Budget:
    """Iterations all loops of one expansion may still take, and output it may still make."""

    def __init__(self) -> None:
        self.steps = MAX_STEPS
        self.output = MAX_OUTPUT

    def take(self, n: int) -> None:
        self.steps -= n
        if self.steps < 0:
            raise TemplateError(f"expressions looped more than {MAX_STEPS} times in all")

    def emit(self, n: int) -> None:
        self.output -= n
        if self.output < 0:
            raise TemplateError(f"the expansion produced more than {MAX_OUTPUT} characters")


class _Env(SandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+", "%", "//", "/"})

    def __init__(self, budget: _Budget) -> None:
        super().__init__(undefined=StrictUndefined, autoescape=False, loader=None,
                         extensions=())
        self.budget = budget
        self.globals = {"range": self._range, "size": _size, "gib": _gib}
        # every filter wrapped so that what it returns is bounded too
        allowed = {n: self.filters[n] for n in _FILTERS}
        self.filters = {n: _bounded(f) for n, f in allowed.items()}
        self.filters["replace"] = _bounded(_replace)
        self.filters["size"] = _size
        self.filters["gib"] = _gib
        self.tests = {n: self.tests[n] for n in ("defined", "undefined", "none", "number",
                                                 "string", "even", "odd", "divisibleby",
                                                 "in", "eq", "ne", "lt", "le", "gt", "ge")}

    def _range(self, *args: Any) -> range:
        if not all(isinstance(a, int) and not isinstance(a, bool) for a in args):
            raise TemplateError("range() takes integers")
        r = range(*args)
        if len(r) > MAX_RANGE:
            raise TemplateError(f"range() of {len(r)} numbers (at most {MAX_RANGE})")
        self.budget.take(len(r))
        return r

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        return False

    def is_safe_callable(self, obj: Any) -> bool:
        return obj in (self._range, _size, _gib)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and (not isinstance(right, int) or abs(right) > 64
                                 or (isinstance(left, int) and abs(left) > MAX_INT)):
            raise TemplateError("** takes an integer exponent of at most 64")
        if operator == "*":
            for a, b in ((left, right), (right, left)):
                if isinstance(a, (str, list, tuple)) and isinstance(b, int) \
                        and _weight(a) * b > MAX_VALUE:
                    raise TemplateError(f"repetition would make more than {MAX_VALUE} items")
        if operator == "%" and isinstance(left, str):
            raise TemplateError("% formatting of text is not allowed: use ~ to join text")
        return _check_size(super().call_binop(context, operator, left, right))


def _bounded(fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = fn(*args, **kwargs)
        if isinstance(result, Iterator) or type(result).__name__ == "generator":
            result = list(_take(result))
        return _check_size(result)
    for attr in ("jinja_pass_arg",):
        if hasattr(fn, attr):
            setattr(wrapper, attr, getattr(fn, attr))
    return wrapper


def _replace(value: Any, old: Any, new: Any, count: int | None = None) -> str:
    """`replace`, refused before it runs when its result would be too long."""
    text, old, new = str(value), str(old), str(new)
    hits = text.count(old) if old else len(text) + 1
    if count is not None:
        hits = min(hits, max(count, 0))
    if len(text) + hits * max(0, len(new) - len(old)) > MAX_VALUE:
        raise TemplateError(f"replace would make more than {MAX_VALUE} characters")
    return text.replace(old, new, -1 if count is None else count)


def _take(it: Iterator[Any]) -> Iterator[Any]:
    for i, item in enumerate(it):
        if i >= MAX_VALUE:
            raise TemplateError(f"a filter made more than {MAX_VALUE} items")
        yield item


def _size(value: Any) -> int:
    """'2G' -> 2147483648: sizes as the workloads accept them."""
    try:
        got = parse_size(value)
    except ValueError as exc:
        raise TemplateError(str(exc)) from None
    if not isinstance(got, int) or isinstance(got, bool):
        raise TemplateError(f"size({value!r}): not a size")
    return int(_check_size(got))


def _gib(value: Any) -> int:
    """Bytes to whole GiB, rounded up (for messages and derived counts)."""
    return -(-_size(value) // (1 << 30))


def _check_tree(tree: nodes.Node, source: str) -> None:
    for node in tree.find_all(_FORBIDDEN):
        raise TemplateError(f"{type(node).__name__.lower()} is not allowed in template "
                            f"expressions: {source[:60]!r}")
    for loop in tree.find_all(nodes.For):
        if loop.recursive:
            raise TemplateError("recursive loops are not allowed in template expressions")
        it = loop.iter
        if not (isinstance(it, nodes.Call) and isinstance(it.node, nodes.Name)
                and it.node.name == "range"):
            raise TemplateError("{% for %} loops only over range(...), whose numbers count "
                                f"against the loop budget: {source[:60]!r}")
    for call in tree.find_all(nodes.Call):
        if not (isinstance(call.node, nodes.Name) and call.node.name in ("range", "size", "gib")):
            raise TemplateError("only range(), size() and gib() may be called; use filters "
                                f"for the rest: {source[:60]!r}")


class Sandbox:
    """Evaluates one template's expressions; one instance per expansion (its budget)."""

    def __init__(self) -> None:
        self.budget = _Budget()
        self.env = _Env(self.budget)

    def check(self, text: str) -> None:
        """Parse `text` (a YAML string value) and apply the static rules; raise TemplateError."""
        if len(text) > MAX_EXPRESSION:
            raise TemplateError(f"an expression of {len(text)} characters (at most "
                                f"{MAX_EXPRESSION})")
        m = _WHOLE.match(text)
        try:
            tree = self.env.parse("{{" + m.group(1) + "}}" if m else text)
        except TemplateSyntaxError as exc:
            raise TemplateError(f"expression syntax: {exc.message}") from None
        _check_tree(tree, text)

    def evaluate(self, value: Any, names: dict[str, Any]) -> Any:
        """`value` with every string in it evaluated: `{{ expr }}` alone keeps its type."""
        if isinstance(value, str):
            return self._string(value, names)
        if isinstance(value, list):
            return [self.evaluate(v, names) for v in value]
        if isinstance(value, dict):
            return {k: self.evaluate(v, names) for k, v in value.items()}
        return value

    def _string(self, text: str, names: dict[str, Any]) -> Any:
        if "{" not in text:
            return text
        self.check(text)
        m = _WHOLE.match(text)
        try:
            if m is not None and "}}" not in m.group(1) and "{{" not in m.group(1):
                result = self.env.compile_expression(m.group(1), undefined_to_none=False)(
                    **names)
                if isinstance(result, StrictUndefined):
                    str(result)  # raises the UndefinedError naming it
                result = _plain(result)
            else:
                out: list[str] = []
                for chunk in self.env.from_string(text).generate(**names):
                    self.budget.emit(len(chunk))
                    out.append(chunk)
                result = "".join(out)
        except TemplateError:
            raise
        except UndefinedError as exc:
            raise TemplateError(f"{exc.message} in {text[:80]!r}") from None
        except SecurityError as exc:
            raise TemplateError(f"not allowed in the sandbox: {exc} in {text[:80]!r}") from None
        except JinjaError as exc:
            raise TemplateError(f"{exc} in {text[:80]!r}") from None
        except (ArithmeticError, TypeError, ValueError, RecursionError) as exc:
            raise TemplateError(f"{type(exc).__name__}: {exc} in {text[:80]!r}") from None
        self.budget.emit(len(str(result)) if isinstance(result, str) else 1)
        return _check_size(result)


def _plain(value: Any) -> Any:
    """A JSON-like value (ints, not floats; lists, not ranges or tuples)."""
    if isinstance(value, float):
        if not value.is_integer():
            raise TemplateError(f"an expression gave the fraction {value}: values are "
                                "integers (use // for integer division)")
        return int(value)
    if isinstance(value, (range, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    raise TemplateError(f"an expression gave a {type(value).__name__}, which a template "
                        "cannot use")
