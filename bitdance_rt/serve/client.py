"""A small standard-library client of the images API, shared by the load test
(``bench/serve_load.py``) and the tests: one request per connection, any status returned (not
raised), timed."""

from __future__ import annotations

import base64
import json
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

GENERATIONS = "/v1/images/generations"


@dataclass
class Reply:
    status: int
    headers: dict
    body: bytes
    seconds: float

    def json(self):
        return json.loads(self.body)

    def pngs(self) -> list[bytes]:
        """The PNG files of a successful images response."""
        return [base64.b64decode(d["b64_json"]) for d in self.json()["data"]]

    @property
    def message(self) -> str:
        try:
            return self.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            return self.body[:200].decode(errors="replace")


def call(url: str, method: str = "GET", body=None, api_key: str | None = None,
         timeout: float = 600.0) -> Reply:
    """One HTTP request; ``body`` a dict (sent as JSON), bytes or None. A refused or broken
    connection raises OSError."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            out = r.read()
            return Reply(r.status, {k.lower(): v for k, v in r.headers.items()}, out,
                         time.perf_counter() - t0)
    except urllib.error.HTTPError as e:
        out = e.read()
        return Reply(e.code, {k.lower(): v for k, v in e.headers.items()}, out,
                     time.perf_counter() - t0)


def generate(base: str, api_key: str | None = None, timeout: float = 600.0, **fields) -> Reply:
    """``POST /v1/images/generations`` with ``fields``."""
    return call(base.rstrip("/") + GENERATIONS, "POST", fields, api_key, timeout)


def wait_ready(base: str, timeout: float = 120.0, proc=None) -> None:
    """Wait for ``GET /healthz`` to answer 200; raises if ``proc`` (a Popen) exits first or
    the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} before it "
                               "was ready")
        try:
            if call(base.rstrip("/") + "/healthz", timeout=5).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{base} was not ready within {timeout:g} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of one sample of a Prometheus text exposition (0 when absent)."""
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0
