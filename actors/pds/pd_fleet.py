"""pd-fleet: heartbeats, and placement on the cloud node.

No real work yet: the stock core (``ping``, ``note``).
"""

from __future__ import annotations

from actors.pds.base import Core


class FleetCore(Core):
    """The stock behaviour, until this PD's issue gives it its own."""
