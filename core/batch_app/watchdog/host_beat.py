"""The host's beat: a thread of every watchdog that writes `hosts.last_seen` every
HEARTBEAT_INTERVAL, apart from the supervision loop (which may spend seconds killing a worker).

It tells the other hosts who judges a silent worker: while its host beats, its own watchdog does
(a hang, charged to the requests it held); once the host is silent too, the worker was lost with
it (a power loss, a cut link) and whoever notices declares it dead, charging nothing.
"""

from __future__ import annotations

from ..config import Settings
from ..database import Database
from ..domain import registry
from ..periodic import Periodic


class HostBeat(Periodic):
    def __init__(self, db: Database, settings: Settings):
        super().__init__("host-beat", settings.heartbeat_interval, "beating for this host")
        self.db, self.host = db, settings.host_name

    def run_round(self) -> None:
        with self.db.begin() as conn:
            registry.beat_host(conn, self.host)
