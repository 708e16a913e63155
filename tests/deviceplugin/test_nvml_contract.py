"""The real backend against NVML's C interface: nvidia-ml-py itself, over a stand-in library.

pynvml calls ``libnvidia-ml.so`` through ctypes; here the library is a Python object whose
attributes are the C functions pynvml looks up (a missing one is a symbol the driver lacks). So
:class:`~gpushare.deviceplugin.nvml.RealNvml` and nvidia-ml-py both run unchanged, and what crosses
into the driver is checked field by field against the recording of NVML's per-cgroup limit call in
``tests/data/nvml/set-memory-limits-v1.json`` (nvidia-ml-py 13.615).
"""

import ctypes
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpushare.core.ids import CardUUID
from gpushare.deviceplugin import nvml

pynvml = pytest.importorskip("pynvml")

CONTRACT = json.loads(
    (Path(__file__).parents[1] / "data" / "nvml" / "set-memory-limits-v1.json").read_text()
)
RECORDED = [(name, getattr(ctypes, kind)) for name, kind in CONTRACT["fields"]]
"""The recorded fields as ctypes types (``c_ulonglong`` is ``c_ulong`` on 64-bit Linux)."""
UUID = "GPU-0a0a0a0a-0000-4000-8000-00000000000a"
SUCCESS, NOT_SUPPORTED, INSUFFICIENT_SIZE = 0, 3, 7
MI = 1 << 20


def _set(buffer: Any, text: str) -> None:
    buffer.value = text.encode()


class Library:
    """A one-card driver: a plain CUDA process, an MPS client and an MPS server on the card."""

    def __init__(self, *, limits: bool) -> None:
        self.limit_calls: list[tuple[Any, dict[str, Any]]] = []
        self.compute = [(100, 2048 * MI), (101, 4096 * MI), (102, 66 * MI)]
        self.mps_clients = [(101, 4096 * MI)]
        self.names = {100: "python3", 101: "python3", 102: "/usr/bin/nvidia-cuda-mps-server"}
        if limits:
            self.nvmlDeviceSetMemoryLimits_v1 = self._set_limits

    def nvmlInitWithFlags(self, flags: int) -> int:  # noqa: N802 - C names
        return SUCCESS

    def nvmlShutdown(self) -> int:  # noqa: N802
        return SUCCESS

    def nvmlDeviceGetCount_v2(self, count: Any) -> int:  # noqa: N802
        count._obj.value = 1
        return SUCCESS

    def nvmlDeviceGetHandleByIndex_v2(self, index: Any, device: Any) -> int:  # noqa: N802
        return SUCCESS

    def nvmlDeviceGetUUID(self, device: Any, buffer: Any, size: Any) -> int:  # noqa: N802
        _set(buffer, UUID)
        return SUCCESS

    def nvmlDeviceGetName(self, device: Any, buffer: Any, size: Any) -> int:  # noqa: N802
        _set(buffer, "NVIDIA H100 80GB HBM3")
        return SUCCESS

    def nvmlEventSetCreate(self, events: Any) -> int:  # noqa: N802
        return NOT_SUPPORTED

    def nvmlDeviceGetMemoryInfo_v2(self, device: Any, memory: Any) -> int:  # noqa: N802
        m = memory._obj
        m.total, m.reserved, m.used = 81559 * MI, 480 * MI, 6210 * MI
        m.free = m.total - m.reserved - m.used
        return SUCCESS

    def nvmlDeviceGetUtilizationRates(self, device: Any, rates: Any) -> int:  # noqa: N802
        return NOT_SUPPORTED

    def nvmlDeviceGetMigMode(self, device: Any, current: Any, pending: Any) -> int:  # noqa: N802
        return NOT_SUPPORTED

    @staticmethod
    def _list(listed: list[tuple[int, int]], count: Any, array: Any) -> int:
        if array is None:
            count._obj.value = len(listed)
            return INSUFFICIENT_SIZE if listed else SUCCESS
        for i, (pid, used) in enumerate(listed):
            array[i].pid, array[i].usedGpuMemory = pid, used
        count._obj.value = len(listed)
        return SUCCESS

    def nvmlDeviceGetComputeRunningProcesses_v3(  # noqa: N802
        self, device: Any, count: Any, array: Any
    ) -> int:
        return self._list(self.compute, count, array)

    def nvmlDeviceGetMPSComputeRunningProcesses_v3(  # noqa: N802
        self, device: Any, count: Any, array: Any
    ) -> int:
        return self._list(self.mps_clients, count, array)

    def nvmlSystemGetProcessName(self, pid: Any, buffer: Any, size: Any) -> int:  # noqa: N802
        _set(buffer, self.names[pid.value])
        return SUCCESS

    def _set_limits(self, device: Any, limits: Any) -> int:
        struct = limits._obj
        # The raw C values (pynvml's structures decode strings when read as attributes).
        values = {
            name: kind.from_buffer(struct, getattr(type(struct), name).offset).value
            for name, kind in type(struct)._fields_
        }
        self.limit_calls.append((type(struct), values))
        return SUCCESS


