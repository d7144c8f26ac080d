"""A user's request to cancel a job, taken by any instance: checked, recorded in the store,
then carried out by the active worker (told through the coordinator)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from jobs.access import CancelRefusedError, JobAccess
from jobs.runner import CancelResult, JobRunner
from runtime import metrics
from runtime.protocol import Requester
from storage.abc import ConversationStore

#: Tells the active worker, wherever it runs, to act on a recorded cancel (``Coordinator.cancel``).
TellWorker = Callable[[str, str], Awaitable[None]]


class JobCancels:
    def __init__(self, store: ConversationStore, job_runner: JobRunner, access: JobAccess,
                 tell_worker: TellWorker) -> None:
        self._store = store
        self._job_runner = job_runner
        self._access = access
        self._tell_worker = tell_worker

    async def cancel(self, key: str, job_id: str, requester: Requester) -> CancelResult:
        """Only the job's starter or an admin may (else CancelRefusedError, and nothing changes).
        Raises JobNotFoundError."""
        try:
            self._access.check_cancel(await self._store.get_job(key, job_id), requester)
        except CancelRefusedError:
            metrics.CANCELS_REFUSED.inc()
            raise
        result = await self._job_runner.request_cancel(key, job_id)
        if result.already_finished:
            return result
        await self._tell_worker(key, job_id)
        return CancelResult(await self._store.get_job(key, job_id), already_finished=False)
