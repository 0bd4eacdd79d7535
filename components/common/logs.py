"""Console and log output: module loggers, progress that suits where it goes, quiet neighbours.

* ``setup_logging()`` (the CLI and every pipeline step call it): our loggers (``components.*``,
  ``pipeline.*``) write to stderr, timestamped when stderr is not a terminal; under DDP only
  rank 0 reports (other ranks say warnings and errors); MLflow's and alembic's chatter
  ("creating initial database tables" and the like) is kept to warnings; warnings go through
  logging with their colour codes stripped.
* ``progress(...)``: a tqdm bar on a terminal; elsewhere (a log file, CI, a pipeline task) a plain
  line every ``every_s`` seconds and one at the end, so logs hold no carriage-return spam.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import warnings

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
QUIET_NEIGHBOURS = ("mlflow", "alembic", "urllib3", "botocore", "kfp", "git", "matplotlib", "PIL", "fsspec")
_configured = False


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (the CLI's test runner and the
    pipeline's log pump replace it; a handler holding the first one would write into the void)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class _PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return strip_ansi(super().format(record))


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def interactive(stream=None) -> bool:
    stream = stream or sys.stderr
    return hasattr(stream, "isatty") and stream.isatty()


def setup_logging(level: int = logging.INFO) -> None:
    """Configure our loggers once per process (see module docstring)."""
    global _configured
    if _configured:
        return
    _configured = True
    handler = _CurrentStderr()
    fmt = "%(message)s" if interactive() else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(_PlainFormatter(fmt, datefmt="%H:%M:%S"))
    for name in ("components", "pipeline", "py.warnings"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(level if rank() == 0 else logging.WARNING)
        logger.propagate = False
    for name in QUIET_NEIGHBOURS:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.captureWarnings(True)
    warnings.filterwarnings("ignore", message=".*input example was not provided.*")  # MLflow, on every pyfunc
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


class progress:
    """An iterable / counter that reports progress to suit its destination.

    ``progress(iterable, total=..., desc=..., unit=...)`` iterates; ``update(n)``, ``set_postfix``
    and ``close`` mirror tqdm's. ``enabled=False`` (``--quiet``, ranks > 0) reports nothing.
    """

    def __init__(self, iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it",
                 enabled: bool = True, initial: int = 0, every_s: float = 30.0, logger: str = "components"):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            self.total = len(iterable)
        self.enabled, self.every_s = enabled and rank() == 0, every_s
        self.n = self.start_n = initial
        self.postfix = ""
        self.t0 = self.t_last = time.monotonic()
        self.log = logging.getLogger(logger)
        self.bar = None
        if self.enabled and interactive():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=initial, desc=desc, unit=unit)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.t_last >= self.every_s:
            self._line()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())
        if self.bar is not None:
            self.bar.set_postfix(**values)

    def _line(self, final: bool = False) -> None:
        self.t_last = time.monotonic()
        elapsed = self.t_last - self.t0
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        of = f"/{self.total}" if self.total else ""
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        eta = ""
        if self.total and rate > 0 and not final:
            eta = f", eta {_duration((self.total - self.n) / rate)}"
        self.log.info("%s: %d%s %s%s, %.2f %s/s%s%s", self.desc, self.n, of, self.unit, pct, rate, self.unit,
                      eta, f", {self.postfix}" if self.postfix else "")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.n > self.start_n:
            self._line(final=True)
        self.enabled = False


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
