"""Successive halving, the local sweep's early stopping (components/train/sweep.py): the rungs,
the worst trials stopped at a rung on their PQ there, the promoted ones going on from their
checkpoints to the weights a straight run gives, and the trial-iterations it saves."""

from __future__ import annotations

import pytest

from components.evaluate.core import EvaluateSettings, evaluate
from components.train.settings import SweepSettings, TrainSettings, resolve_config
from components.train.sweep import halving_rungs, run_local_sweep, trial_settings
from components.train.trainer import train
from tests.training import MICRO_OVERRIDES, load_state, make_shards, max_abs_diff


def test_rungs_keep_one_in_eta():
    assert halving_rungs(3, 3) == [(1 / 3, 3), (1.0, 1)]
    assert halving_rungs(8, 2) == [(1 / 8, 8), (1 / 4, 4), (1 / 2, 2), (1.0, 1)]
    assert halving_rungs(9, 3) == [(1 / 9, 9), (1 / 3, 3), (1.0, 1)]
    assert halving_rungs(2, 3) == [(1.0, 2)]   # fewer trials than eta: no rung, every trial to its end


def test_settings_name_the_backend_each_early_stopping_runs_on():
    with pytest.raises(ValueError, match="early_stopping for backend local must be one of '', 'halving'"):
        SweepSettings(trials=2, space={"x": [1]}, early_stopping="medianstop")
    with pytest.raises(ValueError, match="bayesianoptimization runs in Katib's suggestion service"):
        SweepSettings(trials=2, space={"x": [1]}, algorithm="bayesianoptimization")
    with pytest.raises(ValueError, match="medianstop needs sweep.report_period"):
        SweepSettings(trials=2, space={"x": [1]}, backend="katib", early_stopping="medianstop")


def _evaluate(model_uri, val_shards, out):
    return evaluate(model_uri, val_shards, out, EvaluateSettings(report_samples=0), progress=False).metrics


@pytest.fixture(scope="module")
def shards(synth_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("halving")
    return make_shards(synth_root, str(tmp / "t")), make_shards(synth_root, str(tmp / "v"), "val2017")


def test_halving_stops_the_worst_at_the_rung_and_the_winner_ends_as_a_straight_run(shards, tmp_path):
    train_shards, val_shards = shards
    base = TrainSettings(config="tiny", iterations=6, overrides=MICRO_OVERRIDES)
    sweep = SweepSettings(trials=3, space={"solver.base_lr": [0.0, 0.01, 0.03]}, algorithm="grid", eta=3,
                          early_stopping="halving")
    best, trials = run_local_sweep(base, sweep, train_shards, val_shards, str(tmp_path / "sweep"),
                                   evaluate_fn=_evaluate, device="cpu")
    assert sorted(t.stopped_at for t in trials) == [0, 2, 2]      # two stopped at 6/3 = 2 iterations
    assert sum(t.iterations for t in trials) == 2 + 2 + 6          # against 18 for the full sweep
    assert best.stopped_at == 0 and best.iterations == 6 and best.model_uri
    # the rung's ranking: the one that went on had the best PQ at iteration 2
    rung = {t.index: t.metrics["PQ"] for t in trials if t.stopped_at}
    straight = {}
    for t in trials:
        cfg = resolve_config(trial_settings(base, t.assignment))
        r = train(cfg, train_shards, str(tmp_path / f"straight{t.index}"), progress=False, val_shards=val_shards,
                  eval_at=(2,))
        straight[t.index] = (r, next(e for e in r.evals if e["iter"] == 2)["val/PQ"])
    assert all(straight[i][1] == pytest.approx(pq, abs=1e-12) for i, pq in rung.items())
    assert straight[best.index][1] >= max(rung.values())
    # resumed from its rung checkpoint, the winner has the weights of a run straight to the end
    assert max_abs_diff(load_state(best.model_uri), load_state(straight[best.index][0].model_uri)) <= 1e-6
