"""Every resource, annotation, label and environment name of gpushare: the product's API.

These strings are read and written by other programs (kube-scheduler, kubelet, vLLM, dashboards,
users' manifests). They live here and nowhere else; change one only with a migration note.
"""

from typing import Final

DOMAIN: Final = "gpushare.io"

# --- Extended resource ----------------------------------------------------------------------------
RESOURCE_GPU_MEMORY: Final = f"{DOMAIN}/gpu-memory"
"""Extended resource: a count of memory units on one card (the unit is cluster configuration)."""

NVIDIA_GPU_RESOURCE: Final = "nvidia.com/gpu"
"""NVIDIA's whole-card resource, which the webhook replaces for shared pods."""

NVIDIA_RESOURCE_PREFIX: Final = "nvidia.com/"
"""NVIDIA's other GPU resources (``nvidia.com/mig-1g.10gb``, ``nvidia.com/gpu.shared``...)."""

# --- Annotations written by users -----------------------------------------------------------------
ANNOTATION_GPU_MEMORY: Final = f"{DOMAIN}/gpu-memory"
"""The only line a user adds: a Kubernetes quantity (``20Gi``), rounded up to units."""

ANNOTATION_POLICY: Final = f"{DOMAIN}/policy"
"""Per-pod override of the placement policy (``fill``, ``binpack`` or ``spread``)."""

ANNOTATION_COMPUTE_SHARE: Final = f"{DOMAIN}/compute-share"
"""Optional: the share of the card's streaming multiprocessors a pod's servers may use, in percent
(1 to 100): MPS's active-thread percentage (``docs/isolation.md`` says where it is enforced)."""

# --- Annotations written at bind time (on the Binding, so they land with the node) ----------------
ANNOTATION_CARD_UUID: Final = f"{DOMAIN}/card-uuid"
ANNOTATION_CARD_INDEX: Final = f"{DOMAIN}/card-index"
ANNOTATION_CARD_TOTAL: Final = f"{DOMAIN}/card-total-bytes"
ANNOTATION_GRANTED_BYTES: Final = f"{DOMAIN}/granted-bytes"
ANNOTATION_BIND_TIME: Final = f"{DOMAIN}/bind-time"
ANNOTATION_ALLOCATIONS: Final = f"{DOMAIN}/allocations"
"""JSON list, one entry per container that requests memory, written only when several do.

Each entry: ``{"container", "card-uuid", "card-index", "card-total-bytes", "granted-bytes"}``.
The pod-level annotations above always describe the first such container.
"""

USER_ANNOTATIONS: Final = (ANNOTATION_GPU_MEMORY, ANNOTATION_POLICY, ANNOTATION_COMPUTE_SHARE)
"""Every annotation a user writes; all other ``gpushare.io/`` keys are gpushare's own."""

# --- Annotations written by the webhook and the agent ---------------------------------------------
ANNOTATION_MUTATED: Final = f"{DOMAIN}/mutated"
"""Set by the webhook on pods it rewrote: the units granted (marks idempotent re-invocation)."""

CDI_ANNOTATION_CLAIM: Final = f"{DOMAIN}/claim"
"""Not on pods: in a prepared claim's CDI spec (the DRA backend), the claim's ``namespace/name``, so
that the agent finds the pods that use the claim again after a restart."""

ANNOTATION_NODE_REPORT: Final = f"{DOMAIN}/node-report"
"""On Nodes: the agent's JSON report of every card (see :mod:`gpushare.core.nodereport`)."""

SYSTEM_ANNOTATIONS: Final = frozenset(
    {
        ANNOTATION_MUTATED,
        ANNOTATION_CARD_UUID,
        ANNOTATION_CARD_INDEX,
        ANNOTATION_CARD_TOTAL,
        ANNOTATION_GRANTED_BYTES,
        ANNOTATION_BIND_TIME,
        ANNOTATION_ALLOCATIONS,
    }
)
"""Pod annotations gpushare writes itself; a user never sets them."""

