"""A local HTTP stand-in for the KFP v2beta1 API that records every request (we have no cluster).

Configured as a multi-user Kubeflow (``token``/``cookie`` and ``namespace`` given), it answers
as one behind Dex/oauth2-proxy does: 401 to a request without the bearer token or session
cookie, 400 to experiment and run requests without the namespace, 403 to a run in an
experiment of another namespace.
"""

from __future__ import annotations

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


class KfpStandIn:
    def __init__(self, *, token: str | None = None, cookie: str | None = None, namespace: str | None = None):
        self.requests: list[dict] = []
        self.experiments: dict[str, dict] = {}
        self.token, self.cookie, self.namespace = token, cookie, namespace
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, body: dict, code: int = 200):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                url = urlparse(self.path)
                standin.requests.append({"method": self.command, "path": url.path, "query": parse_qs(url.query),
                                         "body": body, "authorization": self.headers.get("Authorization"),
                                         "cookie": self.headers.get("Cookie")})
                return body

            def _authorized(self) -> bool:
                if standin.token is None and standin.cookie is None:
                    return True
                if standin.token and self.headers.get("Authorization") == f"Bearer {standin.token}":
                    return True
                return bool(standin.cookie) and standin.cookie in (self.headers.get("Cookie") or "")

            def _refuse(self) -> bool:
                if self._authorized():
                    return False
                self._reply({"error": "Unauthorized", "code": 16, "message": "no valid credentials"}, 401)
                return True

            def _wrong_namespace(self, ns: str | None) -> bool:
                if standin.namespace is None or ns == standin.namespace:
                    return False
                if not ns:
                    self._reply({"error": "Invalid input error: In multi-user mode, namespace is required",
                                 "code": 3}, 400)
                else:
                    self._reply({"error": f"PermissionDenied: no access to namespace {ns}", "code": 7}, 403)
                return True

            def do_GET(self):
                self._record()
                if self._refuse():
                    return
                url = urlparse(self.path)
                path, query = url.path, parse_qs(url.query)
                if path.endswith("/healthz"):
                    return self._reply({"multi_user": standin.namespace is not None, "pipeline_store": "minio"})
                if path.endswith("/experiments"):
                    ns = query.get("namespace", [None])[0]
                    if self._wrong_namespace(ns):
                        return
                    exps = [e for e in standin.experiments.values() if e["namespace"] == (ns or "")]
                    return self._reply({"experiments": exps, "total_size": len(exps)})
                if "/experiments/" in path:
                    return self._reply(standin.experiments.get(path.rsplit("/", 1)[1], {}))
                return self._reply({})

            def do_POST(self):
                body = self._record() or {}
                if self._refuse():
                    return
                path = urlparse(self.path).path
                if path.endswith("/experiments"):
                    if self._wrong_namespace(body.get("namespace")):
                        return
                    exp = {"experiment_id": uuid.uuid4().hex[:8], "display_name": body.get("display_name"),
                           "namespace": body.get("namespace", "")}
                    standin.experiments[exp["experiment_id"]] = exp
                    return self._reply(exp)
                if path.endswith("/runs") or path.endswith("/recurringruns"):
                    exp = standin.experiments.get(body.get("experiment_id") or "", {})
                    if self._wrong_namespace(exp.get("namespace")):
                        return
                    if path.endswith("/runs"):
                        return self._reply({**body, "run_id": "run-" + uuid.uuid4().hex[:8], "state": "PENDING"})
                    return self._reply({**body, "recurring_run_id": "rr-" + uuid.uuid4().hex[:8], "status": "ENABLED"})
                return self._reply({})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
