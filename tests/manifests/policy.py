"""The rules every object in ``manifests/`` must follow, as pure checks over rendered objects.

Each check takes the list of objects ``kubectl kustomize`` renders and returns one line per
violation, naming the object and what is wrong (an empty list means the rule holds). The tests
run them on the real manifests and on broken copies, so a check that never fires is caught too.
"""

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

Obj = Mapping[str, Any]

WORKLOAD_KINDS: Final = frozenset({"Deployment", "DaemonSet", "StatefulSet", "Job", "CronJob"})
LONG_RUNNING_KINDS: Final = frozenset({"Deployment", "DaemonSet", "StatefulSet"})
BROAD_ROLES: Final = frozenset({"cluster-admin", "admin", "edit"})
"""Built-in ClusterRoles that grant far more than any part needs."""
DANGEROUS_VERBS: Final = frozenset({"escalate", "bind", "impersonate"})

HOST_PARTS: Final = frozenset({("DaemonSet", "gpushare-device-plugin", "device-plugin")})
"""(kind, workload, container) allowed privileges, root and host access: the device plugin only."""


@dataclass(frozen=True)
class Container:
    """One container of a workload, with the pod spec around it."""

    kind: str
    workload: str
    name: str
    spec: Obj
    pod: Obj
    init: bool

    @property
    def where(self) -> str:
        return f"{self.kind} {self.workload}, container {self.name}"

    @property
    def host_part(self) -> bool:
        return (self.kind, self.workload, self.name) in HOST_PARTS

    def security(self, key: str) -> Any:
        """A securityContext field as it applies: the container's, else the pod's."""
        own = (self.spec.get("securityContext") or {}).get(key)
        if own is not None:
            return own
        return (self.pod.get("securityContext") or {}).get(key)


def pod_spec(obj: Obj) -> Obj | None:
    """The pod spec of a workload (a CronJob's through its job template), else None."""
    if obj.get("kind") not in WORKLOAD_KINDS:
        return None
    spec = obj.get("spec") or {}
    if obj["kind"] == "CronJob":
        spec = (spec.get("jobTemplate") or {}).get("spec") or {}
    template: Obj = spec.get("template") or {}
    result: Obj = template.get("spec") or {}
    return result


def containers(objects: Sequence[Obj]) -> Iterator[Container]:
    """Every container and init container of every workload."""
    for obj in objects:
        pod = pod_spec(obj)
        if pod is None:
            continue
        name = obj["metadata"]["name"]
        for init, key in ((True, "initContainers"), (False, "containers")):
            for spec in pod.get(key) or []:
                yield Container(obj["kind"], name, spec["name"], spec, pod, init)


def _name(obj: Obj) -> str:
    meta = obj.get("metadata") or {}
    namespace = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{obj.get('kind')} {namespace}{meta.get('name')}"


# --- RBAC ------------------------------------------------------------------------------------


def rbac(objects: Sequence[Obj]) -> list[str]:
    """No wildcard, no broad built-in role, no escalation verbs, no cluster-wide Secrets."""
    problems = []
    for obj in objects:
        kind = obj.get("kind")
        if kind in ("Role", "ClusterRole"):
            if obj.get("aggregationRule"):
                problems.append(f"{_name(obj)}: aggregated roles grow without review")
            for index, rule in enumerate(obj.get("rules") or []):
                where = f"{_name(obj)} rule {index}"
                for field in ("verbs", "resources", "apiGroups", "resourceNames"):
                    if "*" in (rule.get(field) or []):
                        problems.append(f"{where}: wildcard in {field}")
                if rule.get("nonResourceURLs"):
                    problems.append(f"{where}: nonResourceURLs are every user's already")
                if not rule.get("verbs"):
                    problems.append(f"{where}: no verbs")
                for verb in sorted(DANGEROUS_VERBS & set(rule.get("verbs") or [])):
                    problems.append(f"{where}: verb {verb} lets the holder grant itself more")
                if kind == "ClusterRole" and "secrets" in (rule.get("resources") or []):
                    problems.append(f"{where}: Secrets of every namespace (use a Role)")
        elif kind in ("RoleBinding", "ClusterRoleBinding"):
            role = (obj.get("roleRef") or {}).get("name")
            if role in BROAD_ROLES:
                problems.append(f"{_name(obj)}: binds the broad built-in role {role}")
            for subject in obj.get("subjects") or []:
                if subject.get("kind") != "ServiceAccount":
                    problems.append(
                        f"{_name(obj)}: binds {subject.get('kind')} {subject.get('name')};"
                        " only the parts' ServiceAccounts may be bound"
                    )
    return problems


