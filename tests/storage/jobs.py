"""Putting a job into a store in tests the way production does: through a conversation commit.

Stores have no "write this job" method: a job is created by the commit of the turn that started it
(``commit(new_jobs=...)``) and changed afterwards only by ``patch_job``. Tests that need a job in a
given state use :func:`add_job` (one commit, the job exactly as given, like a turn that recorded it)
and then ``patch_job`` for what happened to it later.
"""

from __future__ import annotations

from storage.abc import ConcurrencyError, ConversationStore, JobRecord


async def add_job(store: ConversationStore, *jobs: JobRecord) -> None:
    """Create ``jobs`` (all of one conversation) with one commit of that conversation's record, as
    the turn that started them would; a job whose id exists already is left as it is."""
    keys = {job.conversation_key for job in jobs}
    assert len(keys) == 1, f"add_job takes the jobs of one conversation, got {sorted(keys)}"
    [key] = keys
    for _ in range(100):  # another writer may commit the same conversation meanwhile
        try:
            await store.commit(await store.load(key), new_jobs=jobs)
            return
        except ConcurrencyError:
            continue
    raise AssertionError(f"could not commit the jobs of {key!r}")


async def save_job(store: ConversationStore, job: JobRecord) -> JobRecord:
    """Write ``job``'s fields over the stored job with its id, with one ``patch_job`` (as the runner
    records an attempt's progress and outcome); returns the job as stored (``updated_at`` is now)."""
    changes = {k: v for k, v in job.to_json().items() if k not in ("id", "conversation_key", "updated_at")}
    return await store.patch_job(job.conversation_key, job.id, changes)
