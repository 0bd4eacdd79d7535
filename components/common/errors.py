"""What a command says when its input or its environment is at fault: one line naming the file
(or server) and the fix, never a traceback.

The CLI (``components/cli.py``) passes every exception through ``one_line``: the errors of bad
files and values (``ValueError`` and ours, which derive from it), of the filesystem (a missing,
unreadable or read-only path, a full disk) and of the servers we talk to (MLflow, the object
store, KFP, Kubernetes) become one line; anything else is a bug and keeps its traceback.
``PANOPTIC_DEBUG=1`` keeps the traceback for every error.
"""

from __future__ import annotations

import errno
import os

OS_FIXES = {
    errno.ENOSPC: "the disk is full: free space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up: free space or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.EACCES: "no permission: write elsewhere, or fix the folder's permissions",
    errno.EPERM: "not permitted: write elsewhere, or fix the folder's permissions",
    errno.ENOENT: "no such file or folder: check the path",
    errno.ENOTDIR: "a path component is a file, not a folder: check the path",
    errno.EISDIR: "a folder where a file was expected: check the path",
}


def _server_error(e: Exception) -> str | None:
    """MLflow's and HTTP clients' errors, when it is one of them."""
    kind = type(e).__module__.split(".")[0]
    if kind == "mlflow":
        code = getattr(e, "error_code", "")
        return f"MLflow ({os.environ.get('MLFLOW_TRACKING_URI', 'sqlite:///mlflow.db')}): {code}: {_first(e)}"
    if kind in ("requests", "urllib3"):
        return f"a server did not answer or refused ({type(e).__name__}): {_first(e)}"
    if kind == "kubernetes":
        return f"the Kubernetes API: {getattr(e, 'status', '')} {getattr(e, 'reason', '')}: {_first(e)}"
    return None


def _first(e: Exception, limit: int = 600) -> str:
    text = str(e).strip() or type(e).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def one_line(e: BaseException) -> str | None:
    """The message for a user-facing error, or None for a bug (keep its traceback)."""
    if os.environ.get("PANOPTIC_DEBUG"):
        return None
    server = _server_error(e) if isinstance(e, Exception) else None
    if server:
        return server
    if isinstance(e, OSError) and e.errno in OS_FIXES:
        where = e.filename or ""
        return f"{where}: {e.strerror} ({OS_FIXES[e.errno]})" if where else f"{_first(e)} ({OS_FIXES[e.errno]})"
    from components.common.tracking import RegistryError

    if isinstance(e, (OSError, ValueError, RegistryError)):
        return _first(e, 4000)
    if isinstance(e, RecursionError):   # a file nested deeper than Python recurses
        return f"input nested too deeply to read ({_first(e)})"
    return None
