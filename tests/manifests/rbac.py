"""Permissions as ``kubectl auth can-i --list`` shows them, and as policy rules declare them.

A permission is ``(resource, name, verb)``: ``resource`` as can-i writes it (``pods``,
``pods/binding``, ``leases.coordination.k8s.io``; ``url:/api`` for a non-resource URL), ``name`` the
one object it is limited to, or ``""`` for every object.
"""

import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

Permission = tuple[str, str, str]

_ROW: Final = re.compile(r"^(\S*)\s+\[([^\]]*)\]\s+\[([^\]]*)\]\s+\[([^\]]*)\]\s*$")


def parse_can_i(text: str) -> set[Permission]:
    """The rows of ``kubectl auth can-i --list`` as permissions."""
    permissions: set[Permission] = set()
    for line in text.splitlines()[1:]:
        match = _ROW.match(line)
        if match is None:
            if line.strip():
                raise ValueError(f"unexpected can-i line: {line!r}")
            continue
        resource, urls, names, verbs = (group.split() for group in match.groups())
        for verb in verbs:
            for url in urls:
                permissions.add((f"url:{url}", "", verb))
            for resource_name in resource:
                for name in names or [""]:
                    permissions.add((resource_name, name, verb))
    return permissions


def from_rules(rules: Iterable[Mapping[str, Any]]) -> set[Permission]:
    """The permissions PolicyRules grant (no wildcards expected)."""
    permissions: set[Permission] = set()
    for rule in rules:
        for verb in rule.get("verbs") or []:
            for url in rule.get("nonResourceURLs") or []:
                permissions.add((f"url:{url}", "", verb))
            for group in rule.get("apiGroups") or []:
                for resource in rule.get("resources") or []:
                    key = _key(resource, group)
                    for name in rule.get("resourceNames") or [""]:
                        permissions.add((key, name, verb))
    return permissions


def _key(resource: str, group: str) -> str:
    if not group:
        return resource
    base, slash, sub = resource.partition("/")
    return f"{base}.{group}{slash}{sub}"


def beyond(actual: set[Permission], allowed: set[Permission]) -> set[Permission]:
    """What in ``actual`` ``allowed`` does not cover (an unnamed permission covers all names)."""
    return {
        (resource, name, verb)
        for resource, name, verb in actual
        if (resource, name, verb) not in allowed and (resource, "", verb) not in allowed
    }
