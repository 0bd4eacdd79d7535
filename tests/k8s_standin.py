"""A local stand-in for the Kubernetes API, with controllers that play the training operators.

We have no cluster. ``KubeStandIn`` answers the REST calls the train step makes through the real
``kubernetes`` client (custom objects: create, get, patch, delete; pods: list, get, delete, log;
secrets and configmaps: get), records every request, and deletes what a pod owns when the pod is
deleted (Kubernetes' garbage collector, by ``ownerReferences`` uid). Before anything is stored it
does what a real cluster does (tests/kube_rules.py, each rule copied from the real source at a
pinned tag): every request is authorized against the Role in infra/identity/rbac.yaml for the
``panoptic-pipeline`` service account (403 with the API server's words otherwise); a custom
resource is checked against its project's real CRD schema (strict field validation when the
client asks for it, pruning of unknown fields when not) and its project's admission webhook
(Trainer, Training Operator, Katib). What a created job does is a controller's:

- ``ScriptedController``: the job's status follows a script of conditions (no pods).
- ``tests.katib_standin.KatibController``: a Katib Experiment's trials, each through Katib's
  own pod mutation (the ``sh -c`` join) and metrics collector filter.
- ``DockerOperator``: the Training Operator (PyTorchJob) or Kubeflow Trainer's torch runtime
  (TrainJob) as Kubernetes would run the job: each replica a container of the job's image on
  this Docker engine, with the operator's environment (``MASTER_ADDR``, ``MASTER_PORT``,
  ``WORLD_SIZE``, ``RANK``; ``PET_*`` for the TrainJob), ``$(VAR)`` expanded in the command,
  Secrets resolved (a missing one fails the pod, named, as the kubelet does), the pod's user,
  CPU and memory limits, its memory-backed /dev/shm of the manifest's size, PVCs as host
  folders. Containers share the host's network (the "service" addresses are 127.0.0.1).
  GPUs are not emulated.

Write a kubeconfig for the client with ``kubeconfig(path)``.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
import uuid
from http.server import ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from tests.kube_rules import ApiRules, Authorizer, Refused, role_rules, verb_of
from tests.servers import JsonHandler, StandIn, free_port

CUSTOM = re.compile(r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/]+)"
                    r"(?:/(?P<name>[^/]+))?$")
CORE = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/(?P<kind>pods|secrets|configmaps)(?:/(?P<name>[^/]+))?"
                  r"(?:/(?P<sub>log))?$")


class KubeStandIn(StandIn):
    def __init__(self, controller=None, *, secrets: dict | None = None, pods: dict | None = None,
                 configmaps: dict | None = None, rules: ApiRules | None = None, role: list[dict] | None = None,
                 authorize: bool = True):
        """``secrets`` / ``configmaps``: {(namespace, name): {key: value}}; ``pods``: {(namespace, name):
        labels} (pods that exist from the start, such as the pipeline task's own); ``rules``: the
        cluster's CRDs, webhooks and namespaces (default: the newest versions we support);
        ``role``: the rules the caller's service account is bound to (default: our Role);
        ``authorize=False``: no RBAC (a cluster admin's kubeconfig)."""
        self.controller = controller or ScriptedController([])
        self.rules = rules or ApiRules()
        self.authorizer = Authorizer(role if role is not None else role_rules()) if authorize else None
        self.configmaps = dict(configmaps or {})
        self.refused: list[dict] = []
        self.requests: list[dict] = []
        self.objects: dict[tuple, dict] = {}
        self.deleted: list[dict] = []
        self.secrets = dict(secrets or {})
        self.static_pods = {k: {"metadata": {"name": k[1], "namespace": k[0], "uid": str(uuid.uuid4()),
                                             "labels": v or {}}, "status": {"phase": "Running"}}
                            for k, v in (pods or {}).items()}
        self.lock = threading.Lock()
        standin = self

        class Handler(JsonHandler):

            def _status(self, code: int, reason: str, message: str):
                self._reply({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                             "reason": reason, "code": code}, code)

            def _body(self):
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length)) if length else None

            def _handle(self):
                url = urlparse(self.path)
                body = self._body() if self.command in ("POST", "PUT", "PATCH", "DELETE") else None
                query = parse_qs(url.query)
                with standin.lock:
                    standin.requests.append({"method": self.command, "path": url.path, "query": query,
                                             "body": body})
                m = CUSTOM.match(url.path) or CORE.match(url.path)
                if m is None:
                    return self._status(404, "NotFound", f"no route {url.path}")
                try:
                    if standin.authorizer is not None:
                        group = m.groupdict().get("group") or ""
                        resource = m.groupdict().get("plural") or m["kind"]
                        if m.groupdict().get("sub"):
                            resource += "/" + m["sub"]
                        standin.authorizer.check(verb_of(self.command, m["name"], query), group, resource, m["ns"],
                                                 m["name"])
                    if "group" in m.groupdict():
                        return self._custom(m, body, query)
                    return self._core(m, query)
                except Refused as e:
                    standin.refused.append({"method": self.command, "path": url.path, "code": e.code,
                                            "message": e.message})
                    return self._status(e.code, e.reason, e.message)

            do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _handle

            def _custom(self, m, body, query):
                key = (m["group"], m["version"], m["ns"], m["plural"])
                if self.command == "POST" and not m["name"]:
                    name = body["metadata"]["name"]
                    if key + (name,) in standin.objects:
                        return self._status(409, "AlreadyExists", f'{m["plural"]}.{m["group"]} "{name}" already '
                                                                  f"exists")
                    obj = standin.rules.admit(m["group"], m["version"], m["plural"], m["ns"],
                                              json.loads(json.dumps(body)), query)
                    obj["metadata"].update(namespace=m["ns"], uid=str(uuid.uuid4()),
                                           creationTimestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
                    standin.objects[key + (name,)] = obj
                    standin.controller.created(obj)
                    return self._reply(obj, 201)
                obj = standin.objects.get(key + (m["name"],))
                if obj is None:
                    return self._status(404, "NotFound", f'{m["plural"]} "{m["name"]}" not found')
                if self.command == "GET":
                    return self._reply({**obj, "status": standin.controller.status(obj)})
                if self.command == "DELETE":
                    standin.delete(key + (m["name"],))
                    return self._reply({"kind": "Status", "status": "Success"})
                if self.command == "PATCH":   # a merge patch (Argo's executor patches its task result)
                    _merge(obj, body or {})
                    return self._reply(obj)
                self._status(405, "MethodNotAllowed", self.command)

            def _core(self, m, query):
                ns, kind, name, sub = m["ns"], m["kind"], m["name"], m["sub"]
                if kind == "configmaps":
                    data = standin.configmaps.get((ns, name))
                    if data is None:
                        return self._status(404, "NotFound", f'configmaps "{name}" not found')
                    return self._reply({"kind": "ConfigMap", "apiVersion": "v1",
                                        "metadata": {"name": name, "namespace": ns}, "data": data})
                if kind == "secrets":
                    data = standin.secrets.get((ns, name))
                    if data is None:
                        return self._status(404, "NotFound", f'secrets "{name}" not found')
                    return self._reply({"kind": "Secret", "apiVersion": "v1", "metadata": {"name": name,
                                                                                           "namespace": ns},
                                        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}})
                pods = {p["metadata"]["name"]: p for p in standin.pods(ns)}
                if not name:
                    selector = dict(kv.split("=", 1) for kv in query.get("labelSelector", [""])[0].split(",") if kv)
                    items = [p for p in pods.values()
                             if all(p["metadata"].get("labels", {}).get(k) == v for k, v in selector.items())]
                    return self._reply({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
                if name not in pods:
                    return self._status(404, "NotFound", f'pods "{name}" not found')
                if sub == "log":
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.end_headers()
                    follow = query.get("follow", [""])[0].lower() == "true"   # the client sends "True"
                    for chunk in standin.controller.log(ns, name, follow=follow):
                        self.wfile.write(chunk)
                        self.wfile.flush()
                    return
                if self.command == "DELETE":
                    standin.delete_pod(ns, name)
                    return self._reply({"kind": "Status", "status": "Success"})
                return self._reply(pods[name])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def pods(self, namespace: str) -> list[dict]:
        return [p for (ns, _), p in self.static_pods.items() if ns == namespace] + self.controller.pods(namespace)

    def delete(self, key: tuple) -> None:
        obj = self.objects.pop(key, None)
        if obj is not None:
            self.deleted.append(obj)
            self.controller.deleted(obj)

    def delete_pod(self, namespace: str, name: str) -> None:
        """Delete a pod and, as Kubernetes' garbage collector does, everything it owns."""
        pod = self.static_pods.pop((namespace, name), None)
        if pod is None:
            return
        uid = pod["metadata"]["uid"]
        for key, obj in list(self.objects.items()):
            if any(o.get("uid") == uid for o in obj["metadata"].get("ownerReferences", [])):
                self.delete(key)

    def pod_uid(self, namespace: str, name: str) -> str:
        return self.static_pods[(namespace, name)]["metadata"]["uid"]

    def calls(self, method: str, fragment: str = "") -> list[dict]:
        return [r for r in self.requests if r["method"] == method and fragment in r["path"]]

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.controller.close()


def _merge(target: dict, patch: dict) -> None:
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif isinstance(v, dict) and isinstance(target.get(k), dict):
            _merge(target[k], v)
        else:
            target[k] = v


def kubeconfig(path: str, url: str, namespace: str = "default") -> str:
    doc = {"apiVersion": "v1", "kind": "Config", "current-context": "standin",
           "clusters": [{"name": "standin", "cluster": {"server": url}}],
           "users": [{"name": "standin", "user": {"token": "standin-token"}}],
           "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "standin",
                                                        "namespace": namespace}}]}
    with open(path, "w") as f:
        json.dump(doc, f)
    return path


