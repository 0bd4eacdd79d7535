"""The hyper-parameter search: trials planned reproducibly from the declared space, the Katib
Experiment it renders for a cluster checked against Katib's v1beta1 API (field names and
enums from its Go types, the rules of its admission webhook), and the trial template's command
run for real here, as a Katib trial pod would run it."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from components.common.cluster import ClusterSettings
from components.train.settings import SweepSettings, TrainSettings
from components.train.sweep import (
    Trial,
    best_trial,
    katib_best,
    plan_trials,
    render_katib_experiment,
    trial_settings,
)
from tests.training import MICRO_OVERRIDES, make_shards
from tests.unit.test_infra import K8S_VERSION

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KATIB = json.load(open(os.path.join(os.path.dirname(__file__), "..", "fixtures", "katib", "experiment_v1beta1.json")))

SPACE = {"config": ["tiny", "convnext_t_tiny"], "iterations": [80, 120],
         "solver.base_lr": {"min": 0.01, "max": 0.04, "log": True}, "input.copy_paste_prob": [0.0, 0.5]}


def test_random_trials_are_reproducible_and_inside_the_space():
    s = SweepSettings(trials=8, space=SPACE, seed=3)
    trials = plan_trials(s)
    assert trials == plan_trials(SweepSettings(trials=8, space=SPACE, seed=3)) != plan_trials(
        SweepSettings(trials=8, space=SPACE, seed=4))
    for t in trials:
        assert t["config"] in SPACE["config"] and t["iterations"] in SPACE["iterations"]
        assert 0.01 <= t["solver.base_lr"] <= 0.04 and t["input.copy_paste_prob"] in (0.0, 0.5)
    assert len({t["solver.base_lr"] for t in trials}) == 8


def test_a_space_that_went_through_kfp_keeps_its_integers():
    """kfp passes dict parameters as protobuf Structs: every number arrives as a float."""
    from components.common.settings import parse_settings

    s = parse_settings(SweepSettings, {"trials": 3.0, "seed": 0.0, "space": {"iterations": [80.0, 120.0],
                                                                           "input.copy_paste_prob": [0.0, 0.5]}})
    for t in plan_trials(s):
        assert type(t["iterations"]) is int and trial_settings(TrainSettings(), t).iterations in (80, 120)


def test_grid_walks_the_product_in_order():
    s = SweepSettings(trials=3, algorithm="grid", space={"iterations": [10, 20], "input.flip_prob": [0.0, 0.5]})
    assert plan_trials(s) == [{"input.flip_prob": 0.0, "iterations": 10}, {"input.flip_prob": 0.0, "iterations": 20},
                              {"input.flip_prob": 0.5, "iterations": 10}]


@pytest.mark.parametrize("bad, message", [
    ({"trials": 2}, "space is empty"),
    ({"trials": 2, "space": {"x": []}}, "empty list"),
    ({"trials": 2, "space": {"x": {"min": 2, "max": 1}}}, "min must be below max"),
    ({"trials": 2, "space": {"x": {"min": 0, "max": 1, "log": True}}}, "log range needs min > 0"),
    ({"trials": 2, "algorithm": "grid", "space": {"x": {"min": 0, "max": 1}}}, "grid search needs lists"),
    ({"trials": 2, "algorithm": "bayes", "space": {"x": [1]}}, "algorithm must be one of"),
])
def test_bad_search_spaces_are_refused_with_the_reason(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainSettings(sweep=bad)


def test_a_trial_is_the_base_settings_with_its_assignment():
    base = TrainSettings(config="tiny", iterations=300, overrides={"solver.ims_per_batch": 2}, sweep={"trials": 1,
                                                                                                       "space": SPACE})
    t = trial_settings(base, {"config": "convnext_t_tiny", "iterations": 80, "solver.base_lr": 0.02})
    assert (t.config, t.iterations, t.sweep) == ("convnext_t_tiny", 80, {})
    assert t.overrides == {"solver.ims_per_batch": 2, "solver.base_lr": 0.02}


def test_the_best_trial_maximises_the_objective_and_ties_go_to_the_first():
    trials = [Trial(0, {}, "a", {"PQ": 0.5}), Trial(1, {}, "b", {"PQ": 0.7}), Trial(2, {}, "c", {"PQ": 0.7})]
    assert best_trial(trials, "PQ").index == 1


def _render(**kw):
    sweep = SweepSettings(trials=4, space=SPACE, parallel=2, backend="katib")
    return render_katib_experiment("panoptic-sweep-1", sweep, TrainSettings(config="tiny", sweep={}),
                                   image="ghcr.io/panoptic-pipeline/panoptic-cuda:0.1.0", train_shards="s3://b/train",
                                   val_shards="s3://b/val", output="s3://b/model", namespace="team-a",
                                   cluster=ClusterSettings(), env={"MLFLOW_TRACKING_URI": "http://mlflow:5000"}, **kw)


def _check_fields(node, type_name: str, path: str):
    """Every key of ``node`` is a json field of Katib's Go struct ``type_name`` (recursively)."""
    structs = KATIB["structs"]
    if type_name not in structs:
        return
    fields = dict(structs[type_name])
    for k, t in list(fields.items()):
        if k.startswith("__inline__"):
            fields.update(structs[t])
    for key, value in node.items():
        assert key in fields, f"{path}.{key} is not a field of Katib's {type_name}: {sorted(fields)}"
        if key == "trialSpec":   # unstructured: validated as the Kubernetes object it is, below
            continue
        child = fields[key]
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, dict):
                _check_fields(item, child, f"{path}.{key}")
            elif child in KATIB["enums"]:
                assert item in KATIB["enums"][child], f"{path}.{key}: {item!r} is not a Katib {child}"


