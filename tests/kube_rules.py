"""What a real cluster does to a request before any controller sees it, for the Kubernetes
stand-in (tests/k8s_standin.py): RBAC, the CRD schemas, and the admission webhooks of the
Kubeflow projects we send resources to. Each rule names the file it copies, at the tag we
support (docs/design.md, "What the stand-ins copy"):

- RBAC: kubernetes ``plugin/pkg/auth/authorizer/rbac/rbac.go`` (rules of the bound Role; a
  rule with resourceNames matches only those names, never a list or a create) and the
  apiserver's Forbidden message (``staging/src/k8s.io/apiserver/pkg/endpoints/handlers/
  responsewriters/errors.go``, ``forbiddenMessage``), v1.33.
- CRD schemas: tests/crd_schema.py.
- Kubeflow Trainer v2.3.0 / v2.2.1: ``pkg/webhooks/trainjob_webhook.go`` (the runtime must be
  known), ``pkg/runtime/framework/plugins/jobset/jobset.go`` (``runtimePatches[].manager`` a
  domain-prefixed path through apimachinery ``validation.IsDomainPrefixedPath``; patched
  replicated jobs and containers must exist in the runtime; no env on the node container),
  ``pkg/runtime/framework/plugins/torch/torch.go`` (no torchrun-reserved env in the trainer).
- Training Operator v1.9.4: ``pkg/webhooks/pytorch/pytorchjob_webhook.go``.
- Katib v0.19.0: ``pkg/webhook/v1beta1/experiment/validation_webhook.go`` (the namespace label)
  and ``pkg/webhook/v1beta1/experiment/validator/validator.go``.
"""

from __future__ import annotations

import os
import re

import yaml

from tests import crd_schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROLE_FILE = os.path.join(ROOT, "infra", "identity", "rbac.yaml")


class Refused(Exception):
    """An API request refused before storage: ``code``, ``reason`` and the server's message."""

    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


# -- RBAC ---------------------------------------------------------------------------------------

def role_rules(path: str = ROLE_FILE, name: str = "panoptic-pipeline") -> list[dict]:
    """The rules of Role ``name`` in a manifest file (ours: infra/identity/rbac.yaml)."""
    with open(path) as f:
        return next(d for d in yaml.safe_load_all(f) if d and d["kind"] == "Role" and d["metadata"]["name"] == name)[
            "rules"]


def verb_of(method: str, name: str | None, query: dict) -> str:
    """The RBAC verb of a request (kubernetes ``apiserver/pkg/endpoints/request/requestinfo.go``)."""
    if method == "GET":
        if query.get("watch", [""])[0].lower() in ("true", "1"):
            return "watch"
        return "get" if name else "list"
    return {"POST": "create", "PUT": "update", "PATCH": "patch",
            "DELETE": "delete" if name else "deletecollection"}[method]


class Authorizer:
    """A service account bound to one Role's rules."""

    def __init__(self, rules: list[dict], namespace_of_account: str | None = None,
                 account: str = "panoptic-pipeline"):
        self.rules, self.account, self.home = rules, account, namespace_of_account

    def check(self, verb: str, group: str, resource: str, namespace: str, name: str | None) -> None:
        for rule in self.rules:
            if not _matches(rule.get("apiGroups", []), group) or not _matches(rule.get("resources", []), resource):
                continue
            if not _matches(rule.get("verbs", []), verb):
                continue
            names = rule.get("resourceNames")
            if names and (name is None or name not in names):
                continue
            return
        user = f"system:serviceaccount:{self.home or namespace}:{self.account}"
        plain, _, sub = resource.partition("/")
        what = f"{plain}.{group}" if group else plain
        subject = f'{what} "{name}"' if name else what
        scope = f' in API group "{group}" in the namespace "{namespace}"'
        raise Refused(403, "Forbidden", f'{subject} is forbidden: User "{user}" cannot {verb} resource "{plain}"'
                      + (f' subresource "{sub}"' if sub else "") + scope)


def _matches(allowed: list[str], value: str) -> bool:
    return "*" in allowed or value in allowed


# -- admission: Kubeflow Trainer ------------------------------------------------------------------

TORCH_RESERVED_ENV = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}
_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN = re.compile(rf"{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*")
_HTTP_PATH = re.compile(r"[A-Za-z0-9/\-._~%!$&'()*+,;=:]+")


