"""Test-only cores: what the tests' PDs do that production cores never would.

* :class:`Recorder` counts every op it is sent by name (production cores refuse
  unknown ops), so a test can tell exactly which messages arrived;
* :class:`Crashy` also raises on ``{"op": "crash"}``, to exercise supervision.
"""

from __future__ import annotations

from typing import Any

from actors.pds import make_core
from actors.pds.base import Action, Core, Message


class Recorder(Core):
    def handle(self, m: Message, now: float) -> list[Action]:
        op = m.payload.get("op") if type(m.payload) is dict else None
        if type(op) is str and op not in self.ops:
            self.received[op] += 1
            if m.transfer is not None:
                self.held.append(m.transfer)
            return []
        return super().handle(m, now)


class Crashy(Recorder):
    def handle(self, m: Message, now: float) -> list[Action]:
        if type(m.payload) is dict and m.payload.get("op") == "crash":
            raise RuntimeError(f"{self.name}: crash requested")
        return super().handle(m, now)


def recording(pd: str) -> Core:
    """Every PD a :class:`Recorder` (pd-network-admin keeps its own core)."""
    return Recorder(pd) if pd != "pd-network-admin" else make_core(pd)


def crashy(pd: str) -> Core:
    return Crashy(pd)


def status(core: Core) -> dict[str, Any]:
    return core.status()
