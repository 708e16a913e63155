"""The control plane a simulation runs on: embedded, or the real kube-apiserver and kube-scheduler.

Both answer the same questions of :class:`gpushare.simulator.cluster.Simulation`: store and read
objects, admit an InferenceService and its predictor pod, and schedule the pod.

- :class:`Embedded` (the default): the in-process API server of :mod:`.apiserver`; the simulation
  plays kube-apiserver's admission (AdmissionReview over HTTPS to the real webhook) and one
  kube-scheduler cycle (filter, prioritize and bind over HTTP to the real extender,
  :mod:`.scheduling`). Fast, and needs nothing built.
- :class:`Real`: etcd, kube-apiserver and kube-scheduler built by ``tests/controlplane/build.sh``
  (:mod:`.controlplane`). The apiserver calls the webhook through webhook configurations, and
  kube-scheduler runs the ``gpushare-scheduler`` profile with the extender as the manifests
  configure it: its queue, back-off, asynchronous binding, ``percentageOfNodesToScore`` and
  weighted scores are in the loop. The simulation still plays kubelet.
"""

import asyncio
import base64
import contextlib
import copy
import random
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, Literal, Protocol

from prometheus_client.parser import text_string_to_metric_families

from gpushare.core import errors, names
from gpushare.simulator import admission, apiserver, patches, scheduling
from gpushare.simulator.controlplane import binaries, server
from gpushare.simulator.controlplane.rest import ApiError, Rest
from gpushare.webhook import paths

__all__ = [
    "CONTROL_PLANES",
    "ControlPlaneName",
    "Embedded",
    "Plane",
    "Real",
    "choose",
    "scheduler_configuration",
]

Obj = dict[str, Any]
ControlPlaneName = Literal["auto", "embedded", "real"]
CONTROL_PLANES: Final[tuple[ControlPlaneName, ...]] = ("auto", "embedded", "real")
DECISION_SECONDS: Final = 30.0
"""Longest wait for kube-scheduler's first decision on a new pod (bound, or Unschedulable)."""
RETRY_SECONDS: Final = 12.0
"""Longest wait for a pending pod to bind after room was freed: kube-scheduler moves it back to
its active queue on the deletion and retries it after its back-off (1 s doubling to 10 s)."""
POLL_SECONDS: Final = 0.05
EXTENDER_WEIGHT: Final = 10
"""The extender's ``weight`` in ``manifests/scheduler/kube-scheduler-config.yaml``."""
_NODES: Final = apiserver.resource("", "nodes")
_CRDS: Final = apiserver.Resource(
    "apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", False
)


class Plane(Protocol):
    """What a simulation asks of its control plane."""

    label: str
    """Which control plane produced the figures, for the report."""

    async def start(self, workdir: Path) -> None: ...
    def kubeconfig(self) -> str: ...
    async def connect(self, *, extender_url: str, webhook_url: str, ca_pem: bytes) -> None: ...
    async def add_node(self, node: Obj) -> None: ...
    async def create(self, res: apiserver.Resource, obj: Obj) -> Obj: ...
    async def get(self, res: apiserver.Resource, namespace: str, name: str) -> Obj: ...
    async def items(self, res: apiserver.Resource) -> list[Obj]: ...
    async def patch_status(
        self, res: apiserver.Resource, namespace: str, name: str, status: Obj
    ) -> None: ...
    async def delete(self, res: apiserver.Resource, namespace: str, name: str) -> None: ...
    async def admit_inference_service(self, manifest: Obj) -> str | None: ...
    async def admit_pod(self, pod: Obj) -> Obj | str: ...
    async def schedule(
        self, pod: Obj, nodes: Sequence[str], *, retry: bool
    ) -> scheduling.Bound | scheduling.Unschedulable | scheduling.BindFailed: ...
    async def requests(self) -> dict[str, int]: ...
    async def stop(self) -> None: ...


def choose(name: ControlPlaneName, *, seed: int, dra: bool = False) -> Plane:
    """``auto`` is :class:`Real` where the binaries are built, else :class:`Embedded`. The DRA
    backend needs the real one: its allocator lives in kube-scheduler."""
    if dra:
        if name == "embedded":
            raise errors.BadRequest(
                "--backend dra needs the real control plane (kube-scheduler allocates claims):"
                " use --control-plane real or auto"
            )
        return Real(dra=True)
    if name == "real" or (name == "auto" and binaries.built() is not None):
        return Real()
    return Embedded(seed=seed)


def _path(res: apiserver.Resource, namespace: str = "", name: str = "") -> str:
    prefix = f"/apis/{res.group}/{res.version}" if res.group else f"/api/{res.version}"
    where = f"/namespaces/{namespace}" if namespace and res.namespaced else ""
    return f"{prefix}{where}/{res.plural}" + (f"/{name}" if name else "")


