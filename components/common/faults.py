"""Named points where the fault tests stop this process the hard way (SIGKILL), to show that a
re-run converges, or hold it (to force an interleaving of two processes). Inert unless
``PANOPTIC_KILL_AT`` names the point (``name`` or ``name:N`` for the N-th time this process
reaches it) or ``PANOPTIC_PAUSE_AT`` does (``name:SECONDS``). ``PANOPTIC_OSERROR_AT``
(``name:ERRNO``, e.g. ``storage.write:ENOSPC``) makes the point raise that OSError for its path:
what a full disk or a read-only mount does to a write, emulated."""

from __future__ import annotations

import os
import signal

ENV = "PANOPTIC_KILL_AT"
PAUSE_ENV = "PANOPTIC_PAUSE_AT"
OSERROR_ENV = "PANOPTIC_OSERROR_AT"
_reached: dict[str, int] = {}


def point(name: str, path: str | None = None) -> None:
    pause = os.environ.get(PAUSE_ENV)
    if pause and pause.rpartition(":")[0] == name:
        import time

        time.sleep(float(pause.rpartition(":")[2]))
    oserror = os.environ.get(OSERROR_ENV)
    if oserror and oserror.rpartition(":")[0] == name:
        import errno

        code = getattr(errno, oserror.rpartition(":")[2])
        raise OSError(code, os.strerror(code), path)
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