def domain_prefixed_path_errors(path: str, value: str) -> list[str]:
    """apimachinery ``pkg/util/validation`` ``IsDomainPrefixedPath``."""
    if not value:
        return [f"{path}: Required value"]
    host, slash, rest = value.partition("/")
    if not slash or not host or not rest:
        return [f'{path}: Invalid value: "{value}": must be a domain-prefixed path (such as "acme.io/foo")']
    errs = []
    if len(host) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(host):
        errs.append(f'{path}: Invalid value: "{host}": a lowercase RFC 1123 subdomain must consist of lower case '
                    f"alphanumeric characters, '-' or '.'")
    if not _HTTP_PATH.fullmatch(rest):
        errs.append(f'{path}: Invalid value: "{rest}": must be a valid HTTP path')
    return errs


def runtime_containers(runtime: dict) -> dict[str, set[str]]:
    """Replicated job name -> its container names, of a ClusterTrainingRuntime manifest."""
    out = {}
    for rjob in runtime["spec"]["template"]["spec"]["replicatedJobs"]:
        pod = rjob["template"]["spec"]["template"]["spec"]
        out[rjob["name"]] = {c["name"] for c in pod.get("initContainers", []) + pod.get("containers", [])}
    return out


def trainjob_admission(job: dict, runtimes: dict[str, dict]) -> None:
    """Trainer's validating webhook for a TrainJob create (see the module docstring)."""
    spec = job["spec"]
    ref = spec.get("runtimeRef", {})
    runtime = runtimes.get(ref.get("name")) if ref.get("kind", "ClusterTrainingRuntime") == \
        "ClusterTrainingRuntime" else None
    if runtime is None:
        raise _denied("validator.trainjob.trainer.kubeflow.org",
                      f"unsupported runtime: {ref.get('kind', 'ClusterTrainingRuntime')}.{ref.get('apiGroup')}/"
                      f"{ref.get('name')}")
    errs = []
    reserved = sorted({e["name"] for e in spec.get("trainer", {}).get("env", [])} & TORCH_RESERVED_ENV)
    if reserved and "torch" in runtime["spec"].get("mlPolicy", {}):
        errs.append(f"spec.trainer.env: Invalid value: must not have reserved envs, invalid envs configured: "
                    f"{reserved}")
    containers = runtime_containers(runtime)
    for i, patch in enumerate(spec.get("runtimePatches", [])):
        errs += domain_prefixed_path_errors(f"spec.runtimePatches[{i}].manager", patch.get("manager", ""))
        for rjob in (((patch.get("trainingRuntimeSpec") or {}).get("template") or {}).get("spec") or {}).get(
                "replicatedJobs", []):
            names = containers.get(rjob["name"])
            if names is None:
                errs.append("spec.runtimePatches: Invalid value: must not have replicated job that doesn't exist in "
                            "the runtime job template")
                continue
            pod = (((rjob.get("template") or {}).get("spec") or {}).get("template") or {}).get("spec") or {}
            for c in pod.get("initContainers", []):
                if c["name"] not in names:
                    errs.append(f"spec.runtimePatches: Invalid value: must not have initContainer that doesn't exist "
                                f"in the runtime job {rjob['name']}")
            for c in pod.get("containers", []):
                if c["name"] not in names:
                    errs.append(f"spec.runtimePatches: Invalid value: must not have container that doesn't exist in "
                                f"the runtime job {rjob['name']}")
                elif c.get("env") and c["name"] in ("dataset-initializer", "model-initializer", "node"):
                    errs.append("spec.runtimePatches: Invalid value: must not have envs for the dataset-initializer, "
                                "model-initializer, node containers")
    if errs:
        raise _denied("validator.trainjob.trainer.kubeflow.org", "[" + ", ".join(errs) + "]")


# -- admission: Training Operator -----------------------------------------------------------------

_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def pytorchjob_admission(job: dict) -> None:
    errs = []
    name = job["metadata"]["name"]
    if len(name) > 63 or not _DNS1035.fullmatch(name):
        errs.append(f'metadata.name: Invalid value: "{name}": should match: a DNS-1035 label')
    specs = job["spec"].get("pytorchReplicaSpecs")
    if not specs:
        errs.append("spec.pytorchReplicaSpecs: Required value: must be required")
    for rtype, rspec in (specs or {}).items():
        path = f"spec.pytorchReplicaSpecs[{rtype}]"
        if rtype not in ("Master", "Worker"):
            errs.append(f'{path}: Unsupported value: "{rtype}": supported values: "Master", "Worker"')
        containers = ((rspec or {}).get("template") or {}).get("spec", {}).get("containers", [])
        if not containers:
            errs.append(f"{path}.template.spec.containers: Required value: must be specified")
        for i, c in enumerate(containers):
            if not c.get("image"):
                errs.append(f"{path}.template.spec.containers[{i}].image: Required value: must be required")
        if not any(c.get("name") == "pytorch" for c in containers):
            errs.append(f"{path}.template.spec.containers: Required value: must have at least one container with "
                        f"name pytorch")
        replicas = (rspec or {}).get("replicas")
        if rtype == "Master" and replicas != 1:
            errs.append(f"{path}.replicas: Forbidden: must be 1")
        elif replicas is not None and replicas < 1:
            errs.append(f"{path}.replicas: Forbidden: must be at least 1")
    if errs:
        raise _denied("validator.pytorchjob.training-operator.kubeflow.org", "[" + ", ".join(errs) + "]")


