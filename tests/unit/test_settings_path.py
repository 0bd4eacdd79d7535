"""How a setting travels: one knob (the run's length, the LR) from each command a user types to
the config the trainer trains, and a misspelt key stopped before anything starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import yaml
from click.testing import CliRunner

from components.common.settings import parse_settings
from components.train.settings import TrainSettings, resolve_config
from pipeline.cli import compile_pipeline, pipeline, pipeline_arguments
from tests.kfp_standin import KfpStandIn

KNOBS = ["--set", "train.config=r50_1x", "--set", "train.iterations=50", "--set", "train.solver.base_lr=0.005"]


def _lands(train: dict, how: str) -> None:
    """The train mapping as the train step gets it -> the config the trainer trains."""
    cfg = resolve_config(parse_settings(TrainSettings, json.loads(json.dumps(train)), how))
    assert cfg.solver.max_iter == 50, how
    assert cfg.solver.steps == (33, 44), how                     # r50_1x's 60k/80k of 90k, scaled
    assert cfg.solver.warmup_iters == 5, how
    assert cfg.solver.base_lr == 0.005, how


def test_one_knob_lands_in_the_trainer_from_every_command(tmp_path, monkeypatch):
    runner = CliRunner()
    # compile: the package's parameter defaults
    r = runner.invoke(pipeline, ["compile", "--out", str(tmp_path / "p.yaml"), *KNOBS])
    assert r.exit_code == 0, r.output
    spec = next(yaml.safe_load_all(open(tmp_path / "p.yaml")))
    _lands(spec["root"]["inputDefinitions"]["parameters"]["train"]["defaultValue"], "compile")
    # submit and schedule: what reaches the KFP API (numbers as JSON, as the API's Struct keeps them)
    package = compile_pipeline(str(tmp_path / "q.yaml"))
    with KfpStandIn() as kfp:
        for command in (["submit"], ["schedule", "--cron", "0 3 * * 0"]):
            r = runner.invoke(pipeline, [*command, "--host", kfp.url, "--package", package, *KNOBS, "--set",
                                         "data_uri=s3://coco/panoptic", "--set", "mlflow_uri=http://127.0.0.1:9"])
            assert r.exit_code == 0, r.output
        runs = [q["body"] for q in kfp.requests if q["method"] == "POST" and q["path"].endswith(("/runs",
                                                                                                "/recurringruns"))]
        for body, how in zip(runs, ("submit", "schedule")):
            _lands(body["runtime_config"]["parameters"]["train"], how)
    # run-local: what the DAG is run with, its shorthand and its --set alike
    seen = {}
    monkeypatch.setattr("pipeline.cli.run_local", lambda data, **kw: seen.update(kw) or (_ for _ in ()).throw(
        SystemExit(0)))
    for args in (KNOBS, ["--config", "r50_1x", "--iterations", "50", "--set", "train.solver.base_lr=0.005"]):
        seen.clear()
        runner.invoke(pipeline, ["run-local", *args])
        _lands(seen["settings"]["train"], f"run-local {args[0]}")
    # panoptic train: the stage's own command takes the config's keys without the stage prefix
    captured = {}
    monkeypatch.setattr("components.train.trainer.train", lambda cfg, *a, **k: captured.setdefault("cfg", cfg) and
                        (_ for _ in ()).throw(SystemExit(0)))
    from components.cli import main

    runner.invoke(main, ["train", "--shards", str(tmp_path), "--output", str(tmp_path / "o"), "--config", "r50_1x",
                         "--set", "solver.max_iter=50", "--set", "solver.base_lr=0.005", "--no-mlflow"])
    cfg = captured["cfg"]
    assert (cfg.solver.max_iter, cfg.solver.steps, cfg.solver.base_lr) == (50, (33, 44), 0.005)


def test_the_runs_length_is_one_knob():
    assert pipeline_arguments(["train.iterations=50"]) == {"train": {"iterations": 50}}
    by_overrides = resolve_config(TrainSettings(config="r50_1x", overrides={"solver.max_iter": 50}))
    by_iterations = resolve_config(TrainSettings(config="r50_1x", iterations=50))
    assert by_overrides.solver == by_iterations.solver
    kept = resolve_config(TrainSettings(config="r50_1x", overrides={"solver.max_iter": 50, "solver.steps": [10, 40]}))
    assert kept.solver.steps == (10, 40)     # steps given with the length stay as given


def test_a_misspelt_key_fails_before_any_task_starts(tmp_path):
    t0 = time.perf_counter()
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "panoptic"), "pipeline", "run-local", "--set",
                        "train.iteratoins=5"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t0
    assert r.returncode == 2 and "did you mean iterations?" in r.stderr and "iterations" in r.stderr
    assert "Executing task" not in r.stdout + r.stderr and "Traceback" not in r.stderr
    assert os.listdir(tmp_path) == []   # no data synthesised, no pipeline root, no MLflow store
    print(f"\nmisspelt key refused in {elapsed:.2f} s")