@pytest.fixture
def library(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Library]:
    fake = Library(limits=getattr(request, "param", True))
    monkeypatch.setattr(pynvml, "nvmlLib", fake)
    monkeypatch.setattr(pynvml, "_nvmlGetFunctionPointer_cache", {})
    yield fake


def test_nvidia_ml_py_defines_the_call_as_recorded() -> None:
    if not hasattr(pynvml, CONTRACT["function"]):
        pytest.skip(f"nvidia-ml-py {pynvml.__name__} predates {CONTRACT['function']}")
    struct = getattr(pynvml, CONTRACT["struct"])
    assert list(struct._fields_) == RECORDED


def test_processes_are_told_apart_by_how_they_hold_the_card(library: Library) -> None:
    backend = nvml.RealNvml()
    snapshot = backend.snapshot()
    backend.close()
    assert snapshot.error is None
    assert {p.pid: (p.kind, p.used_bytes) for p in snapshot.processes} == {
        100: ("cuda", 2048 * MI),
        101: ("mps-client", 4096 * MI),
        102: ("mps-server", 66 * MI),
    }


def test_without_an_mps_list_no_process_is_judged(
    library: Library, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(Library, "nvmlDeviceGetMPSComputeRunningProcesses_v3")
    backend = nvml.RealNvml()
    kinds = {p.pid: p.kind for p in backend.snapshot().processes}
    backend.close()
    assert kinds == {100: "unknown", 101: "unknown", 102: "mps-server"}


@pytest.mark.parametrize("library", [True, False], indirect=True, ids=["r615", "r580"])
def test_support_follows_the_drivers_symbol(library: Library) -> None:
    backend = nvml.RealNvml()
    (card,) = backend.snapshot().cards
    has = hasattr(library, "nvmlDeviceSetMemoryLimits_v1") and hasattr(pynvml, CONTRACT["function"])
    assert card.memory_limits is has
    if not has:
        with pytest.raises(nvml.LimitError, match="no per-cgroup memory limits"):
            backend.set_memory_limit(CardUUID(UUID), "/a", soft_bytes=1, hard_bytes=1)
    backend.close()


def test_the_limit_crosses_into_the_driver_as_recorded(library: Library) -> None:
    if not hasattr(pynvml, CONTRACT["function"]):
        pytest.skip(f"this nvidia-ml-py predates {CONTRACT['function']}")
    backend = nvml.RealNvml()
    backend.snapshot()
    cgroup = "/kubepods.slice/kubepods-podx.slice/cri-containerd-y.scope"
    backend.set_memory_limit(
        CardUUID(UUID), cgroup, soft_bytes=10 * 1024 * MI, hard_bytes=10 * 1024 * MI
    )
    backend.close()
    ((struct, values),) = library.limit_calls
    assert list(struct._fields_) == RECORDED
    assert ctypes.sizeof(struct) == 24  # a pointer and two 64-bit limits, no version field
    assert values == {
        "nameSpace": cgroup.encode(),
        "softLimit": 10 * 1024 * MI,
        "hardLimit": 10 * 1024 * MI,
    }
