"""The three patch flavours kube-apiserver accepts (JSON patch, merge patch, strategic merge patch
by the ``name`` of list items), for the embedded API server."""

import copy
from typing import Any

import jsonpatch

from gpushare.simulator.apierrors import ApiError

__all__ = ["apply_patch", "merge_patch"]

Obj = dict[str, Any]


def merge_patch(target: Any, patch: Any, *, strategic: bool = False) -> Any:
    """RFC 7386 merge patch; ``strategic`` also merges lists of named objects by ``name``."""
    if not isinstance(patch, dict):
        if strategic and isinstance(patch, list) and isinstance(target, list):
            return _merge_named(target, patch)
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value, strategic=strategic)
    return result


def _merge_named(target: list[Any], patch: list[Any]) -> list[Any]:
    named = all(isinstance(item, dict) and "name" in item for item in [*target, *patch])
    if not named:
        return copy.deepcopy(patch)
    result = copy.deepcopy(target)
    index = {item["name"]: i for i, item in enumerate(result)}
    for item in patch:
        if item.get("$patch") == "delete":
            result = [kept for kept in result if kept["name"] != item["name"]]
            index = {kept["name"]: i for i, kept in enumerate(result)}
        elif item["name"] in index:
            at = index[item["name"]]
            result[at] = merge_patch(result[at], item, strategic=True)
        else:
            index[item["name"]] = len(result)
            result.append(copy.deepcopy(item))
    return result


def apply_patch(obj: Obj, content_type: str, body: Any) -> Obj:
    """Apply a PATCH body of the given content type to a copy of ``obj``."""
    kind = content_type.split(";", maxsplit=1)[0].strip()
    if kind == "application/json-patch+json":
        try:
            patched: Obj = jsonpatch.apply_patch(obj, body)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
            raise ApiError(422, "Invalid", f"the JSON patch does not apply: {exc}") from exc
        return patched
    if kind in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
        merged: Obj = merge_patch(obj, body, strategic=kind.startswith("application/strategic"))
        return merged
    raise ApiError(415, "UnsupportedMediaType", f"the patch type {kind!r} is not supported here")


# ----- HTTP ------------------------------------------------------------------------------------
