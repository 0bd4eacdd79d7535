"""The whole DAG through kfp.local (SubprocessRunner) on a small synthetic set: a first run makes
the champion; a scheduled run on the same data ends early with "nothing new"; a forced run
retrains and meets the gate."""

import json
import os
import subprocess
import sys
import time

import pytest

from components.synthetic.generator import SynthSettings, generate
from pipeline.local import TaskFailed, run_local

OVERRIDES = {"input.min_size_train": [128], "input.max_size_train": 192, "input.min_size_test": 128,
             "input.max_size_test": 192, "solver.ims_per_batch": 2, "data.num_workers": 0}
# the same, as a user types them: one --set train.SECTION.KEY=VALUE each
OVERRIDE_SETS = [a for k, v in OVERRIDES.items() for a in ("--set", f"train.{k}={json.dumps(v)}")]


@pytest.mark.slow
def test_local_pipeline_registers_a_champion_skips_nothing_new_and_gates_the_next(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    generate(str(tmp_path / "coco"), SynthSettings(train=10, val=4, seed=5, min_side=128, max_side=192), progress=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = {"train": {"config": "tiny", "iterations": 4, "overrides": OVERRIDES}, "preprocess": {"shard_images": 4}}
    kw = dict(root=str(tmp_path / "root"), mlflow_uri=uri, settings=settings)
    # the first run as a user runs it, its output going to a file (a pipe): plain lines only
    cli = [os.path.join(os.path.dirname(sys.executable), "panoptic"), "pipeline", "run-local", "--data",
           str(tmp_path / "coco"), "--root", kw["root"], "--set", "train.config=tiny", "--set", "train.iterations=4",
           *OVERRIDE_SETS, "--set", "preprocess.shard_images=4"]
    out = subprocess.run(cli, env={**os.environ, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    log = open(os.path.join(kw["root"], "pipeline.log")).read()
    for text in (out.stdout, out.stderr, log):
        assert "\r" not in text and "\x1b[" not in text  # no progress redraws, no colour codes
    assert "creating initial database tables" not in (out.stdout + out.stderr).lower()
    assert "PQ" in out.stdout and "version 1" in out.stdout and "Executing task 'train'" in out.stdout
    assert "Executing task 'train'" in log and "finished with status" in log
    first = _latest(uri)
    assert first["tags"]["decision.reason"] == "no champion yet"
    assert first["tags"]["model.version"] == "1" and "champion" in first["tags"]["model.aliases"]
    for k in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"):
        assert k in first["metrics"]
    report = next(os.path.join(d, f) for d, _, files in os.walk(kw["root"]) for f in files if f == "report.html")
    assert os.path.getsize(report) > 10_000 and "<h2>Panoptic Quality</h2>" in open(report).read()
    assert f"report: {report}" in out.stdout and first["tags"]["panoptic.report"] == report   # its own run's file

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    champion = client.get_model_version_by_alias("panoptic-fpn", "champion")
    assert str(champion.version) == "1" and champion.tags["data_fingerprint"] and champion.tags["val_manifest_hash"]
    children = client.search_runs([client.get_run(first["run_id"]).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{first['run_id']}'")
    stages = {r.data.tags["panoptic.stage"]: r for r in children}
    assert set(stages) == {"subset", "decide", "preprocess", "train", "evaluate", "register"}
    arts = {a.path for a in client.list_artifacts(stages["evaluate"].info.run_id, "evaluate")}
    assert {"evaluate/report.html", "evaluate/metrics.json", "evaluate/per_class.csv"} <= arts
    assert "train/loss_sem_seg" in stages["train"].data.metrics
    parent = client.get_run(first["run_id"])
    assert parent.data.tags["lineage.manifest_hash"] and parent.data.tags["lineage.shards_hash"]
    assert parent.data.tags["mlflow.source.git.commit"] and parent.data.params["config"] == "tiny"
    # one identity in both: the KFP run's id and name on the MLflow run, the MLflow run's address
    # printed and in the Markdown artifacts of the first task and of the exit handler
    assert parent.info.status == "FINISHED" and parent.data.tags["pipeline.status"] == "SUCCEEDED"
    assert parent.data.tags["kfp.run_id"] and parent.data.tags["kfp.run_name"].startswith("panoptic-fpn-")
    url = f"/#/experiments/{parent.info.experiment_id}/runs/{first['run_id']}"
    assert f"MLflow run: http://127.0.0.1:5000{url}" in out.stdout
    links = {os.path.basename(d): open(os.path.join(d, f)).read() for d, _, files in os.walk(kw["root"])
             for f in files if f == "mlflow_run"}
    assert {"select-subset", "finalize"} <= set(links) and all(url in t for t in links.values()), links
    assert parent.data.tags["kfp.run_id"] in links["finalize"] and "succeeded" in links["finalize"]

    # the scheduled run on unchanged data: nothing new, nothing trained or registered
    second = run_local(str(tmp_path / "coco"), **kw)
    assert second["skipped"] and second["tags"]["decision"] == "skip"
    assert "nothing new" in second["tags"]["decision.reason"] and "version 1" in second["tags"]["decision.reason"]
    assert len(client.search_model_versions("name = 'panoptic-fpn'")) == 1
    kids = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{second['run_id']}'")
    assert {r.data.tags["panoptic.stage"] for r in kids} == {"subset", "decide"}
    assert second["seconds"] < 60

    # forced: it trains again, and must beat the champion by 0.5 PQ: the gate fails, the champion stays
    third_started = time.time()
    third = run_local(str(tmp_path / "coco"), force=True,   # a longer training: another model
                      **{**kw, "settings": {**settings, "train": {**settings["train"], "iterations": 6},
                                            "register": {"margin": 0.5}}})
    assert not third["skipped"] and third["tags"]["decision.reason"] == "forced"
    assert third["tags"]["model.version"] == "2" and third["tags"]["model.aliases"] == "challenger"
    assert str(client.get_model_version_by_alias("panoptic-fpn", "champion").version) == "1"
    reg = client.search_runs([parent.info.experiment_id], filter_string=
                             f"tags.mlflow.parentRunId = '{third['run_id']}' and tags.`panoptic.stage` = 'register'")[0]
    assert reg.data.tags["gate.promote"] == "False" and "margin" in reg.data.tags["gate.reason"]
    # the gate's report: on the register run, named on the version, the register task's HTML artifact,
    # its figures those of the two evaluations (the champion's registered one: the same samples)
    v2 = client.get_model_version("panoptic-fpn", "2")
    assert v2.tags["gate.report"] == f"runs:/{reg.info.run_id}/gate.html"
    page = open(client.download_artifacts(reg.info.run_id, "gate.html", str(tmp_path))).read()
    [task_html] = [os.path.join(d, f) for d, _, fs in os.walk(kw["root"]) for f in fs if f == "gate_report"
                   and os.path.getmtime(os.path.join(d, f)) > third_started]
    assert open(task_html).read() == page and third["gate_report"] == task_html
    from components.register.core import version_metrics
    from pipeline.runs import diff_versions

    m1, m2 = version_metrics(client, "panoptic-fpn", "1"), version_metrics(client, "panoptic-fpn", "2")
    for k in ("PQ", "SQ", "RQ"):
        assert f"<td>{100 * m1[k]:.2f}</td><td>{100 * m2[k]:.2f}</td>" in page
    assert "Not promoted" in page and f"{m2['images']} (the same samples for both" in page
    diffed = diff_versions("panoptic-fpn", "1", "2", out=str(tmp_path / "diff.html"), uri=uri)
    assert diffed["how"] == "their registered evaluations"
    assert diffed["summary"]["PQ"] == (m1["PQ"], m2["PQ"]) and diffed["images_scored"] == m2["images"]
    for d in diffed["categories"]:
        assert d["delta"] == pytest.approx(m2["results"]["per_class"][str(d["category_id"])]["pq"]
                                           - m1["results"]["per_class"][str(d["category_id"])]["pq"])
    shown = [abs(r["delta"]) for r in diffed["images"]]
    assert shown == sorted(shown, reverse=True) and len(shown) <= min(8, m2["images"]) and 0 not in shown
    # preprocess is cached on its inputs (values: same data, same settings): its shards are reused
    made = [d for d, _, _ in os.walk(kw["root"]) if d.endswith(os.path.join("preprocess", "train_shards"))]
    assert len(made) == 1, made   # written by the first run only: the forced one hit the cache

    # a task killed the hard way (what an OOM kill or eviction does): its runs are closed FAILED
    # by the exit handler, the failed task named, nothing left RUNNING
    monkeypatch.setenv("PANOPTIC_KILL_AT", "train.iteration:2")
    with pytest.raises(TaskFailed) as failed:
        run_local(str(tmp_path / "coco"), force=True, **kw)
    monkeypatch.delenv("PANOPTIC_KILL_AT")
    assert "'train'" in str(failed.value) and "(failed task: train, marked FAILED)" in str(failed.value)
    killed = client.get_run(_latest(uri)["run_id"])
    assert killed.info.status == "FAILED" and killed.data.tags["pipeline.failed_task"] == "train"
    assert killed.data.tags["task.train"] == "failed" and killed.data.tags["task.decide"] == "succeeded"
    under = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{killed.info.run_id}'")
    trains = [r for r in under if r.data.tags["panoptic.stage"] == "train"]
    assert len(trains) == 3 and all(r.info.status == "FAILED" and r.data.tags["panoptic.failed"] for r in trains)
    assert not [r for r in under if r.info.status == "RUNNING"]   # (3: the task's retries, each killed)
    assert len(client.search_model_versions("name = 'panoptic-fpn'")) == 2

    # runs compare: all pipeline runs, current aliases from the registry
    import csv
    import io

    from components.register.compare import compare_runs

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    rows = list(csv.DictReader(io.StringIO(compare_runs(as_csv=True))))
    assert {r["version"]: r["aliases"] for r in rows if r["version"]} == {"1": "champion", "2": "challenger"}
    assert any(r["decision"] == "skip" for r in rows)
    assert "PQ" in compare_runs().splitlines()[0]


def _latest(uri: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("panoptic-fpn")
    run = client.search_runs([exp.experiment_id], filter_string="tags.`panoptic.kind` = 'pipeline'",
                             order_by=["attributes.start_time DESC"], max_results=1)[0]
    return {"run_id": run.info.run_id, "tags": run.data.tags, "metrics": run.data.metrics}
