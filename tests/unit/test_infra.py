"""Containers and cluster manifests, checked statically (no Docker engine or cluster here)."""

import glob
import os
import re
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from components.train.launcher import PyTorchJobSpec, TrainingJobFailed, render_pytorchjob, run_pytorchjob

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
K8S_VERSION = "1.37.0"
DOCKERFILES = sorted(glob.glob(os.path.join(ROOT, "containers", "Dockerfile.*")))


def _patches() -> set[str]:
    out = set()
    for k in glob.glob(os.path.join(ROOT, "infra", "**", "kustomization.yaml"), recursive=True):
        for p in yaml.safe_load(open(k)).get("patches", []):
            out.add(os.path.normpath(os.path.join(os.path.dirname(k), p["path"])))
    return out


MANIFESTS = sorted(f for f in glob.glob(os.path.join(ROOT, "infra", "**", "*.yaml"), recursive=True)
                   if not f.endswith("kustomization.yaml") and os.path.normpath(f) not in _patches())


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=os.path.basename)
def test_dockerfiles_pass_hadolint_and_run_as_non_root(dockerfile):
    hadolint = os.path.join(os.path.dirname(sys.executable), "hadolint")
    r = subprocess.run([hadolint, dockerfile], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    users = re.findall(r"^USER\s+(\S+)", open(dockerfile).read(), re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "ENTRYPOINT [\"python\", \"-m\"]" in open(dockerfile).read()
    assert "HEALTHCHECK" not in open(dockerfile).read()


def test_two_images():
    assert [os.path.basename(d) for d in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.cuda"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_manifests_validate(path):
    for doc in yaml.safe_load_all(open(path)):
        if doc["kind"] == "PyTorchJob":
            check_pytorchjob(doc)
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def check_pytorchjob(job: dict) -> None:
    """The PyTorchJob CRD's required fields (kubeflow.org/v1), and each pod template against the
    Kubernetes PodTemplateSpec schema."""
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob" and job["metadata"]["name"]
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert set(specs) <= {"Master", "Worker"} and specs["Master"]["replicas"] == 1
    for role, spec in specs.items():
        assert isinstance(spec["replicas"], int) and spec["replicas"] >= 1
        assert spec["restartPolicy"] in ("Always", "OnFailure", "Never", "ExitCode")
        containers = spec["template"]["spec"]["containers"]
        assert any(c["name"] == "pytorch" for c in containers), "the operator needs a container named pytorch"
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"},
                                      "template": spec["template"]}, K8S_VERSION, strict=True)
        assert spec["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_launcher_renders_a_valid_job():
    job = render_pytorchjob(PyTorchJobSpec(image="reg/panoptic-cuda:1", nodes=4, gpus_per_node=8,
                                           shards="s3://d/shards", output="s3://d/run", iterations=1000,
                                           overrides="solver.amp=bf16;solver.channels_last=true",
                                           mlflow_uri="http://mlflow:5000", name="j1", namespace="panoptic"))
    check_pytorchjob(job)
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 3
    c = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert c["command"][:6] == ["torchrun", "--nnodes=4", "--nproc_per_node=8", "--node_rank=$(RANK)",
                                "--master_addr=$(MASTER_ADDR)", "--master_port=$(MASTER_PORT)"]
    assert "solver.amp=bf16" in c["command"] and "solver.max_iter=1000" in c["command"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
    with pytest.raises(ValueError, match="nodes >= 2"):
        render_pytorchjob(PyTorchJobSpec(image="x", nodes=1, gpus_per_node=1, shards="a", output="b"))


class FakeCustomObjects:
    """The two CustomObjectsApi calls the launcher makes, answering from a script of states."""

    def __init__(self, states):
        self.created, self.states = [], list(states)

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.created.append((group, version, namespace, plural, body))

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        state, message = self.states.pop(0)
        return {"status": {"conditions": [{"type": state, "status": "True", "message": message}]}}


def test_launcher_waits_and_fails_clearly():
    spec = PyTorchJobSpec(image="x", nodes=2, gpus_per_node=1, shards="s3://a", output="s3://b", name="j2",
                          namespace="ns")
    ok = FakeCustomObjects([("Created", ""), ("Running", ""), ("Succeeded", "done")])
    run_pytorchjob(spec, poll_s=0, api=ok)
    assert ok.created[0][:4] == ("kubeflow.org", "v1", "ns", "pytorchjobs")
    bad = FakeCustomObjects([("Running", ""), ("Failed", "Worker 0 exited with code 1")])
    with pytest.raises(TrainingJobFailed, match=r"ns/j2 failed: Worker 0 exited with code 1 .*kubectl -n ns logs"):
        run_pytorchjob(spec, poll_s=0, api=bad)


SECRETISH = re.compile(r"(AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----|aws_secret_access_key\s*=\s*\S+)", re.I)


def test_no_secret_values_anywhere():
    files = [f for pattern in ("infra/**/*.yaml", "containers/*", "pipeline/*.py", "components/**/*.py", "Makefile",
                               "components/model/configs/*.yaml")
             for f in glob.glob(os.path.join(ROOT, pattern), recursive=True)]
    for f in files:
        text = open(f).read()
        assert not SECRETISH.search(text), f
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(open(path)):
            if doc["kind"] == "Secret":
                assert all(v == "" for v in doc.get("stringData", {}).values()), path
                assert not doc.get("data"), path
            for env in _envs(doc):
                if re.search("PASSWORD|SECRET|TOKEN|KEY", env["name"]):
                    assert "value" not in env, f"{path}: {env['name']} must come from a Secret"


def _envs(node):
    if isinstance(node, dict):
        if "env" in node and isinstance(node["env"], list):
            yield from node["env"]
        for v in node.values():
            yield from _envs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _envs(v)


def test_kustomizations_reference_existing_files():
    for k in glob.glob(os.path.join(ROOT, "infra", "**", "kustomization.yaml"), recursive=True):
        doc = yaml.safe_load(open(k))
        for r in doc.get("resources", []) + [p["path"] for p in doc.get("patches", [])]:
            assert os.path.exists(os.path.join(os.path.dirname(k), r)), f"{k}: {r}"
