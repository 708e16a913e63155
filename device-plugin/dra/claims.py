"""Preparing claims on the node: the allocation kube-scheduler wrote becomes a grant.

The claim's ``status.allocation`` names the card (the device of this node's pool) and the memory
consumed there; the grant is that memory less the per-allocation overhead, in whole units
(:func:`gpushare.core.dra.granted_bytes`). The agent then grants it exactly as the device plugin's
``Allocate`` does (same checks, same MPS daemon, same environment), and the environment goes
into the claim's CDI spec. Preparing a claim twice answers the same; unpreparing forgets it.
Until then the agent's reconciliation keeps the claim's grant booked and its MPS daemon running
(:attr:`Agent.claimed`): kubelet's PodResources, which it reads for the device plugin's grants,
does not list a claim's.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

from gpushare.core import dra, errors
from gpushare.core.ids import CardUUID
from gpushare.deviceplugin.agent import Agent, Booked
from gpushare.deviceplugin.allocation import Grant
from gpushare.deviceplugin.dra import cdi
from gpushare.deviceplugin.dra.kube import DraApi

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """A claim's device as kubelet is told it, and the grant behind it."""

    grant: Grant
    claim: str
    """The claim's ``namespace/name``."""
    request: str
    pool: str
    device: str
    share_id: str
    cdi_devices: tuple[str, ...]


class Claims:
    """The node's prepared claims, by UID."""

    def __init__(self, agent: Agent, api: DraApi, *, cdi_dir: Path) -> None:
        self._agent = agent
        self._api = api
        self._cdi_dir = cdi_dir
        self._prepared: dict[str, Prepared] = {}
        self._adopted: dict[str, tuple[Grant, str]] = {}
        agent.claimed = self.held  # the agent keeps these booked and their daemons running
        agent.claim_grants = self.by_claim  # and judges the containers that use them

    def adopt(self) -> None:
        """Take back the grants of claims prepared before a restart (from their CDI specs)."""
        self._adopted = cdi.adopt(self._cdi_dir)
        for grant, _claim in self._adopted.values():
            self._agent.book.setdefault(grant.key, Booked(grant, self._agent.clock()))

    def held(self) -> dict[str, Grant]:
        """The grant of every prepared claim, by key (booked, their MPS daemons kept)."""
        grants = [p.grant for p in self._prepared.values()]
        grants += [grant for grant, _claim in self._adopted.values()]
        return {grant.key: grant for grant in grants}

    def by_claim(self) -> dict[str, Grant]:
        """The grant of every prepared claim, by its ``namespace/name``."""
        found = {claim: grant for grant, claim in self._adopted.values() if claim}
        found.update({p.claim: p.grant for p in self._prepared.values()})
        return found

    async def prepare(self, namespace: str, name: str, uid: str) -> Prepared:
        """Grant the claim's allocation on this node and write its CDI spec."""
        if uid in self._prepared:
            return self._prepared[uid]
        claim = await self._api.get_claim(namespace, name)
        found = str((claim.get("metadata") or {}).get("uid") or "")
        if found != uid:
            raise errors.BadRequest(
                f"claim {namespace}/{name} has UID {found or 'none'}, not {uid}: it was replaced"
            )
        result = self._ours(namespace, name, claim)
        card = self._card(result.device)
        granted = dra.granted_bytes(
            result.consumed_bytes,
            unit_bytes=self._agent.settings.unit_bytes,
            overhead_bytes=self._agent.settings.allocation_overhead_bytes,
        )
        grant = Grant(card=card, devices=(cdi.grant_of(uid),), granted_bytes=granted)
        setup = await self._agent.grant(grant)
        try:
            body = cdi.spec(uid, grant, setup, claim=f"{namespace}/{name}")
            cdi.write(self._cdi_dir, uid, body)
        except OSError as exc:
            self._agent.book.pop(grant.key, None)
            raise errors.Conflict(
                f"cannot write the CDI spec of claim {namespace}/{name} in {self._cdi_dir}:"
                f" {exc.strerror}"
            ) from exc
        prepared = Prepared(
            grant=grant,
            claim=f"{namespace}/{name}",
            request=result.request,
            pool=result.pool,
            device=result.device,
            share_id=result.share_id,
            cdi_devices=(cdi.device_id(uid), *setup.cdi_devices),
        )
        self._prepared[uid] = prepared
        self._adopted.pop(uid, None)
        logger.info("prepared claim %s/%s: %d bytes of card %s", namespace, name, granted, card)
        return prepared

    async def unprepare(self, uid: str) -> None:
        """Forget the claim: its spec goes, its grant leaves the book, its daemon stops.

        kubelet unprepares a claim once none of its pod's containers runs, and the allocator
        hands its memory, the MPS server's share included, to the next claim at once: the
        daemon does not wait out the release grace that the device plugin's grants need.
        """
        prepared = self._prepared.pop(uid, None)
        adopted = self._adopted.pop(uid, None)
        grant = prepared.grant if prepared is not None else adopted[0] if adopted else None
        cdi.remove(self._cdi_dir, uid)
        if grant is not None:
            self._agent.book.pop(grant.key, None)
            await self._agent.mode.end(grant.key)
            logger.info("unprepared claim %s: card %s", uid, grant.card)

    def _ours(self, namespace: str, name: str, claim: dict[str, object]) -> dra.Allocated:
        results = [r for r in dra.allocated(claim) if r.pool == self._agent.node]
        if len(results) != 1:
            raise errors.BadRequest(
                f"claim {namespace}/{name} has {len(results)} devices of {self._agent.node}"
                " allocated: a gpushare claim asks for memory of exactly one card"
            )
        return results[0]

    def _card(self, device: str) -> CardUUID:
        for reading in self._agent.cards.values():
            if dra.device_name(reading.index) == device:
                return reading.uuid
        raise errors.BadRequest(f"device {device} is not a card of node {self._agent.node}")
