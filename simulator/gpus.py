"""The simulated GPUs of one node: the fake NVML file its device plugin reads.

The file lists the cards (NVML total and the driver's reserved part), the processes that hold
memory (each simulated vLLM), and per card the memory of MPS servers (``used`` beside the
processes). It is rewritten atomically on every change; the plugin's fake backend reloads it.
"""

import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpushare.core.ids import CardUUID
from gpushare.simulator.fleet import Card, Node

_PIDS = itertools.count(10_000)


@dataclass(slots=True)
class NodeGpus:
    """The cards of one node, their processes and MPS servers."""

    node: Node
    path: Path
    processes: dict[int, tuple[CardUUID, int]] = field(default_factory=dict)
    """pid → (card, bytes used)."""
    servers: dict[CardUUID, int] = field(default_factory=dict)
    """Bytes held by MPS servers on each card."""

    def card(self, uuid: str) -> Card:
        for card in self.node.cards:
            if card.uuid == uuid:
                return card
        raise KeyError(uuid)

    def used_bytes(self, uuid: CardUUID) -> int:
        """NVML's used memory of a card (v2: the reserved part excluded)."""
        return self.servers.get(uuid, 0) + sum(
            used for card, used in self.processes.values() if card == uuid
        )

    def free_bytes(self, uuid: CardUUID) -> int:
        return self.card(uuid).model.cuda_total_bytes - self.used_bytes(uuid)

    def start(self, uuid: CardUUID, used: int) -> int:
        """A process now holds ``used`` bytes of the card; returns its pid."""
        pid = next(_PIDS)
        self.processes[pid] = (uuid, used)
        self.write()
        return pid

    def stop(self, pid: int) -> None:
        self.processes.pop(pid, None)
        self.write()

    def set_servers(self, uuid: CardUUID, total: int) -> None:
        """MPS servers on the card now hold ``total`` bytes."""
        if total:
            self.servers[uuid] = total
        else:
            self.servers.pop(uuid, None)
        self.write()

    def state(self) -> dict[str, Any]:
        """The fake NVML file's content."""
        return {
            "cards": [
                {
                    "uuid": card.uuid,
                    "index": card.index,
                    "model": card.model.product,
                    "total": card.model.total_bytes,
                    "reserved": card.model.reserved_bytes,
                    "used": self.servers.get(card.uuid, 0),
                }
                for card in self.node.cards
            ],
            "processes": [
                {"pid": pid, "card": card, "used": used}
                for pid, (card, used) in sorted(self.processes.items())
            ],
        }

    def write(self) -> None:
        """Replace the file in one step, so the plugin never reads half of it."""
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.state()))
        os.replace(temporary, self.path)
