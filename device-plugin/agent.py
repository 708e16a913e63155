"""The agent: one node's cards, grants and isolation, and the loops that keep them current.

The gRPC servicer (:mod:`.server`) asks it for the device list, preferences and allocations; its
loops read NVML, track health, write the node report, watch usage and reconcile with kubelet. All
of it runs on one asyncio loop, so state changes need no locks beyond the one that serialises
``Allocate`` (a capacity check and its grant must not interleave with another's).
"""

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from gpushare.core import config, errors, grants, names
from gpushare.core.config import Settings
from gpushare.core.ids import CardUUID, DeviceID, PodKey
from gpushare.core.nodereport import CardReport
from gpushare.deviceplugin import (
    allocation,
    cgrouplimit,
    devices,
    escapes,
    health,
    kube,
    mps,
    reconcile,
)
from gpushare.deviceplugin.metrics import CardState, Metrics
from gpushare.deviceplugin.nvml import CardReading, Nvml, Snapshot
from gpushare.deviceplugin.podresources import Holding, PodResourcesClient, PodResourcesError
from gpushare.deviceplugin.pods import PodInfo, PodSource, Wanted, next_wanted
from gpushare.deviceplugin.report import Reporter
from gpushare.deviceplugin.watchdog import PollLocator, ProcessLocator, Watchdog, usage

logger = logging.getLogger(__name__)

EVENT_WAIT_SECONDS: Final = 1.0
"""An NVML event wait returns at least this often, so the agent can stop promptly."""
RESTART_SECONDS: Final = 5.0
"""A loop that crashed is restarted after this pause (and its crash logged)."""
STALL_SECONDS: Final = 60.0
"""A poll loop that has not finished a round this long (or ten periods, if longer) is stuck:
``/healthz`` fails and kubelet restarts the agent. A round reads NVML and may start an MPS daemon
(five seconds at worst); the API is never awaited in it."""
STEERED_KEPT: Final = 64
"""Recent preferences remembered with the container each was for (kubelet allocates right after)."""


@dataclass(frozen=True)
class Booked:
    """A grant handed out by ``Allocate`` and when."""

    grant: allocation.Grant
    at: float