# --- Labels ---------------------------------------------------------------------------------------
LABEL_BACKEND: Final = f"{DOMAIN}/backend"
"""On Namespaces and Nodes of a cluster that runs both backends (``manifests/overlays/mixed``):
``dra`` puts a namespace's pods, and a node's cards, on the DRA backend."""
LABEL_ENABLED: Final = f"{DOMAIN}/enabled"
"""On Nodes that share GPUs (value ``true``): the device plugin runs there."""

LABEL_COMPONENT: Final = "app.kubernetes.io/component"
LABEL_PART_OF: Final = "app.kubernetes.io/part-of"
LABEL_POD_TEMPLATE_HASH: Final = "pod-template-hash"
"""Kubernetes': a Deployment's ReplicaSet puts it on its pods and ends its own name with it (the
extender tells a rollout's revisions apart by it)."""

# --- Scheduler ------------------------------------------------------------------------------------
SCHEDULER_NAME: Final = "gpushare-scheduler"
"""Default ``schedulerName`` of mutated pods; the profile name in KubeSchedulerConfiguration."""

SCHEDULER_CONTROLLER: Final = f"{DOMAIN}/scheduler"
DEVICE_PLUGIN_CONTROLLER: Final = f"{DOMAIN}/device-plugin"
"""The ``reportingController`` of the device plugin's Events."""
"""``reportingController`` of the extender's Events."""

# --- Environment handed to containers by the device plugin's Allocate -----------------------------
ENV_VISIBLE_DEVICES: Final = "NVIDIA_VISIBLE_DEVICES"
ENV_GRANTED_BYTES: Final = "GPUSHARE_GRANTED_BYTES"
ENV_CARD_UUID: Final = "GPUSHARE_CARD_UUID"
ENV_VLLM_UTILIZATION: Final = "GPUSHARE_VLLM_GPU_MEMORY_UTILIZATION"
ENV_MPS_PIPE_DIRECTORY: Final = "CUDA_MPS_PIPE_DIRECTORY"
ENV_MPS_LOG_DIRECTORY: Final = "CUDA_MPS_LOG_DIRECTORY"
ENV_MPS_MEM_LIMIT: Final = "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"
ENV_MPS_ACTIVE_THREAD_PERCENTAGE: Final = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
"""A client's share of the SMs; it can only lower the control daemon's default, never raise it."""
ENV_GPU_MEMORY_REQUEST: Final = "NVIDIA_GPU_MEMORY_REQUEST"
ENV_GPU_MEMORY_LIMIT: Final = "NVIDIA_GPU_MEMORY_LIMIT"
"""Read (in MiB) by the NVIDIA container toolkit's CDI hook ``apply-cuda-memory-limits`` (toolkit
1.20.1 and later), which sets the container's per-cgroup limit on drivers r615 and later."""
ENV_GPU_MEMORY_REQUESTS: Final = "NVIDIA_GPU_MEMORY_REQUESTS"
ENV_GPU_MEMORY_LIMITS: Final = "NVIDIA_GPU_MEMORY_LIMITS"
"""The per-GPU forms the same hook reads: gpushare never sets them, and no pod spec may."""

ENV_CUDA_VISIBLE_DEVICES: Final = "CUDA_VISIBLE_DEVICES"
"""The CUDA devices a process sees (an MPS daemon is started with its card's UUID)."""

SYSTEM_ENV: Final = frozenset(
    {
        ENV_VISIBLE_DEVICES,
        ENV_GRANTED_BYTES,
        ENV_CARD_UUID,
        ENV_VLLM_UTILIZATION,
        ENV_MPS_PIPE_DIRECTORY,
        ENV_MPS_LOG_DIRECTORY,
        ENV_MPS_MEM_LIMIT,
        ENV_GPU_MEMORY_REQUEST,
        ENV_GPU_MEMORY_LIMIT,
        ENV_GPU_MEMORY_REQUESTS,
        ENV_GPU_MEMORY_LIMITS,
        ENV_CUDA_VISIBLE_DEVICES,
    }
)
"""Variables the system sets: user environment must not declare them."""

