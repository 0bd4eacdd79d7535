"""Stage 5: register the model in MLflow, alias it ``challenger``, and gate promotion to ``champion``.

The gate compares challenger and champion **on the same evaluation data**: both metric sets
carry the digest of exactly the validation samples they were measured on
(``val_samples_digest``: the subset and the images scored), and a comparison across different
digests is refused (the pipeline re-scores the champion on the current validation shards
first; by hand, ``panoptic evaluate --model models:/NAME@champion`` does). Then a new version
becomes ``champion`` only if its PQ beats the champion's by more than ``margin`` (strictly: a
tie never moves the alias) and no category's PQ drops by more than ``tolerance`` (both in PQ
points, 0-1 scale). The first version becomes champion.

Nothing read is trusted: every metric must be a finite number in 0..1 (a NaN or 999 stops the
stage, naming the file), margin and tolerance too, and the evaluation must be of the very model
file registered (``model_digest``). Only "model or alias not found" means "no champion yet";
any other registry failure fails the stage, and nothing is promoted.

Registering is idempotent and safe when runs overlap: a re-run for the same pipeline run and
model file finds the version it made, and the champion is moved only while the registry lock is
held (``registry_lock``: MLflow has no compare-and-set for aliases, but creating a registered
model is atomic), after checking again, against the champion of that moment, that the version
beats it on the same data. So the champion is always the best version that passed, whatever the
interleaving of two runs.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from components.common import faults, storage
from components.common.hashing import file_digest
from components.common.metrics import METRIC_KEYS, PER_IMAGE_FILE, InvalidMetrics, check_metrics, unit_number
from components.common.tracking import CHAMPION, RegistryError, get_alias, log_parent, setup, stage_run, tracking_uri

log = logging.getLogger(__name__)

MODEL_NAME = "panoptic-fpn"
MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")   # no quotes: names go into MLflow filters
PER_CLASS_PREFIX = "pq_class_"
EVAL_ARTIFACT = "evaluation"  # where a register run keeps the metrics.json it was gated on


@dataclass(frozen=True)
class RegisterSettings:
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

    def __post_init__(self):
        if not isinstance(self.name, str) or not MODEL_NAME_RE.fullmatch(self.name):
            raise ValueError(f"register: model name {str(self.name)[:80]!r}: use letters, digits, '.', '_' and '-' "
                             f"(at most 100), starting with a letter or digit")
        for key in ("margin", "tolerance"):
            value = getattr(self, key)
            if not unit_number(value):
                raise ValueError(f"register: {key} must be a finite number in 0..1 (PQ points), not {value!r}")


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
    not_promoted: str = ""   # passed the gate but was not promoted: why (a champion promoted meanwhile)

    @property
    def outcome(self) -> str:
        """What happened, in one line: the console's, the tags' and the description's words."""
        if self.not_promoted:
            return f"PASS, not promoted: {self.not_promoted}"
        return f"{'PASS' if self.decision.promote else 'FAIL'}: {self.decision.reason}"


class IncomparableMetrics(ValueError):
    """Challenger and champion were measured on different validation data."""


def gate(pq: float, per_class: dict[str, float], champion_pq: float | None, champion_per_class: dict[str, float],
         margin: float, tolerance: float, champion_version: str | None = None) -> GateDecision:
    """The promotion decision (pure function: numbers in, decision out). Every number must be
    finite and in 0..1: anything else (a NaN compares false both ways) is a ValueError."""
    numbers = {"PQ": pq, "margin": margin, "tolerance": tolerance,
               **{f"PQ of {c}": v for c, v in per_class.items()},
               **({} if champion_pq is None else {"champion PQ": champion_pq}),
               **{f"champion PQ of {c}": v for c, v in champion_per_class.items()}}
    bad = [f"{k}={v!r}" for k, v in numbers.items() if not unit_number(v)]
    if bad:
        raise InvalidMetrics(f"the gate refuses {', '.join(bad[:6])}: every figure must be a finite number in 0..1")
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
    return {k: metrics.get(k) for k in (*METRIC_KEYS, "images", "val_manifest_hash", "val_samples_digest",
                                        "model_digest")}