class Agent:
    """State and behaviour of the device plugin on one node."""

    def __init__(
        self,
        settings: Settings,
        *,
        node: str,
        nvml: Nvml,
        mode: mps.Mode,
        metrics: Metrics,
        api: kube.NodeApi | None = None,
        pods: PodSource | None = None,
        podresources: PodResourcesClient | None = None,
        locator: ProcessLocator | None = None,
        clock: Callable[[], float] = time.monotonic,
        stall_seconds: float | None = None,
    ) -> None:
        self.settings = settings
        self.node = node
        self.nvml = nvml
        self.mode = mode
        self.metrics = metrics
        self.api = api
        self.pods = pods
        self.podresources = podresources
        self.locator = locator
        self.clock = clock
        self.health = health.HealthTracker(clock=clock)
        self.cards: dict[CardUUID, CardReading] = {}
        self.book: dict[str, Booked] = {}
        self.holdings: list[Holding] | None = None
        """Which containers hold our IDs (kubelet's PodResources); ``None`` until first read."""
        self.claimed: Callable[[], Mapping[str, allocation.Grant]] = dict
        self.claim_grants: Callable[[], Mapping[str, allocation.Grant]] = dict
        """The DRA backend's prepared claims by ``namespace/name``: the containers that use
        them are held to them as the device plugin's are held to their IDs."""
        """Grants held outside PodResources, by key: the DRA backend's prepared claims."""
        self.last_snapshot = Snapshot(cards=())
        self.polled_at = clock()
        self.stall_seconds = stall_seconds or max(STALL_SECONDS, 10 * settings.agent.poll_seconds)
        self._publishing: asyncio.Task[None] | None = None
        self.devices_changed = asyncio.Condition()
        self._devices: list[tuple[DeviceID, bool]] = []
        self._listed: frozenset[str] = frozenset()
        self._allocating = asyncio.Lock()
        self._steered: collections.OrderedDict[tuple[str, ...], Wanted] = collections.OrderedDict()
        """The container each recent preference was made for, by its IDs (the newest last)."""
        self.reporter = (
            Reporter(
                api,
                node=node,
                isolation=mode.name,
                change_bytes=settings.agent.report_change_bytes,
                heartbeat_seconds=settings.agent.heartbeat_seconds,
                on_sent=metrics.reports.inc,
                clock=clock,
            )
            if api is not None
            else None
        )
        self.watchdog = Watchdog(
            api,
            node=node,
            grace_seconds=settings.agent.overuse_grace_seconds,
            action=settings.agent.overuse_action,
            on_violation=metrics.violation,
            clock=clock,
        )
        self.escapes = escapes.Guard(
            api, node=node, action=settings.agent.escape_action, on_escape=metrics.escape
        )
        metrics.isolation = mode.name

    # --- devices ----------------------------------------------------------------------------

    def device_list(self) -> list[tuple[DeviceID, bool]]:
        """Every unit ID with its health, the last sent to kubelet."""
        return list(self._devices)

    def _compute_devices(self) -> list[tuple[DeviceID, bool]]:
        unit = self.settings.unit_bytes
        server = self.settings.agent.mps_server_bytes
        result: list[tuple[DeviceID, bool]] = []
        for card in sorted(self.cards.values(), key=lambda c: (c.index, c.uuid)):
            total = devices.unit_count(card.cuda_total_bytes, unit)
            ids = devices.ids_for(card.uuid, total)
            if not self.health.healthy(card.uuid):
                result.extend((i, False) for i in ids)
                continue
            # Keep room for the card's MPS servers, and for the next container's own in `mps`.
            servers = self.mode.servers_on(card.uuid) + (1 if self.mode.name == "mps" else 0)
            capacity = devices.unit_count(card.cuda_total_bytes - servers * server, unit)
            held = {
                d for b in self.book.values() if b.grant.card == card.uuid for d in b.grant.devices
            }
            spare = [i for i in reversed(ids) if i not in held][: max(total - capacity, 0)]
            result.extend((i, i not in spare) for i in ids)
        return result

    async def refresh_devices(self) -> bool:
        """Recompute the device list; wake ``ListAndWatch`` streams if it changed."""
        fresh = self._compute_devices()
        if fresh == self._devices:
            return False
        self._devices = fresh
        self._listed = frozenset(d for d, _ in fresh)
        async with self.devices_changed:
            self.devices_changed.notify_all()
        return True

    # --- polling ----------------------------------------------------------------------------

    async def poll(self) -> Snapshot:
        """Read NVML and update health, devices and metrics; publish in the background.

        What goes to the API server (the node report, the watchdog's Events and evictions) runs
        in its own task, one at a time, so a slow or silent API never holds up health.
        """
        started = time.perf_counter()
        snapshot = await asyncio.to_thread(self.nvml.snapshot)
        self.last_snapshot = snapshot
        if snapshot.error is not None:
            logger.error("%s: no card can be granted until NVML answers", snapshot.error)
        for reading in snapshot.cards:
            if reading.error is None:
                self.cards[reading.uuid] = reading
            else:
                logger.error("card %s (index %d): %s", reading.uuid, reading.index, reading.error)
        self.health.observe(snapshot)
        await self.mode.check()
        self.health.isolation(self.mode.down_reason())
        await self.refresh_devices()
        self._update_card_metrics()
        self.metrics.poll_seconds.observe(time.perf_counter() - started)
        self.polled_at = self.clock()
        if self._publishing is None or self._publishing.done():
            self._publishing = asyncio.get_running_loop().create_task(self._publish(snapshot))
        return snapshot

    async def _publish(self, snapshot: Snapshot) -> None:
        try:
            await self._watch_usage(snapshot)
            if self.reporter is not None:
                await self.reporter.offer(self.card_reports())
        except Exception:
            logger.exception("publishing the poll's results failed; the next poll tries again")

    async def published(self) -> None:
        """Wait for the last poll's report and watchdog round (for callers that need them)."""
        if self._publishing is not None:
            await self._publishing

    def stalled(self) -> str | None:
        """Why the poll loop counts as stuck, or ``None`` while it keeps its pace."""
        since = self.clock() - self.polled_at
        if since <= self.stall_seconds:
            return None
        return f"no poll finished for {since:.0f} s (limit {self.stall_seconds:.0f} s)"

    def card_reports(self) -> list[CardReport]:
        """The node report's cards: the latest readings, or the last good one of a broken card."""
        good_now = {r.uuid for r in self.last_snapshot.cards if r.error is None}
        reports = []
        for card in self.cards.values():
            broken = card.uuid not in good_now or self.last_snapshot.error is not None
            reports.append(
                CardReport(
                    uuid=card.uuid,
                    index=card.index,
                    model=card.model,
                    total_bytes=card.total_bytes,
                    reserved_bytes=card.reserved_bytes,
                    used_bytes=card.used_bytes,
                    free_bytes=0 if broken else card.free_bytes,
                    healthy=self.health.healthy(card.uuid),
                    memory_limits=card.memory_limits,
                )
            )
        return reports

    def granted_on(self, card: CardUUID, *, besides: allocation.Grant | None = None) -> int:
        """Bytes booked on ``card`` (leaving out ``besides`` and any grant sharing its IDs)."""
        skip = set(besides.devices) if besides is not None else set()
        return sum(
            b.grant.granted_bytes
            for b in self.book.values()
            if b.grant.card == card and not skip & set(b.grant.devices)
        )

    def _update_card_metrics(self) -> None:
        self.metrics.set_cards(
            CardState(
                reading=reading,
                granted_bytes=self.granted_on(uuid),
                healthy=self.health.healthy(uuid),
                mps_servers=self.mode.servers_on(uuid),
            )
            for uuid, reading in self.cards.items()
        )

    async def _watch_usage(self, snapshot: Snapshot) -> None:
        if self.locator is None or self.pods is None:
            return
        locator = PollLocator(self.locator)  # four checks below, one cgroup read per process
        pods = self.pods.pods()
        claimed = self._claim_holdings(pods)
        if self._unheld_pod_on_card(snapshot, locator, pods, self._holders(claimed)):
            # A container may start within one reconcile of its Allocate: ask kubelet now, so its
            # processes are judged against its grant on this poll, not the next.
            await self.refresh_holdings()
        grants = {
            (h.pod, h.container): (
                allocation.grant_of(h.devices, unit_bytes=self.settings.unit_bytes)
            )
            for h in self.holdings or []
            if _single_card(h.devices)
        }
        grants.update(claimed)
        held = {k: (g.card, g.granted_bytes) for k, g in grants.items()}
        if isinstance(self.mode, cgrouplimit.CgroupLimit):
            containers = {
                (pod.uid, cid): (pod.key, name)
                for pod in pods
                for cid, name in pod.container_ids.items()
            }
            await asyncio.to_thread(
                self.mode.enforce,
                snapshot.processes,
                locator=locator,
                grants=held,
                containers=containers,
            )
        found = escapes.find(
            snapshot.processes,
            isolation=self.mode.name,
            locator=locator,
            pods=pods,
            grants=held,
            slack_bytes=self.settings.agent.escape_slack_bytes,
        )
        if snapshot.error is None:  # no reading is not the end of an episode
            await self.escapes.check(found)
        usages = usage(snapshot.processes, locator=locator, pods=pods, grants=held)
        self.metrics.set_containers(usages)
        await self.watchdog.check(usages)

    @staticmethod
    def _unheld_pod_on_card(
        snapshot: Snapshot,
        locator: ProcessLocator,
        pods: Sequence[PodInfo],
        holders: set[tuple[PodKey, str]],
    ) -> bool:
        held = {pod for pod, _container in holders}
        uids = {pod.uid for pod in pods if pod.key not in held}
        for process in snapshot.processes:
            where = locator.locate(process.pid)
            if where is not None and where.pod_uid in uids:
                return True
        return False

    async def watch_events(self) -> None:
        """Forward NVML XID events to health as they come."""
        while True:
            events = await asyncio.to_thread(self.nvml.wait_events, EVENT_WAIT_SECONDS)
            if events and self.health.xid(events):
                await self.refresh_devices()
                self._update_card_metrics()

    # --- reconciliation ---------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Rebook from kubelet's PodResources, then correct pod annotations through the API."""
        if not await self.rebook():
            return
        if self.api is not None and self.pods is not None:
            unit = self.settings.unit_bytes
            by_pod = reconcile.grants_by_pod(self.holdings or [], unit_bytes=unit)
            fixes = reconcile.corrections(self.pods.pods(), by_pod, self.cards)
            await reconcile.apply(self.api, fixes, node=self.node)

    async def rebook(self) -> bool:
        """Read kubelet's PodResources: rebuild the book (with :attr:`claimed`), stop idle
        daemons; ``False`` if unread."""
        if not await self.refresh_holdings():
            return False
        unit = self.settings.unit_bytes
        by_pod = reconcile.grants_by_pod(self.holdings or [], unit_bytes=unit)
        held = {h.grant.key: h.grant for grants in by_pod.values() for h in grants}
        held.update(self.claimed())
        now = self.clock()
        book = {k: b for k, b in self.book.items() if now - b.at <= mps.RELEASE_GRACE_SECONDS}
        for key, grant in held.items():
            book[key] = self.book.get(key, Booked(grant, now))
        self.book = book
        await self.mode.release(held)
        await self.refresh_devices()
        self._update_card_metrics()
        return True

    async def refresh_holdings(self) -> bool:
        """Read which containers hold our IDs from kubelet; ``False`` if it did not answer.

        Without a PodResources client (an agent embedded with no kubelet) nothing is held.
        """
        if self.podresources is None:
            self.holdings = []
            return True
        try:
            self.holdings = await self.podresources.holdings()
        except PodResourcesError as exc:
            logger.warning("%s; keeping grants as booked", exc)
            return False
        return True

    def holders(self) -> set[tuple[PodKey, str]]:
        """Pods and containers that hold devices (PodResources) or prepared claims now."""
        claimed = self._claim_holdings(self.pods.pods()) if self.pods is not None else {}
        return self._holders(claimed)

    def _holders(
        self, claimed: Mapping[tuple[PodKey, str], allocation.Grant]
    ) -> set[tuple[PodKey, str]]:
        return {(h.pod, h.container) for h in self.holdings or []} | claimed.keys()

    def _claim_holdings(
        self, pods: Sequence[PodInfo]
    ) -> dict[tuple[PodKey, str], allocation.Grant]:
        """Containers of ``pods`` that use a claim prepared here, and its grant."""
        prepared = self.claim_grants()
        if not prepared:
            return {}
        return {
            (pod.key, container): prepared[claim]
            for pod in pods
            for container, claims in pod.claims.items()
            for claim in claims
            if claim in prepared
        }

    # --- the device plugin calls ------------------------------------------------------------

    async def preferred(
        self, available: Sequence[str], must_include: Sequence[str], size: int
    ) -> list[DeviceID]:
        """Steer ``size`` IDs to the card the extender chose for the container being admitted.

        Reads only the pod cache and kubelet's PodResources: never the API server, so kubelet's
        admission (which waits on this call with no deadline) never waits on it.
        """
        self.check_advertised(available)
        self.check_advertised(must_include)
        wanted = await self._wanted(size)
        if wanted is not None:
            logger.info(
                "preferring card %s for %d unit(s): pod %s container %s",
                wanted.card,
                size,
                wanted.pod.key,
                wanted.container,
            )
        elif self.pods is not None:
            logger.info("no bound pod asks for %d unit(s): preferring the fullest card", size)
        target = None if wanted is None else wanted.card
        chosen = allocation.preferred(available, must_include, size, target=target)
        if wanted is not None:
            self._steered[tuple(sorted(chosen))] = wanted
            while len(self._steered) > STEERED_KEPT:
                self._steered.popitem(last=False)
        return chosen

    async def _wanted(self, size: int, card: CardUUID | None = None) -> Wanted | None:
        """The container kubelet is admitting now for ``size`` units (on ``card``, if named)."""
        if self.pods is None:
            return None
        await self.refresh_holdings()
        return next_wanted(
            self.pods.pods(),
            units=size,
            unit_bytes=self.settings.unit_bytes,
            cards=self.cards if card is None else [card],
            held=self.holders(),
        )

    async def _compute_share(self, grant: allocation.Grant) -> int | None:
        """The ``gpushare.io/compute-share`` of the pod these IDs are for, if it asks for one.

        The pod is the one the preference for these IDs was made for, else the one kubelet is
        admitting now for this many units of this card; a value the webhook would have refused
        (it ran before this pod's annotations could change) is ignored, loudly.
        """
        wanted = self._steered.get(tuple(sorted(grant.devices)))
        if wanted is None:
            wanted = await self._wanted(len(grant.devices), grant.card)
        if wanted is None:
            return None
        value = wanted.pod.annotations.get(names.ANNOTATION_COMPUTE_SHARE)
        if value is None:
            return None
        try:
            return grants.compute_share(value)
        except errors.BadRequest as exc:
            logger.warning("pod %s: %s; no compute share is set", wanted.pod.key, exc)
            return None

    def check_advertised(self, device_ids: Sequence[str]) -> None:
        """Refuse IDs this plugin never listed (or spelled otherwise, or twice), naming one."""
        if len(set(device_ids)) != len(device_ids):
            raise errors.BadRequest(f"device IDs {list(device_ids)} name a unit twice")
        for device in device_ids:
            devices.parse(device)
            if device not in self._listed:
                raise errors.BadRequest(
                    f"device ID {device!r} was never advertised by this plugin on node {self.node}"
                )

    async def allocate(self, device_ids: Sequence[str]) -> allocation.ContainerSetup:
        """Grant a container its IDs: check the IDs and the card, start its isolation, build its
        environment."""

        async def checked() -> allocation.ContainerSetup:
            self.check_advertised(device_ids)
            grant = allocation.grant_of(device_ids, unit_bytes=self.settings.unit_bytes)
            await self._check_not_held(grant)
            if self.mode.name in config.MPS_MODES:  # only MPS applies a compute share
                share = await self._compute_share(grant)
                grant = dataclasses.replace(grant, compute_share=share)
            return await self._grant(grant)

        return await self._counted(checked)

    async def grant(self, grant: allocation.Grant) -> allocation.ContainerSetup:
        """Hand out a DRA claim's ``grant`` as :meth:`allocate` does once its IDs are checked
        (the claim's allocation names the card; its ID is the claim's, never advertised)."""
        return await self._counted(lambda: self._grant(grant))

    async def _counted(
        self, make: Callable[[], Awaitable[allocation.ContainerSetup]]
    ) -> allocation.ContainerSetup:
        """Run one grant under the allocation lock, counting it as made or refused."""
        async with self._allocating:
            try:
                setup = await make()
            except errors.GpushareError:
                self.metrics.allocations.labels(self.node, "refused").inc()
                raise
            self.metrics.allocations.labels(self.node, "ok").inc()
            return setup

    async def _grant(self, grant: allocation.Grant) -> allocation.ContainerSetup:
        card = self.cards.get(grant.card)
        if card is None:
            raise errors.BadRequest(f"card {grant.card} is not on node {self.node}")
        if not self.health.healthy(grant.card):
            raise errors.NoFit(f"card {grant.card} is unhealthy: {self.health.reason(grant.card)}")
        down = self.mode.down_reason()
        if down is not None:
            raise errors.NoFit(f"isolation {self.mode.name!r} cannot limit memory now: {down}")
        allocation.check_fits(
            grant,
            cuda_total_bytes=card.cuda_total_bytes,
            other_grants_bytes=self.granted_on(grant.card, besides=grant),
            servers=self.mode.servers_for(grant),
            server_bytes=self.settings.agent.mps_server_bytes,
        )
        pipe = await self.mode.prepare(grant)
        setup = allocation.setup(
            grant,
            cuda_total_bytes=card.cuda_total_bytes,
            settings=self.settings,
            isolation=self.mode.name,
            pipe_directory=pipe,
        )
        taken = set(grant.devices)
        self.book = {k: b for k, b in self.book.items() if not taken & set(b.grant.devices)}
        self.book[grant.key] = Booked(grant, self.clock())
        logger.info(
            "granted %d unit(s) of card %s (%d bytes) under %s",
            len(grant.devices),
            grant.card,
            grant.granted_bytes,
            self.mode.name,
        )
        await self.refresh_devices()
        self._update_card_metrics()
        return setup

    async def _check_not_held(self, grant: allocation.Grant) -> None:
        """Refuse IDs a live container holds; grant nothing before PodResources has been read.

        Until kubelet has said which IDs are held (after a restart), the card's grants are unknown
        and a grant could overcommit it. IDs already granted (booked, or held at the last reading)
        are checked against a fresh reading: kubelet frees a finished pod's IDs just before it
        hands them out anew, and lists a live container's until it ends.
        """
        if self.holdings is None and not await self.refresh_holdings():
            raise errors.Conflict(
                "kubelet's PodResources has not answered since the plugin started: the grants"
                f" already on card {grant.card} are unknown, so none is made; kubelet retries"
            )
        ids = set(grant.devices)
        granted = [b.grant.devices for b in self.book.values()]
        if any(ids & set(d) for d in [*granted, *(h.devices for h in self.holdings or [])]):
            await self.refresh_holdings()
        for holding in self.holdings or []:
            taken = sorted(ids & set(holding.devices), key=devices.sort_key)
            if taken:
                raise errors.BadRequest(
                    f"device ID(s) {', '.join(taken)} are held by container {holding.container}"
                    f" of pod {holding.pod}"
                )

    async def pre_start(self, device_ids: Sequence[str]) -> None:
        """Before a container starts: its MPS daemon must be running (restart it if it died)."""
        async with self._allocating:
            self.check_advertised(device_ids)
            grant = allocation.grant_of(device_ids, unit_bytes=self.settings.unit_bytes)
            down = self.mode.down_reason()
            if down is not None:
                raise errors.NoFit(f"isolation {self.mode.name!r} cannot limit memory now: {down}")
            await self.mode.prepare(grant)
            self.book.setdefault(grant.key, Booked(grant, self.clock()))

    # --- running ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Adopt isolation state, take a first reading and read PodResources (no API call)."""
        await self.mode.start()
        await self.poll()
        await self.rebook()

    async def run_loops(self) -> None:
        """Poll, watch events and reconcile until cancelled."""
        period = self.settings.agent.poll_seconds
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(guard("poll", lambda: _every(period, self.poll)))
                group.create_task(guard("reconcile", lambda: _every(period, self.reconcile)))
                group.create_task(guard("nvml-events", self.watch_events))
        finally:
            if self._publishing is not None:
                self._publishing.cancel()


async def guard(name: str, loop: Callable[[], Awaitable[object]]) -> None:
    """Run an eternal loop; log a crash or an early exit, and start it again."""
    while True:
        try:
            await loop()
            logger.error("%s loop exited; restarting it", name)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("%s loop crashed; restarting it in %.0f s", name, RESTART_SECONDS)
        await asyncio.sleep(RESTART_SECONDS)


async def _every(seconds: float, step: Callable[[], Awaitable[object]]) -> None:
    while True:
        await asyncio.sleep(seconds)
        await step()


def _single_card(ids: Sequence[str]) -> bool:
    try:
        devices.card_of(ids)
    except errors.BadRequest:
        return False
    return True