SYSTEM_ENV_PREFIXES: Final = ("CUDA_MPS_", "GPUSHARE_")
"""Prefixes of variables MPS and gpushare read: user environment must not declare them either."""

# --- Environment read by gpushare itself ----------------------------------------------------------
ENV_CONFIG_FILE: Final = "GPUSHARE_CONFIG"
"""Path of the shared configuration file (the mounted ConfigMap)."""

ENV_PREFIX: Final = "GPUSHARE_"
"""Prefix of environment overrides of configuration keys (``GPUSHARE_UNIT_BYTES``...)."""

ENV_CONTROLPLANE_BIN: Final = "GPUSHARE_CONTROLPLANE_BIN"
"""Folder of etcd, kube-apiserver, kube-scheduler and kubectl for a local control plane."""

ENV_CONTROLPLANE_CACHE: Final = "GPUSHARE_CONTROLPLANE_CACHE"
"""Where ``tests/controlplane/build.sh`` caches those binaries, one folder per version."""

ENV_KEEP_CONTROLPLANE: Final = "GPUSHARE_KEEP_CONTROLPLANE"
"""Set: a local control plane keeps its work folder (certificates, etcd data, logs) on stop."""

# --- vLLM -----------------------------------------------------------------------------------------
VLLM_UTILIZATION_FLAG: Final = "--gpu-memory-utilization"
VLLM_UTILIZATION_FLAG_UNDERSCORED: Final = "--gpu_memory_utilization"
"""vLLM's argument parser takes the flag with underscores too."""
VLLM_UTILIZATION_ARG: Final = f"{VLLM_UTILIZATION_FLAG}=$({ENV_VLLM_UTILIZATION})"
"""The argument the webhook injects; kubelet expands ``$(VAR)`` from Allocate's environment."""
VLLM_KV_CACHE_FLAG: Final = "--kv-cache-memory-bytes"
"""A fixed KV-cache size: with it vLLM ignores ``--gpu-memory-utilization``."""

# --- CDI ------------------------------------------------------------------------------------------
CDI_KIND: Final = "nvidia.com/gpu"

# --- Dynamic Resource Allocation (resource.k8s.io/v1), the second backend ----------------------
DRA_API_GROUP: Final = "resource.k8s.io"
DRA_API_VERSION: Final = f"{DRA_API_GROUP}/v1"
"""The version kube-apiserver serves by default since Kubernetes 1.34."""

DRA_DRIVER: Final = f"gpu.{DOMAIN}"
"""Driver name in ResourceSlices and allocation results; kubelet dials the plugin by it."""

DRA_DEVICE_CLASS: Final = f"gpu-memory.{DOMAIN}"
"""DeviceClass whose claims ask for memory of one shared card."""

DRA_CAPACITY_MEMORY: Final = "memory"
"""Each card's consumable capacity: CUDA-visible bytes, consumed per claim."""

DRA_ATTRIBUTE_UUID: Final = "uuid"
DRA_ATTRIBUTE_MODEL: Final = "model"
DRA_ATTRIBUTE_INDEX: Final = "index"
"""Device attributes (in the driver's domain: ``gpu.gpushare.io/uuid`` in CEL selectors)."""

DRA_CLAIM_NAME: Final = "gpushare-gpu-memory"
"""The name of the pod's claim entry (``spec.resourceClaims[].name``) the webhook writes."""

DRA_REQUEST_NAME: Final = "gpu"
"""The request's name inside that claim."""

# --- Kubernetes object names of an installation ---------------------------------------------------
NAMESPACE: Final = "gpushare-system"
CONFIGMAP: Final = "gpushare-config"
