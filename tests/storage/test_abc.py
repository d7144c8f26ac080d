"""storage.abc itself: the seams compose into ConversationStore, and translate_errors covers them all."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from storage.abc import (
    ConversationLog,
    ConversationRecord,
    ConversationStore,
    InboxEvent,
    ItemStore,
    JobNotFoundError,
    JobRecord,
    JobStore,
    StoreUnavailableError,
    translate_errors,
)
from storage.memory import MemoryStore


def _abstract(seam: type) -> set[str]:
    return {n for n, m in vars(seam).items() if getattr(m, "__isabstractmethod__", False)}


def test_the_seams_are_disjoint_and_compose_into_the_store() -> None:
    log, jobs, items = _abstract(ConversationLog), _abstract(JobStore), _abstract(ItemStore)
    assert not (log & jobs or log & items or jobs & items)
    assert {"commit", "append_event", "get_reference"} <= log
    # born in a commit, then patched (transition_job: a patch only from a given status, issue 16)
    assert jobs == {"get_job", "patch_job", "transition_job", "list_jobs", "unfinished_jobs"}
    assert items == {"read_items", "write_items", "delete_items"}
    assert ConversationStore.__abstractmethods__ == log | jobs | items | {"forget_conversation"}
    store = MemoryStore()
    assert all(isinstance(store, seam) for seam in (ConversationLog, JobStore, ItemStore))


def test_removed_members_are_gone() -> None:
    assert not hasattr(ConversationStore, "put_job")
    assert "announced" not in JobRecord.__dataclass_fields__
    stored = {**JobRecord(id="j", conversation_key="k", tool="t", arguments={}).to_json(), "announced": True}
    assert JobRecord.from_json(stored).id == "j"  # records written by older versions still load


@translate_errors(OSError)
class _Broken(MemoryStore):
    """Each seam's methods fail as a driver would; one raises a store error of its own."""

    async def load(self, key: str) -> ConversationRecord:
        raise OSError("disk gone")

    async def append_event(self, key: str, event: InboxEvent) -> bool:
        raise OSError("disk gone")

    async def list_jobs(self, key: str) -> list[JobRecord]:
        raise OSError("disk gone")

    async def get_job(self, key: str, job_id: str) -> JobRecord:
        raise JobNotFoundError(key, job_id)

    async def read_items(self, keys: Any) -> dict[str, Any]:
        raise OSError("disk gone")

    async def forget_conversation(self, key: str, *, item_keys: Any = ()) -> int:
        raise OSError("disk gone")


@pytest.mark.parametrize("call", [
    lambda s: s.load("k"),
    lambda s: s.append_event("k", InboxEvent(id="e", kind="message", payload={})),
    lambda s: s.list_jobs("k"),
    lambda s: s.read_items(["x"]),
    lambda s: s.forget_conversation("k"),
], ids=["log.load", "log.append_event", "jobs.list_jobs", "items.read_items", "store.forget_conversation"])
async def test_translate_errors_covers_every_seam(call: Any) -> None:
    with pytest.raises(StoreUnavailableError, match=r"_Broken\..* failed: OSError: disk gone"):
        await call(_Broken())


async def test_translate_errors_passes_store_errors_and_inherited_methods_through() -> None:
    store = _Broken()
    with pytest.raises(JobNotFoundError):
        await store.get_job("k", "j")
    assert inspect.iscoroutinefunction(_Broken.patch_job) and _Broken.patch_job is MemoryStore.patch_job
