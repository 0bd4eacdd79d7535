"""One storage layer for local paths and ``s3://`` URIs, built on ``pyarrow.fs``.

Every stage reads and writes through these functions, so a stage never knows whether its
data lives on local disk, on S3, or on an S3-compatible store (MinIO, moto). pyarrow.fs was
chosen over fsspec because pyarrow is already needed for the Parquet shards and its S3
client needs no extra dependency.

S3 settings come from the environment, as the AWS tools read them: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` and, for MinIO or a local test server,
``AWS_ENDPOINT_URL`` (``S3_ENDPOINT_URL`` and ``MLFLOW_S3_ENDPOINT_URL`` are accepted too).

An object store fails for a while (a 503 storm, a restart, a stall): each call to it is retried
when its error is one a store has for a while (5xx, throttling, a connection or a timeout), never
when it is an answer (403, 404), with backoff (1, 2, 4, 8 s: ``PANOPTIC_STORE_ATTEMPTS`` calls,
5 by default), each retry said in the log, then one error naming the store and the object. The
calls are whole-object ones (an S3 PUT is seen whole or not at all), so a retry repeats nothing
half done.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import re
import stat
import time
import uuid
from functools import lru_cache
from urllib.parse import urlparse

import pyarrow.fs as pafs

from components.common import faults

log = logging.getLogger(__name__)

STORE_ATTEMPTS_ENV = "PANOPTIC_STORE_ATTEMPTS"
STORE_BACKOFF_S = 1.0
# what pyarrow's S3 errors say when the store, not the request, is at fault (AWS SDK error names,
# an HTTP 5xx, curl's connection and timeout failures)
_TRANSIENT = re.compile(r"HTTP status 5\d\d|SERVICE_UNAVAILABLE|SLOW_DOWN|INTERNAL_FAILURE|THROTTLING|"
                        r"REQUEST_TIMEOUT|NETWORK_CONNECTION|curlCode|Couldn't connect|Connection (reset|refused)|"
                        r"timed? ?out|Broken pipe|Empty reply|InternalError|ServiceUnavailable|SlowDown", re.I)


class StoreUnavailable(OSError):
    """The object store failed every attempt of a call (5xx, stalls, refused connections)."""


def _store_attempts() -> int:
    raw = os.environ.get(STORE_ATTEMPTS_ENV, "5")
    if not raw.isdigit() or not 1 <= int(raw) <= 20:
        raise ValueError(f"{STORE_ATTEMPTS_ENV}={raw!r}: a whole number of attempts from 1 to 20")
    return int(raw)


def _retrying(what: str, uri: str, call):
    """``call()``; for an s3:// ``uri`` retried while the store's error is a passing one (see the
    module's note). A local call is made once: a disk's errors do not pass."""
    if not is_remote(uri):
        return call()
    attempts, started = _store_attempts(), time.monotonic()
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except OSError as e:
            if isinstance(e, (FileNotFoundError, StoreUnavailable)) or not _TRANSIENT.search(str(e)):
                raise
            reason = " ".join(str(e).split())[:300].rstrip(" :.")
            store = _endpoint() or "AWS S3"
            if attempt == attempts:
                left = "; nothing half-written is left there" if what == "write it" else ""
                raise StoreUnavailable(
                    f"{uri}: the object store ({store}) failed to {what} {attempts} times in "
                    f"{time.monotonic() - started:.0f} s ({reason}){left}: check the store (or raise "
                    f"{STORE_ATTEMPTS_ENV}) and re-run; the stage picks up where it stopped") from e
            delay = STORE_BACKOFF_S * 2 ** (attempt - 1)
            log.warning("%s: the object store (%s) failed to %s (%s); retry %d of %d in %.0f s", uri, store, what,
                        reason[:160], attempt, attempts - 1, delay)
            time.sleep(delay)


def is_remote(uri: str) -> bool:
    return str(uri).startswith("s3://")


_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def s3_parts(uri: str) -> tuple[str, str]:
    """(bucket, key) of an ``s3://BUCKET/KEY`` address, parsed strictly: a bucket is required and
    ``.``/``..`` segments are refused (S3 keeps them literally; collapsing them silently would
    read or write another object than the one named)."""
    bucket, _, key = str(uri)[len("s3://"):].partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise ValueError(f"{uri!r}: not an s3:// address with a bucket; use s3://BUCKET/KEY")
    if any(part in (".", "..") for part in key.split("/")):
        raise ValueError(f"{uri!r}: '.' and '..' are not allowed in an s3 key; name the object itself")
    return bucket, key


def _endpoint() -> str | None:
    for name in ("AWS_ENDPOINT_URL", "S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        if os.environ.get(name):
            return os.environ[name]
    return None


@lru_cache(maxsize=8)
def _s3(endpoint: str | None, region: str | None, key_id: str | None) -> pafs.S3FileSystem:
    kwargs: dict = {"allow_bucket_creation": True}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    if region:
        kwargs["region"] = region
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs["access_key"], kwargs["secret_key"] = key, secret
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path inside it)`` for a local path or an ``s3://bucket/key`` URI."""
    uri = str(uri)
    if is_remote(uri):
        s3_parts(uri)
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        return _s3(_endpoint(), region, os.environ.get("AWS_ACCESS_KEY_ID")), uri[len("s3://"):].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported URI scheme in {uri!r}: use a local path or s3://bucket/key")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(base: str, *parts: str) -> str:
    base = str(base)
    if is_remote(base):
        s3_parts(base)
        joined = posixpath.join(base.rstrip("/"), *parts)
        s3_parts(joined)
        return joined
    return os.path.join(base, *parts)