def test_the_katib_experiment_uses_katibs_fields_and_passes_its_webhook_rules():
    from tests import crd_schema
    from tests.kube_rules import KATIB_NAMESPACE_LABEL, experiment_admission

    exp = _render()
    experiment_admission(exp, "team-a", dict([KATIB_NAMESPACE_LABEL]))   # Katib v0.19.0's webhook, copied
    assert not crd_schema.errors(exp, crd_schema.schema_of(crd_schema.KATIB_EXPERIMENT_CRD))
    assert exp["apiVersion"] == "kubeflow.org/v1beta1" and exp["kind"] == "Experiment"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", exp["metadata"]["name"])
    spec = exp["spec"]
    _check_fields(spec, "ExperimentSpec", "spec")
    # the admission webhook's rules (pkg/webhook/v1beta1/experiment/validator)
    assert 0 < spec["parallelTrialCount"] <= spec["maxTrialCount"] and 0 <= spec["maxFailedTrialCount"] <= \
        spec["maxTrialCount"]
    assert spec["objective"]["type"] in ("maximize", "minimize") and spec["objective"]["objectiveMetricName"] == "PQ"
    assert "PQ" not in spec["objective"]["additionalMetricNames"]
    assert spec["algorithm"]["algorithmName"] in KATIB["suggestion_algorithms"]
    for p in spec["parameters"]:
        fs = p["feasibleSpace"]
        if p["parameterType"] in ("double", "int"):
            assert "list" not in fs and fs["min"] and fs["max"]
        else:
            assert set(fs) == {"list"} and all(isinstance(v, str) for v in fs["list"])
    tt = spec["trialTemplate"]
    assert tt["successCondition"] and tt["failureCondition"]
    text = json.dumps(tt["trialSpec"])
    names = {p["name"] for p in spec["parameters"]}
    for tp in tt["trialParameters"]:
        assert "{" not in tp["name"] and f"${{trialParameters.{tp['name']}}}" in text
        assert tp["reference"] in names or re.fullmatch(r"\$\{trialSpec\.\w+\}", tp["reference"])
    assert len({tp["name"] for tp in tt["trialParameters"]}) == len(tt["trialParameters"])
    assert {tp["reference"] for tp in tt["trialParameters"]} >= names   # every searched value reaches the trial
    job = tt["trialSpec"]
    assert "name" not in job.get("metadata", {}) and job["apiVersion"] and job["kind"]
    containers = job["spec"]["template"]["spec"]["containers"]
    assert tt["primaryContainerName"] in [c["name"] for c in containers]
    assert spec["metricsCollectorSpec"]["collector"]["kind"] == "StdOut"


def test_the_trial_template_is_a_valid_kubernetes_job():
    import kubernetes_validate

    job = _render()["spec"]["trialTemplate"]["trialSpec"]
    job = json.loads(json.dumps(job).replace("${trialParameters.", "TRIAL-").replace("${trialSpec.", "SPEC-"))
    job["metadata"] = {"name": "trial-1", "namespace": "team-a"}
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["restartPolicy"] == "Never"


