"""Real servers for tests, bound to 127.0.0.1 and stopped by the fixture that started them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler

BIN = os.path.dirname(sys.executable)


class JsonHandler(BaseHTTPRequestHandler):
    """A stand-in server's request handler: quiet, and JSON replies."""

    def log_message(self, *args):
        pass

    def _reply(self, body: dict, code: int = 200):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class StandIn:
    """A stand-in server on a thread for the length of a ``with`` block (the subclass sets
    ``self.server`` and ``self.thread``)."""

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def moto_s3(bucket: str = "panoptic"):
    """A moto S3 server on 127.0.0.1 with ``bucket`` created; sets the AWS env vars for its life."""
    port = free_port()
    proc = subprocess.Popen([os.path.join(BIN, "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": endpoint}
    old = {k: os.environ.get(k) for k in env}
    try:
        wait_http(endpoint + "/moto-api/", proc)
        os.environ.update(env)
        import boto3
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        stop(proc)


@contextmanager
def postgres_database(host: str = "127.0.0.1", port: int = 5432, admin_db: str = "test", user: str = "postgres"):
    """A fresh PostgreSQL database on the machine's server, dropped afterwards. Yields its URI."""
    import uuid

    import psycopg2

    name = f"mlflow_{uuid.uuid4().hex[:10]}"
    conn = psycopg2.connect(host=host, port=port, dbname=admin_db, user=user)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        yield f"postgresql+psycopg2://{user}@{host}:{port}/{name}"
    finally:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


@contextmanager
def mlflow_server(backend_uri: str, artifacts_destination: str):
    """`mlflow server` on 127.0.0.1 with that backend store and artifact destination."""
    import tempfile

    port = free_port()
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([os.path.join(BIN, "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", backend_uri, "--artifacts-destination", artifacts_destination,
                             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_http(url + "/health", proc, timeout=180)
        except (RuntimeError, TimeoutError) as e:
            log.seek(0)
            raise RuntimeError(f"{e}; server log:\n{log.read()[-3000:]}") from None
        yield url
    finally:
        stop(proc)
        log.close()


@contextmanager
def faulty_proxy(target: str, fail: tuple[str, ...] = (), status: int = 500):
    """tests/fault_proxy.py in front of ``target``, answering ``status`` to every request whose path
    contains one of ``fail`` until the block ends. Yields the proxy (``.url``, ``.hits``)."""
    import re

    from tests.fault_proxy import FaultProxy

    with FaultProxy(target) as proxy:
        proxy.inject("status", match="|".join(map(re.escape, fail)), status=status)
        yield proxy
