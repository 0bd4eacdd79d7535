"""README's "Run on a cluster" steps, followed in order over the rendered manifests: each command
must find what it needs made by an earlier one (a namespace, a Secret and its keys, a Service,
a bucket, an image that was pushed), as a fresh cluster would. No cluster here: the state is
what the steps have made so far; the manifests are the real kustomize output."""

from __future__ import annotations

import os
import re
import shlex
import subprocess

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OURS = re.compile(r"/panoptic-(cpu|cuda):")
PROFILE = "team-vision"   # the profile's namespace: Kubeflow made it (README, step 3)


def readme_steps() -> list[str]:
    """The commands of the README's cluster section, in order (continuation lines joined)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text[text.index("## Run on a cluster"):]
    section = section[:section.index("\n## ", 1)]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ", 1)[0].strip()
            if line:
                commands.append(line)
    return commands


class FreshCluster:
    def __init__(self):
        self.namespaces = {PROFILE, "kubeflow"}
        self.secrets: dict[tuple[str, str], set[str]] = {}
        self.services: set[tuple[str, str]] = set()
        self.buckets: set[str] = set()
        self.pushed: set[str] = set()
        self.env: dict[str, str] = {}
        self.problems: list[str] = []

    def run(self, command: str) -> None:
        words = shlex.split(command)
        if words[0] == "export":
            self.env.update(w.split("=", 1) for w in words[1:])
        elif words[:2] == ["make", "images"]:
            self.env.update(w.split("=", 1) for w in words[2:] if "=" in w)
        elif words[0] == "docker" and words[1] == "push":
            self.pushed.update(w for w in words if OURS.search(w))
        elif words[:3] == ["aws", "s3", "mb"]:
            self.buckets.add(words[3][len("s3://"):].split("/")[0])
        elif words[0] == "kubectl":
            self._kubectl(words[1:], command)
        elif words[:2] == ["panoptic", "pipeline"]:
            self._panoptic(words[2:], command)
        else:
            self.problems.append(f"{command!r}: a step this test does not know")

    def _kubectl(self, args: list[str], command: str) -> None:
        ns = None
        if args[0] == "-n":
            ns, args = args[1], args[2:]
        if args[:3] == ["create", "secret", "generic"]:
            if ns not in self.namespaces:
                self.problems.append(f"{command}: namespace {ns} does not exist yet")
            keys = {a.split("=", 1)[1].split("=", 1)[0] for a in args if a.startswith("--from-literal=")}
            self.secrets[(ns, args[3])] = keys
        elif args[0] == "apply":
            docs = self._render(args[1], args[2])
            self._apply(docs, command)
        elif args[0] == "port-forward":
            svc = args[1].split("/", 1)[1]
            if (ns, svc) not in self.services:
                self.problems.append(f"{command}: no Service {ns}/{svc} yet")
        else:
            self.problems.append(f"{command}: a kubectl command this test does not know")

    def _render(self, flag: str, path: str) -> list[dict]:
        full = os.path.join(ROOT, path)
        if flag == "-k":
            out = subprocess.run(["kubectl", "kustomize", full], capture_output=True, text=True, timeout=120,
                                 check=True).stdout
        else:
            out = open(full).read()
        return [d for d in yaml.safe_load_all(out) if d]

    def _apply(self, docs: list[dict], command: str) -> None:
        self.namespaces |= {d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"}
        made = set()
        for d in docs:   # what this apply makes itself (a Job's buckets come with it)
            made |= set(filter(None, d["metadata"].get("annotations", {}).get("panoptic.io/creates-buckets",
                                                                               "").split(",")))
        for d in docs:
            meta = d["metadata"]
            if d["kind"] in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
                continue
            ns = meta.get("namespace")
            where = f"{command}: {d['kind']} {ns}/{meta['name']}"
            if ns not in self.namespaces:
                self.problems.append(f"{where}: namespace {ns} does not exist yet")
            if d["kind"] == "Secret":
                self.secrets[(ns, meta["name"])] = set(d.get("stringData", {})) | set(d.get("data", {}))
            if d["kind"] == "Service":
                self.services.add((ns, meta["name"]))
            pod = d.get("spec", {}).get("template", {}).get("spec")
            if pod:
                self._pod(pod, ns, where, made)
        self.buckets |= made

    def _pod(self, pod: dict, ns: str, where: str, made: set) -> None:
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            if OURS.search(c["image"]) and c["image"] not in self.pushed:
                self.problems.append(f"{where}: image {c['image']} was never pushed (pushed: {sorted(self.pushed)})")
            if "/" not in c["image"].split(":")[0] and not OURS.search(c["image"]) and "panoptic" in c["image"]:
                self.problems.append(f"{where}: image {c['image']} is a name no registry serves")
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    keys = self.secrets.get((ns, ref["name"]))
                    if keys is None or ref["key"] not in keys:
                        self.problems.append(f"{where}: needs Secret {ns}/{ref['name']} key {ref['key']}, which no "
                                             f"earlier step made")
                if e["name"] == "MLFLOW_ARTIFACTS_DESTINATION":
                    bucket = e["value"][len("s3://"):].split("/")[0]
                    if bucket not in self.buckets | made:
                        self.problems.append(f"{where}: needs bucket {bucket}, which no step makes")

    def _panoptic(self, args: list[str], command: str) -> None:
        if args[0] not in ("submit", "schedule", "compile"):
            return
        opts = {}
        i = 1
        sets = {}
        while i < len(args):
            if args[i] == "--set":
                k, _, v = args[i + 1].partition("=")
                sets[k] = v
                i += 2
            elif args[i].startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
                opts[args[i]] = args[i + 1]
                i += 2
            else:
                i += 1
        ns = opts.get("--namespace", "kubeflow")
        secret = opts.get("--s3-secret", "panoptic-s3")
        if (ns, secret) not in self.secrets:
            self.problems.append(f"{command}: the tasks need Secret {ns}/{secret}, which no earlier step made")
        registry, tag = self.env.get("IMAGE_REGISTRY"), self.env.get("IMAGE_TAG")
        for image in (f"{registry}/panoptic-cpu:{tag}", f"{registry}/panoptic-cuda:{tag}"):
            if image not in self.pushed:
                self.problems.append(f"{command}: the tasks run {image}, which was never pushed")
        m = re.fullmatch(r"https?://([\w-]+)\.([\w-]+)(?::\d+)?/?", sets.get("mlflow_uri", ""))
        if not m or (m.group(2), m.group(1)) not in self.services:
            self.problems.append(f"{command}: mlflow_uri {sets.get('mlflow_uri')} is no Service an earlier step made")
        data = sets.get("data_uri", "")
        if data.startswith("s3://") and data[5:].split("/")[0] not in self.buckets:
            self.problems.append(f"{command}: data_uri {data}: no step makes that bucket")
        if "--s3-endpoint" in opts:
            host = re.match(r"https?://([\w-]+)\.([\w-]+)", opts["--s3-endpoint"])
            if not host or (host.group(2), host.group(1)) not in self.services:
                self.problems.append(f"{command}: --s3-endpoint {opts['--s3-endpoint']} is no Service made")
        elif (ns, secret) in self.secrets and ("panoptic", "minio") in self.services:
            self.problems.append(f"{command}: the data is on MinIO (the local overlay) but no --s3-endpoint says so")


def follow(commands: list[str]) -> FreshCluster:
    cluster = FreshCluster()
    for command in commands:
        cluster.run(command)
    return cluster


def test_the_readmes_cluster_steps_work_in_their_order():
    steps = readme_steps()
    assert any(s.startswith("kubectl apply -k infra/overlays/local") for s in steps)
    assert any(s.startswith("panoptic pipeline submit") for s in steps)
    cluster = follow(steps)
    assert cluster.problems == []
    assert {"panoptic-mlflow", "panoptic-data"} <= cluster.buckets


def test_the_old_order_fails_where_a_fresh_cluster_would():
    """The steps as the README gave them before: the Secrets (the template, filled) before the
    namespace they go into; no bucket for MLflow; a submit without the MinIO endpoint."""
    old = ["make images IMAGE_REGISTRY=registry.example.com/ml IMAGE_TAG=0.1.0",
           "docker push registry.example.com/ml/panoptic-cpu:0.1.0",
           "docker push registry.example.com/ml/panoptic-cuda:0.1.0",
           "kubectl apply -f infra/base/secrets.template.yaml",
           "kubectl apply -k infra/overlays/prod",
           f"kubectl -n {PROFILE} create secret generic panoptic-s3 --from-literal=AWS_ACCESS_KEY_ID=k "
           f"--from-literal=AWS_SECRET_ACCESS_KEY=s",
           "kubectl apply -k infra/overlays/profile",
           "export IMAGE_REGISTRY=registry.example.com/ml IMAGE_TAG=0.1.0",
           f"panoptic pipeline submit --host https://kf --namespace {PROFILE} --set data_uri=s3://coco/panoptic "
           f"--set mlflow_uri=http://mlflow.panoptic:5000"]
    problems = "\n".join(follow(old).problems)
    assert "Secret panoptic/panoptic-postgres: namespace panoptic does not exist yet" in problems
    assert "needs bucket panoptic-mlflow, which no step makes" in problems
    assert "data_uri s3://coco/panoptic: no step makes that bucket" in problems