def test_katib_best_reads_the_optimal_trial():
    status = {"currentOptimalTrial": {"bestTrialName": "panoptic-sweep-1-abc",
                                      "parameterAssignments": [{"name": "solver-base-lr", "value": "0.02"}],
                                      "observation": {"metrics": [{"name": "PQ", "latest": "0.61", "max": "0.61",
                                                                   "min": "0.61"}]}}}
    status["currentOptimalTrial"]["parameterAssignments"].append({"name": "iterations", "value": "120"})
    sweep = SweepSettings(trials=2, space={"solver.base_lr": {"min": 0.01, "max": 0.04}, "iterations": [80, 120]})
    name, assignment, metrics = katib_best({"metadata": {"name": "x"}, "status": status}, sweep)
    assert (name, assignment, metrics) == ("panoptic-sweep-1-abc", {"solver.base_lr": 0.02, "iterations": 120},
                                           {"PQ": 0.61})
    with pytest.raises(RuntimeError, match="no optimal trial"):
        katib_best({"metadata": {"name": "x"}, "status": {}}, sweep)
    with pytest.raises(RuntimeError, match="no value for input.flip_prob"):
        katib_best({"metadata": {"name": "x"}, "status": status},
                   SweepSettings(trials=1, space={"input.flip_prob": [0.0, 0.5]}))


def test_the_trial_command_runs_as_katib_would_run_it(synth_root, tmp_path):
    """Katib renders the trial's Job by pasting the trial parameters into the template, and its
    StdOut metrics collector rewrites the primary container as ``sh -c "<argv joined by spaces>
    1>metrics.log 2>&1 && ..."`` (tests/katib_standin.py, copied from kubeflow/katib v0.19.0):
    the settings' JSON must reach ``sweep_trial`` whole. Run the wrapped container for real and
    read its metrics with Katib's own filter."""
    from tests.katib_standin import expand, parse_metrics, trial_job, wrap_worker_container

    train_shards = make_shards(synth_root, str(tmp_path / "train"), size=4)
    val_shards = make_shards(synth_root, str(tmp_path / "val"), split="val2017", size=2)
    sweep = SweepSettings(trials=2, space={"iterations": [2, 3], "solver.base_lr": {"min": 0.001, "max": 0.01}},
                          backend="katib")
    exp = render_katib_experiment("s", sweep, TrainSettings(config="tiny", overrides=MICRO_OVERRIDES, device="cpu"),
                                  image="x", train_shards=train_shards, val_shards=val_shards,
                                  output=str(tmp_path / "model"))
    job = trial_job(exp, "s-trial-1", "ns", {"iterations": "3", "solver-base-lr": "0.005"})
    pod = wrap_worker_container(job["spec"]["template"]["spec"], "trial", str(tmp_path / "katib" / "metrics.log"))
    os.makedirs(tmp_path / "katib")
    container = pod["containers"][0]
    assert container["command"] == ["sh", "-c"] and len(container["args"]) == 1
    wrapped = container["args"][0]
    argv = shlex.split(wrapped.split(" 1>", 1)[0])   # what sh hands sweep_trial
    assert argv[:3] == ["python", "-m", "pipeline.sweep_trial"]
    settings = json.loads(argv[argv.index("--settings") + 1])
    assert settings["config"] == "tiny" and settings["overrides"] == MICRO_OVERRIDES
    assert "iterations=3" in argv and "solver.base_lr=0.005" in argv
    env = {"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    out = subprocess.run([expand(a, env) for a in container["command"] + container["args"]], capture_output=True,
                         text=True, timeout=600, env={**os.environ, **env}, cwd=ROOT)
    log = (tmp_path / "katib" / "metrics.log").read_text()
    assert out.returncode == 0, (out.stderr + log)[-3000:]
    assert [f.endswith(".pid") for f in os.listdir(tmp_path / "katib")].count(True) == 1   # marked completed
    metrics = {k: v[-1] for k, v in parse_metrics(log, ["PQ", "SQ", "RQ"]).items()}
    assert set(metrics) == {"PQ", "SQ", "RQ"}
    trial = tmp_path / "model" / "trials" / "s-trial-1"
    assert (trial / "model.pt").exists() and json.load(open(trial / "evaluation" / "metrics.json"))["PQ"] == \
        pytest.approx(metrics["PQ"], abs=1e-6)


def test_the_old_plain_argv_breaks_under_katibs_wrapping():
    """Why the trial's command is ``sh -c STRING``: a plain argv is joined unquoted, and sh splits
    the settings' JSON into words."""
    from tests.katib_standin import wrap_worker_container

    argv = ["python", "-m", "pipeline.sweep_trial", "--settings", json.dumps({"config": "tiny", "overrides": {}})]
    pod = wrap_worker_container({"containers": [{"name": "trial", "command": argv}]}, "trial", "/tmp/m.log")
    split = shlex.split(pod["containers"][0]["args"][0].split(" 1>", 1)[0])
    assert split[split.index("--settings") + 1] == "{config:"