def champion_metrics(champion, uri: str | None = None) -> dict:
    """The metrics.json a champion version was gated on (logged by its register run), checked."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(uri))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(champion.run_id, f"{EVAL_ARTIFACT}/metrics.json", tmp)
            metrics = storage.read_json(path, "champion's metrics")
    except ValueError:
        raise
    except Exception as e:
        raise RegistryError(f"cannot read the metrics of champion version {champion.version} (run "
                            f"{champion.run_id}): {type(e).__name__}: {str(e)[:300]}") from e
    return check_metrics(metrics, f"champion version {champion.version}'s {EVAL_ARTIFACT}/metrics.json")


LOCK_STALE_S = 120.0   # a lock whose heartbeat is older than this was left by a register that died
LOCK_HEARTBEAT_S = 15.0
LOCK_SAY_S = 5.0       # a waiter says who holds the lock this often
# what a create of a held lock answers. MLflow's SQL store, on the unique-name violation, looks the
# existing model up to word its error (mlflow/store/model_registry/sqlalchemy_store.py,
# create_registered_model's IntegrityError branch); when the holder released it in between, that
# lookup answers RESOURCE_DOES_NOT_EXIST: the lock was held an instant ago and is free now.
_TAKEN = ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST")


@contextmanager
def registry_lock(client, name: str, timeout_s: float = 600.0, poll_s: float = 0.5):
    """Hold ``<name>.lock`` in the model registry while versions and aliases of ``name`` change.

    MLflow offers no compare-and-set on aliases; creating a registered model is atomic (its name
    is unique in the store, local or server), so that creation is the lock and its deletion the
    release. The holder refreshes the lock's ``panoptic.lock.heartbeat`` tag every
    ``LOCK_HEARTBEAT_S``; a waiter says who holds it and since when every ``LOCK_SAY_S``, and
    breaks a lock whose heartbeat stopped ``LOCK_STALE_S`` ago (its holder was killed) with a
    warning. Breaking is itself locked (``<name>.lock.break``) and re-checks, under that lock,
    that the lock is still the stale one, so two waiters never both break it and both take it.
    A registry failure while taking it is a ``RegistryError``: nothing is promoted."""
    import threading

    from mlflow.exceptions import MlflowException

    lock = f"{name}.lock"
    owner = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"
    t_start = time.time()
    deadline, said = t_start + timeout_s, 0.0
    while True:
        now = time.time()
        try:
            client.create_registered_model(lock, tags={"panoptic.lock": owner, "panoptic.lock.since": str(now),
                                                       "panoptic.lock.heartbeat": str(now)},
                                           description=f"a transient lock of `panoptic register` for {name}")
            break
        except MlflowException as e:
            if e.error_code not in _TAKEN:
                raise RegistryError(f"cannot take the registry lock {lock}: {e.error_code}: {str(e)[:300]}") from e
        held = _lock_state(client, lock)
        if held is None:
            continue   # released meanwhile
        holder, since, beat = held
        if holder == owner:   # our own create, done there, its answer lost and retried by MLflow's client
            log.info("registry lock %s: taken (the registry made it before its answer to us was lost)", lock)
            break
        now = time.time()
        if now - beat > LOCK_STALE_S:
            if not _break_stale(client, lock, held):
                time.sleep(poll_s)   # another waiter is breaking it
            continue
        if now > deadline:
            raise RegistryError(f"the registry lock {lock} is held by {holder} for {now - since:.0f} s; nothing was "
                                f"registered or promoted (delete the registered model {lock} if its holder is gone)")
        if now - said >= LOCK_SAY_S:
            log.info("waiting for the registry lock %s: held by %s for %.0f s (last heartbeat %.0f s ago); "
                     "waited %.0f s of %.0f", lock, holder, now - since, now - beat, now - t_start, timeout_s)
            said = now
        time.sleep(poll_s)
    stop = threading.Event()

    def heartbeat():
        while not stop.wait(LOCK_HEARTBEAT_S):
            try:
                client.set_registered_model_tag(lock, "panoptic.lock.heartbeat", str(time.time()))
            except Exception as e:   # the registry blinks: the next beat may pass; a long gap breaks the lock
                log.warning("registry lock %s: heartbeat failed (%s)", lock, e)

    beating = threading.Thread(target=heartbeat, daemon=True)
    beating.start()
    try:
        yield
    finally:
        stop.set()
        beating.join(timeout=5)
        _release(client, lock)


def _lock_state(client, lock: str):
    """(holder, since, last heartbeat) of a lock, or None when there is none."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(lock).tags
    except MlflowException:
        return None
    since = float(tags.get("panoptic.lock.since", "0") or 0)
    return tags.get("panoptic.lock", "?"), since, float(tags.get("panoptic.lock.heartbeat", since) or since)


