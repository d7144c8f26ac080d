"""Named crash points: the real process SIGKILLs itself at an exact step, for crash tests.

``CRASH_AT=turn_committed:2,job_event_appended`` kills the process the 2nd time it reaches
``turn_committed`` and the 1st time it reaches ``job_event_appended``. Unset (always, in
production), a crash point costs one dict lookup. Tests restart the process without it.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter

_targets: dict[str, int] = {}
for _spec in filter(None, (s.strip() for s in os.environ.get("CRASH_AT", "").split(","))):
    _name, _, _nth = _spec.partition(":")
    _targets[_name] = int(_nth or 1)
_seen: Counter[str] = Counter()


def crash_point(name: str) -> None:
    if name not in _targets:
        return
    _seen[name] += 1
    if _seen[name] == _targets[name]:
        print(f"crash point {name!r} reached: SIGKILL", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
