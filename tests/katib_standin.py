"""Katib as its source says it runs a trial, for the Kubernetes stand-in (tests/k8s_standin.py).

Copied from kubeflow/katib at v0.19.0:
- ``trial_job``: the trial's Job from the Experiment's template, by string replacement of
  ``${trialParameters.NAME}`` in the template's JSON with the assignment's text or the trial's
  metadata (``pkg/controller.v1beta1/experiment/manifest/generator.go``, ``applyParameters``).
- ``wrap_worker_container``: the pod webhook's mutation of the primary container when the
  metrics collector is StdOut: ``sh -c "<command and args joined by single spaces>
  1>METRICS 2>&1 && echo completed > DIR/$$$$.pid"``, unquoted (``pkg/webhook/v1beta1/pod/
  utils.go``, ``wrapWorkerContainer``); an argv that already starts ``sh -c`` keeps it.
- ``parse_metrics``: the StdOut/File collector's default filter
  ``([\\w|-]+)\\s*=\\s*([+-]?\\d*(\\.\\d+)?([Ee][+-]?\\d+)?)`` (``pkg/metricscollector/v1beta1/
  common/const.go``), latest value per name.
- Kubernetes' ``$(VAR)`` / ``$$`` expansion of a container's command and args
  (kubernetes ``third_party/forked/golang/expansion/expand.go``).
- ``metric_strategies`` / ``objective_value``: the objective's default strategy (max for
  maximize, min for minimize, latest otherwise; the additional metrics' likewise) and the trial
  value the optimal-trial search compares (``pkg/apis/controller/experiments/v1beta1/
  experiment_defaults.go``, ``setDefaultObjective``; ``pkg/controller.v1beta1/experiment/util/
  status_util.go``, ``getObjectiveMetricValue``).
- ``algorithm_settings_problem`` / ``early_stopping_problem``: what the suggestion services
  answer ``ValidateAlgorithmSettings`` / ``ValidateEarlyStoppingSettings`` with
  (``pkg/suggestion/v1beta1/hyperopt/service.py`` for random and tpe, ``pkg/suggestion/v1beta1/
  skopt/service.py`` for bayesianoptimization, ``pkg/earlystopping/v1beta1/medianstop/
  service.py``), which fails the Experiment before any trial (``pkg/controller.v1beta1/
  suggestion/suggestion_controller.go``: "Validation failed: ...").

What is ours, not Katib's: the suggestion (trial i takes the i-th categorical value, or a point
spaced evenly across a range, whatever the algorithm), no trial is ever stopped early (median
stopping's settings are validated, its rule is not played), and the trials run one after another
as processes of this machine (the container's command through ``sh``, its env, the repository as working folder),
with the metrics file in a temporary folder instead of ``/var/log/katib``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import uuid

from tests.k8s_standin import Controller

METRICS_FILTER = re.compile(r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trial_job(experiment: dict, trial_name: str, namespace: str, assignment: dict[str, str]) -> dict:
    """The trial's Job, as Katib's manifest generator renders it."""
    tt = experiment["spec"]["trialTemplate"]
    text = json.dumps(tt["trialSpec"])
    values = {}
    for p in tt["trialParameters"]:
        meta = re.fullmatch(r"\$\{trialSpec\.(.+?)\}", p["reference"])
        if meta is None:
            values[p["name"]] = assignment[p["reference"]]
        else:
            values[p["name"]] = {"Name": trial_name, "Namespace": namespace, "Kind": tt["trialSpec"]["kind"],
                                 "APIVersion": tt["trialSpec"]["apiVersion"]}[meta.group(1)]
    for name, value in values.items():
        text = text.replace("${trialParameters.%s}" % name, value)
    job = json.loads(text)
    job.setdefault("metadata", {}).update(name=trial_name, namespace=namespace)
    return job


def wrap_worker_container(pod_spec: dict, primary: str, metrics_file: str, early_stopping: bool = False) -> dict:
    """The pod webhook's mutation of the primary container (StdOut collector)."""
    c = next(c for c in pod_spec["containers"] if c["name"] == primary)
    args = list(c.get("command", [])) + list(c.get("args", []))
    command = ["sh", "-c"]
    if args[0] in ("sh", "bash") and args[1] == "-c":
        command, args = args[:2], args[2:]
    args.append(f"1>{metrics_file} 2>&1")
    folder = os.path.dirname(metrics_file)
    if early_stopping:
        args += ["||", f"if test -f {folder}/$$$$.pid && [ $(head -n 1 {folder}/$$.pid) = early-stopped ]; then echo "
                       f"Training Container was Early Stopped; else echo Training Container was Failed; exit 1; fi"]
    args += ["&&", f"echo completed > {folder}/$$$$.pid"]
    c["command"], c["args"] = command, [" ".join(args)]
    return pod_spec


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' expansion of a command or arg: ``$$`` is ``$``, ``$(VAR)`` a defined variable."""
    return re.sub(r"\$\$|\$\((\w+)\)", lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
                  text)


