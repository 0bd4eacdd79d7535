"""Hyper-parameter search as part of the train stage: ``train.sweep`` declares a search space;
every trial is a real training + evaluation on the validation shards; the best trial's model
is the stage's output, so it goes through the same evaluation, gate and promotion as any model.

Two backends, one search space:

- ``local`` (kfp.local, or one pod): the trials run one after another in the step, each logged
  as an MLflow child run of the train stage run (params, curves, PQ): ``run_local_sweep``,
  scoring each trial with the evaluate stage's function the pipeline hands in (a stage never
  imports another).
- ``katib`` (a cluster): the step creates a Katib ``Experiment`` (kubeflow.org/v1beta1) whose
  trial template is a Job running ``python -m pipeline.sweep_trial`` (train + evaluate,
  printing ``PQ=...`` for Katib's stdout metrics collector), waits for it and takes the optimal
  trial's model. Katib rather than a ParallelFor in the DAG: it brings the search algorithms
  (random, grid, Bayesian, TPE, Hyperband) and early stopping, runs trials in parallel within a
  budget (``parallel``, ``max_failed``), and shows them in Kubeflow's UI; the DAG stays one graph.

A search space maps a name to a list (categorical) or a range ``{min, max, log, type}``: names
are ``config`` and ``iterations`` (train settings) or any config key (``solver.base_lr``,
``input.copy_paste_prob``, ``model.backbone``...).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import shlex
from dataclasses import dataclass

import numpy as np

from components.train.settings import TRAIN_KEYS, SweepSettings


def _draw(spec, rng: np.random.Generator):
    if isinstance(spec, (list, tuple)):
        return spec[int(rng.integers(len(spec)))]
    lo, hi = float(spec["min"]), float(spec["max"])
    if spec.get("type") == "int":
        return int(rng.integers(int(lo), int(hi) + 1))
    value = math.exp(rng.uniform(math.log(lo), math.log(hi))) if spec.get("log") else rng.uniform(lo, hi)
    return float(f"{value:.6g}")


def plan_trials(s: SweepSettings) -> list[dict]:
    """The trials' assignments (name -> value), reproducibly: grid in order, random by seed."""
    names = sorted(s.space)
    if s.algorithm == "grid":
        combos = itertools.product(*(s.space[n] for n in names))
        return [dict(zip(names, values)) for values in itertools.islice(combos, s.trials)]
    rng = np.random.default_rng(s.seed)
    return [{n: _draw(s.space[n], rng) for n in names} for _ in range(s.trials)]


def trial_settings(train, assignment: dict):
    """The train settings of one trial: ``config``/``iterations`` replaced, config keys as overrides."""
    direct = {k: v for k, v in assignment.items() if k in TRAIN_KEYS}
    overrides = {k: v for k, v in sorted(assignment.items()) if k not in TRAIN_KEYS}
    return dataclasses.replace(train, **direct, overrides={**train.overrides, **overrides}, sweep={})


@dataclass
class Trial:
    index: int
    assignment: dict
    model_uri: str
    metrics: dict
    run_id: str = ""
    iterations: int = 0     # what it trained
    stopped_at: int = 0     # the iteration successive halving stopped it at (0: it ran to its end)


def best_trial(trials: list[Trial], objective: str) -> Trial:
    """The completed trial with the highest objective; a tie goes to the earlier trial."""
    return max((t for t in trials if not t.stopped_at), key=lambda t: (t.metrics[objective], -t.index))


