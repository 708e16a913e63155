"""Label and field selectors as kube-apiserver reads them (``app=x,tier in (gpu,cpu)``,
``spec.nodeName=n1,status.phase!=Failed``), for the embedded API server."""

import re
from collections.abc import Callable, Mapping
from typing import Any, Final

__all__ = ["field_matcher", "label_matcher"]

Obj = dict[str, Any]

_SET_EXPR: Final = re.compile(r"^\s*([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_selector(text: str) -> list[str]:
    # Commas inside "in (a,b)" do not separate requirements.
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [part.strip() for part in parts if part.strip()]


def label_matcher(text: str) -> Callable[[Mapping[str, str]], bool]:
    """A predicate over labels for a Kubernetes label selector."""
    requirements: list[tuple[str, str, frozenset[str]]] = []
    for req in _split_selector(text):
        if match := _SET_EXPR.match(req):
            values = frozenset(v.strip() for v in match[3].split(","))
            requirements.append((match[1], match[2], values))
        elif "!=" in req:
            key, value = (s.strip() for s in req.split("!=", 1))
            requirements.append((key, "notin", frozenset({value})))
        elif "=" in req:
            key, value = (s.strip() for s in req.replace("==", "=").split("=", 1))
            requirements.append((key, "in", frozenset({value})))
        elif req.startswith("!"):
            requirements.append((req[1:].strip(), "absent", frozenset()))
        else:
            requirements.append((req, "present", frozenset()))

    def matches(labels: Mapping[str, str]) -> bool:
        for key, op, values in requirements:
            value = labels.get(key)
            ok = {
                "in": value in values,
                "notin": value not in values,
                "absent": value is None,
                "present": value is not None,
            }[op]
            if not ok:
                return False
        return True

    return matches


def field_matcher(text: str) -> Callable[[Obj], bool]:
    """A predicate over objects for a field selector (``spec.nodeName=n1,status.phase!=Failed``)."""
    checks: list[Callable[[Obj], bool]] = []
    for req in _split_selector(text):
        negate = "!=" in req
        path, value = (s.strip() for s in req.replace("==", "=").replace("!=", "=").split("=", 1))

        def check(obj: Obj, path: str = path, value: str = value, negate: bool = negate) -> bool:
            node: Any = obj
            for part in path.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            actual = "" if node is None else str(node)
            return (actual != value) if negate else (actual == value)

        checks.append(check)
    return lambda obj: all(check(obj) for check in checks)


# ----- patches ----------------------------------------------------------------------------------