# -- admission: Katib ---------------------------------------------------------------------------

KATIB_NAMESPACE_LABEL = ("katib.kubeflow.org/metrics-collector-injection", "enabled")
# the suggestion and early-stopping algorithms of katib-config.yaml (manifests/v1beta1/installs/katib-standalone)
KATIB_ALGORITHMS = {"random", "grid", "hyperband", "bayesianoptimization", "tpe", "multivariate-tpe", "cmaes",
                    "sobol", "enas", "darts", "pbt"}
KATIB_EARLY_STOPPING = {"medianstop"}
_TRIAL_PARAM = re.compile(r"\$\{trialParameters\..+?\}")
_TRIAL_META = re.compile(r"\$\{trialSpec\.(.+?)\}")
_KATIB_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def experiment_admission(exp: dict, namespace: str, namespace_labels: dict) -> None:
    """Katib's experiment validating webhook: the namespace label first, then the validator."""
    key, value = KATIB_NAMESPACE_LABEL
    hook = "validator.experiment.katib.kubeflow.org"
    if namespace_labels.get(key) != value:
        raise _denied(hook, f'Cannot create the Experiment "{exp["metadata"]["name"]}" in namespace "{namespace}": '
                            f'the namespace lacks label "{key}: {value}"')
    errs = validate_experiment(exp)
    if errs:
        raise _denied(hook, "[" + ", ".join(errs) + "]")


