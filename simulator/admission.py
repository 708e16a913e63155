"""kube-apiserver's side of admission: AdmissionReview v1 over HTTPS to the webhook, patch applied.

A request carries the object, its kind and resource, the operation and a fresh ``uid``; the answer
must echo the ``uid``. A mutating answer's ``patch`` is a base64 JSON patch (``patchType:
JSONPatch``) that the apiserver applies to the object before storing it.
"""

import base64
import json
import ssl
import uuid
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import jsonpatch

from gpushare.core import errors

CALL_SECONDS: Final = 10.0
"""The webhook configurations' ``timeoutSeconds`` (at most 10)."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """The webhook's answer: allowed or not, the message, the warnings, the patched object."""

    allowed: bool
    message: str
    warnings: tuple[str, ...]
    obj: dict[str, Any]


class AdmissionClient:
    """Sends AdmissionReviews to one webhook server, trusting its CA only."""

    def __init__(self, base_url: str, *, ca_pem: bytes) -> None:
        self._base = base_url.rstrip("/")
        context = ssl.create_default_context(cadata=ca_pem.decode())
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context),
            timeout=aiohttp.ClientTimeout(total=CALL_SECONDS),
        )
        self.calls = 0

    async def close(self) -> None:
        await self._session.close()

    async def review(
        self,
        path: str,
        obj: dict[str, Any],
        *,
        group: str,
        version: str,
        resource: str,
        kind: str,
        operation: str = "CREATE",
    ) -> Verdict:
        """One AdmissionReview round trip; a broken webhook is a :class:`Conflict`."""
        uid = str(uuid.uuid4())
        meta = obj.get("metadata") or {}
        review = {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": uid,
                "kind": {"group": group, "version": version, "kind": kind},
                "resource": {"group": group, "version": version, "resource": resource},
                "requestKind": {"group": group, "version": version, "kind": kind},
                "requestResource": {"group": group, "version": version, "resource": resource},
                "name": meta.get("name", ""),
                "namespace": meta.get("namespace", ""),
                "operation": operation,
                "userInfo": {"username": "system:serviceaccount:kserve:kserve-controller-manager"},
                "object": obj,
                "oldObject": None,
                "dryRun": False,
                "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
            },
        }
        self.calls += 1
        try:
            async with self._session.post(f"{self._base}/{path}", json=review) as response:
                text = await response.text()
                if response.status != 200:
                    raise errors.Conflict(
                        f"webhook /{path} answered HTTP {response.status}: {text[:300]}"
                    )
                answer = json.loads(text)
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
            raise errors.Conflict(f"webhook /{path} failed: {exc!r}") from exc
        return _verdict(answer, uid, obj, path)


def _verdict(answer: Any, uid: str, obj: dict[str, Any], path: str) -> Verdict:
    response = answer.get("response") if isinstance(answer, dict) else None
    if not isinstance(response, dict) or response.get("uid") != uid:
        raise errors.Conflict(
            f"webhook /{path} answered without this request's uid: {answer!r:.300}"
        )
    warnings = tuple(str(w) for w in response.get("warnings") or ())
    if not response.get("allowed"):
        status = response.get("status") or {}
        return Verdict(False, str(status.get("message") or "denied"), warnings, obj)
    patched = obj
    if response.get("patch"):
        if response.get("patchType") != "JSONPatch":
            raise errors.Conflict(f"webhook /{path} sent patchType {response.get('patchType')!r}")
        ops = json.loads(base64.b64decode(response["patch"]))
        try:
            patched = jsonpatch.apply_patch(obj, ops)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
            raise errors.Conflict(
                f"webhook /{path} sent a patch that does not apply: {exc}"
            ) from exc
    return Verdict(True, "", warnings, patched)