class Controller:
    """What KubeStandIn asks of whatever plays a job's operator; these defaults: no pods, no logs."""

    def created(self, obj):
        pass

    def status(self, obj):
        return {}

    def deleted(self, obj):
        pass

    def pods(self, namespace):
        return []

    def log(self, namespace, name, follow=False):
        return iter(())

    def close(self):
        pass


class ScriptedController(Controller):
    """Conditions from a script: each status read takes the next (type, message); the last stays.
    ``on_created(job)`` runs when a job is created (to leave what its pods would write)."""

    def __init__(self, states, on_created=None):
        self.states = list(states)
        self.on_created = on_created
        self.created_jobs: list[dict] = []

    def created(self, obj):
        self.created_jobs.append(obj)
        if self.on_created:
            self.on_created(obj)

    def status(self, obj):
        state, message = self.states.pop(0) if len(self.states) > 1 else (self.states or [("Created", "")])[0]
        return {"conditions": [{"type": state, "status": "True", "message": message}]}


# -- the operators, on a Docker engine -----------------------------------------------------------

def _quantity_bytes(q: str) -> int:
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|K|M|G|T)?", str(q))
    factor = {None: 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
              "Ti": 2**40}[m.group(2)]
    return int(m.group(1)) * factor


def _cpu_nano(q: str) -> int:
    q = str(q)
    return int(q[:-1]) * 10**6 if q.endswith("m") else int(float(q) * 10**9)