def validate_experiment(exp: dict) -> list[str]:
    """Katib ``validator.go`` ``ValidateExperiment`` for a new Experiment (the rules our Experiments
    can meet; NAS and ConfigMap trial sources are not ours)."""
    errs = []
    name, spec = exp["metadata"]["name"], exp["spec"]
    if len(name) > 40 or not _KATIB_NAME.match(name):   # validator.go anchors the start only
        errs.append(f'metadata.name: Invalid value: "{name}": name must consist of lower case alphanumeric '
                    f"characters or '-', start with an alphabetic character, and end with an alphanumeric "
                    f"character (...) and may not be longer than 40 characters.")
    max_failed, max_trials, parallel = (spec.get("maxFailedTrialCount"), spec.get("maxTrialCount"),
                                        spec.get("parallelTrialCount"))
    if max_failed is not None and max_failed < 0:
        errs.append(f"spec.maxFailedTrialCount: Invalid value: {max_failed}: should not be less than 0")
    if max_trials is not None and max_trials <= 0:
        errs.append(f"spec.maxTrialCount: Invalid value: {max_trials}: must be greater than 0")
    if parallel is not None and parallel <= 0:
        errs.append(f"spec.parallelTrialCount: Invalid value: {parallel}: must be greater than 0")
    if max_trials is not None and max_failed is not None and max_failed > max_trials:
        errs.append(f"spec.maxFailedTrialCount: Invalid value: {max_failed}: should be less than or equal to "
                    f"spec.maxTrialCount")
    if max_trials is not None and parallel is not None and parallel > max_trials:
        errs.append(f"spec.parallelTrialCount: Invalid value: {parallel}: should be less than or equal to "
                    f"spec.maxTrialCount")
    objective = spec.get("objective")
    if not objective:
        errs.append("spec.objective: Required value: must be specified")
    else:
        if objective.get("type") not in ("maximize", "minimize"):
            errs.append(f'spec.objective.type: Invalid value: "{objective.get("type")}": type must be minimize or '
                        f"maximize")
        if not objective.get("objectiveMetricName"):
            errs.append("spec.objective.objectiveMetricName: Required value: must be specified")
        if objective.get("objectiveMetricName") in objective.get("additionalMetricNames", []):
            errs.append("spec.objective.additionalMetricNames: Invalid value: should not contain objective metric")
    algorithm = (spec.get("algorithm") or {}).get("algorithmName")
    if not algorithm:
        errs.append("spec.algorithm.algorithmName: Required value: must be specified")
    elif algorithm not in KATIB_ALGORITHMS:
        errs.append(f'spec.algorithm.algorithmName: Invalid value: "{algorithm}": unable to get Suggestion config '
                    f"data for algorithm {algorithm}")
    stopping = spec.get("earlyStopping")
    if stopping is not None and stopping.get("algorithmName") not in KATIB_EARLY_STOPPING:
        errs.append(f'spec.earlyStopping.algorithmName: Invalid value: "{stopping.get("algorithmName")}": unable to '
                    f"get EarlyStopping config data")
    params = spec.get("parameters") or []
    if not params:
        errs.append("spec: Required value: spec.parameters or spec.nasConfig must be specified")
    for i, p in enumerate(params):
        path = f"spec.parameters[{i}]"
        kind, fs = p.get("parameterType"), p.get("feasibleSpace")
        if kind not in ("double", "int", "discrete", "categorical"):
            errs.append(f'{path}.parameterType: Invalid value: "{kind}": parameterType must be one of int, double, '
                        f"categorical or discrete")
        if fs is None:
            errs.append(f"{path}.feasibleSpace: Required value: feasibleSpace must be specified")
            continue
        if fs.get("distribution", "") not in ("", "uniform", "logUniform", "normal", "logNormal"):
            errs.append(f"{path}.feasibleSpace.distribution: Invalid value: must be one of uniform, logUniform, "
                        f"normal or logNormal")
        if kind in ("double", "int"):
            if fs.get("list"):
                errs.append(f"{path}.feasibleSpace.list: Invalid value: feasibleSpace.list is not supported for "
                            f"parameterType {kind}")
            if not fs.get("max") and not fs.get("min"):
                errs.append(f"{path}.feasibleSpace.max: Required value: feasibleSpace.max or feasibleSpace.min must "
                            f"be specified for parameterType {kind}")
        elif fs.get("max") or fs.get("min") or fs.get("step"):
            errs.append(f"{path}.feasibleSpace: Invalid value: feasibleSpace .max, .min and .step are not supported "
                        f"for parameterType {kind}")
    errs += _validate_trial_template(spec, {p.get("name") for p in params})
    collector = ((spec.get("metricsCollectorSpec") or {}).get("collector") or {}).get("kind", "StdOut")
    if collector not in ("StdOut", "File", "TensorFlowEvent", "PrometheusMetric", "Custom", "None", "Push"):
        errs.append(f'spec.metricsCollectorSpec.collector.kind: Invalid value: "{collector}": invalid metrics '
                    f"collector kind")
    return errs


def _validate_trial_template(spec: dict, parameter_names: set) -> list[str]:
    import json

    tt = spec.get("trialTemplate")
    path = "spec.trialTemplate"
    if not tt:
        return [f"{path}: Required value: must be specified"]
    errs = []
    if not tt.get("primaryContainerName"):
        errs.append(f"{path}.primaryContainerName: Required value: must be specified")
    if not tt.get("successCondition") or not tt.get("failureCondition"):
        errs.append(f"{path}: Required value: successCondition and failureCondition must be specified")
    if not tt.get("trialParameters"):
        return errs + [f"{path}.trialParameters: Required value: must be specified"]
    if not tt.get("trialSpec"):
        return errs + [f"{path}.TrialSource: Required value: spec.trialTemplate.trialSpec or "
                       f"spec.trialTemplate.configMap must be specified"]
    text = json.dumps(tt["trialSpec"])
    seen = set()
    for i, p in enumerate(tt["trialParameters"]):
        ppath = f"{path}.trialParameters[{i}]"
        if p["name"] in seen:
            errs.append(f'{ppath}.name: Invalid value: "{p["name"]}": parameter name must be unique')
        seen.add(p["name"])
        if "{" in p["name"] or "}" in p["name"]:
            errs.append(f'{ppath}.name: Invalid value: "{p["name"]}": parameter name must not contain "{{" or "}}"')
        ref = p.get("reference", "")
        meta = _TRIAL_META.fullmatch(ref)
        if not meta and ref not in parameter_names:
            errs.append(f'{ppath}.reference: Invalid value: "{ref}": parameter reference must be in experiment '
                        f"parameter names or trial metadata")
        if meta and meta.group(1) not in ("Name", "Namespace", "Kind", "APIVersion") and not re.fullmatch(
                r"(Labels|Annotations)\[.+\]", meta.group(1)):
            errs.append(f'{ppath}.reference: Invalid value: "{ref}": illegal reference of trial metadata')
        if "${trialParameters." + p["name"] + "}" not in text:
            errs.append(f'{ppath}.name: Invalid value: "{p["name"]}": parameter must exist in '
                        f"spec.trialTemplate.trialSpec")
    if len(_TRIAL_PARAM.findall(text)) and {m[len("${trialParameters."):-1] for m in _TRIAL_PARAM.findall(text)} - \
            seen:
        errs.append(f"{path}: Invalid value: parameters in spec.trialTemplate.trialSpec must be in "
                    f"spec.trialTemplate.trialParameters")
    job = tt["trialSpec"]
    if job.get("metadata", {}).get("name") or job.get("metadata", {}).get("namespace"):
        errs.append(f"{path}: Invalid value: metadata.name and metadata.namespace in spec.trialTemplate must be "
                    f"omitted")
    if not job.get("apiVersion") or not job.get("kind"):
        errs.append(f"{path}: Required value: APIVersion and Kind in spec.trialTemplate must be specified")
    return errs