def _info(uri: str) -> pafs.FileInfo:
    fs, path = resolve(uri)
    return _retrying("look it up", uri, lambda: fs.get_file_info(path))


def exists(uri: str) -> bool:
    return _info(uri).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    return _info(uri).type == pafs.FileType.Directory


def dirname(uri: str) -> str:
    """The folder holding ``uri`` (a local path or s3:// key)."""
    uri = str(uri)
    return posixpath.dirname(uri.rstrip("/")) if is_remote(uri) else os.path.dirname(uri)


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    _retrying("create the folder", uri, lambda: fs.create_dir(path, recursive=True))


def listdir(uri: str) -> list[str]:
    """Names (not paths) of the entries directly under ``uri``, sorted. A local name that is not
    UTF-8 comes back as Python gives it (surrogate escapes), for the caller to name and skip."""
    fs, path = resolve(uri)
    if not is_remote(uri) and os.path.isdir(path):   # pyarrow fails the whole listing on one such name
        return sorted(os.listdir(path))
    infos = _retrying("list it", uri, lambda: fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))
    return sorted(posixpath.basename(i.path) for i in infos)


class UnsafePath(ValueError):
    """A path refused before anything is read: ``kind`` "leaves_folder" (a link out of the
    folder it must stay in) or "not_regular" (a FIFO, a device, a socket)."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


class FileTooLarge(ValueError):
    """A file larger than its kind ever is (a resource bomb, or the wrong file)."""


JSON_MAX_BYTES = 4 << 30      # COCO's largest annotation file is ~0.6 GB


def _open_regular(path: str, uri: str, within: str | None) -> int:
    """An fd of ``path``, refused (``UnsafePath``) when it resolves outside ``within`` (a symlink
    out of the dataset) or is no regular file (a FIFO, a device, a folder): checked before the
    open, and on the open file (an O_NONBLOCK open does not wait for a FIFO's writer)."""
    if within is not None:
        real, root = os.path.realpath(path), os.path.realpath(within)
        if real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
            raise UnsafePath(f"{uri}: leads out of {within} (to {real}); refused without reading it", "leaves_folder")
    try:
        st = os.stat(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{uri}: no such file") from e
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(f"{uri}: is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePath(f"{uri}: not a regular file ({_kind(st.st_mode)}); refused without reading it", "not_regular")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePath(f"{uri}: not a regular file; refused without reading it", "not_regular")
    return fd


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a file"


def read_bytes(uri: str, *, within: str | None = None, max_bytes: int | None = None) -> bytes:
    """The bytes of a local file or an S3 object. ``within``: a local path must resolve inside
    that folder (symlinks followed); only regular files are read; ``max_bytes``: a larger file
    is refused (``FileTooLarge``) before it is read."""
    if not is_remote(uri):  # the common case, without a pyarrow stream per file
        path = resolve(uri)[1]
        fd = _open_regular(path, uri, within)
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if max_bytes is not None and size > max_bytes:
                raise FileTooLarge(f"{uri}: {size} bytes, more than the {max_bytes} such a file may have")
            return f.read()
    fs, path = resolve(uri)
    try:
        if max_bytes is not None:
            size = _info(uri).size
            if size is not None and size > max_bytes:
                raise FileTooLarge(f"{uri}: {size} bytes, more than the {max_bytes} such a file may have")

        def read():
            with fs.open_input_stream(path) as f:
                return f.read()
        return _retrying("read it", uri, read)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{uri}: no such file") from e


def read_text(uri: str, **kwargs) -> str:
    data = read_bytes(uri, **kwargs)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{uri}: not UTF-8 text ({e})") from None


DUPLICATE_CHECK_BYTES = 8 << 20   # records (metrics, lineage, manifests, index): checked for repeated keys


def read_json(uri: str, what: str = "JSON", max_bytes: int = JSON_MAX_BYTES, **kwargs):
    """A JSON document, parsed by orjson: nesting beyond 1,024 levels, NaN/Infinity literals,
    invalid UTF-8 and files over ``max_bytes`` are refused with a ValueError naming the file."""
    import orjson

    data = read_bytes(uri, max_bytes=max_bytes, **kwargs)
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise ValueError(f"{uri}: the {what} file is not valid JSON ({e})") from None
    if len(data) <= DUPLICATE_CHECK_BYTES:   # orjson keeps the last of a repeated key: say so instead
        import json

        def pairs(items):
            seen = set()
            for k, _ in items:
                if k in seen:
                    raise ValueError(f"{uri}: the {what} file names {k!r} twice in one object; which one is meant "
                                     f"is not for the reader to guess: write it once")
                seen.add(k)
            return dict(items)

        json.loads(data, object_pairs_hook=pairs)
    return doc


def read_json_doc(uri: str, default_name: str, missing_hint: str):
    """A JSON document given its file or the folder holding ``default_name``; a missing one is a
    FileNotFoundError naming the path and ``missing_hint`` (how to make it)."""
    if not uri.endswith(".json"):
        uri = join(uri, default_name)
    if not exists(uri):
        raise FileNotFoundError(f"{uri}: {missing_hint}")
    return uri, read_json(uri, default_name)


class FolderBusy(OSError):
    """Another process writes into the folder (``exclusive``)."""


@contextlib.contextmanager
def exclusive(folder: str, name: str, what: str):
    """Hold ``folder/name`` as a lock while one ``what`` writes into ``folder`` (local folders; an
    S3 prefix has no such primitive and is not locked): a second one at the same time is refused,
    naming the holder; a lock whose process is gone (same host) is taken over."""
    import json
    import socket

    if is_remote(folder):
        yield
        return
    path = os.path.join(resolve(folder)[1], name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(open(path).read() or "{}")
            except (OSError, ValueError):
                holder = {}
            alive = holder.get("host") != me["host"] or _pid_alive(holder.get("pid"))
            if alive and holder:
                raise FolderBusy(f"{folder}: another {what} (pid {holder.get('pid')} on {holder.get('host')}) "
                                 f"is writing here; wait for it or choose another folder") from None
            os.remove(path)   # its holder is gone
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield
    finally:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def size(uri: str) -> int:
    return _info(uri).size


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` atomically: readers see the old file or the whole new one.

    Locally the bytes go to a temporary name in the same folder, then ``os.replace``; a crash
    leaves at most a ``.tmp-*`` file that no reader looks at; a file that holds ``data`` already
    is left as it is (a re-run on a read-only disk finishes). An S3 PUT is atomic already. An
    error names ``uri`` (a full disk's write error names no file of its own).
    """
    fs, path = resolve(uri)
    faults.point("storage.write", uri)
    if is_remote(uri):
        def put():
            with fs.open_output_stream(path) as f:
                f.write(data)
        _retrying("write it", uri, put)
        return
    folder = os.path.dirname(path)
    if _holds(path, data):   # a re-run writing what is there already: nothing to do (a read-only disk too)
        return
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        faults.point("storage.before_rename")
        os.replace(tmp, path)
    except OSError as e:
        if e.filename in (None, tmp):   # a write's error (a full disk) names no file, or the temporary one
            raise OSError(e.errno, e.strerror or str(e), uri) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _holds(path: str, data: bytes) -> bool:
    """Whether the local file ``path`` holds exactly ``data``."""
    try:
        if os.path.getsize(path) != len(data) or os.path.islink(path):
            return False
        with open(path, "rb") as f:
            return f.read(len(data) + 1) == data
    except OSError:
        return False


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def delete(uri: str) -> None:
    fs, path = resolve(uri)
    info = _info(uri)
    remove = {pafs.FileType.Directory: fs.delete_dir, pafs.FileType.File: fs.delete_file}.get(info.type)
    if remove is not None:
        _retrying("delete it", uri, lambda: remove(path))


def local_path(uri: str) -> str | None:
    """The local filesystem path for ``uri``, or None when it is remote."""
    return None if is_remote(uri) else resolve(uri)[1]
