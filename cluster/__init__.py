"""How several instances share the work: which worker owns which conversations, and how work reaches it.

``LocalCoordinator`` is one process doing everything (the default); ``PostgresCoordinator``
spreads the conversations' partitions (cluster/partitions.py) over every live worker with leases
in PostgreSQL and carries wake-ups and cancel requests from web instances to each partition's
owner with LISTEN/NOTIFY. Nothing here imports botbuilder or AutoGen.
"""

from cluster.coordinator import Coordinator, LocalCoordinator, OnCancel, OnChange, OnWake
from cluster.partitions import DEFAULT_PARTITIONS, Ownership, partition_of

__all__ = ["DEFAULT_PARTITIONS", "Coordinator", "LocalCoordinator", "OnCancel", "OnChange", "OnWake", "Ownership",
           "partition_of"]
