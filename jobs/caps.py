"""Caps on active (queued or running) jobs, checked where a job is recorded.

``MAX_ACTIVE_JOBS_PER_CONVERSATION`` (default 10) counts the conversation's jobs;
``MAX_ACTIVE_JOBS_PER_USER`` (default 5) counts the jobs a person started, in every
conversation (matched as in :func:`jobs.access.same_person`). 0 switches a cap off. Jobs the
same turn (or the same commit) recorded before are counted too: they are not in the store yet.

Cost: the per-conversation count reads the conversation's jobs (one partition: a single-
partition query on Cosmos DB); the per-user count reads every unfinished job of every
conversation (``JobStore.unfinished_jobs``: on Cosmos DB two cross-partition queries,
whose request charge grows with the number of unfinished jobs, which these caps keep bounded).
Both run only when a job is about to be recorded, never per message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from jobs.access import same_person, starter
from runtime.protocol import Requester
from storage.abc import JobRecord, JobStore


@dataclass(frozen=True)
class JobCaps:
    per_conversation: int = 10
    per_user: int = 5

    async def refusal(self, store: JobStore, conversation_key: str, requester: Requester | None,
                      earlier: Sequence[JobRecord] = ()) -> tuple[str, str] | None:
        """None if one more job may start; else ``(reason, message for the user)``.

        ``earlier``: jobs recorded in this turn (or this commit) and not yet in the store."""
        if self.per_conversation:
            stored = [j for j in await store.list_jobs(conversation_key) if not j.finished]
            ids = {j.id for j in stored}
            active = len(stored) + sum(1 for j in earlier if j.id not in ids and j.conversation_key == conversation_key)
            if active >= self.per_conversation:
                return "conversation_cap", (
                    f"This conversation already has {active} background jobs queued or running, the most allowed "
                    f"(MAX_ACTIVE_JOBS_PER_CONVERSATION = {self.per_conversation}). Nothing was started: wait for "
                    "one to finish or cancel one, then ask again.")
        if self.per_user and requester is not None and (requester.id or requester.aad_object_id):
            unfinished = await store.unfinished_jobs()
            keys = {(j.conversation_key, j.id) for j in unfinished}
            mine = [j for j in [*unfinished, *(j for j in earlier if (j.conversation_key, j.id) not in keys)]
                    if (owner := starter(j)) is not None and same_person(owner, requester)]
            if len(mine) >= self.per_user:
                return "user_cap", (
                    f"You already have {len(mine)} background jobs queued or running, the most one person may "
                    f"have (MAX_ACTIVE_JOBS_PER_USER = {self.per_user}). Nothing was started: wait for one to "
                    "finish or cancel one, then ask again.")
        return None