def _break_stale(client, lock: str, seen: tuple) -> bool:
    """Delete ``lock`` if it is still the stale one ``seen``, holding ``<lock>.break`` meanwhile: a
    second waiter that saw the same stale lock finds the breaker's lock (or, after, a fresh one)
    and breaks nothing."""
    from mlflow.exceptions import MlflowException

    breaker = f"{lock}.break"
    try:
        client.create_registered_model(breaker, tags={"panoptic.lock.since": str(time.time())})
    except MlflowException as e:
        if e.error_code not in _TAKEN:
            raise RegistryError(f"cannot take {breaker}: {e.error_code}: {str(e)[:300]}") from e
        state = _lock_state(client, breaker)   # another waiter breaks it; a breaker that died long ago goes
        if state is not None and time.time() - state[1] > LOCK_STALE_S:
            _release(client, breaker)
        return False
    try:
        if _lock_state(client, lock) != seen:
            return False   # released, or taken afresh, since it was seen stale
        holder, since, beat = seen
        log.warning("breaking the registry lock %s held by %s since %.0f s: no heartbeat for %.0f s (its holder "
                    "was killed?)", lock, holder, time.time() - since, time.time() - beat)
        _release(client, lock)
        return True
    finally:
        _release(client, breaker)


def _release(client, lock: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model(lock)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            log.error("could not release the registry lock %s (%s): delete that registered model by hand", lock, e)


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


def _one_version(client, name: str, register_run_id: str, version: str) -> str:
    """The version this registration made. MLflow's client retries a create whose answer was lost
    on the way (the server made the version, the connection closed): that makes a second version
    of one registration. The first is kept, the later ones deleted, said in the log."""
    made = sorted(int(v.version) for v in client.search_model_versions(
        f"name = '{name}' and tags.register_run_id = '{register_run_id}'"))
    if len(made) <= 1:
        return version
    for extra in made[1:]:
        client.delete_model_version(name, str(extra))
    log.warning("%s: the registry made versions %s for one registration (a create retried after its answer was "
                "lost): kept version %d, deleted the others", name, ", ".join(map(str, made)), made[0])
    return str(made[0])


def register(model_uri: str, eval_dir: str, cfg: RegisterSettings = RegisterSettings(), *,
             champion_eval: dict | None = None, parent_run_id: str | None = None, uri: str | None = None,
             experiment: str | None = None, lineage: dict | None = None, val_shards: str | None = None,
             champion_eval_dir: str | None = None, report_out: str | None = None) -> RegisterResult:
    """Log ``model_uri`` (a model.pt) as an MLflow pyfunc, register a version (alias
    ``challenger``), decide the gate against the current ``champion`` and, with
    ``cfg.promote``, move ``champion`` when the gate passes (under the registry lock).

    Args:
        eval_dir: ``panoptic evaluate``'s output for this model (``metrics.json``).
        champion_eval: the champion's metrics.json on the same validation data (None: use the
            metrics the champion was registered with, if they are on the same data).
        parent_run_id: the pipeline's MLflow run (the stage run nests under it; also the key
            that makes a re-run reuse its version).
        lineage: tags to record (manifest hashes, data fingerprint, parent model version ...).
        val_shards: the validation shards both were scored on: with a champion, ``gate.html``
            (champion vs challenger) is built from the two evaluations, logged on the register run,
            named on the version and, with ``report_out``, written there too (KFP's HTML artifact).
        champion_eval_dir: the champion's evaluation on these shards (re-scored); else the one
            it was registered with.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    from components.register.pyfunc import log_pyfunc

    metrics_uri = storage.join(eval_dir, "metrics.json")
    metrics = check_metrics(storage.read_json(metrics_uri, "evaluation"), metrics_uri)
    digest = file_digest(model_uri)
    if metrics.get("model_digest") != digest:
        raise InvalidMetrics(f"{metrics_uri} is the evaluation of model {str(metrics.get('model_digest'))[:12]} "
                             f"({metrics.get('model')}), not of {model_uri} ({digest[:12]}): evaluate this model "
                             f"(panoptic evaluate --model {model_uri}). Nothing was registered")
    if champion_eval is not None:
        champion_eval = check_metrics(champion_eval, "the champion's evaluation")
    lineage = {**(lineage or {}), "val_manifest_hash": metrics.get("val_manifest_hash", ""),
               "val_samples_digest": metrics.get("val_samples_digest", "")}
    client = MlflowClient(tracking_uri(uri))
    setup(uri, experiment)
    name = cfg.name
    champion = get_alias(name, CHAMPION, uri)  # RegistryError unless "not found": fails the stage
    champ = _champion_on_same_data(name, champion, champion_eval, metrics, uri)
    decision = gate(metrics["PQ"], per_class_pq(metrics), champ["PQ"] if champ else None,
                    per_class_pq(champ) if champ else {}, cfg.margin, cfg.tolerance,
                    champion.version if champion else None)
    faults.point("register.gated")
    with tempfile.TemporaryDirectory() as tmp, stage_run("register", parent_run_id, uri, experiment) as run_ml:
        run_id = run_ml.active_run().info.run_id
        run_ml.set_tags({f"lineage.{k}": v for k, v in lineage.items()})
        run_ml.log_dict(metrics, f"{EVAL_ARTIFACT}/metrics.json")
        if storage.exists(storage.join(eval_dir, PER_IMAGE_FILE)):   # a later gate report compares against it
            run_ml.log_text(storage.read_text(storage.join(eval_dir, PER_IMAGE_FILE)),
                            f"{EVAL_ARTIFACT}/{PER_IMAGE_FILE}")
        run_ml.log_dict({"decision": decision.to_json(), "challenger": summary(metrics),
                         "champion": {"version": champion.version if champion else None,
                                      "source": (champ or {}).get("source", "registered"), **summary(champ or {})}},
                        "gate.json")
        run_ml.set_tags({"gate.promote": str(decision.promote), "gate.reason": decision.reason[:4000]})
        run_ml.log_params({"gate.margin": cfg.margin, "gate.tolerance": cfg.tolerance})
        def upload():
            local_model = os.path.join(tmp, "model.pt")
            with open(local_model, "wb") as f:
                f.write(storage.read_bytes(model_uri))
            logged = log_pyfunc(local_model, **logged_model_fields(name, digest, metrics, lineage, cfg))
            faults.point("register.model_logged")
            return logged

        existing = _existing_version(client, name, parent_run_id, digest) if parent_run_id else None
        logged = upload() if existing is None else None   # outside the lock: an upload can take a while
        # the figures go on the run and, when it was logged here, on the LoggedModel (its page lists them)
        run_ml.log_metrics({"PQ": metrics["PQ"], "SQ": metrics["SQ"], "RQ": metrics["RQ"],
                            **{f"{PER_CLASS_PREFIX}{c}": v for c, v in per_class_pq(metrics).items()}},
                           model_id=logged.model_id if logged is not None else None)
        with registry_lock(client, name):   # one version per pipeline run and model file, runs overlapping or not
            existing = _existing_version(client, name, parent_run_id, digest) if parent_run_id else None
            if existing is None:
                logged = logged or upload()
                # the keys of idempotency go on the version as it is created: a re-run after a kill
                # at any later point finds it
                version = str(mlflow.register_model(logged.model_uri, name, tags={
                    "model_digest": digest, "register_run_id": run_id,
                    **({"pipeline_run_id": parent_run_id} if parent_run_id else {})}).version)
                version = _one_version(client, name, run_id, version)
            else:
                version = str(existing.version)
                log.info("%s version %s was registered for this pipeline run already: reused", name, version)
    faults.point("register.version_created")
    if logged is not None:
        mlflow.set_logged_model_tags(logged.model_id, {"registered_model": name, "registered_version": version})
    tags = {"PQ": f"{metrics['PQ']:.6f}", "gate": "pass" if decision.promote else "fail",
            "gate.reason": decision.reason[:4000], "gate.champion": decision.champion_version or "", **lineage}
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, str(v))
    faults.point("register.tagged")
    pipeline_run = client.get_run(parent_run_id) if parent_run_id else None
    client.update_model_version(name, version, description=version_description(
        metrics, decision, lineage, champ, cfg, pipeline_run.info if pipeline_run else None, tracking_uri(uri)))
    if champion is not None and val_shards:
        report = gate_report(client, name, champion, version, eval_dir, champion_eval_dir, val_shards, decision,
                             run_id, model_uri, report_out, tracking_uri(uri))
        client.set_model_version_tag(name, version, "gate.report", report)
    elif report_out:   # KFP uploads the task's HTML output whatever happened: say why there is no comparison
        from components.register.gate_report import no_champion_page

        storage.write_text(report_out, no_champion_page(name, version, metrics, decision.reason))
    client.set_registered_model_alias(name, "challenger", version)
    aliases, not_promoted, reason = ["challenger"], "", decision.reason
    if cfg.promote and decision.promote:
        not_promoted = promote_champion(name, version, uri=uri, cfg=cfg, metrics=metrics)
        if not not_promoted:
            aliases.append("champion")
            reason = client.get_model_version(name, version).tags.get("gate.reason", reason)   # promoted over?
    elif champion is None or not client.get_registered_model(name).description:
        describe_model(client, name, cfg)
    log_parent(parent_run_id, tags={"model.name": name, "model.version": version,
                                    "model.aliases": ",".join(aliases),
                                    "gate.promote": decision.promote and not not_promoted,
                                    "gate.reason": (f"passed the gate but not promoted: {not_promoted}" if not_promoted
                                                    else reason)[:4000]}, uri=uri)
    return RegisterResult(name, version, run_id, aliases, decision, reused=existing is not None,
                          not_promoted=not_promoted)


def registered_evaluation(client, name: str, mv, folder: str, label: str, tracking: str):
    """The evaluation model version ``mv`` was gated on (its register run's metrics.json and
    per_image.csv, downloaded into ``folder``), its model drawing any images shown; None when
    the register run holds no per_image.csv. A registry failure raises."""
    source = mv.tags.get("register_run_id") or mv.run_id
    held = {a.path for a in client.list_artifacts(source, EVAL_ARTIFACT)}
    if f"{EVAL_ARTIFACT}/{PER_IMAGE_FILE}" not in held:
        return None
    from components.register import gate_report as gr

    for f in ("metrics.json", PER_IMAGE_FILE):
        client.download_artifacts(source, f"{EVAL_ARTIFACT}/{f}", folder)   # lands as folder/<its name>
    return gr.Evaluation.read(folder, label, model_uri=f"models:/{name}/{mv.version}", tracking=tracking)


def gate_report(client, name: str, champion, version: str, eval_dir: str, champion_eval_dir: str | None,
                val_shards: str, decision: GateDecision, run_id: str, model_uri: str, report_out: str | None,
                tracking: str) -> str:
    """Build ``gate.html`` (components/register/gate_report.py) and log it on the register run;
    returns its address (``runs:/<register run>/gate.html``) or why it is missing. The report
    explains the decision; it never makes it: a report that cannot be built leaves the decision
    as it is, and says so."""
    from components.register import gate_report as gr

    with tempfile.TemporaryDirectory() as tmp:
        try:
            challenger = gr.Evaluation.read(eval_dir, f"v{version} (challenger)")
            label = f"v{champion.version} (champion)"
            if champion_eval_dir and storage.exists(storage.join(champion_eval_dir, PER_IMAGE_FILE)):
                champ = gr.Evaluation.read(champion_eval_dir, label)
            else:   # the evaluation it was registered with; its model draws the images shown
                champ = registered_evaluation(client, name, champion, os.path.join(tmp, "champion"), label,
                                              tracking)
                if champ is None:
                    raise FileNotFoundError(f"{name} version {champion.version} was registered without "
                                            f"{EVAL_ARTIFACT}/{PER_IMAGE_FILE}")
            verdict = (f"{'Promoted' if decision.promote else 'Not promoted'}: {decision.reason}")
            path = os.path.join(tmp, gr.GATE_REPORT)
            built = gr.build(champ, challenger, val_shards, path, verdict=verdict, facts={
                "registered model": name, "challenger model": model_uri,
                "champion model": f"models:/{name}/{champion.version}"})
        except Exception as e:   # any failure: the report is missing, the decision stands
            log.warning("gate.html for %s version %s not built: %s: %s", name, version, type(e).__name__, e)
            return f"not built: {type(e).__name__}: {str(e)[:300]}"
        client.log_artifact(run_id, path)
        if report_out:
            storage.write_bytes(report_out, open(path, "rb").read())
        log.info("gate.html: %s version %s vs champion %s, %d categories, %d images, built in %.1f s", name, version,
                 champion.version, len(built["categories"]), len(built["images"]), built["seconds"])
    return f"runs:/{run_id}/{gr.GATE_REPORT}"


def logged_model_fields(name: str, digest: str, metrics: dict, lineage: dict, cfg: RegisterSettings) -> dict:
    """The LoggedModel's name, params and tags: ``<config>-<model digest>`` (one name per
    trained model, readable in MLflow's Models tab), what it was trained from and gated with."""
    config = str(lineage.get("config") or name)
    params = {k: str(v) for k, v in lineage.items()
              if k in ("config", "code_version", "parent_model_version", "data_fingerprint") and v not in ("", None)}
    params.update({"gate.margin": str(cfg.margin), "gate.tolerance": str(cfg.tolerance),
                   "val_images": str(metrics.get("images", ""))})
    tags = {"model_digest": digest, "mlflow.note.content":
            f"Panoptic FPN `{config}` (model.pt sha256 {digest[:12]}), PQ {_pct(metrics.get('PQ'))} on "
            f"{metrics.get('images', '?')} validation images; registered as {name}."}
    return {"name": re.sub(r"[^A-Za-z0-9_.-]", "-", f"{config}-{digest[:8]}")[:200], "params": params, "tags": tags}


def _champion_on_same_data(name: str, champion, champion_eval: dict | None, metrics: dict, uri: str | None):
    """The champion's metrics measured on exactly the challenger's validation samples, or None
    when there is no champion; ``IncomparableMetrics`` when they were measured on other data."""
    if champion is None:
        return None
    champ = champion_eval if champion_eval is not None else champion_metrics(champion, uri)
    if champ.get("val_samples_digest") != metrics.get("val_samples_digest") or not metrics.get("val_samples_digest"):
        raise IncomparableMetrics(
            f"champion {name} version {champion.version} was measured on validation samples "
            f"{str(champ.get('val_samples_digest'))[:12]} ({champ.get('images')} images), this model on "
            f"{str(metrics.get('val_samples_digest'))[:12]} ({metrics.get('images')} images); "
            f"evaluate the champion on the same shards (panoptic evaluate --model models:/{name}@champion "
            f"--shards VAL --out DIR) and pass its metrics (--champion-eval-dir DIR)")
    return champ


def version_metrics(client, name: str, version: str) -> dict:
    """The metrics.json version ``version`` was gated on (its register run's), checked."""
    mv = client.get_model_version(name, str(version))
    run_id = mv.tags.get("register_run_id") or mv.run_id
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, f"{EVAL_ARTIFACT}/metrics.json", tmp)
        return check_metrics(storage.read_json(path, "version's metrics"), f"{name} version {version}'s metrics")