def parse_metrics(text: str, names: list[str]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for line in text.splitlines():
        for m in METRICS_FILTER.finditer(line):
            if m.group(1) in names and m.group(2) not in ("", "+", "-"):
                out.setdefault(m.group(1), []).append(float(m.group(2)))
    return out


def metric_strategies(objective: dict) -> dict[str, str]:
    """{metric: max | min | latest}: the Experiment's own, and Katib's defaults for the rest."""
    default = {"maximize": "max", "minimize": "min"}.get(objective.get("type"), "latest")
    out = {s["name"]: s["value"] for s in objective.get("metricStrategies") or []}
    for name in (objective["objectiveMetricName"], *objective.get("additionalMetricNames", [])):
        out.setdefault(name, default)
    return out


def objective_value(values: list[float], strategy: str) -> float:
    return {"max": max, "min": min}.get(strategy, lambda v: v[-1])(values)


_SETTING_RULES = {   # the suggestion services' ValidateAlgorithmSettings, setting by setting
    "random": {"random_state": (int, lambda v: v >= 0, "random_state should be great or equal than zero")},
    "tpe": {"gamma": (float, lambda v: 1 > v > 0, "gamma should be in the range of (0, 1)"),
            "prior_weight": (float, lambda v: v > 0, "prior_weight should be great than zero"),
            "n_EI_candidates": (int, lambda v: v > 0, "n_EI_candidates should be great than zero"),
            "random_state": (int, lambda v: v >= 0, "random_state should be great or equal than zero")},
    "bayesianoptimization": {
        "base_estimator": (str, lambda v: v in ("GP", "RF", "ET", "GBRT"), None),
        "n_initial_points": (int, lambda v: v >= 0, "n_initial_points should be great or equal than zero"),
        "acq_func": (str, lambda v: v in ("gp_hedge", "LCB", "EI", "PI", "EIps", "PIps"), None),
        "acq_optimizer": (str, lambda v: v in ("auto", "sampling", "lbfgs"), None),
        "random_state": (int, lambda v: v >= 0, "random_state should be great or equal than zero")},
    "medianstop": {"min_trials_required": (int, lambda v: v > 0, "min_trials_required must be greater than zero (>0)"),
                   "start_step": (int, lambda v: v >= 1, "start_step must be greater or equal than one (>=1)")},
}


def _settings_problem(algorithm: str, settings: list[dict]) -> str | None:
    rules = _SETTING_RULES.get(algorithm)
    if rules is None:
        return None   # grid and the rest: services whose validation our Experiments never meet
    for setting in settings or []:
        name, value = setting["name"], setting["value"]
        if name not in rules:
            return f"unknown setting {name} for algorithm {algorithm}"
        kind, ok, message = rules[name]
        try:
            if not ok(kind(value)):
                return message or f"{name} {value} is not supported in Bayesian optimization"
        except ValueError as e:
            return f"failed to validate {name}({value}): {e}"
    return None


def algorithm_settings_problem(algorithm: dict) -> str | None:
    return _settings_problem(algorithm["algorithmName"], algorithm.get("algorithmSettings", []))


def early_stopping_problem(early_stopping: dict) -> str | None:
    return _settings_problem(early_stopping["algorithmName"], early_stopping.get("algorithmSettings", []))


def suggest(parameters: list[dict], i: int, n: int) -> dict[str, str]:
    """Ours (see the module docstring): the i-th of n trials' values, as Katib hands them, text."""
    out = {}
    for p in parameters:
        fs = p["feasibleSpace"]
        if "list" in fs:
            out[p["name"]] = fs["list"][i % len(fs["list"])]
            continue
        lo, hi = float(fs["min"]), float(fs["max"])
        x = lo + (hi - lo) * (i / max(n - 1, 1))
        out[p["name"]] = str(int(round(x))) if p["parameterType"] == "int" else f"{x:.6g}"
    return out


class KatibController(Controller):
    """Runs a created Experiment's trials (see the module docstring); answers status as Katib's
    experiment controller writes it (conditions, trial counts, ``currentOptimalTrial``)."""

    def __init__(self, secrets: dict | None = None, timeout_s: float = 1800):
        self.secrets, self.timeout_s = secrets or {}, timeout_s
        self.experiments: dict[str, dict] = {}
        self.trials: list[dict] = []      # what each trial ran: name, command, args, returncode, metrics
        self.threads: list[threading.Thread] = []

    # the controller interface of KubeStandIn
    def created(self, obj):
        state = {"obj": obj, "done": False, "failed": 0, "succeeded": 0, "best": None, "message": "",
                 "invalid": False, "succeeded_names": []}
        self.experiments[obj["metadata"]["uid"]] = state
        t = threading.Thread(target=self._run, args=(state,), daemon=True)
        self.threads.append(t)
        t.start()

    def status(self, obj):
        state = self.experiments[obj["metadata"]["uid"]]
        spec = obj["spec"]
        status = {"trials": state["succeeded"] + state["failed"], "trialsSucceeded": state["succeeded"],
                  "trialsFailed": state["failed"]}
        if state["best"]:
            status["currentOptimalTrial"] = state["best"]
        status["succeededTrialList"] = list(state["succeeded_names"])
        if not state["done"]:
            kind = "Running"
        elif state["invalid"] or state["failed"] > spec.get("maxFailedTrialCount", 0):
            kind = "Failed"
        else:
            kind = "Succeeded"
        status["conditions"] = [{"type": kind, "status": "True", "message": state["message"]}]
        return status

    def close(self):
        for t in self.threads:
            t.join(timeout=1)

    # running the trials
    def _run(self, state):
        exp = state["obj"]
        spec, ns = exp["spec"], exp["metadata"]["namespace"]
        objective = spec["objective"]
        names = [objective["objectiveMetricName"], *objective.get("additionalMetricNames", [])]
        n = spec["maxTrialCount"]
        best_value = None
        strategies = metric_strategies(objective)
        problem = algorithm_settings_problem(spec["algorithm"])
        problem = (f"ValidateAlgorithmSettings Error: {problem}" if problem else
                   "ValidateEarlyStoppingSettings Error: " + early_stopping_problem(spec["earlyStopping"])
                   if spec.get("earlyStopping") and early_stopping_problem(spec["earlyStopping"]) else None)
        if problem:   # the suggestion is marked failed before any trial; so is the Experiment
            state.update(done=True, invalid=True, message=f"Validation failed: {problem}")
            return
        for i in range(n):
            if state["failed"] > spec.get("maxFailedTrialCount", 0):
                break
            trial = f"{exp['metadata']['name']}-{uuid.uuid4().hex[:8]}"
            assignment = suggest(spec["parameters"], i, n)
            metrics, code = self._trial(exp, trial, ns, assignment, names)
            if code != 0 or objective["objectiveMetricName"] not in metrics:
                state["failed"] += 1
                state["message"] = f"trial {trial} failed (exit code {code})"
                continue
            state["succeeded"] += 1
            state["succeeded_names"].append(trial)
            value = objective_value(metrics[objective["objectiveMetricName"]],
                                    strategies[objective["objectiveMetricName"]])
            better = best_value is None or (value > best_value if objective["type"] == "maximize" else
                                            value < best_value)
            if better:
                best_value = value
                state["best"] = {
                    "bestTrialName": trial,
                    "parameterAssignments": [{"name": k, "value": v} for k, v in assignment.items()],
                    "observation": {"metrics": [{"name": k, "latest": str(v[-1]), "max": str(max(v)),
                                                 "min": str(min(v))} for k, v in metrics.items()]}}
        state["done"] = True
        state["message"] = state["message"] or "Experiment has succeeded because max trial count has reached"

    def _trial(self, exp, trial, ns, assignment, names):
        job = trial_job(exp, trial, ns, assignment)
        pod = job["spec"]["template"]["spec"]
        folder = tempfile.mkdtemp(prefix="katib-")
        wrap_worker_container(pod, exp["spec"]["trialTemplate"]["primaryContainerName"],
                              os.path.join(folder, "metrics.log"), early_stopping="earlyStopping" in exp["spec"])
        c = next(c for c in pod["containers"] if c["name"] == exp["spec"]["trialTemplate"]["primaryContainerName"])
        env = {"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
        for e in c.get("env", []):
            if "value" in e:
                env[e["name"]] = expand(e["value"], env)
            else:
                ref = e["valueFrom"]["secretKeyRef"]
                env[e["name"]] = self.secrets[(ns, ref["name"])][ref["key"]]
        argv = [expand(a, env) for a in c["command"] + c.get("args", [])]
        proc = subprocess.run(argv, cwd=ROOT, env={**os.environ, **env}, timeout=self.timeout_s,
                              capture_output=True, text=True)
        with open(os.path.join(folder, "metrics.log")) as f:
            log = f.read()
        metrics = parse_metrics(log, names)
        self.trials.append({"name": trial, "command": c["command"], "args": c["args"], "argv": argv,
                            "returncode": proc.returncode, "metrics": metrics, "log": log,
                            "completed": any(f.endswith(".pid") for f in os.listdir(folder))})
        return metrics, proc.returncode
