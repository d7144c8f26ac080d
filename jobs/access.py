"""Who may do what with a job: its starter (or an admin) cancels it; in shared conversations
only its starter sees its arguments.

A job records who started it (``JobRecord.started_by``, the turn's :class:`Requester` as JSON).
Two requesters are the same person when both have an Entra ID (AAD) object id and they are
equal, else when both have a channel account id and those are equal: Teams gives both, the
Emulator and the Agents Playground only the channel id. A job without a recorded starter (one
stored before this was recorded) may be cancelled by anyone in its conversation, as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from runtime.protocol import Requester
from storage.abc import JobRecord


def same_person(a: Requester, b: Requester) -> bool:
    if a.aad_object_id and b.aad_object_id:
        return a.aad_object_id.lower() == b.aad_object_id.lower()
    return bool(a.id) and a.id == b.id


def starter(job: JobRecord) -> Requester | None:
    """Who started the job, or None when it was not recorded (or records nobody)."""
    if not isinstance(job.started_by, Mapping):
        return None
    who = Requester.from_json(dict(job.started_by))
    return who if who.id or who.aad_object_id else None


class CancelRefusedError(Exception):
    """The requester may not cancel this job; ``str(error)`` says who may."""

    def __init__(self, job: JobRecord, message: str) -> None:
        super().__init__(message)
        self.job = job


@dataclass(frozen=True)
class JobAccess:
    #: ADMINS: lower-case AAD object ids of people who may cancel anyone's job.
    admins: frozenset[str] = frozenset()

    @classmethod
    def of(cls, admins: Iterable[str]) -> JobAccess:
        return cls(frozenset(a.strip().lower() for a in admins if a.strip()))

    def is_admin(self, requester: Requester | None) -> bool:
        return requester is not None and bool(requester.aad_object_id) and \
            requester.aad_object_id.lower() in self.admins

    def cancel_refusal(self, job: JobRecord, requester: Requester | None) -> str | None:
        """None if ``requester`` may cancel ``job``, else the sentence that says who may."""
        owner = starter(job)
        if owner is None or self.is_admin(requester) or (requester is not None and same_person(owner, requester)):
            return None
        admins = " or a bot admin" if self.admins else ""
        return f"Only {owner.label}, who started job `{job.id}`,{admins} can cancel it. Nothing was changed."

    def check_cancel(self, job: JobRecord, requester: Requester | None) -> None:
        """Raises :class:`CancelRefusedError` if ``requester`` may not cancel ``job``."""
        if (refusal := self.cancel_refusal(job, requester)) is not None:
            raise CancelRefusedError(job, refusal)


def shows_arguments(job: JobRecord, viewer: Requester | None) -> bool:
    """Whether ``viewer`` may see the job's arguments (and result): always in a personal chat;
    in a group chat or channel only the person who started it (or anyone, for a job with no
    recorded starter). A viewer of None (a job-result turn, whose answer goes to everyone in the
    conversation) is treated as a member who started nothing."""
    owner = starter(job)
    if owner is None:
        return True
    if viewer is None:
        return False
    return not viewer.shared_conversation or same_person(owner, viewer)


def started_by_label(job: JobRecord) -> str | None:
    owner = starter(job)
    return owner.label if owner is not None else None


def public_view(job: JobRecord) -> dict[str, Any]:
    """What every member of a shared conversation may see of someone else's job."""
    return {"id": job.id, "tool": job.tool, "status": job.status, "progress": job.progress,
            "started_by": started_by_label(job), "created_at": job.created_at, "finished_at": job.finished_at,
            "arguments": "(hidden: only the person who started this job sees them)"}