def promote_champion(name: str, version: str, uri: str | None = None, cfg: RegisterSettings = RegisterSettings(),
                     metrics: dict | None = None) -> str:
    """Move ``champion`` to ``version``, under the registry lock, if it still beats the champion
    of this moment (another run may have promoted one since this version was gated): compared
    on the same validation samples, with the same margin and tolerance. Returns "" when it
    moved, else why not (a champion measured on other data leaves the alias as it is); then the
    version's record is corrected while the lock is held (``record_not_promoted``). A version
    that beats a champion promoted meanwhile too is promoted, and its record says which it beat
    (``record_promoted_over``): its gate was decided against another champion, or none."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(uri))
    with registry_lock(client, name):
        current = get_alias(name, CHAMPION, uri)
        if current is not None and str(current.version) != str(version):
            mine = metrics if metrics is not None else version_metrics(client, name, version)
            theirs = champion_metrics(current, uri)
            why, again = "", None
            if theirs.get("val_samples_digest") != mine.get("val_samples_digest"):
                why = (f"version {current.version} was promoted meanwhile, measured on other validation samples; "
                       f"run the pipeline again to compare them")
            else:
                again = gate(mine["PQ"], per_class_pq(mine), theirs["PQ"], per_class_pq(theirs), cfg.margin,
                             cfg.tolerance, str(current.version))
                if not again.promote:
                    why = f"version {current.version} was promoted meanwhile, and against it: {again.reason}"
            if why:
                log.warning("%s version %s passed the gate but is not promoted: %s", name, version, why)
                record_not_promoted(client, name, version, why)
                return why
            mv = client.get_model_version(name, str(version))
            if mv.tags.get("gate.champion", "") != str(current.version):
                record_promoted_over(client, mv, str(current.version), again.reason)
        faults.point("register.before_promote")
        client.set_registered_model_alias(name, CHAMPION, str(version))
        describe_model(client, name, cfg)
    return ""


PROMOTED_OVER = "version {champion} was promoted meanwhile, and this one beats it too: {reason}"


def record_promoted_over(client, mv, champion: str, reason: str) -> None:
    """The records of version ``mv`` promoted over a champion its gate never saw (promoted by an
    overlapping run after this version was gated): its gate tags, description, register run
    and pipeline run name that champion and the comparison made under the lock."""
    name, version = mv.name, str(mv.version)
    outcome = PROMOTED_OVER.format(champion=champion, reason=reason)
    log.info("%s version %s: %s", name, version, outcome)
    for k, v in {"gate.reason": outcome[:4000], "gate.champion": champion}.items():
        client.set_model_version_tag(name, version, k, v)
    client.update_model_version(name, version, description=f"**Promoted over version {champion}**, promoted "
                                f"meanwhile: {reason}\n\n{mv.description or ''}")
    for run_id in (mv.tags.get("register_run_id"), mv.tags.get("pipeline_run_id")):
        if run_id:
            client.set_tag(run_id, "gate.reason", outcome[:4000])


def record_not_promoted(client, name: str, version: str, why: str) -> None:
    """The records of a version that passed its gate but lost the champion to another run: its
    tags, its description's verdict and its register run say so, not "promoted"."""
    outcome = f"passed the gate but not promoted: {why}"
    for k, v in {"gate": "pass", "gate.promote": "False", "gate.outcome": outcome[:4000]}.items():
        client.set_model_version_tag(name, version, k, v)
    mv = client.get_model_version(name, version)
    description = (mv.description or "").replace("**promoted to champion**", "**passed the gate, not promoted**")
    client.update_model_version(name, version, description=f"**Not promoted**: {outcome}\n\n{description}")
    run_id = mv.tags.get("register_run_id")
    if run_id:
        client.set_tag(run_id, "gate.promote", "False")
        client.set_tag(run_id, "gate.outcome", outcome[:4000])


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * float(x):.2f}"


