"""One sans-I/O core per protection domain, and the table that picks a PD's core.

PDs with no real work yet keep the stock behaviour of :class:`~actors.pds.base.Core`
(``ping``, ``note``).  Later issues give each its own logic in its module here.
"""

from __future__ import annotations

from actors.pds.base import Core
from actors.pds.pd_fleet import FleetCore
from actors.pds.pd_genesis import GenesisCore
from actors.pds.pd_ledger import LedgerCore
from actors.pds.pd_net_driver import NetDriverCore
from actors.pds.pd_network_admin import NetworkAdminCore
from actors.pds.pd_vmm import VmmCore
from actors.pds.pd_wireguard import WireguardCore

CORES: dict[str, type[Core]] = {
    "pd-ledger": LedgerCore,
    "pd-net-driver": NetDriverCore,
    "pd-wireguard": WireguardCore,
    "pd-genesis": GenesisCore,
    "pd-vmm": VmmCore,
    "pd-fleet": FleetCore,
    "pd-network-admin": NetworkAdminCore,
}


def make_core(pd: str) -> Core:
    """The core for a PD named in the system description (the stock core otherwise)."""
    return CORES.get(pd, Core)(pd)
