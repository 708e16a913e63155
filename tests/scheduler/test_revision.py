"""Which Deployment revision a pod belongs to, as its ReplicaSet marks it."""

from typing import Any

import pytest

from gpushare.scheduler import demand, wire


def _meta(labels: dict[str, str], owners: list[dict[str, Any]]) -> wire.ObjectMeta:
    return wire.Pod.model_validate(
        {"metadata": {"name": "p", "labels": labels, "ownerReferences": owners}}
    ).metadata


RS = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7c9f", "controller": True}


def test_a_replicaset_pod_names_its_deployment_and_template_hash() -> None:
    revision = demand.revision_of(_meta({"pod-template-hash": "7c9f"}, [RS]))
    assert revision == demand.Revision("web", "7c9f")


@pytest.mark.parametrize(
    ("labels", "owners"),
    [
        ({}, [RS]),  # no template hash
        ({"pod-template-hash": "7c9f"}, []),  # no owner
        ({"pod-template-hash": "7c9f"}, [{**RS, "controller": False}]),  # not the controller
        ({"pod-template-hash": "7c9f"}, [{**RS, "kind": "StatefulSet"}]),
        ({"pod-template-hash": "0000"}, [RS]),  # the owner's name does not end in the hash
    ],
    ids=["no-hash", "no-owner", "not-controller", "statefulset", "foreign-hash"],
)
def test_anything_else_has_no_revision(labels: dict[str, str], owners: list[Any]) -> None:
    assert demand.revision_of(_meta(labels, owners)) is None
