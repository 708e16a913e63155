"""Allocation as pure functions: device IDs in, the card and the container's environment out.

The IDs kubelet hands ``Allocate`` are the truth: they name one card (IDs spanning cards are
refused) and their count is the grant. Nothing here does I/O; the server feeds it the card's
readings and the isolation's pipe directory, and returns what it builds.
"""

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gpushare.core import errors, names, quantities, sizing
from gpushare.core.config import Isolation, Settings
from gpushare.core.ids import CardUUID, DeviceID
from gpushare.deviceplugin import devices


@dataclass(frozen=True)
class Grant:
    """What one container holds: units of one card."""

    card: CardUUID
    devices: tuple[DeviceID, ...]
    granted_bytes: int
    compute_share: int | None = None
    """The pod's ``gpushare.io/compute-share`` (percent of the SMs), when it asks for one."""

    @property
    def key(self) -> str:
        """A stable name for this set of IDs (names its MPS daemon): card and a digest of the IDs.

        kubelet never gives the same ID to two live containers, so two live grants never share a
        key; the digest keeps the name short enough for a unix socket path.
        """
        digest = hashlib.sha256(",".join(self.devices).encode()).hexdigest()[:12]
        return f"{self.card}-{digest}"

    @property
    def limit_mib(self) -> int:
        """The grant in whole MiB, rounded down so that the MPS limit never exceeds it."""
        return self.granted_bytes // quantities.MI


@dataclass(frozen=True)
class Mount:
    """A host path mounted into the container."""

    container_path: str
    host_path: str
    read_only: bool = False


@dataclass(frozen=True)
class ContainerSetup:
    """What ``Allocate`` answers for one container."""

    envs: Mapping[str, str]
    mounts: tuple[Mount, ...] = ()
    cdi_devices: tuple[str, ...] = ()


def grant_of(device_ids: Iterable[str], *, unit_bytes: int) -> Grant:
    """The grant that ``device_ids`` make; malformed or card-spanning IDs raise BadRequest."""
    ids = sorted(set(device_ids), key=devices.sort_key)
    card = devices.card_of(ids)
    return Grant(
        card=card, devices=tuple(DeviceID(i) for i in ids), granted_bytes=len(ids) * unit_bytes
    )


def check_fits(
    grant: Grant,
    *,
    cuda_total_bytes: int,
    other_grants_bytes: int,
    servers: int,
    server_bytes: int,
) -> None:
    """Refuse a grant that, with the card's other grants and MPS servers, exceeds the card."""
    needed = grant.granted_bytes + other_grants_bytes + servers * server_bytes
    if needed > cuda_total_bytes:
        raise errors.NoFit(
            f"card {grant.card} cannot take {quantities.format_bytes(grant.granted_bytes)}: other"
            f" grants hold {quantities.format_bytes(other_grants_bytes)} and {servers} MPS"
            f" server(s) {quantities.format_bytes(servers * server_bytes)} of its"
            f" {quantities.format_bytes(cuda_total_bytes)}"
        )


def setup(
    grant: Grant,
    *,
    cuda_total_bytes: int,
    settings: Settings,
    isolation: Isolation,
    pipe_directory: Path | None,
) -> ContainerSetup:
    """The environment, mounts and CDI devices of the contract for one container."""
    envs = {
        names.ENV_VISIBLE_DEVICES: grant.card,
        names.ENV_CARD_UUID: grant.card,
        names.ENV_GRANTED_BYTES: str(grant.granted_bytes),
    }
    # A grant at or under the reserve has no vLLM budget: only a container that does not run vLLM
    # (the webhook refuses such vLLM requests) holds one, and it gets no utilization to misuse.
    if grant.granted_bytes > settings.reserve_bytes:
        value = sizing.utilization(
            granted_bytes=grant.granted_bytes,
            reserve_bytes=settings.reserve_bytes,
            cuda_total_bytes=sizing.cuda_total_seen(
                isolation=isolation,
                granted_bytes=grant.granted_bytes,
                cuda_total_bytes=cuda_total_bytes,
            ),
        )
        envs[names.ENV_VLLM_UTILIZATION] = sizing.format_utilization(value)
    mounts: tuple[Mount, ...] = ()
    if isolation == "cgroup":
        # NVIDIA's CDI hook sets the container's limit from these (MiB); soft = hard = grant.
        envs[names.ENV_GPU_MEMORY_REQUEST] = str(grant.limit_mib)
        envs[names.ENV_GPU_MEMORY_LIMIT] = str(grant.limit_mib)
    elif isolation != "none":
        if pipe_directory is None:
            raise errors.Conflict(f"isolation {isolation!r} has no MPS daemon for {grant.card}")
        envs[names.ENV_MPS_PIPE_DIRECTORY] = str(pipe_directory)
        envs[names.ENV_MPS_MEM_LIMIT] = f"{grant.card}={grant.limit_mib}M"
        if grant.compute_share is not None:
            # Enforced in ``mps`` by the daemon's default; in ``mps-shared`` the client's own.
            envs[names.ENV_MPS_ACTIVE_THREAD_PERCENTAGE] = str(grant.compute_share)
        mounts = (Mount(container_path=str(pipe_directory), host_path=str(pipe_directory)),)
    # The toolkit's hooks, the memory limit's among them, run for CDI devices.
    named = settings.agent.cdi or isolation == "cgroup"
    cdi = (f"{names.CDI_KIND}={grant.card}",) if named else ()
    return ContainerSetup(envs=envs, mounts=mounts, cdi_devices=cdi)


def preferred(
    available: Sequence[str],
    must_include: Sequence[str],
    size: int,
    *,
    target: CardUUID | None,
) -> list[DeviceID]:
    """IDs to prefer for a container of ``size`` units: all on one card, lowest units first.

    The card is the one ``must_include`` names, else ``target`` (the extender's choice) where it
    has room, else the fullest card that has room (binpack). ``[]`` when no card has room: kubelet
    then picks, and ``Allocate`` refuses a set that spans cards.
    """
    if size <= 0:
        return []
    by_card: dict[CardUUID, list[str]] = {}
    for device in sorted(set(available), key=devices.sort_key):
        by_card.setdefault(devices.parse(device)[0], []).append(device)
    chosen = [DeviceID(d) for d in sorted(set(must_include), key=devices.sort_key)]
    if chosen:
        card = devices.card_of(chosen)
        order = [card]
    else:
        rest = sorted(by_card, key=lambda c: (len(by_card[c]), c))
        order = ([target] if target is not None else []) + rest
    for card in order:
        extra = [DeviceID(d) for d in by_card.get(card, []) if d not in chosen]
        if len(chosen) + len(extra) >= size:
            return chosen + extra[: size - len(chosen)]
    return []