class Embedded:
    """The in-process API server; admission and scheduling played by the simulation."""

    label = "embedded API server, simulated kube-scheduler cycle"

    def __init__(self, *, seed: int) -> None:
        self.api = apiserver.ApiServer()
        self._rng = random.Random(seed)
        self._webhook: admission.AdmissionClient | None = None
        self._scheduler: scheduling.SchedulerClient | None = None

    async def start(self, workdir: Path) -> None:
        await self.api.start()
        await self.api.store.create(
            apiserver.resource("", "namespaces"), {"metadata": {"name": "default"}}
        )

    def kubeconfig(self) -> str:
        return self.api.kubeconfig()

    async def connect(self, *, extender_url: str, webhook_url: str, ca_pem: bytes) -> None:
        self._webhook = admission.AdmissionClient(webhook_url, ca_pem=ca_pem)
        self._scheduler = scheduling.SchedulerClient(extender_url, rng=self._rng)

    async def add_node(self, node: Obj) -> None:
        await self.api.store.create(_NODES, node)

    async def create(self, res: apiserver.Resource, obj: Obj) -> Obj:
        try:
            return await self.api.store.create(res, obj)
        except apiserver.ApiError as exc:
            raise ApiError("POST", _path(res), exc.code, exc.status()) from None

    async def get(self, res: apiserver.Resource, namespace: str, name: str) -> Obj:
        return self.api.store.get(res, namespace, name)

    async def items(self, res: apiserver.Resource) -> list[Obj]:
        return self.api.store.items(res)

    async def patch_status(
        self, res: apiserver.Resource, namespace: str, name: str, status: Obj
    ) -> None:
        obj = copy.deepcopy(self.api.store.get(res, namespace, name))
        obj["status"] = patches.merge_patch(obj.get("status") or {}, status)
        await self.api.store.put(res, obj, event="MODIFIED")

    async def delete(self, res: apiserver.Resource, namespace: str, name: str) -> None:
        with contextlib.suppress(apiserver.ApiError):
            await self.api.store.delete(res, namespace, name)

    async def admit_inference_service(self, manifest: Obj) -> str | None:
        assert self._webhook is not None
        verdict = await self._webhook.review(
            paths.VALIDATE_INFERENCE_SERVICES,
            manifest,
            group="serving.kserve.io",
            version="v1beta1",
            resource="inferenceservices",
            kind="InferenceService",
        )
        return None if verdict.allowed else verdict.message

    async def admit_pod(self, pod: Obj) -> Obj | str:
        assert self._webhook is not None
        verdict = await self._webhook.review(
            paths.MUTATE_PODS, pod, group="", version="v1", resource="pods", kind="Pod"
        )
        if not verdict.allowed:
            return verdict.message
        return await self.create(apiserver.resource("", "pods"), verdict.obj)

    async def schedule(
        self, pod: Obj, nodes: Sequence[str], *, retry: bool
    ) -> scheduling.Bound | scheduling.Unschedulable | scheduling.BindFailed:
        assert self._scheduler is not None
        return await self._scheduler.schedule(pod, nodes)

    async def requests(self) -> dict[str, int]:
        return dict(self.api.store.requests)

    async def stop(self) -> None:
        for session in (self._webhook, self._scheduler):
            if session is not None:
                await session.close()
        await self.api.stop()


INFERENCE_SERVICE_CRD: Final[Obj] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "inferenceservices.serving.kserve.io"},
    "spec": {
        "group": "serving.kserve.io",
        "scope": "Namespaced",
        "names": {
            "kind": "InferenceService",
            "listKind": "InferenceServiceList",
            "plural": "inferenceservices",
            "singular": "inferenceservice",
            "shortNames": ["isvc"],
        },
        "versions": [
            {
                "name": "v1beta1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "x-kubernetes-preserve-unknown-fields": True,
                    }
                },
            }
        ],
    },
}
"""KServe's InferenceService, schema left open: the simulation plays KServe's controller, and the
webhook validates what it needs."""


def scheduler_configuration(extender_url: str, kubeconfig: Path) -> Obj:
    """The ``gpushare-scheduler`` profile and its extender, as the manifests configure them."""
    return {
        "apiVersion": "kubescheduler.config.k8s.io/v1",
        "kind": "KubeSchedulerConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "leaderElection": {"leaderElect": False},
        "profiles": [{"schedulerName": names.SCHEDULER_NAME}],
        "extenders": [
            {
                "urlPrefix": extender_url,
                "filterVerb": "filter",
                "prioritizeVerb": "prioritize",
                "bindVerb": "bind",
                "preemptVerb": "preempt",
                "weight": EXTENDER_WEIGHT,
                "nodeCacheCapable": True,
                "httpTimeout": "10s",
                "enableHTTPS": False,
                "ignorable": False,
                "managedResources": [
                    {"name": names.RESOURCE_GPU_MEMORY, "ignoredByScheduler": False}
                ],
            }
        ],
    }