class PodStartError(RuntimeError):
    """What the kubelet says when a container cannot start (CreateContainerConfigError ...)."""


class DockerOperator:
    """Runs PyTorchJobs and TrainJobs as containers (see the module docstring)."""

    LABEL = "panoptic.k8s-standin"

    def __init__(self, client, *, secrets: dict | None = None, pvcs: dict | None = None):
        """``client``: a docker.DockerClient; ``secrets``: {(namespace, name): {key: value}};
        ``pvcs``: {claim name: host folder}."""
        self.client, self.secrets, self.pvcs = client, secrets or {}, pvcs or {}
        self.run = uuid.uuid4().hex[:8]
        self.jobs: dict[str, dict] = {}      # job uid -> {"pods": {name: pod}, "error": str|None}
        self.started: list[dict] = []        # what each container was started with (for the tests)

    # the controller interface
    def created(self, obj):
        entry = {"pods": {}, "error": None, "kind": obj["kind"]}
        self.jobs[obj["metadata"]["uid"]] = entry
        try:
            for pod in self._pods_of(obj):
                entry["pods"][pod["name"]] = pod
            for pod in entry["pods"].values():
                pod["container"] = self._start(pod)
        except PodStartError as e:
            entry["error"] = str(e)

    def status(self, obj):
        entry = self.jobs.get(obj["metadata"]["uid"])
        done = "Complete" if obj["kind"] == "TrainJob" else "Succeeded"
        if entry["error"]:
            return {"conditions": [{"type": "Failed", "status": "True", "message": entry["error"]}]}
        codes = {}
        for name, pod in entry["pods"].items():
            pod["container"].reload()
            if pod["container"].status == "exited":
                codes[name] = pod["container"].attrs["State"]["ExitCode"]
        failed = {n: c for n, c in codes.items() if c != 0}
        if failed:
            return {"conditions": [{"type": "Failed", "status": "True", "message": "; ".join(
                f"pod {n} exited with code {c}" for n, c in sorted(failed.items()))}]}
        if len(codes) == len(entry["pods"]):
            return {"conditions": [{"type": done, "status": "True", "message": "all replicas succeeded"}]}
        return {"conditions": [{"type": "Running", "status": "True", "message": ""}]}

    def deleted(self, obj):
        entry = self.jobs.pop(obj["metadata"]["uid"], None)
        for pod in (entry or {}).get("pods", {}).values():
            self._remove(pod.get("container"))

    def pods(self, namespace):
        out = []
        for entry in self.jobs.values():
            for pod in entry["pods"].values():
                if pod["namespace"] != namespace or "container" not in pod:
                    continue
                c = pod["container"]
                c.reload()
                state = c.attrs["State"]
                phase = "Running" if state["Running"] else ("Succeeded" if state["ExitCode"] == 0 else "Failed")
                out.append({"metadata": {"name": pod["name"], "namespace": namespace, "uid": pod["uid"],
                                         "labels": pod["labels"]},
                            "status": {"phase": phase, "containerStatuses": [
                                {"name": pod["container_name"], "ready": bool(state["Running"]), "restartCount": 0,
                                 "image": pod["image"], "imageID": c.image.id}]}})
        return out

    def log(self, namespace, name, follow=False):
        for entry in self.jobs.values():
            pod = entry["pods"].get(name)
            if pod is not None and "container" in pod:
                return pod["container"].logs(stream=True, follow=follow)
        return iter(())

    def close(self):
        for entry in self.jobs.values():
            for pod in entry["pods"].values():
                self._remove(pod.get("container"))
        self.jobs.clear()

    # what the operators make of a job
    def _pods_of(self, obj) -> list[dict]:
        name, ns = obj["metadata"]["name"], obj["metadata"]["namespace"]
        port = str(free_port())
        if obj["kind"] == "PyTorchJob":
            specs = obj["spec"]["pytorchReplicaSpecs"]
            world = sum(s["replicas"] for s in specs.values())
            out, rank = [], 0
            for rtype in ("Master", "Worker"):
                for i in range(specs.get(rtype, {}).get("replicas", 0)):
                    template = specs[rtype]["template"]["spec"]
                    container = next(c for c in template["containers"] if c["name"] == "pytorch")
                    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(world),
                           "RANK": str(rank), "PYTHONUNBUFFERED": "1"}
                    labels = {"training.kubeflow.org/job-name": name,
                              "training.kubeflow.org/replica-type": rtype.lower(),
                              "training.kubeflow.org/replica-index": str(i)}
                    out.append(self._pod(f"{name}-{rtype.lower()}-{i}", ns, labels, template, container, env))
                    rank += 1
            return out
        if obj["kind"] == "TrainJob":
            trainer = obj["spec"]["trainer"]
            patch = obj["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
            template = patch["template"]["spec"]["template"]["spec"]
            mounts = next(c for c in template["containers"] if c["name"] == "node").get("volumeMounts", [])
            container = {"name": "node", "image": trainer["image"], "command": trainer["command"],
                         "env": trainer.get("env", []), "resources": trainer.get("resourcesPerNode", {}),
                         "volumeMounts": mounts}
            out = []
            for i in range(trainer["numNodes"]):
                env = {"PET_NNODES": str(trainer["numNodes"]), "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
                       "PET_NODE_RANK": str(i), "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": port,
                       "PYTHONUNBUFFERED": "1"}
                labels = {"jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/replicatedjob-name": "node",
                          "jobset.sigs.k8s.io/job-index": "0", "batch.kubernetes.io/job-completion-index": str(i)}
                out.append(self._pod(f"{name}-node-0-{i}", ns, labels, template, container, env))
            return out
        raise PodStartError(f"no operator for kind {obj['kind']}")

    def _pod(self, name, ns, labels, template, container, operator_env) -> dict:
        return {"name": name, "namespace": ns, "uid": str(uuid.uuid4()), "labels": labels, "template": template,
                "container_spec": container, "container_name": container["name"], "image": container["image"],
                "operator_env": operator_env}

    def _env(self, pod) -> dict[str, str]:
        env = dict(pod["operator_env"])
        for e in pod["container_spec"].get("env", []):
            if "value" in e:
                env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), e["value"])
            else:
                ref = e["valueFrom"]["secretKeyRef"]
                secret = self.secrets.get((pod["namespace"], ref["name"]))
                if secret is None or ref["key"] not in secret:
                    if ref.get("optional"):
                        continue
                    what = (f'secret "{ref["name"]}" not found' if secret is None else
                            f'couldn\'t find key {ref["key"]} in Secret {pod["namespace"]}/{ref["name"]}')
                    raise PodStartError(f"pod {pod['name']}: CreateContainerConfigError: {what}")
                env[e["name"]] = secret[ref["key"]]
        return env

    def _start(self, pod):
        import docker

        spec, template = pod["container_spec"], pod["template"]
        env = self._env(pod)
        command = [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), part)
                   for part in spec["command"]]
        security = template.get("securityContext", {})
        user = str(security.get("runAsUser", ""))
        if security.get("runAsNonRoot") and user in ("", "0"):
            image_user = self.client.images.get(spec["image"]).attrs["Config"].get("User", "")
            if image_user.split(":")[0] in ("", "0", "root"):
                raise PodStartError(f"pod {pod['name']}: container has runAsNonRoot and image will run as root")
        volumes = {v["name"]: v for v in template.get("volumes", [])}
        mounts, shm = [], None
        for m in spec.get("volumeMounts", []):
            v = volumes[m["name"]]
            if "emptyDir" in v and m["mountPath"] == "/dev/shm" and v["emptyDir"].get("medium") == "Memory":
                shm = _quantity_bytes(v["emptyDir"].get("sizeLimit", "64Mi"))
            elif "emptyDir" in v:
                mounts.append(docker.types.Mount(m["mountPath"], None, type="tmpfs"))
            elif "persistentVolumeClaim" in v:
                mounts.append(docker.types.Mount(m["mountPath"], self.pvcs[v["persistentVolumeClaim"]["claimName"]],
                                                 type="bind"))
        limits = spec.get("resources", {}).get("limits", {})
        kwargs = {"nano_cpus": _cpu_nano(limits["cpu"])} if "cpu" in limits else {}
        if "memory" in limits:
            kwargs["mem_limit"] = _quantity_bytes(limits["memory"])
        group = security.get("fsGroup")
        record = {"pod": pod["name"], "command": command, "env": env, "user": user, "shm_size": shm,
                  "mounts": [(m["Target"], m["Type"]) for m in mounts], **kwargs}
        self.started.append(record)
        return self.client.containers.run(
            spec["image"], entrypoint=command[:1], command=command[1:], environment=env, user=user or None,
            group_add=[str(group)] if group is not None else None, network_mode="host", shm_size=shm, mounts=mounts,
            detach=True, labels={self.LABEL: self.run, "pod": pod["name"]}, **kwargs)

    def _remove(self, container) -> None:
        if container is None:
            return
        try:
            container.remove(force=True)
        except Exception:
            pass
