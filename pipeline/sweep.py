"""A sweep's trials, run here: each a real training + evaluation (the train and evaluate stages'
cores), locally one after another as MLflow child runs of the train stage run, or as one Katib
trial (``pipeline/sweep_trial.py``). The search itself (space, plan, Katib Experiment) is the
train stage's: ``components/train/sweep.py``."""

from __future__ import annotations

import json

from components.train.sweep import SweepSettings, Trial, best_trial, plan_trials, trial_settings


def run_trial(train, assignment: dict, train_shards: str, val_shards: str, out: str, eval_settings=None,
              device: str = "auto", log_fn=None) -> tuple[str, dict]:
    """Train and evaluate one trial into ``out``; returns (model URI, metrics)."""
    from components.common import storage
    from components.evaluate.core import EvaluateSettings, evaluate
    from components.train.settings import resolve_config
    from components.train.trainer import train as train_model

    cfg = resolve_config(trial_settings(train, assignment))
    result = train_model(cfg, train_shards, out, device=device, progress=False, log_fn=log_fn)
    ecfg = eval_settings or EvaluateSettings(report_samples=0)
    metrics = evaluate(result.model_uri, val_shards, storage.join(out, "evaluation"), ecfg, progress=False).metrics
    return result.model_uri, metrics


def run_local_sweep(train, sweep: SweepSettings, train_shards: str, val_shards: str, out: str, *,
                    ml=None, device: str = "auto") -> tuple[Trial, list[Trial]]:
    """Run the trials one by one (each a child run of the active MLflow run when ``ml`` is given);
    returns (best, all)."""
    import logging

    from components.common import storage
    from components.common.metrics import METRIC_KEYS

    log = logging.getLogger(__name__)
    trials = []
    parent = ml.active_run() if ml is not None else None
    for i, assignment in enumerate(plan_trials(sweep)):
        folder = storage.join(out, f"trial-{i:03d}")
        log.info("sweep trial %d (%d of %d): %s", i, i + 1, sweep.trials, assignment)
        if ml is None:
            model_uri, metrics = run_trial(train, assignment, train_shards, val_shards, folder, device=device)
            trials.append(Trial(i, assignment, model_uri, metrics))
            continue
        name = f"trial {i} · {parent.info.run_name.split(' · ', 1)[-1]}"   # <stage> · <pipeline run>
        with ml.start_run(run_name=name, nested=True, experiment_id=parent.info.experiment_id) as run:
            ml.set_tags({"panoptic.kind": "trial", "panoptic.stage": "trial", "sweep.trial": str(i)})
            ml.log_params({f"sweep.{k}": v for k, v in assignment.items()})

            def log_fn(m, step):
                ml.log_metrics({f"train/{k}": float(v) for k, v in m.items() if k != "iter"}, step=step)

            model_uri, metrics = run_trial(train, assignment, train_shards, val_shards, folder, device=device,
                                           log_fn=log_fn)
            ml.log_metrics({k: metrics[k] for k in METRIC_KEYS})
            trials.append(Trial(i, assignment, model_uri, metrics, run.info.run_id))
        log.info("sweep trial %d: %s %.4f", i, sweep.objective, metrics[sweep.objective])
    best = best_trial(trials, sweep.objective)
    if ml is not None:
        ml.set_tags({"sweep.best_trial": str(best.index), "sweep.best_run_id": best.run_id,
                     "sweep.best": json.dumps(best.assignment, sort_keys=True)})
        ml.log_metric(f"sweep_best_{sweep.objective}", best.metrics[sweep.objective])
        client = ml.MlflowClient()
        for t in trials:
            client.set_tag(t.run_id, "sweep.best", str(t.index == best.index))
    return best, trials