def _denied(hook: str, message: str) -> Refused:
    """As the API server words a validating webhook's refusal."""
    return Refused(400, "BadRequest", f'admission webhook "{hook}" denied the request: {message}')


# -- the cluster we claim to support ------------------------------------------------------------

def trainer_runtime(tag: str) -> dict:
    with open(os.path.join(crd_schema.FIXTURES, f"trainer-{tag}.torch_distributed.yaml")) as f:
        return next(d for d in yaml.safe_load_all(f) if d)


class ApiRules:
    """The CRDs, webhooks and namespaces of one cluster (default: the versions we support, newest)."""

    def __init__(self, *, trainer: str = "v2.3.0", namespaces: dict | None = None, strict_default: bool = False):
        """``trainer``: the Kubeflow Trainer tag whose TrainJob CRD and torch runtime are installed
        (v2.1.0 for an unsupported one); ``namespaces``: name -> labels (None: every namespace a
        Kubeflow profile's, labelled for Katib as the profile controller labels it);
        ``strict_default``: a server that validates strictly even when the client does not ask."""
        files = {**crd_schema.TRAINJOB_CRDS, **crd_schema.TRAINJOB_CRD_UNSUPPORTED}
        self.schemas = {}
        for file in (crd_schema.PYTORCHJOB_CRD, files[trainer], crd_schema.KATIB_EXPERIMENT_CRD):
            group, version, plural, _ = crd_schema.resource_of(file)
            self.schemas[(group, version, plural)] = crd_schema.schema_of(file, version)
        self.runtimes = {"torch-distributed": trainer_runtime(trainer)}
        self.namespaces = namespaces
        self.strict_default = strict_default
        self.trainer = trainer

    def namespace_labels(self, namespace: str) -> dict:
        if self.namespaces is None:
            return dict([KATIB_NAMESPACE_LABEL])
        return self.namespaces.get(namespace, {})

    def admit(self, group: str, version: str, plural: str, namespace: str, obj: dict, query: dict) -> dict:
        """The object as stored, or ``Refused`` as the API server refuses it: the schema (strict
        field validation when asked, pruning otherwise), then the project's webhook."""
        schema = self.schemas.get((group, version, plural))
        if schema is not None:
            errs = crd_schema.errors(obj, schema)
            unknown = [e for e in errs if e.endswith(": unknown field")]
            invalid = [e for e in errs if not e.endswith(": unknown field")]
            strict = query.get("fieldValidation", [""])[0] == "Strict" or self.strict_default
            if unknown and strict:
                fields = ", ".join(f'unknown field "{e.split(": ")[0]}"' for e in unknown)
                raise Refused(400, "BadRequest", f'{obj.get("kind")} in version "{version}" cannot be handled as a '
                                                 f"{obj.get('kind')}: strict decoding error: {fields}")
            if invalid:
                raise Refused(422, "Invalid", f'{obj.get("kind")}.{group} "{obj["metadata"]["name"]}" is invalid: '
                                              + "; ".join(invalid))
            obj = crd_schema.prune(obj, schema)
        kind = obj.get("kind")
        if kind == "TrainJob":
            trainjob_admission(obj, self.runtimes)
        elif kind == "PyTorchJob":
            pytorchjob_admission(obj)
        elif kind == "Experiment" and group == "kubeflow.org":
            experiment_admission(obj, namespace, self.namespace_labels(namespace))
        return obj