def _webhook_configurations(webhook_url: str, ca_pem: bytes) -> list[Obj]:
    """The webhook configurations of the manifests, calling the webhook at ``webhook_url``."""
    bundle = base64.b64encode(ca_pem).decode()

    def hook(name: str, path: str, group: str, resource: str, operations: list[str]) -> Obj:
        return {
            "name": name,
            "admissionReviewVersions": ["v1"],
            "sideEffects": "NoneOnDryRun",
            "failurePolicy": "Fail",
            "timeoutSeconds": 10,
            "rules": [
                {
                    "apiGroups": [group],
                    "apiVersions": ["v1beta1" if group else "v1"],
                    "resources": [resource],
                    "operations": operations,
                }
            ],
            "clientConfig": {"url": f"{webhook_url.rstrip('/')}/{path}", "caBundle": bundle},
        }

    return [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "gpushare-webhook"},
            "webhooks": [hook("pods.gpushare.io", paths.MUTATE_PODS, "", "pods", ["CREATE"])],
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": "gpushare-webhook"},
            "webhooks": [
                hook(
                    "inferenceservices.gpushare.io",
                    paths.VALIDATE_INFERENCE_SERVICES,
                    "serving.kserve.io",
                    "inferenceservices",
                    ["CREATE", "UPDATE"],
                )
            ],
        },
    ]


