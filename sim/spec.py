"""Parsing of call-like specs: ``name(key=value, ...)`` joined by ``+``.

One syntax serves defenses (``"noise(sigma=0.05)+cem(lam=8)"``) and strategies
(``"FedProx(proximal_mu=0.1)"``, ``"pkg.mod:MyStrategy(x=1)"``, and wrappers whose first
positional argument is another spec: ``"DifferentialPrivacyServerSideFixedClipping(FedAvg(),
noise_multiplier=0.1, clipping_norm=10, num_sampled_clients=5)"``).
Values are Python literals only (numbers, strings, booleans, None, lists): a spec is data,
never code.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any


class SpecError(ValueError):
    """A spec that cannot be parsed; the message is one line meant for the user."""


def fits(value: Any, cls: type) -> bool:
    """``isinstance`` as settings and spec parameters read it (Python's numeric tower): an int
    counts as a float, a bool is neither an int nor a float."""
    if isinstance(value, bool) and cls in (int, float):
        return False
    if cls is float:
        return isinstance(value, (int, float))
    return isinstance(value, cls)


def one_line(exc: BaseException) -> str:
    """An exception's message squeezed onto one line, as every user-facing error is."""
    return " ".join(str(exc).split()) or type(exc).__name__


@dataclass(frozen=True)
class CallSpec:
    """One parsed ``name(args...)``; positional args may themselves be CallSpecs."""

    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        parts = [str(a) if isinstance(a, CallSpec) else repr(a) for a in self.args]
        parts += [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.name}({', '.join(parts)})" if parts else self.name


# A name is a dotted Python path, optionally "module.path:Attr".
_NAME = re.compile(r"^[A-Za-z_][\w.]*(:[A-Za-z_]\w*)?$")


def split_top_level(text: str, sep: str) -> list[str]:
    """Split on ``sep`` where it is not inside brackets or quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _value(node: ast.AST, text: str) -> Any:
    if isinstance(node, ast.Call):
        return parse_call(ast.get_source_segment(text, node) or "")
    try:
        return ast.literal_eval(node)
    except ValueError as exc:
        raise SpecError(
            f"'{ast.get_source_segment(text, node)}' is not a literal value in '{text}'"
        ) from exc


def parse_call(text: str) -> CallSpec:
    """Parse one ``name`` or ``name(args)``; raises SpecError with a one-line message."""
    text = text.strip()
    if not text:
        raise SpecError("empty spec")
    paren = text.find("(")
    name = text if paren < 0 else text[:paren].strip()
    if not _NAME.match(name):
        raise SpecError(f"'{name}' is not a valid name in '{text}'")
    if paren < 0:
        return CallSpec(name)
    if not text.endswith(")"):
        raise SpecError(f"unbalanced parentheses in '{text}'")
    # Parse the argument list as a call of a placeholder so dots and colons in the name
    # do not reach the Python parser.
    call_text = "f" + text[paren:]
    try:
        tree = ast.parse(call_text, mode="eval").body
    except SyntaxError as exc:
        raise SpecError(f"cannot parse the arguments of '{text}': {exc.msg}") from None
    if not isinstance(tree, ast.Call):
        raise SpecError(f"cannot parse '{text}'")
    args = tuple(_value(a, call_text) for a in tree.args)
    kwargs: dict[str, Any] = {}
    for kw in tree.keywords:
        if kw.arg is None:
            raise SpecError(f"'**' is not allowed in '{text}'")
        if kw.arg in kwargs:  # Python's compiler rejects this, but ast.parse does not
            raise SpecError(f"'{kw.arg}' is given twice in '{text}'")
        kwargs[kw.arg] = _value(kw.value, call_text)
    return CallSpec(name, args, kwargs)


def parse_chain(text: str) -> list[CallSpec]:
    """Parse ``a(...)+b(...)``: the composition syntax of defenses."""
    if not text or not text.strip():
        raise SpecError("empty spec")
    parts = split_top_level(text, "+")
    for i, part in enumerate(parts):
        if not part.strip():  # "noise+" or "a++b": a dropped part, most likely a typo
            raise SpecError(f"part {i + 1} of {len(parts)} is empty (a '+' with nothing on one side)")
    return [parse_call(part) for part in parts]
