"""Named points where the fault tests stop this process the hard way (SIGKILL), to show that a
re-run converges. Inert unless ``PANOPTIC_KILL_AT`` names the point (``name`` or ``name:N`` for
the N-th time this process reaches it)."""

from __future__ import annotations

import os
import signal

ENV = "PANOPTIC_KILL_AT"
_reached: dict[str, int] = {}


def point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