class Real:
    """etcd, kube-apiserver and kube-scheduler as processes; the webhook called by the apiserver."""

    def __init__(self, *, dra: bool = False) -> None:
        self.plane: server.ControlPlane | None = None
        self._rest: Rest | None = None
        self._scheduler: contextlib.ExitStack = contextlib.ExitStack()
        self.dra = dra
        """kube-scheduler's default profile places the pods (its DRA allocator), and
        kube-controller-manager's ResourceClaim controller makes each pod's claim."""
        self.label = "kube-apiserver and kube-scheduler"

    async def start(self, workdir: Path) -> None:
        folder = binaries.find()
        self.label = f"kube-apiserver and kube-scheduler ({folder.name})"
        # No kube-controller-manager makes the ``default`` ServiceAccounts this plug-in wants.
        args = ["--disable-admission-plugins=ServiceAccount"]
        plane = server.ControlPlane(
            folder, workdir=workdir / "control-plane", keep=True, apiserver_args=args
        )
        self.plane = plane
        await asyncio.to_thread(plane.start)
        if self.dra:
            plane.start_controller_manager(["resourceclaim-controller"])
            self.label += " with kube-controller-manager's ResourceClaim controller"
        self._rest = plane.rest()
        await self._call(self._rest.create, _path(_CRDS), INFERENCE_SERVICE_CRD)
        await self._until_established()

    async def _until_established(self) -> None:
        deadline = time.monotonic() + DECISION_SECONDS
        while time.monotonic() < deadline:
            name = INFERENCE_SERVICE_CRD["metadata"]["name"]
            crd = await self._call(self._rest_client().get, _path(_CRDS, name=name))
            conditions = (crd.get("status") or {}).get("conditions") or []
            if any(
                c.get("type") == "Established" and c.get("status") == "True" for c in conditions
            ):
                return
            await asyncio.sleep(POLL_SECONDS)
        raise errors.Conflict("the InferenceService CRD was not established in time")

    def _rest_client(self) -> Rest:
        if self._rest is None:
            raise errors.Conflict("the control plane is not started")
        return self._rest

    async def _call(self, method: Any, *args: Any, **params: Any) -> Obj:
        result: Obj = await asyncio.to_thread(method, *args, **params)
        return result

    def kubeconfig(self) -> str:
        assert self.plane is not None
        return self.plane.kubeconfig.read_text()

    async def connect(self, *, extender_url: str, webhook_url: str, ca_pem: bytes) -> None:
        rest = self._rest_client()
        for configuration in _webhook_configurations(webhook_url, ca_pem):
            kind = configuration["kind"].lower() + "s"
            await self._call(
                rest.create, f"/apis/admissionregistration.k8s.io/v1/{kind}", configuration
            )
        assert self.plane is not None
        config = scheduler_configuration(extender_url, self.plane.kubeconfig)
        if self.dra:
            config["profiles"].append({"schedulerName": "default-scheduler"})
        running = self.plane.start_scheduler(config)
        await asyncio.to_thread(self._scheduler.enter_context, running)

    async def add_node(self, node: Obj) -> None:
        """Create the Node, post its status as its kubelet would, and lift the ``not-ready``
        taint that admission puts on every new Node (the node lifecycle controller's job)."""
        name = node["metadata"]["name"]
        rest = self._rest_client()
        await self.create(_NODES, {k: v for k, v in node.items() if k != "status"})
        await self.patch_status(_NODES, "", name, node["status"])
        await self._call(rest.patch, _path(_NODES, name=name), {"spec": {"taints": None}}, "merge")

    async def create(self, res: apiserver.Resource, obj: Obj) -> Obj:
        namespace = (obj.get("metadata") or {}).get("namespace", "")
        body = {"apiVersion": res.group_version, "kind": res.kind, **obj}
        return await self._call(self._rest_client().create, _path(res, namespace), body)

    async def get(self, res: apiserver.Resource, namespace: str, name: str) -> Obj:
        return await self._call(self._rest_client().get, _path(res, namespace, name))

    async def items(self, res: apiserver.Resource) -> list[Obj]:
        listed = await self._call(self._rest_client().get, _path(res))
        return list(listed.get("items") or [])

    async def patch_status(
        self, res: apiserver.Resource, namespace: str, name: str, status: Obj
    ) -> None:
        await self._call(
            self._rest_client().patch,
            _path(res, namespace, name) + "/status",
            {"status": status},
            "merge",
        )

    async def delete(self, res: apiserver.Resource, namespace: str, name: str) -> None:
        # No kubelet confirms a graceful deletion: the object goes at once, as kubelet's would.
        with contextlib.suppress(ApiError):
            await self._call(
                self._rest_client().delete, _path(res, namespace, name), gracePeriodSeconds=0
            )

    async def admit_inference_service(self, manifest: Obj) -> str | None:
        try:
            await self.create(
                apiserver.resource("serving.kserve.io", "inferenceservices"), manifest
            )
        except ApiError as exc:
            return exc.message
        return None

    async def admit_pod(self, pod: Obj) -> Obj | str:
        try:
            return await self.create(apiserver.resource("", "pods"), pod)
        except ApiError as exc:
            return exc.message

    async def schedule(
        self, pod: Obj, nodes: Sequence[str], *, retry: bool
    ) -> scheduling.Bound | scheduling.Unschedulable | scheduling.BindFailed:
        """Wait for kube-scheduler: the pod bound, or marked unschedulable (on a retry: still
        unbound when :data:`RETRY_SECONDS` have passed)."""
        meta = pod["metadata"]
        res = apiserver.resource("", "pods")
        deadline = time.monotonic() + (RETRY_SECONDS if retry else DECISION_SECONDS)
        message = "kube-scheduler has not decided yet"
        while True:
            current = await self.get(res, meta["namespace"], meta["name"])
            node = (current.get("spec") or {}).get("nodeName")
            if node:
                return scheduling.Bound(str(node))
            for condition in (current.get("status") or {}).get("conditions") or []:
                if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
                    message = str(condition.get("message") or condition.get("reason"))
                    if not retry:
                        if condition.get("reason") == "SchedulerError":
                            return scheduling.BindFailed(message)
                        return scheduling.Unschedulable(message, False)
            if time.monotonic() > deadline:
                return scheduling.Unschedulable(message, False)
            await asyncio.sleep(POLL_SECONDS)

    async def requests(self) -> dict[str, int]:
        """Requests the apiserver served, by verb and resource, from its own metrics."""
        rest = self._rest_client()
        try:
            text = await asyncio.to_thread(_metrics_text, rest)
        except (ApiError, OSError):
            return {}
        counts: dict[str, int] = {}
        for family in text_string_to_metric_families(text):
            if family.name != "apiserver_request":
                continue
            for sample in family.samples:
                if not sample.name.endswith("_total"):
                    continue
                labels = sample.labels
                sub = labels.get("subresource")
                key = f"{labels.get('verb')} {labels.get('resource')}" + (f"/{sub}" if sub else "")
                counts[key] = counts.get(key, 0) + int(sample.value)
        return counts

    async def stop(self) -> None:
        await asyncio.to_thread(self._scheduler.close)
        if self.plane is not None:
            await asyncio.to_thread(self.plane.stop)


def _metrics_text(rest: Rest) -> str:
    """``/metrics`` as text (the REST client decodes JSON only)."""
    request = urllib.request.Request(rest.base_url + "/metrics")
    with urllib.request.urlopen(request, context=rest.context, timeout=10) as response:
        return str(response.read().decode())
