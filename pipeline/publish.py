"""The pipeline on a KFP host as KFP's users keep theirs: one pipeline by name (under
*Pipelines* in KFP's UI), a version per compiled package, named by the package's digest and
reused when it exists, runs and recurring runs that reference a version, and one recurring run
per name (a second `schedule` replaces the first, or leaves it when nothing changed; KFP's API
has no update of a recurring run's pipeline or trigger)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pipeline.dag import PIPELINE_NAME


def package_digest(package: str) -> str:
    with open(package, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def version_name(digest: str, name: str = PIPELINE_NAME) -> str:
    return f"{name}-{digest[:12]}"


@dataclass
class PublishedVersion:
    pipeline_id: str
    version_id: str
    name: str
    how: str    # "new pipeline", "new version" or "existing version"


def list_all(list_page, attr: str, **kwargs) -> list:
    """Every item of a paged KFP list call."""
    out, token = [], ""
    while True:
        page = list_page(page_token=token, page_size=100, **kwargs)
        out += getattr(page, attr) or []
        token = page.next_page_token
        if not token:
            return out


def pipeline_id_in(client, name: str, namespace: str | None = None) -> str | None:
    """The id of pipeline ``name`` in ``namespace``. KFP's own ``get_pipeline_id`` sends no
    namespace, and a multi-user API server lists the shared pipelines then (kubeflow/pipelines
    2.17.0 backend/src/apiserver/server/pipeline_server.go, ``listPipelines``), so it never finds
    one in a profile, and the upload that follows is refused: (namespace, name) is unique
    (backend/src/apiserver/model/pipeline.go) and the upload server answers 409."""
    import json

    flt = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})
    found = client.list_pipelines(filter=flt, page_size=2, namespace=namespace or None).pipelines or []
    if len(found) > 1:
        raise ValueError(f"KFP has {len(found)} pipelines named {name!r} in namespace {namespace or '(shared)'}")
    return found[0].pipeline_id if found else None


def ensure_version(client, package: str, namespace: str | None = None, description: str = "",
                   name: str = PIPELINE_NAME) -> PublishedVersion:
    """The version of pipeline ``name`` holding ``package``: found by its digest's name, else
    uploaded (and the pipeline too, the first time: its default version, named like the
    pipeline, is replaced by the digest-named one, so that every version says what it holds)."""
    wanted = version_name(package_digest(package), name)
    pipeline_id = pipeline_id_in(client, name, namespace)
    how = "new version"
    if pipeline_id is None:
        pipeline_id = client.upload_pipeline(package, pipeline_name=name, description=description,
                                             namespace=namespace).pipeline_id
        how = "new pipeline"
    versions = list_all(client.list_pipeline_versions, "pipeline_versions", pipeline_id=pipeline_id)
    found = next((v for v in versions if v.display_name == wanted), None)
    if found is not None:
        return PublishedVersion(pipeline_id, found.pipeline_version_id, wanted, "existing version")
    created = client.upload_pipeline_version(package, wanted, pipeline_id=pipeline_id,
                                             description=description or None)
    if how == "new pipeline":   # the upload's default version holds the same package
        for v in versions:
            if v.display_name == name:
                client.delete_pipeline_version(pipeline_id, v.pipeline_version_id)
    return PublishedVersion(pipeline_id, created.pipeline_version_id, wanted, how)


def find_recurring_run(client, experiment_id: str, name: str, namespace: str | None = None):
    runs = list_all(client.list_recurring_runs, "recurring_runs", experiment_id=experiment_id, namespace=namespace)
    return next((r for r in runs if r.display_name == name), None)


def same_schedule(run, version: PublishedVersion, cron: str, params: dict, max_concurrency: int) -> bool:
    """Whether recurring run ``run`` already runs this version, on this cron, with these arguments."""
    ref = run.pipeline_version_reference
    trigger = run.trigger.cron_schedule.cron if run.trigger and run.trigger.cron_schedule else None
    given = (run.runtime_config.parameters or {}) if run.runtime_config else {}
    return (ref is not None and ref.pipeline_version_id == version.version_id and trigger == cron
            and dict(given) == dict(params) and int(run.max_concurrency or 1) == int(max_concurrency))


def schedule(client, *, experiment_id: str, name: str, version: PublishedVersion, cron: str, params: dict,
             max_concurrency: int, namespace: str | None = None, service_account: str | None = None):
    """(recurring run, what was done: "created", "replaced" or "unchanged", the one replaced)."""
    old = find_recurring_run(client, experiment_id, name, namespace)
    if old is not None and same_schedule(old, version, cron, params, max_concurrency):
        return old, "unchanged", None
    if old is not None:
        client.delete_recurring_run(old.recurring_run_id)
    new = client.create_recurring_run(experiment_id=experiment_id, job_name=name, cron_expression=cron,
                                      max_concurrency=max_concurrency, params=params, pipeline_id=version.pipeline_id,
                                      version_id=version.version_id, no_catchup=True,
                                      service_account=service_account)
    return new, "replaced" if old is not None else "created", old