def halving_rungs(trials: int, eta: int) -> list[tuple[float, int]]:
    """Successive halving's rungs: [(fraction of a trial's iterations, trials that train to it)],
    the last at 1 (the end). K = floor(log_eta(trials)) rungs before the end; at rung k the
    best trials // eta^k go on."""
    k = 0
    while eta ** (k + 1) <= trials:
        k += 1
    return [(float(eta) ** -(k - r), max(1, trials // eta ** r)) for r in range(k + 1)]


def run_trial(train, assignment: dict, train_shards: str, val_shards: str, out: str, evaluate_fn,
              device: str = "auto", log_fn=None, report_period: int = 0, report_fn=None) -> tuple[str, dict]:
    """Train one trial into ``out`` and score it: ``evaluate_fn(model_uri, val_shards, folder)``
    returns its metrics (the evaluate stage's, handed in: a stage never imports another).
    ``report_period``: also score it on the validation shards every that many iterations while
    it trains, each score handed to ``report_fn(metrics, iteration)`` (Katib's median stopping
    reads them). Returns (model URI, metrics)."""
    from components.common import storage
    from components.train.settings import resolve_config
    from components.train.trainer import train as train_model

    cfg = resolve_config(trial_settings(train, assignment))
    log = log_fn
    if report_period:
        cfg = dataclasses.replace(cfg, solver=dataclasses.replace(cfg.solver, eval_period=report_period))

        def log(metrics, step):
            if log_fn:
                log_fn(metrics, step)
            if report_fn and any(k.startswith("val/") for k in metrics):
                report_fn({k[4:]: v for k, v in metrics.items() if k.startswith("val/")}, step)

    result = train_model(cfg, train_shards, out, device=device, progress=False, log_fn=log,
                         val_shards=val_shards if report_period else None)
    return result.model_uri, evaluate_fn(result.model_uri, val_shards, storage.join(out, "evaluation"))


def run_local_sweep(train, sweep: SweepSettings, train_shards: str, val_shards: str, out: str, *, evaluate_fn,
                    ml=None, device: str = "auto") -> tuple[Trial, list[Trial]]:
    """Run the trials one by one (each a child run of the active MLflow run when ``ml`` is given,
    named ``trial N · <pipeline run>``); returns (best, all)."""
    import logging

    from components.common import storage
    from components.common.metrics import METRIC_KEYS
    from components.train.settings import resolve_config

    log = logging.getLogger(__name__)
    if sweep.early_stopping == "halving":
        return _run_halving(train, sweep, train_shards, val_shards, out, evaluate_fn=evaluate_fn, ml=ml,
                            device=device)
    trials = []
    parent = ml.active_run() if ml is not None else None
    for i, assignment in enumerate(plan_trials(sweep)):
        folder = storage.join(out, f"trial-{i:03d}")
        log.info("sweep trial %d (%d of %d): %s", i, i + 1, sweep.trials, assignment)
        iterations = resolve_config(trial_settings(train, assignment)).solver.max_iter
        if ml is None:
            model_uri, metrics = run_trial(train, assignment, train_shards, val_shards, folder, evaluate_fn,
                                           device=device)
            trials.append(Trial(i, assignment, model_uri, metrics, iterations=iterations))
            continue
        name = f"trial {i} · {parent.info.run_name.split(' · ', 1)[-1]}"   # <stage> · <pipeline run>
        with ml.start_run(run_name=name, nested=True, experiment_id=parent.info.experiment_id) as run:
            ml.set_tags({"panoptic.kind": "trial", "panoptic.stage": "trial", "sweep.trial": str(i)})
            ml.log_params({f"sweep.{k}": v for k, v in assignment.items()})

            def log_fn(m, step):
                ml.log_metrics({f"train/{k}": float(v) for k, v in m.items() if k != "iter"}, step=step)

            model_uri, metrics = run_trial(train, assignment, train_shards, val_shards, folder, evaluate_fn,
                                           device=device, log_fn=log_fn)
            ml.log_metrics({k: metrics[k] for k in METRIC_KEYS})
            trials.append(Trial(i, assignment, model_uri, metrics, run.info.run_id, iterations=iterations))
        log.info("sweep trial %d: %s %.4f", i, sweep.objective, metrics[sweep.objective])
    return _finish_sweep(trials, sweep, ml)


def _finish_sweep(trials: list[Trial], sweep: SweepSettings, ml) -> tuple[Trial, list[Trial]]:
    best = best_trial(trials, sweep.objective)
    if ml is not None:
        ml.set_tags({"sweep.best_trial": str(best.index), "sweep.best_run_id": best.run_id,
                     "sweep.best": json.dumps(best.assignment, sort_keys=True)})
        ml.log_metrics({f"sweep_best_{sweep.objective}": best.metrics[sweep.objective],
                        "sweep_trial_iterations": sum(t.iterations for t in trials)})
        client = ml.MlflowClient()
        for t in trials:
            client.set_tag(t.run_id, "sweep.best", str(t.index == best.index))
    return best, trials


def _run_halving(train, sweep: SweepSettings, train_shards: str, val_shards: str, out: str, *, evaluate_fn,
                 ml=None, device: str = "auto") -> tuple[Trial, list[Trial]]:
    """Successive halving over the planned trials (``halving_rungs``). A trial trains to a rung
    (the trainer stops there with a checkpoint, as if preempted), is scored there on the
    validation shards (evaluation during training, ``eval_at``), and the best go on from their
    checkpoints: a promoted trial ends with the weights it would have had run straight through.
    The last rung's trials run to their end and are scored by ``evaluate_fn`` like any trial."""
    import logging

    from components.common import storage
    from components.common.metrics import METRIC_KEYS
    from components.train.settings import resolve_config
    from components.train.trainer import train as train_model

    log = logging.getLogger(__name__)
    plans = plan_trials(sweep)
    cfgs = [resolve_config(trial_settings(train, a)) for a in plans]
    folders = [storage.join(out, f"trial-{i:03d}") for i in range(len(plans))]
    trials = [Trial(i, a, "", {}) for i, a in enumerate(plans)]
    parent = ml.active_run() if ml is not None else None
    rungs = halving_rungs(len(plans), sweep.eta)
    alive = list(range(len(plans)))
    key = f"val/{sweep.objective}"
    for r, (fraction, _) in enumerate(rungs):
        last = r == len(rungs) - 1
        scores = {}
        for i in alive:
            t, length = trials[i], cfgs[i].solver.max_iter
            stop = length if last else min(length, max(t.iterations + 1, round(length * fraction)))
            log.info("sweep trial %d, rung %d of %d: to iteration %d of %d: %s", i, r + 1, len(rungs), stop, length,
                     t.assignment)

            def run_rung(log_fn=None):
                result = train_model(cfgs[i], train_shards, folders[i], device=device, progress=False,
                                     log_fn=log_fn, val_shards=None if last else val_shards,
                                     stop_after=None if last else stop, eval_at=() if last else (stop,))
                t.iterations = result.iterations
                if last:
                    t.model_uri = result.model_uri
                    t.metrics = evaluate_fn(result.model_uri, val_shards, storage.join(folders[i], "evaluation"))
                else:
                    scores[i] = float(result.evals[-1][key])
                    t.metrics = {sweep.objective: scores[i]}

            if ml is None:
                run_rung()
                continue
            opened = (ml.start_run(run_id=t.run_id, nested=True) if t.run_id else
                      ml.start_run(run_name=f"trial {i} · {parent.info.run_name.split(' · ', 1)[-1]}", nested=True,
                                   experiment_id=parent.info.experiment_id))
            with opened as run:
                if not t.run_id:
                    t.run_id = run.info.run_id
                    ml.set_tags({"panoptic.kind": "trial", "panoptic.stage": "trial", "sweep.trial": str(i)})
                    ml.log_params({f"sweep.{k}": v for k, v in t.assignment.items()})

                def log_fn(m, step):
                    ml.log_metrics({k if "/" in k else f"train/{k}": float(v) for k, v in m.items() if k != "iter"},
                                   step=step)

                run_rung(log_fn)
                if last:
                    ml.log_metrics({k: t.metrics[k] for k in METRIC_KEYS})
        if last:
            break
        keep = rungs[r + 1][1]
        ranked = sorted(alive, key=lambda i: (-scores[i], i))
        for i in ranked[keep:]:
            trials[i].stopped_at = trials[i].iterations
            log.info("sweep trial %d stopped at iteration %d (%s %.4f; the best %d of %d go on)", i,
                     trials[i].iterations, sweep.objective, scores[i], keep, len(alive))
            if ml is not None:
                ml.MlflowClient().set_tag(trials[i].run_id, "sweep.stopped_at", str(trials[i].iterations))
        alive = sorted(ranked[:keep])
    full = sum(c.solver.max_iter for c in cfgs)
    spent = sum(t.iterations for t in trials)
    log.info("successive halving: %d trial-iterations of the %d a full sweep trains (%.0f%%)", spent, full,
             100 * spent / max(full, 1))
    return _finish_sweep(trials, sweep, ml)


# ---- the cluster form: a Katib Experiment ------------------------------------------------

KATIB_API = "kubeflow.org/v1beta1"
TRIAL_CONTAINER = "trial"


def _katib_parameter(name: str, spec) -> dict:
    kname = _katib_name(name)
    if isinstance(spec, (list, tuple)):
        values = [str(v) for v in spec]
        for v in values:   # Katib pastes the text into the template's JSON, then into a shell word
            if any(ch in v for ch in "'\"\\\n"):
                raise ValueError(f"train.sweep: {name} value {v!r}: Katib cannot hand a value with quotes, backslashes "
                                 f"or line breaks to a trial; rename it")
        return {"name": kname, "parameterType": "categorical", "feasibleSpace": {"list": values}}
    space = {"min": str(spec["min"]), "max": str(spec["max"])}
    if spec.get("log"):
        space["distribution"] = "logUniform"
    return {"name": kname, "parameterType": "int" if spec.get("type") == "int" else "double", "feasibleSpace": space}


def _katib_name(name: str) -> str:
    """A search name as a Katib parameter name (no dots: trial parameters are ${trialParameters.NAME})."""
    return name.replace(".", "-").replace("_", "-")


def render_katib_experiment(name: str, sweep: SweepSettings, train, *, image: str, train_shards: str,
                            val_shards: str, output: str, namespace: str | None = None, env: dict | None = None,
                            gpus: int = 1, cluster=None) -> dict:
    """The Katib Experiment of a sweep: parameters from the space, the objective, the algorithm,
    and a trial template (a batch/v1 Job) running ``pipeline.sweep_trial`` with the
    trial's assignment; the trial writes its model to ``output/trials/<trial name>/``.

    The trial's command is ``sh -c '<the argv, shell-quoted>'``: Katib's StdOut metrics collector
    rewrites the container as ``sh -c "<command and args joined by spaces>"`` without quoting
    (kubeflow/katib pkg/webhook/v1beta1/pod/utils.go, ``wrapWorkerContainer``), which would split
    the settings' JSON into words; an argv that already is ``sh -c STRING`` keeps its string whole."""
    from components.common.cluster import ClusterSettings

    c = cluster or ClusterSettings()
    base = dataclasses.replace(train, sweep={})
    args = ["python", "-m", "pipeline.sweep_trial", "--train-shards", train_shards, "--val-shards", val_shards,
            "--output", f"{output.rstrip('/')}/trials/${{trialParameters.trialName}}",
            "--settings", json.dumps(dataclasses.asdict(base), default=list), "--objective", sweep.objective,
            *(["--report-period", str(sweep.report_period)] if sweep.early_stopping == "medianstop" else [])]
    trial_parameters = [{"name": "trialName", "reference": "${trialSpec.Name}",
                         "description": "the trial's name: its output folder"}]
    for n in sorted(sweep.space):
        k = _katib_name(n)
        args += ["--assign", f"{n}=${{trialParameters.{k}}}"]
        trial_parameters.append({"name": k, "reference": k, "description": f"train setting {n}"})
    container = {"name": TRIAL_CONTAINER, "image": image, "command": ["sh", "-c", shlex.join(args)],
                 "env": c.pod_env(env or {}),
                 "resources": c.pod_resources(gpus)}
    pod_spec = c.pod_spec([container], restartPolicy="Never")
    additional = [m for m in ("PQ", "SQ", "RQ") if m != sweep.objective]
    spec = {
        # a trial's value is its last line (the evaluation of its final model), not the highest
        # intermediate score it printed on the way (Katib's default for maximize is max:
        # pkg/apis/controller/experiments/v1beta1/experiment_defaults.go, setDefaultObjective)
        "objective": {"type": "maximize", "objectiveMetricName": sweep.objective, "additionalMetricNames": additional,
                      "metricStrategies": [{"name": m, "value": "latest"} for m in (sweep.objective, *additional)]},
        "algorithm": {"algorithmName": sweep.algorithm,
                      # each algorithm's seed setting (Katib's skopt and hyperopt suggestion services)
                      **({"algorithmSettings": [{"name": "random_state", "value": str(sweep.seed)}]}
                         if sweep.algorithm in ("random", "bayesianoptimization", "tpe") else {})},
        **({"earlyStopping": {"algorithmName": "medianstop", "algorithmSettings": [
            {"name": "min_trials_required", "value": str(sweep.min_trials_required)},
            {"name": "start_step", "value": str(sweep.start_step)}]}} if sweep.early_stopping == "medianstop" else {}),
        "parallelTrialCount": min(sweep.parallel, sweep.trials),
        "maxTrialCount": sweep.trials,
        "maxFailedTrialCount": sweep.max_failed,
        "parameters": [_katib_parameter(n, sweep.space[n]) for n in sorted(sweep.space)],
        "metricsCollectorSpec": {"collector": {"kind": "StdOut"}},
        "trialTemplate": {
            "primaryContainerName": TRIAL_CONTAINER,
            "successCondition": 'status.conditions.#(type=="Complete")#|#(status=="True")#',
            "failureCondition": 'status.conditions.#(type=="Failed")#|#(status=="True")#',
            "trialParameters": trial_parameters,
            "trialSpec": {"apiVersion": "batch/v1", "kind": "Job",
                          "spec": {"backoffLimit": 0, "template": {"spec": pod_spec}}},
        },
    }
    meta = {"name": name, **({"namespace": namespace} if namespace else {})}
    return {"apiVersion": KATIB_API, "kind": "Experiment", "metadata": meta, "spec": spec}


TRIAL_RECORD = "trial.json"   # a Katib trial's assignment and metrics, in its folder, written when it ends


def katib_best(experiment: dict, sweep: SweepSettings, trial_record=None) -> tuple[str, dict, dict]:
    """(trial name, assignment by search name, metrics) of a finished Experiment. Katib hands
    values over as text: they are read back as YAML (``"120"`` -> 120), as the trial read them.

    Katib's optimal trial may be one median stopping stopped (its last intermediate score beat
    the others' final ones): it has no model. Then the best of the succeeded trials, by the
    record each wrote when it ended (``trial_record(name)``: {"assignment", "metrics"} or None),
    is the sweep's."""
    import math

    import yaml

    status = experiment.get("status", {})
    best = status.get("currentOptimalTrial", {})
    if best.get("bestTrialName") and best["bestTrialName"] in status.get("earlyStoppedTrialList", []):
        done = []
        for name in status.get("succeededTrialList", []) if trial_record else []:
            rec = trial_record(name)
            value = rec.get("metrics", {}).get(sweep.objective) if isinstance(rec, dict) else None
            if isinstance(value, float) and math.isfinite(value) and isinstance(rec.get("assignment"), dict):
                done.append((value, name, rec))
        if not done:
            raise RuntimeError(f"Katib experiment {experiment['metadata']['name']}: its optimal trial "
                               f"{best['bestTrialName']} was stopped early and no trial that ran to its end left "
                               f"a record ({TRIAL_RECORD})")
        value, name, rec = max(done, key=lambda d: (d[0], d[1]))
        return name, {n: rec["assignment"][n] for n in sweep.space}, {
            k: float(v) for k, v in rec["metrics"].items() if isinstance(v, (int, float))}
    if not best.get("bestTrialName"):
        raise RuntimeError(f"Katib experiment {experiment['metadata']['name']} has no optimal trial "
                           f"(conditions: {experiment.get('status', {}).get('conditions')})")
    by_katib = {p["name"]: p["value"] for p in best.get("parameterAssignments", [])}
    missing = [n for n in sweep.space if _katib_name(n) not in by_katib]
    if missing:
        raise RuntimeError(f"Katib experiment {experiment['metadata']['name']}: the optimal trial has no value "
                           f"for {', '.join(missing)}")
    assignment = {n: yaml.safe_load(by_katib[_katib_name(n)]) for n in sweep.space}
    metrics = {m["name"]: float(m["latest"]) for m in best.get("observation", {}).get("metrics", [])}
    return best["bestTrialName"], assignment, metrics
