"""How several instances share the work: who is the active worker, and how work reaches it.

``LocalCoordinator`` is one process doing everything (the default); ``PostgresCoordinator``
elects the active worker with a PostgreSQL advisory lock and carries wake-ups and cancel
requests from web instances to it with LISTEN/NOTIFY. Nothing here imports botbuilder or AutoGen.
"""

from cluster.coordinator import Coordinator, LocalCoordinator, OnCancel, OnWake

__all__ = ["Coordinator", "LocalCoordinator", "OnCancel", "OnWake"]