def run_link(run_info, tracking: str) -> str:
    """A Markdown link to a run in MLflow's UI: relative (the UI's own address: it works
    wherever the UI is served); absolute when the tracking URI is the server's."""
    path = f"#/experiments/{run_info.experiment_id}/runs/{run_info.run_id}"
    base = tracking.rstrip("/") + "/" if tracking.startswith(("http://", "https://")) else ""
    return f"[{run_info.run_name or run_info.run_id}]({base}{path})"


def version_description(metrics: dict, decision: GateDecision, lineage: dict, champion: dict | None,
                        cfg: RegisterSettings, pipeline_run=None, tracking: str = "") -> str:
    """A model version's description (Markdown), written from the facts: what it was trained
    on, how well it does, what the gate decided against which champion, and where to look."""
    from components.common.datasets import digest_of

    rows = [("all", "PQ", "SQ", "RQ"), ("things", "PQ_th", "SQ_th", "RQ_th"), ("stuff", "PQ_st", "SQ_st", "RQ_st")]
    # an aligned block, not a Markdown table: MLflow's UI draws tables without cell padding
    # ("73.9087.3983.96"); a fenced block reads the same there, in the raw text and in an API
    table = "\n".join([f"{'':8s}{'PQ':>8s}{'SQ':>8s}{'RQ':>8s}"] + [
        f"{label:8s}{_pct(metrics.get(a)):>8s}{_pct(metrics.get(b)):>8s}{_pct(metrics.get(c)):>8s}"
        for label, a, b, c in rows])
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
        # plain words first: the versions list shows the description's start as raw text
        f"Panoptic FPN {lineage.get('config', '?')}, PQ {_pct(metrics.get('PQ'))} on {metrics.get('images', '?')} "
        f"validation images: {'promoted to champion' if decision.promote else 'not promoted'}.",
        "",
        "```", table, "```",
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
    if lineage.get("model_checkpoint") == "best":
        lines.append(f"- the best {lineage.get('model_metric', 'PQ')} of the evaluations during training: iteration "
                     f"{lineage.get('model_iteration', '?')}")
    if decision.champion_version is not None:
        lines += ["", f"Side by side with champion version {decision.champion_version}: `gate.html` among the "
                      "register run's artifacts (per-category PQ change, the images where the two disagree most)."]
    if pipeline_run is not None:
        lines += ["", f"Pipeline run: {run_link(pipeline_run, tracking)} (its stages hold the report, the "
                      "per-class table and the training curves)."]
    return "\n".join(lines)


def describe_model(client, name: str, cfg: RegisterSettings = RegisterSettings()) -> None:
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
