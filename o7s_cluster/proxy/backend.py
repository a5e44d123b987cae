"""What the session core knows of one backend connection: its settings and its prepared statements."""

from __future__ import annotations

from o7s_cluster.proxy.params import BackendSettings
from o7s_cluster.proxy.statements import ServerStatements


class BackendState:
    """Pure state kept with a pooled backend connection, handed to whichever session attaches it."""

    __slots__ = ("settings", "prepared", "pid", "holder", "drops_seen", "__weakref__")

    def __init__(self) -> None:
        self.settings = BackendSettings()
        self.prepared = ServerStatements()
        self.pid = 0  # the server process id (from its BackendKeyData): a notification it sent names it
        self.holder = 0  # the process id O7s gave the client it serves or served last (own notifications)
        self.drops_seen = 0  # how far into its pool's log of dropped statements it has closed them

    def reset(self) -> None:
        """After DISCARD ALL: nothing of any client's is left on the server."""
        self.settings.applied.clear()
        self.prepared.clear()