# --- Containers ------------------------------------------------------------------------------


def resources(objects: Sequence[Obj]) -> list[str]:
    """Every container requests and limits both CPU and memory, requests within limits."""
    problems = []
    for container in containers(objects):
        spec = container.spec.get("resources") or {}
        for section in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if resource not in (spec.get(section) or {}):
                    problems.append(f"{container.where}: no {resource} in resources.{section}")
    return problems


def probes(objects: Sequence[Obj]) -> list[str]:
    """Every long-running container has a liveness and a readiness probe."""
    problems = []
    for container in containers(objects):
        if container.init or container.kind not in LONG_RUNNING_KINDS:
            continue
        for probe in ("livenessProbe", "readinessProbe"):
            if not container.spec.get(probe):
                problems.append(f"{container.where}: no {probe}")
    return problems


def privileges(objects: Sequence[Obj]) -> list[str]:
    """Only the device plugin may be privileged, run as root, or reach into the host."""
    problems = []
    for container in containers(objects):
        if container.host_part:
            continue
        where = container.where
        if container.security("privileged"):
            problems.append(f"{where}: privileged (only the device plugin may be)")
        if container.security("runAsNonRoot") is not True:
            problems.append(f"{where}: runAsNonRoot is not true")
        if container.security("runAsUser") == 0:
            problems.append(f"{where}: runs as uid 0")
        if container.security("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        added = ((container.spec.get("securityContext") or {}).get("capabilities") or {}).get("add")
        if added:
            problems.append(f"{where}: adds capabilities {added}")
        dropped = ((container.spec.get("securityContext") or {}).get("capabilities") or {}).get(
            "drop"
        )
        if "ALL" not in (dropped or []):
            problems.append(f"{where}: does not drop ALL capabilities")
    seen: set[tuple[str, str]] = set()
    for container in containers(objects):
        key = (container.kind, container.workload)
        if key in seen:
            continue
        seen.add(key)
        pod = container.pod
        allowed = any((kind, workload) == key for kind, workload, _ in HOST_PARTS)
        if allowed:
            continue
        for flag in ("hostPID", "hostIPC", "hostNetwork"):
            if pod.get(flag):
                problems.append(f"{container.kind} {container.workload}: {flag}")
        for volume in pod.get("volumes") or []:
            if "hostPath" in volume:
                problems.append(
                    f"{container.kind} {container.workload}: hostPath volume {volume['name']}"
                )
    return problems


def read_only_root(objects: Sequence[Obj]) -> list[str]:
    """Every container, the device plugin included, has a read-only root filesystem."""
    return [
        f"{container.where}: readOnlyRootFilesystem is not true"
        for container in containers(objects)
        if container.security("readOnlyRootFilesystem") is not True
    ]


def images(objects: Sequence[Obj]) -> list[str]:
    """Every image names a version: a tag other than ``latest``, or a digest."""
    problems = []
    for container in containers(objects):
        image = container.spec.get("image") or ""
        last = image.rsplit("/", 1)[-1]
        if "@" in last:
            continue
        if ":" not in last or last.endswith(":latest"):
            problems.append(f"{container.where}: image {image!r} has no version")
    return problems


CHECKS: Final = {
    "rbac": rbac,
    "resources": resources,
    "probes": probes,
    "privileges": privileges,
    "read-only-root": read_only_root,
    "images": images,
}
"""Every rule by name."""
