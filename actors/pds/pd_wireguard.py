"""pd-wireguard: the WireGuard device and its peers (issue 9).

No real work yet: the stock core (``ping``, ``note``).
"""

from __future__ import annotations

from actors.pds.base import Core


class WireguardCore(Core):
    """The stock behaviour, until this PD's issue gives it its own."""
