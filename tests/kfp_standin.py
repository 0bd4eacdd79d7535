"""A local HTTP stand-in for the KFP v2beta1 API that records every request (we have no cluster).

Configured as a multi-user Kubeflow (``token``/``cookie`` and ``namespace`` given), it answers
as one behind Dex/oauth2-proxy does: 401 to a request without the bearer token or session
cookie, 400 to experiment and run requests without the namespace, 403 to a run in an
experiment of another namespace.

What the real API server does, copied from kubeflow/pipelines at 2.17.0 (the SDK we pin):
- Pipelines are namespaced in multi-user mode and shared ("") in single-user mode
  (``backend/src/apiserver/resource/resource_manager.go``, ``ReplaceNamespace``); a list call
  returns the pipelines of the namespace it names, so one without a namespace sees only the
  shared ones (``backend/src/apiserver/server/pipeline_server.go``, ``listPipelines``).
- (namespace, name) of a pipeline and (pipeline, name) of a version are unique indexes
  (``backend/src/apiserver/model/pipeline.go``, ``pipeline_version.go``): an upload of a
  duplicate is refused with 409 and the upload server's error body
  (``backend/src/apiserver/server/pipeline_upload_server.go``, ``writeErrorToResponse``).
- A list call's JSON filter (``display_name`` EQUALS) is applied to experiments, pipelines and
  versions alike (``backend/src/apiserver/filter/filter.go``).
"""

from __future__ import annotations

import json
import threading
import uuid
from http.server import ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from tests.servers import JsonHandler, StandIn


class KfpStandIn(StandIn):
    def __init__(self, *, token: str | None = None, cookie: str | None = None, namespace: str | None = None):
        self.requests: list[dict] = []
        self.experiments: dict[str, dict] = {}
        self.pipelines: dict[str, dict] = {}     # id -> pipeline
        self.versions: dict[str, dict] = {}      # id -> version (with its "package" bytes)
        self.recurring: dict[str, dict] = {}     # id -> recurring run
        self.runs: dict[str, dict] = {}
        self.conflicts: list[str] = []           # uploads refused as duplicates (409)
        self.token, self.cookie, self.namespace = token, cookie, namespace
        standin = self

        class Handler(JsonHandler):

            def _record(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                if (self.headers.get("Content-Type") or "").startswith("multipart/form-data"):
                    body = {"files": _multipart(self.headers["Content-Type"], raw)}
                else:
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

            def _upload_error(self, code: int, message: str):
                standin.conflicts.append(message)
                self._reply({"error_message": message, "error_details": f"{message}: AlreadyExistsError"}, code)

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
                    name = _filter_value(query, "display_name")
                    exps = [e for e in standin.experiments.values() if e["namespace"] == (ns or "")
                            and (name is None or e["display_name"] == name)]
                    return self._reply({"experiments": exps, "total_size": len(exps)} if exps else {})
                if "/experiments/" in path:
                    return self._reply(standin.experiments.get(path.rsplit("/", 1)[1], {}))
                if path.endswith("/pipelines"):
                    name = _filter_value(query, "display_name")
                    ns = standin._pipeline_namespace(query)
                    found = [p for p in standin.pipelines.values() if (name is None or p["display_name"] == name)
                             and p["namespace"] == ns]
                    return self._reply({"pipelines": found, "total_size": len(found)} if found else {})
                if path.endswith("/versions"):
                    pid = path.split("/")[-2]
                    name = _filter_value(query, "display_name")
                    found = [_public(v) for v in standin.versions.values() if v["pipeline_id"] == pid
                             and (name is None or v["display_name"] == name)]
                    return self._reply({"pipeline_versions": found, "total_size": len(found)} if found else {})
                if path.endswith("/recurringruns"):
                    exp = query.get("experiment_id", [None])[0]
                    found = [r for r in standin.recurring.values() if exp is None or r["experiment_id"] == exp]
                    return self._reply({"recurringRuns": found, "total_size": len(found)} if found else {})
                return self._reply({})

            def do_DELETE(self):
                self._record()
                if self._refuse():
                    return
                path = urlparse(self.path).path
                parts = path.split("/")
                if "/recurringruns/" in path:
                    standin.recurring.pop(parts[-1], None)
                elif "/versions/" in path:
                    standin.versions.pop(parts[-1], None)
                return self._reply({})

            def do_POST(self):
                body = self._record() or {}
                if self._refuse():
                    return
                url = urlparse(self.path)
                path, query = url.path, parse_qs(url.query)
                if path.endswith("/pipelines/upload"):
                    pid = "p-" + uuid.uuid4().hex[:8]
                    pipeline = {"pipeline_id": pid, "display_name": query["name"][0],
                                "description": query.get("description", [""])[0],
                                "namespace": standin._pipeline_namespace(query)}
                    if any((p["namespace"], p["display_name"]) == (pipeline["namespace"], pipeline["display_name"])
                           for p in standin.pipelines.values()):
                        return self._upload_error(409, "Failed to create a pipeline and a pipeline version")
                    standin.pipelines[pid] = pipeline
                    standin._version(pid, query["name"][0], "", body["files"]["uploadfile"])
                    return self._reply(pipeline)
                if path.endswith("/pipelines/upload_version"):
                    if any((v["pipeline_id"], v["display_name"]) == (query["pipelineid"][0], query["name"][0])
                           for v in standin.versions.values()):
                        return self._upload_error(409, "Failed to create a pipeline version")
                    v = standin._version(query["pipelineid"][0], query["name"][0], query.get("description", [""])[0],
                                         body["files"]["uploadfile"])
                    return self._reply(_public(v))
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
                        run = {**body, "run_id": "run-" + uuid.uuid4().hex[:8], "state": "PENDING"}
                        standin.runs[run["run_id"]] = run
                        return self._reply(run)
                    rr = {**body, "recurring_run_id": "rr-" + uuid.uuid4().hex[:8], "status": "ENABLED"}
                    standin.recurring[rr["recurring_run_id"]] = rr
                    return self._reply(rr)
                return self._reply({})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _pipeline_namespace(self, query: dict) -> str:
        """ReplaceNamespace: the request's namespace in multi-user mode, "" (shared) otherwise."""
        return query.get("namespace", [""])[0] if self.namespace is not None else ""

    def _version(self, pipeline_id: str, name: str, description: str, package: bytes) -> dict:
        vid = "v-" + uuid.uuid4().hex[:8]
        self.versions[vid] = {"pipeline_id": pipeline_id, "pipeline_version_id": vid, "display_name": name,
                              "description": description, "created_at": "2026-12-02T00:00:00Z", "package": package}
        return self.versions[vid]


def _public(version: dict) -> dict:
    return {k: v for k, v in version.items() if k != "package"}


def _filter_value(query: dict, key: str):
    """The value a KFP list call's JSON filter asks ``key`` to equal (None: no such filter)."""
    raw = query.get("filter", [None])[0]
    if not raw:
        return None
    for p in json.loads(raw).get("predicates", []):
        if p.get("key") == key:
            return p.get("stringValue", p.get("string_value"))
    return None


def _multipart(content_type: str, raw: bytes) -> dict[str, bytes]:
    """The files of a multipart/form-data body, by field name."""
    from email.parser import BytesParser
    from email.policy import HTTP

    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
    return {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
            for part in msg.iter_parts()}
