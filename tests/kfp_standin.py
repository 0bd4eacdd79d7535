"""A local HTTP stand-in for the KFP v2beta1 API that records every request (we have no cluster)."""

from __future__ import annotations

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class KfpStandIn:
    def __init__(self):
        self.requests: list[dict] = []
        self.experiments: dict[str, dict] = {}
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
                standin.requests.append({"method": self.command, "path": self.path, "body": body})
                return body

            def do_GET(self):
                self._record()
                path = self.path.split("?")[0]
                if path.endswith("/healthz"):
                    return self._reply({"multi_user": False, "pipeline_store": "minio"})
                if path.endswith("/experiments"):
                    return self._reply({"experiments": list(standin.experiments.values()),
                                        "total_size": len(standin.experiments)})
                if "/experiments/" in path:
                    exp_id = path.rsplit("/", 1)[1]
                    return self._reply(standin.experiments.get(exp_id, {}))
                return self._reply({})

            def do_POST(self):
                body = self._record() or {}
                path = self.path.split("?")[0]
                if path.endswith("/experiments"):
                    exp = {"experiment_id": uuid.uuid4().hex[:8], "display_name": body.get("display_name"),
                           "namespace": body.get("namespace", "")}
                    standin.experiments[exp["experiment_id"]] = exp
                    return self._reply(exp)
                if path.endswith("/runs"):
                    return self._reply({**body, "run_id": "run-" + uuid.uuid4().hex[:8], "state": "PENDING"})
                if path.endswith("/recurringruns"):
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
