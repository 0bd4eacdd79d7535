"""Stage 5: register the model in MLflow, alias it ``challenger``, and gate promotion to ``champion``.

The gate compares challenger and champion **on the same evaluation data**: both metric sets
carry the hash of the validation manifest they were measured on, and a comparison across
different hashes is refused (the pipeline re-scores the champion on the current validation
shards first; by hand, ``panoptic evaluate --model models:/NAME@champion`` does). Then a new
version becomes ``champion`` only if its PQ beats the champion's by more than ``margin``
(strictly: a tie never moves the alias) and no category's PQ drops by more than
``tolerance`` (both in PQ points, 0-1 scale). The first version becomes champion.

Only "model or alias not found" means "no champion yet"; any other registry failure fails the
stage, and nothing is promoted. Registering is idempotent: a re-run for the same pipeline run
and the same model file finds the version it made, instead of adding one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field

from components.common import faults, storage
from components.common.metrics import METRIC_KEYS
from components.common.tracking import CHAMPION, RegistryError, get_alias, log_parent, setup, stage_run, tracking_uri

log = logging.getLogger(__name__)

MODEL_NAME = "panoptic-fpn"
PER_CLASS_PREFIX = "pq_class_"
EVAL_ARTIFACT = "evaluation"  # where a register run keeps the metrics.json it was gated on


@dataclass(frozen=True)
class RegisterConfig:
    """Args:
        name: the registered model.
        margin: PQ (0-1) a new version must gain over the champion, strictly.
        tolerance: the largest per-category PQ drop allowed (0-1).
        promote: move ``champion`` when the gate passes (the pipeline promotes in its own step).
    """

    name: str = MODEL_NAME
    margin: float = 0.0
    tolerance: float = 0.05
    promote: bool = True


@dataclass
class GateDecision:
    promote: bool
    reason: str
    champion_version: str | None = None
    pq: float = 0.0
    champion_pq: float | None = None
    deltas: dict[str, float] = field(default_factory=dict)   # category id -> PQ(new) - PQ(champion)

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class RegisterResult:
    name: str
    version: str
    run_id: str
    aliases: list[str]
    decision: GateDecision
    reused: bool = False


class IncomparableMetrics(ValueError):
    """Challenger and champion were measured on different validation data."""


def gate(pq: float, per_class: dict[str, float], champion_pq: float | None, champion_per_class: dict[str, float],
         margin: float, tolerance: float, champion_version: str | None = None) -> GateDecision:
    """The promotion decision (pure function: numbers in, decision out)."""
    if champion_pq is None:
        return GateDecision(True, "no champion yet: the first version becomes champion", None, pq)
    deltas = {c: per_class.get(c, 0.0) - v for c, v in champion_per_class.items()}
    deltas.update({c: v for c, v in per_class.items() if c not in champion_per_class})
    worst = min(deltas.items(), key=lambda kv: kv[1], default=(None, 0.0))
    if pq <= champion_pq + margin:
        reason = f"PQ {pq:.4f} does not beat the champion's {champion_pq:.4f} by more than the margin {margin:.4f}"
        return GateDecision(False, reason, champion_version, pq, champion_pq, deltas)
    if worst[1] < -tolerance:
        reason = (f"category {worst[0]} drops by {-worst[1]:.4f} PQ, more than the tolerance {tolerance:.4f}")
        return GateDecision(False, reason, champion_version, pq, champion_pq, deltas)
    reason = (f"PQ {pq:.4f} beats {champion_pq:.4f} by more than {margin:.4f}; "
              f"no category drops more than {tolerance:.4f}")
    return GateDecision(True, reason, champion_version, pq, champion_pq, deltas)


def per_class_pq(metrics: dict) -> dict[str, float]:
    return {str(c): r["pq"] for c, r in metrics["results"]["per_class"].items()}


def summary(metrics: dict) -> dict:
    """What gate.json keeps of a metrics.json."""
    return {k: metrics.get(k) for k in (*METRIC_KEYS, "images", "val_manifest_hash")}


def champion_metrics(champion, uri: str | None = None) -> dict:
    """The metrics.json a champion version was gated on (logged by its register run). Versions
    registered before this was kept have only their run's metrics, and no validation hash: they
    compare with nothing until re-scored."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(uri))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(champion.run_id, f"{EVAL_ARTIFACT}/metrics.json", tmp)
            with open(path) as f:
                return json.load(f)
    except Exception as first:
        try:
            m = client.get_run(champion.run_id).data.metrics
        except Exception as e:
            raise RegistryError(f"cannot read the metrics of champion version {champion.version} (run "
                                f"{champion.run_id}): {type(e).__name__}: {str(e)[:300]}") from e
        if "PQ" not in m:
            raise RegistryError(f"champion version {champion.version}: its run {champion.run_id} has no PQ "
                                f"({type(first).__name__}: {str(first)[:200]})") from first
        per_class = {k[len(PER_CLASS_PREFIX):]: {"pq": v} for k, v in m.items() if k.startswith(PER_CLASS_PREFIX)}
        return {**{k: m.get(k) for k in ("PQ", "SQ", "RQ")}, "results": {"per_class": per_class},
                "val_manifest_hash": champion.tags.get("val_manifest_hash")}


