"""The container's side of a prepared claim: a CDI spec file that the container runtime applies.

A DRA driver answers kubelet with CDI device IDs only; the environment and mounts the device
plugin returns from ``Allocate`` travel in a CDI spec instead (one file per claim, kind
``gpu.gpushare.io/claim``, device named by the claim's UID). kubelet never sees them, so it
cannot expand ``$(VAR)`` from them: the webhook writes vLLM's utilization out for this backend.

The files are also the plugin's memory: on start it adopts the claims whose files it finds, so
a restart neither forgets a grant nor stops the MPS daemon of a running container.
"""

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Final

from gpushare.core import names
from gpushare.core.ids import CardUUID, DeviceID
from gpushare.deviceplugin.allocation import ContainerSetup, Grant

logger = logging.getLogger(__name__)

KIND: Final = f"{names.DRA_DRIVER}/claim"
VERSION: Final = "0.6.0"
"""The CDI specification version: the first with spec-level annotations."""


def device_id(claim_uid: str) -> str:
    """The fully qualified CDI device name of a claim: ``gpu.gpushare.io/claim=<uid>``."""
    return f"{KIND}={claim_uid}"


def path(folder: Path, claim_uid: str) -> Path:
    """Where a claim's spec lives."""
    return folder / f"{names.DRA_DRIVER}-{claim_uid}.json"


def spec(claim_uid: str, grant: Grant, setup: ContainerSetup, *, claim: str) -> dict[str, Any]:
    """The CDI spec of one prepared claim (``claim`` is its ``namespace/name``): the environment
    and mounts of the contract."""
    return {
        "cdiVersion": VERSION,
        "kind": KIND,
        "annotations": {
            names.ANNOTATION_CARD_UUID: grant.card,
            names.ANNOTATION_GRANTED_BYTES: str(grant.granted_bytes),
            names.CDI_ANNOTATION_CLAIM: claim,
        },
        "devices": [
            {
                "name": claim_uid,
                "containerEdits": {
                    "env": [f"{key}={value}" for key, value in sorted(setup.envs.items())],
                    "mounts": [
                        {
                            "hostPath": mount.host_path,
                            "containerPath": mount.container_path,
                            "options": ["rbind", "ro" if mount.read_only else "rw"],
                        }
                        for mount in setup.mounts
                    ],
                },
            }
        ],
    }


def write(folder: Path, claim_uid: str, body: dict[str, Any]) -> None:
    """Write a spec atomically: the runtime never reads half a file."""
    folder.mkdir(parents=True, exist_ok=True)
    target = path(folder, claim_uid)
    partial = target.with_suffix(".tmp")
    partial.write_text(json.dumps(body, indent=1))
    os.replace(partial, target)


def edits(folder: Path, claim_uid: str) -> tuple[dict[str, str], tuple[tuple[str, str], ...]]:
    """What the runtime applies from a claim's spec: its environment, and its mounts as (host
    path, container path)."""
    body = json.loads(path(folder, claim_uid).read_text())
    container = body["devices"][0]["containerEdits"]
    env = dict(item.split("=", 1) for item in container.get("env") or [])
    mounts = tuple((m["hostPath"], m["containerPath"]) for m in container.get("mounts") or [])
    return env, mounts


def remove(folder: Path, claim_uid: str) -> None:
    """Delete a claim's spec (absent: fine)."""
    with contextlib.suppress(FileNotFoundError):
        path(folder, claim_uid).unlink()


def grant_of(claim_uid: str) -> DeviceID:
    """The one ID a claim's grant holds: its UID, which names its MPS daemon."""
    return DeviceID(claim_uid)


def adopt(folder: Path) -> dict[str, tuple[Grant, str]]:
    """The grants of the claims whose specs are in ``folder`` and their ``namespace/name``
    (empty where a spec predates it), by claim UID."""
    found: dict[str, tuple[Grant, str]] = {}
    for file in sorted(folder.glob(f"{names.DRA_DRIVER}-*.json")):
        try:
            body = json.loads(file.read_text())
            uid = str(body["devices"][0]["name"])
            annotations = body["annotations"]
            grant = Grant(
                card=CardUUID(annotations[names.ANNOTATION_CARD_UUID]),
                devices=(grant_of(uid),),
                granted_bytes=int(annotations[names.ANNOTATION_GRANTED_BYTES]),
            )
            found[uid] = (grant, str(annotations.get(names.CDI_ANNOTATION_CLAIM, "")))
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            logger.warning("ignoring CDI spec %s, which is not gpushare's: %s", file, exc)
    return found
