"""Preemption under the real kube-scheduler: PriorityClasses, its victims, our card check.

kube-scheduler finds victims against the node's total of ``gpushare.io/gpu-memory`` and sends them
to the extender's ``preempt`` verb; the extender answers with victims that free one card, or none.
No kubelet runs here, so the test finishes each deletion that preemption starts (a pod with a
``deletionTimestamp`` is deleted at once, as kubelet does once its containers stop).
"""

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpushare.core import names
from tests import cluster
from tests.scheduler.extender import ExtenderProcess, kube_scheduler, started
from tests.scheduler.objects import GI, pod
from tests.scheduler.test_under_kube_scheduler import events, list_pods, metric_sum

CARD_40 = 40 * GI


@pytest.fixture
def sidecar(control_plane: cluster.ControlPlane, tmp_path: Path) -> Iterator[ExtenderProcess]:
    """``gpushare scheduler`` in its own process, talking to the test's API server."""
    with started(control_plane, tmp_path) as process:
        yield process


@pytest.fixture
def priorities(control_plane: cluster.ControlPlane, namespace: str) -> Iterator[dict[str, str]]:
    """PriorityClasses ``low`` (100), ``mid`` (500), ``high`` (1000) and ``guard`` (2000)."""
    rest = control_plane.rest()
    made = {}
    for role, value in (("low", 100), ("mid", 500), ("high", 1000), ("guard", 2000)):
        name = f"{namespace}-{role}"
        rest.create(
            "/apis/scheduling.k8s.io/v1/priorityclasses",
            {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
             "metadata": {"name": name}, "value": value},
        )
        made[role] = name
    yield made
    for name in made.values():
        rest.delete(f"/apis/scheduling.k8s.io/v1/priorityclasses/{name}")


def _node(control_plane: cluster.ControlPlane, namespace: str) -> str:
    """One node of two 40 GiB cards (80 units in its total)."""
    name = f"{namespace}-n"
    cards = [cluster.gpu_card(i, total=CARD_40, model="NVIDIA L40S") for i in range(2)]
    cluster.register_gpu_node(control_plane, name, cards, owner=namespace)
    return name


def _create(rest: cluster.Rest, namespace: str, name: str, gib: int, priority_class: str) -> None:
    body = pod(name, gib, namespace=namespace)
    body["spec"]["priorityClassName"] = priority_class
    rest.create(f"/api/v1/namespaces/{namespace}/pods", body)


def _placed(rest: cluster.Rest, namespace: str, name: str) -> dict[str, Any] | None:
    got = rest.get(f"/api/v1/namespaces/{namespace}/pods/{name}")
    return got if got["spec"].get("nodeName") else None


def _one_by_one(
    rest: cluster.Rest, namespace: str, pods: list[tuple[str, int, str]]
) -> dict[str, str]:
    """Create each pod once the one before is bound; each one's card index."""
    cards = {}
    for name, gib, priority_class in pods:
        _create(rest, namespace, name, gib, priority_class)
        bound = cluster.wait_for(
            functools.partial(_placed, rest, namespace, name), timeout=60, what=f"{name} bound"
        )
        cards[name] = bound["metadata"]["annotations"][names.ANNOTATION_CARD_INDEX]
    return cards


def _finish_deletions(rest: cluster.Rest, namespace: str, deleted: set[str]) -> None:
    """Delete at once each pod that preemption marked for deletion (kubelet's part)."""
    for item in list_pods(rest, namespace):
        meta = item["metadata"]
        if meta.get("deletionTimestamp"):
            deleted.add(meta["name"])
            rest.delete(f"/api/v1/namespaces/{namespace}/pods/{meta['name']}",
                        gracePeriodSeconds=0)


@contextlib.contextmanager
def _urgent_on_two_full_cards(
    control_plane: cluster.ControlPlane,
    namespace: str,
    extender: ExtenderProcess,
    priorities: dict[str, str],
    second: str,
) -> Iterator[cluster.Rest]:
    """Under kube-scheduler, fill puts a (20 GiB, low) and b (16 GiB, ``second``) on card 0 of
    :func:`_node`, c and d likewise on card 1 (72 of its 80 units); then "urgent" asks for 30 GiB,
    which fits no card, at high priority."""
    rest = control_plane.rest()
    _node(control_plane, namespace)
    with kube_scheduler(control_plane, extender):
        cards = _one_by_one(rest, namespace, [
            ("a", 20, priorities["low"]), ("b", 16, priorities[second]),
            ("c", 20, priorities["low"]), ("d", 16, priorities[second]),
        ])  # fmt: skip
        assert cards == {"a": "0", "b": "0", "c": "1", "d": "1"}
        _create(rest, namespace, "urgent", 30, priorities["high"])
        yield rest


def test_exactly_enough_pods_on_one_card_are_evicted_for_a_higher_priority_pod(
    control_plane: cluster.ControlPlane,
    namespace: str,
    sidecar: ExtenderProcess,
    priorities: dict[str, str],
) -> None:
    # kube-scheduler needs 22 units of the node's total back and spares the mid pods first: its
    # victims are a and c, 20 GiB on each card and 30 on neither.
    with _urgent_on_two_full_cards(control_plane, namespace, sidecar, priorities, "mid") as rest:
        deleted: set[str] = set()

        def bound() -> dict[str, Any] | None:
            _finish_deletions(rest, namespace, deleted)
            return _placed(rest, namespace, "urgent")

        urgent = cluster.wait_for(bound, timeout=120, interval=0.5, what="urgent bound")
        chosen = metric_sum(
            sidecar.metrics(), 'gpushare_scheduler_preempt_nodes_total{outcome="chosen"}'
        )
    # The extender chose again: both pods of card 0 (the first of two equal cards), each needed
    # (neither frees 30 GiB alone); c and d stayed, and the pod holds card 0.
    assert chosen >= 1
    assert deleted == {"a", "b"}
    assert urgent["metadata"]["annotations"][names.ANNOTATION_CARD_INDEX] == "0"
    left = {p["metadata"]["name"] for p in list_pods(rest, namespace)}
    assert left == {"a", "b", "c", "d", "urgent"} - deleted
    assert all(not p["metadata"].get("deletionTimestamp") for p in list_pods(rest, namespace))


def test_kube_schedulers_victims_are_refused_when_they_free_no_card(
    control_plane: cluster.ControlPlane,
    namespace: str,
    sidecar: ExtenderProcess,
    priorities: dict[str, str],
) -> None:
    # b and d outrank the preemptor. kube-scheduler would evict a and c: 40 units of the node's
    # total, 20 GiB on each card, and no card with 30 GiB. The extender refuses: nothing is evicted.
    with _urgent_on_two_full_cards(control_plane, namespace, sidecar, priorities, "guard") as rest:
        cluster.wait_for(
            lambda: metric_sum(
                sidecar.metrics(), 'gpushare_scheduler_preempt_nodes_total{outcome="refused"}'
            ) >= 1 or None,
            timeout=120, interval=0.5, what="a refused preemption",
        )
        cluster.wait_for(
            lambda: events(rest, namespace, "FailedScheduling") or None,
            timeout=60, what="FailedScheduling",
        )
        pods = list_pods(rest, namespace)
    assert not any(p["metadata"].get("deletionTimestamp") for p in pods)
    assert {p["metadata"]["name"] for p in pods} == {"a", "b", "c", "d", "urgent"}
    assert not next(p for p in pods if p["metadata"]["name"] == "urgent")["spec"].get("nodeName")