def test_a_sweep_value_katib_cannot_carry_is_refused():
    sweep = SweepSettings(trials=2, space={"config": ["tiny", "it's"]}, backend="katib")
    with pytest.raises(ValueError, match="Katib cannot hand a value with quotes"):
        render_katib_experiment("s", sweep, TrainSettings(config="tiny"), image="x", train_shards="a", val_shards="b",
                                output="c")


def test_a_bayesian_search_with_median_stopping_passes_katibs_rules_and_its_services_settings():
    """Rendered with bayesianoptimization (or tpe) and medianstop: the webhook's rules and the CRD
    schema (copied from Katib v0.19.0), and what Katib's suggestion and early-stopping services
    answer ValidateAlgorithmSettings / ValidateEarlyStoppingSettings (tests/katib_standin.py)."""
    from tests import crd_schema
    from tests.katib_standin import algorithm_settings_problem, early_stopping_problem, metric_strategies
    from tests.kube_rules import KATIB_NAMESPACE_LABEL, experiment_admission

    for algorithm in ("bayesianoptimization", "tpe"):
        sweep = SweepSettings(trials=6, space=SPACE, parallel=2, backend="katib", algorithm=algorithm, seed=5,
                              early_stopping="medianstop", report_period=20, min_trials_required=2, start_step=2)
        exp = render_katib_experiment("panoptic-sweep-1", sweep, TrainSettings(config="tiny"), image="i",
                                      train_shards="s3://b/t", val_shards="s3://b/v", output="s3://b/o",
                                      namespace="team-a")
        experiment_admission(exp, "team-a", dict([KATIB_NAMESPACE_LABEL]))
        assert not crd_schema.errors(exp, crd_schema.schema_of(crd_schema.KATIB_EXPERIMENT_CRD))
        _check_fields(exp["spec"], "ExperimentSpec", "spec")
        spec = exp["spec"]
        assert spec["algorithm"] == {"algorithmName": algorithm,
                                     "algorithmSettings": [{"name": "random_state", "value": "5"}]}
        assert spec["earlyStopping"] == {"algorithmName": "medianstop", "algorithmSettings": [
            {"name": "min_trials_required", "value": "2"}, {"name": "start_step", "value": "2"}]}
        assert algorithm_settings_problem(spec["algorithm"]) is None
        assert early_stopping_problem(spec["earlyStopping"]) is None
        # a trial's value is its last PQ line (its final model's), not its highest intermediate one
        assert metric_strategies(spec["objective"])["PQ"] == "latest"
        args = shlex.split(spec["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]["containers"][0]
                           ["command"][2])
        assert args[args.index("--report-period") + 1] == "20"
    # the services' answers to settings they refuse, as Katib words them
    assert algorithm_settings_problem({"algorithmName": "tpe", "algorithmSettings": [
        {"name": "gamma", "value": "1.5"}]}) == "gamma should be in the range of (0, 1)"
    assert algorithm_settings_problem({"algorithmName": "bayesianoptimization", "algorithmSettings": [
        {"name": "seed", "value": "1"}]}) == "unknown setting seed for algorithm bayesianoptimization"
    assert early_stopping_problem({"algorithmName": "medianstop", "algorithmSettings": [
        {"name": "start_step", "value": "0"}]}) == "start_step must be greater or equal than one (>=1)"
    # Katib's default for a maximised objective without a strategy: its highest value
    assert metric_strategies({"type": "maximize", "objectiveMetricName": "PQ"}) == {"PQ": "max"}


def test_an_optimal_trial_stopped_early_gives_way_to_the_best_that_ran_to_its_end():
    sweep = SweepSettings(trials=3, space={"iterations": [80, 120]}, backend="katib", early_stopping="medianstop",
                          report_period=10)
    status = {"currentOptimalTrial": {"bestTrialName": "s-c", "parameterAssignments": [
        {"name": "iterations", "value": "80"}], "observation": {"metrics": [{"name": "PQ", "latest": "0.9"}]}},
        "earlyStoppedTrialList": ["s-c"], "succeededTrialList": ["s-a", "s-b"]}
    records = {"s-a": {"assignment": {"iterations": 80}, "metrics": {"PQ": 0.4, "SQ": 0.7, "RQ": 0.5}},
               "s-b": {"assignment": {"iterations": 120}, "metrics": {"PQ": 0.6, "SQ": 0.8, "RQ": 0.7}}}
    name, assignment, metrics = katib_best({"metadata": {"name": "s"}, "status": status}, sweep, records.get)
    assert (name, assignment, metrics["PQ"]) == ("s-b", {"iterations": 120}, 0.6)
    with pytest.raises(RuntimeError, match="was stopped early and no trial that ran to its end left a record"):
        katib_best({"metadata": {"name": "s"}, "status": status}, sweep, lambda name: None)
