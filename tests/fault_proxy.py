"""A TCP proxy on 127.0.0.1 in front of a real server (MLflow, moto's S3) that plays, for a window,
the faults the parts around us have: a server that drops connections while it restarts, answers
5xx, stalls, or closes in the middle of its answer (the request done, the answer lost).

It reads each HTTP/1.1 request (head, then a ``Content-Length`` or chunked body), decides whether a
fault applies (the window is open and the request's method and path match), and otherwise sends the
request upstream with ``Connection: close`` and relays the answer until the server closes: one
request per connection, so the proxy never has to parse an answer. Bounded: at most
``MAX_CONNECTIONS`` at once, every socket with a timeout, threads stopped with the proxy.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from urllib.parse import urlparse

MAX_CONNECTIONS = 64
SOCKET_TIMEOUT_S = 120.0
KINDS = ("drop", "status", "stall", "cut")


class FaultProxy:
    """``with FaultProxy("http://127.0.0.1:5000") as proxy:`` point the client at ``proxy.url``;
    ``proxy.inject("status", seconds=2)`` opens a window; ``proxy.hits`` lists what it did."""

    def __init__(self, target: str):
        parsed = urlparse(target)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(MAX_CONNECTIONS)
        self._listener.settimeout(0.2)    # the accept loop looks at the stop flag this often
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._stopped = threading.Event()
        self._fault: dict | None = None
        self.hits: list[tuple[str, str, str]] = []      # (fault, method, path) of each request it faulted
        self.forwarded = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stopped.set()
        self._thread.join(timeout=10)
        self._listener.close()

    def inject(self, kind: str, *, seconds: float | None = None, count: int | None = None, match: str = "",
               method: str = "", status: int = 503, delay_s: float = 5.0) -> None:
        """Fault the requests whose path matches the regex ``match`` (and whose method is
        ``method``, when given) for ``seconds`` from now or the next ``count`` of them, whichever
        ends first (neither: until ``clear``). ``drop``: close the connection unanswered (a server
        going down); ``status``: answer ``status``; ``stall``: hold the request ``delay_s``, then
        forward it; ``cut``: forward it and close before its answer (done there, lost here)."""
        if kind not in KINDS:
            raise ValueError(f"fault {kind!r}: one of {KINDS}")
        with self._lock:
            self._fault = {"kind": kind, "until": time.monotonic() + seconds if seconds is not None else None,
                           "left": count, "match": re.compile(match), "method": method.upper(),
                           "status": status, "delay_s": delay_s}

    def clear(self) -> None:
        with self._lock:
            self._fault = None

    def _take(self, method: str, path: str) -> dict | None:
        with self._lock:
            f = self._fault
            if f is None:
                return None
            if (f["until"] is not None and time.monotonic() >= f["until"]) or f["left"] == 0:
                self._fault = None
                return None
            if not f["match"].search(path) or (f["method"] and f["method"] != method):
                return None
            if f["left"] is not None:
                f["left"] -= 1
            self.hits.append((f["kind"], method, path))
            return dict(f)

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._slots.acquire(timeout=SOCKET_TIMEOUT_S):
                client.close()
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            client.settimeout(SOCKET_TIMEOUT_S)
            reader = client.makefile("rb")
            head = _read_head(reader)
            if head is None:
                return
            method, path, lines = head
            fault = self._take(method, path)
            if fault and fault["kind"] == "drop":
                return
            headers = {k.lower(): v for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
            if headers.get("expect", "").strip().lower() == "100-continue":
                client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = _read_body(reader, headers)
            if fault and fault["kind"] == "status":
                client.sendall(f"HTTP/1.1 {fault['status']} Injected Fault\r\nContent-Type: text/plain\r\n"
                               f"Content-Length: 14\r\nConnection: close\r\n\r\ninjected fault".encode())
                return
            if fault and fault["kind"] == "stall":
                if self._stopped.wait(fault["delay_s"]):
                    return
            kept = [line for line in lines[1:] if line.split(":", 1)[0].strip().lower() not in ("connection", "expect")]
            data = "\r\n".join([lines[0], *kept, "Connection: close", "", ""]).encode("latin-1") + body
            with socket.create_connection(self.upstream, timeout=SOCKET_TIMEOUT_S) as up:
                up.sendall(data)
                with self._lock:
                    self.forwarded += 1
                while chunk := up.recv(1 << 16):
                    if fault and fault["kind"] == "cut":
                        return    # the server did the work; its answer goes nowhere
                    client.sendall(chunk)
        except OSError:
            pass
        finally:
            client.close()
            self._slots.release()


def _read_head(reader) -> tuple[str, str, list[str]] | None:
    lines = []
    while True:
        line = reader.readline(1 << 16)
        if not line:
            return None
        line = line.decode("latin-1").rstrip("\r\n")
        if not line:
            break
        lines.append(line)
        if len(lines) > 200:
            raise OSError("a request head of more than 200 lines")
    parts = lines[0].split(" ")
    if len(parts) < 3:
        raise OSError(f"not an HTTP request line: {lines[0][:80]!r}")
    return parts[0].upper(), parts[1], lines


def _read_body(reader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        out = bytearray()
        while True:
            size_line = reader.readline(1 << 16)
            out += size_line
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (trailer := reader.readline(1 << 16)) not in (b"\r\n", b"\n", b""):
                    out += trailer
                return bytes(out + b"\r\n")
            out += reader.read(size + 2)
    return reader.read(int(headers.get("content-length", "0").strip() or 0))
