"""The KFP API as our commands use it: an authenticated client (a bearer token, the in-cluster
service-account token, or a session cookie; a namespace on multi-user Kubeflow), one preflight
request so that a refusal is said at once, and errors worded with what to check."""

from __future__ import annotations

import contextlib
import json
import os

import click


def auth_options(f):
    f = click.option("--namespace", default=lambda: os.environ.get("KFP_NAMESPACE", ""),
                     help="Kubeflow profile namespace (multi-user Kubeflow); env KFP_NAMESPACE.")(f)
    f = click.option("--token-file", default=None, type=click.Path(dir_okay=False),
                     help="File holding a bearer token (else KFP_TOKEN, else the in-cluster service-account token "
                          "at KF_PIPELINES_SA_TOKEN_PATH).")(f)
    f = click.option("--cookie", default=lambda: os.environ.get("KFP_COOKIE", ""),
                     help='Session cookie of the Kubeflow login (Dex/oauth2-proxy), "authservice_session=..."; '
                          "env KFP_COOKIE.")(f)
    return f


def _token(token_file: str | None) -> tuple[str | None, bool]:
    """(bearer token, whether it is the in-cluster service-account token)."""
    from kfp.client import KF_PIPELINES_SA_TOKEN_ENV, KF_PIPELINES_SA_TOKEN_PATH

    if token_file:
        with open(token_file) as f:
            return f.read().strip(), False
    if os.environ.get("KFP_TOKEN"):
        return os.environ["KFP_TOKEN"], False
    sa = os.environ.get(KF_PIPELINES_SA_TOKEN_ENV) or KF_PIPELINES_SA_TOKEN_PATH
    if os.path.exists(sa):
        with open(sa) as f:
            return f.read().strip(), True
    return None, False


def _preflight(host: str, namespace: str, token: str | None, cookie: str) -> None:
    """One request to the API's health endpoint with our credentials, so that a refusal or a
    multi-user deployment without --namespace is said at once (KFP's client retries for 25 s)."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(host.rstrip("/") + "/apis/v2beta1/healthz")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if cookie:
        req.add_header("Cookie", cookie)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            health = json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        raise click.ClickException(_api_error(host, e, e.read()[:300].decode(errors="replace"))) from None
    except (OSError, ValueError) as e:
        raise click.ClickException(_api_error(host, e)) from None
    if health.get("multi_user") and not namespace:
        raise click.ClickException(f"the KFP API at {host} is multi-user: pass --namespace (your Kubeflow profile's "
                                   f"namespace) or set KFP_NAMESPACE")


def kfp_client(host: str, namespace: str = "", token_file: str | None = None, cookie: str = ""):
    """A KFP client, authenticated the ways KFP's own client supports: a bearer token (from
    ``--token-file`` or ``KFP_TOKEN``), the in-cluster service-account token
    (``KF_PIPELINES_SA_TOKEN_PATH``, KFP's ServiceAccountTokenVolumeCredentials) or a session
    cookie; in ``namespace`` on a multi-user Kubeflow."""
    import kfp
    from kfp.client import ServiceAccountTokenVolumeCredentials

    token, service_account = _token(token_file)
    _preflight(host, namespace, token, cookie)
    kwargs: dict = {"host": host}
    if namespace:
        kwargs["namespace"] = namespace
    if service_account:
        kwargs["credentials"] = ServiceAccountTokenVolumeCredentials()  # re-read on refresh: tokens rotate
    elif token:
        kwargs["existing_token"] = token
    if cookie:
        kwargs["cookies"] = cookie
    try:
        return kfp.Client(**kwargs)
    except Exception as e:  # urllib3/ApiException: say which host and what to check
        raise click.ClickException(_api_error(host, e)) from None


def _api_error(host: str, e: Exception, body: str | None = None) -> str:
    status = getattr(e, "status", None) or getattr(e, "code", None)
    body = body if body is not None else str(getattr(e, "body", "") or "")[:300]
    if status in (401, 403):
        return (f"the KFP API at {host} refused the request ({status} {getattr(e, 'reason', '')}: {body}); "
                f"authenticate with --token-file, KFP_TOKEN, the in-cluster service-account token "
                f"(KF_PIPELINES_SA_TOKEN_PATH) or --cookie, and check --namespace")
    if status == 400 and "namespace" in body.lower():
        return f"the KFP API at {host} wants a namespace ({body}): pass --namespace (your Kubeflow profile)"
    if status:
        return f"the KFP API at {host} answered {status} {getattr(e, 'reason', '')}: {body}"
    return (f"cannot reach the KFP API at {host} ({type(e).__name__}: {str(e)[:200]}); check --host (the pipelines "
            f"endpoint, e.g. https://HOST/pipeline)")


@contextlib.contextmanager
def api_errors(host: str):
    try:
        yield
    except click.ClickException:
        raise
    except Exception as e:
        raise click.ClickException(_api_error(host, e)) from None


def experiment_id(client, name: str, namespace: str = "") -> str:
    return client.create_experiment(name=name, namespace=namespace or None).experiment_id  # gets it when it exists