def file_digest(uri: str) -> str:
    return hashlib.sha256(storage.read_bytes(uri)).hexdigest()


def _existing_version(client, name: str, pipeline_run: str, digest: str):
    """The version a previous attempt of this pipeline run registered for this model file."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}' and tags.pipeline_run_id = '{pipeline_run}'")
    except MlflowException as e:
        if "not found" in str(e).lower():
            return None
        raise
    return next((v for v in versions if v.tags.get("model_digest") == digest), None)


def register(model_uri: str, eval_dir: str, cfg: RegisterConfig = RegisterConfig(), *,
             champion_eval: dict | None = None, parent_run_id: str | None = None, uri: str | None = None,
             experiment: str | None = None, lineage: dict | None = None) -> RegisterResult:
    """Log ``model_uri`` (a model.pt) as an MLflow pyfunc, register a version (alias
    ``challenger``), decide the gate against the current ``champion`` and, with
    ``cfg.promote``, move ``champion`` when the gate passes.

    Args:
        eval_dir: ``panoptic evaluate``'s output for this model (``metrics.json``).
        champion_eval: the champion's metrics.json on the same validation data (None: use the
            metrics the champion was registered with, if they are on the same data).
        parent_run_id: the pipeline's MLflow run (the stage run nests under it; also the key
            that makes a re-run reuse its version).
        lineage: tags to record (manifest hashes, data fingerprint, parent model version ...).
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    from components.register.pyfunc import log_pyfunc

    metrics = json.loads(storage.read_text(storage.join(eval_dir, "metrics.json")))
    lineage = {**(lineage or {}), "val_manifest_hash": metrics.get("val_manifest_hash", "")}
    client = MlflowClient(tracking_uri(uri))
    setup(uri, experiment)
    name = cfg.name
    champion = get_alias(name, CHAMPION, uri)  # RegistryError unless "not found": fails the stage
    champ = None
    if champion is not None:
        champ = champion_eval if champion_eval is not None else champion_metrics(champion, uri)
        if champ.get("val_manifest_hash") != metrics.get("val_manifest_hash"):
            raise IncomparableMetrics(
                f"champion {name} version {champion.version} was measured on validation manifest "
                f"{str(champ.get('val_manifest_hash'))[:12]}, this model on "
                f"{str(metrics.get('val_manifest_hash'))[:12]}; "
                f"evaluate the champion on the same shards (panoptic evaluate --model models:/{name}@champion "
                f"--shards VAL --out DIR) and pass its metrics (--champion-eval-dir DIR)")
    decision = gate(metrics["PQ"], per_class_pq(metrics), champ["PQ"] if champ else None,
                    per_class_pq(champ) if champ else {}, cfg.margin, cfg.tolerance,
                    champion.version if champion else None)
    digest = file_digest(model_uri)
    existing = _existing_version(client, name, parent_run_id, digest) if parent_run_id else None
    with tempfile.TemporaryDirectory() as tmp, stage_run("register", parent_run_id, uri, experiment) as run_ml:
        run_id = run_ml.active_run().info.run_id
        run_ml.log_metrics({"PQ": metrics["PQ"], "SQ": metrics["SQ"], "RQ": metrics["RQ"],
                            **{f"{PER_CLASS_PREFIX}{c}": v for c, v in per_class_pq(metrics).items()}})
        run_ml.set_tags({f"lineage.{k}": v for k, v in lineage.items()})
        run_ml.log_dict(metrics, f"{EVAL_ARTIFACT}/metrics.json")
        run_ml.log_dict({"decision": decision.to_json(), "challenger": summary(metrics),
                         "champion": {"version": champion.version if champion else None,
                                      "source": (champ or {}).get("source", "registered"), **summary(champ or {})}},
                        "gate.json")
        run_ml.set_tags({"gate.promote": str(decision.promote), "gate.reason": decision.reason[:4000]})
        run_ml.log_params({"gate.margin": cfg.margin, "gate.tolerance": cfg.tolerance})
        if existing is not None:
            version = str(existing.version)
            log.info("%s version %s was registered for this pipeline run already: reused", name, version)
        else:
            local_model = os.path.join(tmp, "model.pt")
            with open(local_model, "wb") as f:
                f.write(storage.read_bytes(model_uri))
            logged = log_pyfunc(local_model)
            faults.point("register.model_logged")
            # the keys of idempotency go on the version as it is created: a re-run after a kill
            # at any later point finds it
            version = str(mlflow.register_model(logged.model_uri, name, tags={
                "model_digest": digest, "register_run_id": run_id,
                **({"pipeline_run_id": parent_run_id} if parent_run_id else {})}).version)
    faults.point("register.version_created")
    tags = {"PQ": f"{metrics['PQ']:.6f}", "gate": "pass" if decision.promote else "fail",
            "gate.reason": decision.reason[:4000], **lineage}
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, str(v))
    faults.point("register.tagged")
    pipeline_run = client.get_run(parent_run_id) if parent_run_id else None
    client.update_model_version(name, version, description=version_description(
        metrics, decision, lineage, champ, cfg, pipeline_run.info if pipeline_run else None, tracking_uri(uri)))
    client.set_registered_model_alias(name, "challenger", version)
    aliases = ["challenger"]
    if cfg.promote and decision.promote:
        promote_champion(name, version, uri=uri, cfg=cfg)
        aliases.append("champion")
    elif champion is None or not client.get_registered_model(name).description:
        describe_model(client, name, cfg)
    log_parent(parent_run_id, tags={"model.name": name, "model.version": version,
                                    "model.aliases": ",".join(aliases), "gate.promote": decision.promote,
                                    "gate.reason": decision.reason[:4000]}, uri=uri)
    return RegisterResult(name, version, run_id, aliases, decision, reused=existing is not None)


