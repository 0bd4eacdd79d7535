"""Evaluation during training (``solver.eval_period``, components/train/trainer.py): PQ every N
iterations and at the end, the best model kept beside the last, a run with evaluations training
the same weights as one without, a resumed run keeping its best, and the train stage outputting
the best or the last as ``train.select`` says."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from components.evaluate.core import evaluate
from components.evaluate.settings import EvaluateSettings
from components.train.stage import chosen_model
from components.train.trainer import train
from tests.training import load_state, make_shards, max_abs_diff, micro_config


@pytest.fixture(scope="module")
def shards(synth_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("evaltrain"))
    return make_shards(synth_root, os.path.join(out, "t")), make_shards(synth_root, os.path.join(out, "v"), "val2017")


def _digest(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_a_run_evaluates_every_period_and_at_its_end_and_keeps_the_best(shards, tmp_path):
    train_shards, val_shards = shards
    cfg = micro_config(solver={"max_iter": 7, "eval_period": 2, "eval_images": 3})
    logged = []
    result = train(cfg, train_shards, str(tmp_path / "run"), progress=False, val_shards=val_shards,
                   log_fn=lambda m, step: logged.append((step, dict(m))))
    assert [e["iter"] for e in result.evals] == [2, 4, 6, 7]   # each period, and the end
    assert all(e["val/images"] == 3 and 0 <= e["val/PQ"] <= 1 for e in result.evals)
    val_steps = [step for step, m in logged if "val/PQ" in m]
    assert val_steps == [2, 4, 6, 7]
    best = max(result.evals, key=lambda e: (e["val/PQ"], -e["iter"]))   # the first of the highest
    assert result.best == {"iteration": best["iter"], "metric": "PQ", "value": best["val/PQ"]}
    doc = json.load(open(tmp_path / "run" / "best" / "best.json"))
    assert doc["iteration"] == best["iter"] and doc["metrics"]["PQ"] == best["val/PQ"]
    saved = json.load(open(tmp_path / "run" / "train_metrics.json"))
    assert [e["iter"] for e in saved["evals"]] == [2, 4, 6, 7] and saved["last_eval_per_class"]
    # the evaluate stage, on the same 3 images one at a time (a batch pads them to one size), scores
    # the best model file as training did
    m = evaluate(str(tmp_path / "run" / "best" / "model.pt"), val_shards, str(tmp_path / "ev"),
                 EvaluateSettings(max_images=3, batch_size=1, report_samples=0), progress=False).metrics
    assert m["PQ"] == pytest.approx(best["val/PQ"], abs=1e-12)


def test_evaluations_change_nothing_the_run_learns(shards, tmp_path):
    train_shards, val_shards = shards
    plain = train(micro_config(), train_shards, str(tmp_path / "a"), progress=False)
    scored = train(micro_config(solver={"eval_period": 2, "eval_images": 2}), train_shards, str(tmp_path / "b"),
                   progress=False, val_shards=val_shards)
    assert len(scored.evals) == 3
    assert max_abs_diff(load_state(plain.model_uri), load_state(scored.model_uri)) == 0.0


def test_a_resumed_run_keeps_its_best_and_its_evaluations(shards, tmp_path):
    train_shards, val_shards = shards
    cfg = micro_config(solver={"max_iter": 6, "eval_period": 2, "eval_images": 2, "checkpoint_period": 2})
    full = train(cfg, train_shards, str(tmp_path / "full"), progress=False, val_shards=val_shards)
    first = train(cfg, train_shards, str(tmp_path / "cut"), progress=False, val_shards=val_shards, stop_after=4)
    assert first.preempted
    again = train(cfg, train_shards, str(tmp_path / "cut"), progress=False, val_shards=val_shards)
    assert again.resumed_from == 4
    assert [e["iter"] for e in again.evals] == [2, 4, 6]
    assert [e["val/PQ"] for e in again.evals] == [e["val/PQ"] for e in full.evals]
    assert again.best == full.best
    assert max_abs_diff(load_state(str(tmp_path / "full" / "best" / "model.pt")),
                        load_state(str(tmp_path / "cut" / "best" / "model.pt"))) <= 1e-6


def test_the_stage_outputs_the_best_or_the_last_as_select_says(shards, tmp_path):
    train_shards, val_shards = shards
    cfg = micro_config(solver={"max_iter": 6, "eval_period": 2, "eval_images": 3})
    out = str(tmp_path / "run")
    result = train(cfg, train_shards, out, progress=False, val_shards=val_shards)
    uri, what = chosen_model(out, "best", cfg)
    assert _digest(uri) == _digest(os.path.join(out, "best", "model.pt"))
    assert what == {"checkpoint": "best", "iteration": result.best["iteration"], "metric": "PQ",
                    "value": result.best["value"]}
    uri, what = chosen_model(out, "last", cfg)
    assert uri == os.path.join(out, "model.pt") and what == {"checkpoint": "last", "iteration": 6}
    # a best.json that is not this run's record is refused, naming the file and the way out
    best_json = os.path.join(out, "best", "best.json")
    for bad in ({"iteration": 99, "metric": "PQ", "value": 0.5},
                {"iteration": 2, "metric": "PQ", "value": float("nan")}, {"iteration": 2, "metric": "RQ", "value": 0.5},
                {"iteration": True, "metric": "PQ", "value": 0.5}):
        with open(best_json, "w") as f:
            f.write(json.dumps(bad))
        with pytest.raises(ValueError, match="best.json: not a record of this run's best model.*train.select=last"):
            chosen_model(out, "best", cfg)


def test_a_period_without_validation_shards_says_so(shards, tmp_path, caplog):
    train_shards, _ = shards
    result = train(micro_config(solver={"eval_period": 2}), train_shards, str(tmp_path / "r"), progress=False)
    assert result.evals == [] and result.best is None
    assert "no validation shards were given (--val-shards): no evaluation during training" in caplog.text
    assert chosen_model(str(tmp_path / "r"), "best", micro_config(solver={"eval_period": 2}))[1]["checkpoint"] == "last"


def test_config_refuses_an_unknown_best_metric():
    from components.model.config import ConfigError

    with pytest.raises(ConfigError, match="solver.best_metric must be one of PQ, SQ, RQ"):
        micro_config(solver={"best_metric": "AP"})
    with pytest.raises(ConfigError, match="solver.eval_period = -1"):
        micro_config(solver={"eval_period": -1})