def promote_champion(name: str, version: str, uri: str | None = None, cfg: RegisterConfig = RegisterConfig()) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(uri))
    client.set_registered_model_alias(name, CHAMPION, str(version))
    describe_model(client, name, cfg)


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * float(x):.2f}"


def run_link(run_info, tracking: str) -> str:
    """A Markdown link to a run in MLflow's UI: relative (the UI's own address: it works
    wherever the UI is served); absolute when the tracking URI is the server's."""
    path = f"#/experiments/{run_info.experiment_id}/runs/{run_info.run_id}"
    base = tracking.rstrip("/") + "/" if tracking.startswith(("http://", "https://")) else ""
    return f"[{run_info.run_name or run_info.run_id}]({base}{path})"


def version_description(metrics: dict, decision: GateDecision, lineage: dict, champion: dict | None,
                        cfg: RegisterConfig, pipeline_run=None, tracking: str = "") -> str:
    """A model version's description (Markdown), written from the facts: what it was trained
    on, how well it does, what the gate decided against which champion, and where to look."""
    from components.common.datasets import digest_of

    rows = [("all", "PQ", "SQ", "RQ"), ("things", "PQ_th", "SQ_th", "RQ_th"), ("stuff", "PQ_st", "SQ_st", "RQ_st")]
    table = "\n".join(f"| {label} | {_pct(metrics.get(a))} | {_pct(metrics.get(b))} | {_pct(metrics.get(c))} |"
                      for label, a, b, c in rows)
    verdict = "**promoted to champion**" if decision.promote else "**not promoted**"
    if decision.champion_version is None:
        compared = ""   # the reason says it: no champion yet
    else:
        source = (champion or {}).get("source", "registered")
        how = {"logged": "its registered metrics, measured on the same validation data",
               "re-scored": "re-evaluated on this version's validation data"}.get(source, source)
        compared = (f"Compared with champion version {decision.champion_version} (PQ {_pct(decision.champion_pq)}; "
                    f"{how}).")
    lines = [
        f"Panoptic FPN `{lineage.get('config', '?')}`: PQ **{_pct(metrics.get('PQ'))}** on "
        f"{metrics.get('images', '?')} validation images.",
        "",
        "| | PQ | SQ | RQ |", "|---|---|---|---|", table,
        "",
        f"Gate: {verdict}: {decision.reason} (margin {cfg.margin}, per-category tolerance {cfg.tolerance}). "
        + compared,
        "",
        "Data (MLflow dataset digests):",
        f"- training subset `{digest_of(lineage.get('train_manifest_hash', ''))}`, shards "
        f"`{digest_of(lineage.get('train_shards_hash', ''))}`",
        f"- validation subset `{digest_of(lineage.get('val_manifest_hash', '') or '')}`",
    ]
    if lineage.get("parent_model_version"):
        lines.append(f"- initialised from `{lineage['parent_model_version']}`")
    if lineage.get("code_version"):
        lines.append(f"- code `{lineage['code_version']}`")
    if pipeline_run is not None:
        lines += ["", f"Pipeline run: {run_link(pipeline_run, tracking)} (its stages hold the report, the "
                      "per-class table and the training curves)."]
    return "\n".join(lines)


def describe_model(client, name: str, cfg: RegisterConfig = RegisterConfig()) -> None:
    """The registered model's description: what it is, how versions are promoted, and the
    current champion (rewritten at each promotion)."""
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except Exception:
        champion = None
    now = (f"Champion: version {champion.version} (PQ {_pct(champion.tags.get('PQ'))}, config "
           f"`{champion.tags.get('config', '?')}`)." if champion is not None else "No champion yet.")
    client.update_registered_model(name, description="\n".join([
        "Panoptic FPN (detectron2's architecture and checkpoints) for COCO panoptic segmentation, trained "
        "and registered by the panoptic-fpn pipeline. Load a version with "
        f"`mlflow.pyfunc.load_model('models:/{name}@champion')` or `panoptic predict --model "
        f"models:/{name}@champion`.",
        "",
        "Every version is registered with the alias `challenger`; it becomes `champion` only when its PQ beats "
        f"the champion's, on the same validation data, by more than the margin (now {cfg.margin}) and no "
        f"category's PQ drops more than the tolerance (now {cfg.tolerance}). Each version's description says "
        "what it was trained on and what the gate decided.",
        "",
        now]))
