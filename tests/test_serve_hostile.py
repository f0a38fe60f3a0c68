"""The server against hostile or broken clients (tiny P = 64 model, 14 blocks per 896x256 image).

- Bodies are counted as they arrive, whatever their framing: over the limit is 413, and a
  20 MB chunked body neither grows the process nor stalls /healthz (real sockets).
- Slow clients: a request cut anywhere (head or body), or dripped, is answered 408 and closed
  within --client-timeout; a client that stops taking its answer is dropped; SIGTERM's drain
  ends within --drain-timeout, answers what it dropped 503 and exits 0 (a real process).
- Every answer is counted by route and status (500s and 499s too); a client that goes away
  is one log line, never a traceback.
- API keys: empty, or with white space around, or untransmittable: refused at startup (exit 2).
- No answer carries a server path, host or pid; messages name the server's real limits; a
  stream reports its real block total from its first event.

Cases are generated from fixed seeds (each assertion names its seed and case)."""

import asyncio
import base64
import io
import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from bitdance_rt.cli import rt_app
from bitdance_rt.limits import MAX_IMAGES, SERVE_MAX_BODY
from bitdance_rt.runtime.session import Session
from bitdance_rt.serve.app import ROUTES, SERVED_BY, create_app
from bitdance_rt.serve.client import call, free_port, metric, wait_ready
from bitdance_rt.serve.config import ServeConfig
from bitdance_rt.serve.redact import redact
from bitdance_rt.serve.run import make_server
from bitdance_rt.serve.service import ImageService
from bitdance_rt.tiny import make_tiny
from conftest import one_line_error

URL = "/v1/images/generations"
FAST = {"size": "896x256", "steps": 1, "guidance": 3.0}   # 14 blocks with P = 64
CLIENT_S = 1.0          # --client-timeout of the live server
SLACK_S = 3.0           # what a busy 2-core machine may add to a timeout
KEY = "k3y-for-tests"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("hostile") / "tiny64", parallel_num=64, seed=0)


@pytest.fixture(scope="module")
def session(ckpt):
    return Session.open(ckpt, device="cpu")


def client_for(session, **config):
    service = ImageService(ServeConfig(**{"max_batch": 4, "warmup": False, **config}), session)
    return TestClient(create_app(service, load="startup"), raise_server_exceptions=False), service


@pytest.fixture(scope="module")
def live(session):
    """A real uvicorn server in a thread of this process (the same server `serve` runs)."""
    service = ImageService(ServeConfig(max_batch=4, warmup=False, client_timeout=CLIENT_S,
                                       drain_timeout=5.0), session)
    port = free_port()
    server = make_server(create_app(service, load="startup"), service, "127.0.0.1", port,
                         log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, 60)
    yield {"base": base, "port": port, "service": service}
    server.should_exit = True
    thread.join(30)


class Collect(logging.Handler):
    """Every record of the server's loggers and uvicorn's (which does not propagate)."""

    NAMES = ("bitdance_rt.serve", "uvicorn.error")

    def __init__(self):
        super().__init__(logging.INFO)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def __enter__(self):
        self.levels = {}
        for name in self.NAMES:
            logger = logging.getLogger(name)
            logger.addHandler(self)
            self.levels[name] = logger.level
            if logger.getEffectiveLevel() > logging.INFO:
                logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc):
        for name in self.NAMES:
            logging.getLogger(name).removeHandler(self)
            logging.getLogger(name).setLevel(self.levels[name])


# -- the wire -------------------------------------------------------------------------------

def read_answer(sock, timeout=10.0):
    """(status, headers, body, closed) of one HTTP/1.1 answer; ``closed``: the server closed
    the connection after it."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    if b"\r\n\r\n" not in data:
        return None, {}, data, True
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    size = int(headers.get("content-length", -1))
    closed = False
    try:
        while size < 0 or len(body) < size:
            chunk = sock.recv(65536)
            if not chunk:
                closed = True
                break
            body += chunk
        if not closed and headers.get("connection") == "close":
            closed = sock.recv(1) == b""
    except ConnectionResetError:
        closed = True
    except socket.timeout:
        pass
    return status, headers, body, closed


def send_in_background(sock, parts, pause=0.0):
    """Send ``parts`` from a thread, stopping when the server closes the connection."""
    def run():
        try:
            for p in parts:
                sock.sendall(p)
                if pause:
                    time.sleep(pause)
        except OSError:
            pass
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def head(framing, size=None, path=URL, extra=b""):
    h = b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n" % path.encode()
    h += extra
    if framing == "chunked":
        return h + b"Transfer-Encoding: chunked\r\n\r\n"
    return h + b"Content-Length: %d\r\n\r\n" % size


def framed(framing, pieces):
    if framing == "chunked":
        return [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces] + [b"0\r\n\r\n"]
    return list(pieces)


def body_of(size):
    """A JSON object of exactly ``size`` bytes whose prompt is not a string (422 if read)."""
    return b'{"prompt": 7' + b" " * (size - 13) + b"}"


def split(data, rng, low=256, high=65536):
    out, i = [], 0
    while i < len(data):
        n = int(rng.choice([low, high, rng.randint(low, high)]))
        out.append(data[i:i + n])
        i += n
    return out


def metrics_of(base):
    return call(base + "/metrics").body.decode()


def rss_mib():
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith("VmRSS")).split()[1]) / 1024


# -- bodies ---------------------------------------------------------------------------------

def test_bodies_are_limited_as_they_stream_whatever_their_framing(live):
    seed, limit = 5101, SERVE_MAX_BODY
    rng = random.Random(seed)
    sizes = [limit - 1, limit, limit + 1, 2 * limit] + [rng.randint(limit // 2, 3 * limit)
                                                        for _ in range(4)]
    before = Counter()
    for i, size in enumerate(sizes):
        framing = rng.choice(["chunked", "content-length"])
        pieces = split(body_of(size), rng)
        with socket.create_connection(("127.0.0.1", live["port"])) as s:
            s.sendall(head(framing, size))
            send_in_background(s, framed(framing, pieces))
            status, _, body, closed = read_answer(s)
        want = 413 if size > limit else 422
        case = f"seed {seed} case {i}: {size} bytes, {framing}, {len(pieces)} pieces"
        assert status == want, (case, status, body[:300])
        if want == 413:
            assert f"over {limit // 1024} KiB" in json.loads(body)["error"]["message"], case
            assert closed, case  # nothing more is read from it
        before[want] += 1
    text = metrics_of(live["base"])
    for status, n in before.items():
        assert metric(text, "bitdance_requests_total", f'status="{status}"') >= n


def test_an_answer_given_before_the_body_was_read_closes_the_connection(live):
    """404, 405: the body was never read; an endless one must not hold the connection."""
    for path in (b"/nope", b"/v1/models"):
        with socket.create_connection(("127.0.0.1", live["port"])) as s:
            s.sendall(head("chunked", path=path.decode()))
            send_in_background(s, (b"10\r\n" + b"a" * 16 + b"\r\n" for _ in range(10**6)),
                               0.01)
            t0 = time.monotonic()
            status, headers, _, closed = read_answer(s)
        assert status in (404, 405) and closed and time.monotonic() - t0 < 5, (path, status)
        assert headers["connection"] == "close"


def test_a_20_mb_chunked_body_neither_grows_the_server_nor_stalls_healthz(live):
    rss0 = rss_mib()
    healthz = []
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            t0 = time.monotonic()
            healthz.append((call(live["base"] + "/healthz", timeout=30).status,
                            time.monotonic() - t0))
            time.sleep(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    chunk = b"x" * 65536
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", live["port"])) as s:
        s.sendall(head("chunked"))
        sender = send_in_background(s, (b"%x\r\n%s\r\n" % (len(chunk), chunk)
                                         for _ in range(20 * 16)))
        status, _, _, closed = read_answer(s)
        sender.join(10)
    seconds = time.monotonic() - t0
    stop.set()
    poller.join(30)
    assert status == 413 and closed and seconds < 10, (status, closed, seconds)
    assert rss_mib() - rss0 < 64, (rss0, rss_mib())  # the old server grew by gigabytes
    assert healthz and all(st == 200 and dt < 5 for st, dt in healthz), healthz


# -- slow clients ---------------------------------------------------------------------------

def test_requests_cut_anywhere_or_dripped_get_408_and_are_closed_in_time(live):
    """Each connection sends a prefix of a valid request (cut in the head, in the body, or
    nothing at all), or drips its body, then stalls: all are answered 408 and closed within
    --client-timeout (plus scheduling slack), while /healthz keeps answering."""
    seed = 5102
    rng = random.Random(seed)
    payload = json.dumps({"prompt": "a lighthouse", **FAST}).encode()
    whole = head("content-length", len(payload)) + payload
    head_len = whole.index(b"\r\n\r\n") + 4
    cuts = [0, 1, head_len - 2, head_len, len(whole) - 1]
    cuts += [rng.randint(1, len(whole) - 1) for _ in range(5)]
    cases = [("cut", c) for c in cuts] + [("drip", None), ("drip chunked", None)]
    results = [None] * len(cases)

    def run(i, kind, cut):
        t0 = time.monotonic()  # before the server can start its clock
        s = socket.create_connection(("127.0.0.1", live["port"]))
        if kind == "cut":
            s.sendall(whole[:cut])
        elif kind == "drip":  # a byte at a time: never idle, never done in time
            s.sendall(whole[:head_len])
            send_in_background(s, [payload[k:k + 1] for k in range(len(payload))], 0.1)
        else:
            s.sendall(head("chunked"))
            send_in_background(s, framed("chunked", [payload[k:k + 1]
                                                     for k in range(len(payload))]), 0.1)
        status, _, body, closed = read_answer(s, timeout=CLIENT_S + 10)
        results[i] = (status, closed, time.monotonic() - t0, body[:200])
        s.close()

    threads = [threading.Thread(target=run, args=(i, k, c)) for i, (k, c) in enumerate(cases)]
    for t in threads:
        t.start()
    assert call(live["base"] + "/healthz", timeout=5).status == 200
    for t in threads:
        t.join(30)
    for (kind, cut), (status, closed, seconds, body) in zip(cases, results):
        case = f"seed {seed}: {kind} at {cut} of {len(whole)} bytes (head {head_len})"
        assert status == 408 and closed, (case, status, closed, body)
        assert CLIENT_S <= seconds <= CLIENT_S + SLACK_S, (case, seconds)
        assert "--client-timeout" in json.loads(body)["error"]["message"], case
    heads = sum(kind == "cut" and cut < head_len for kind, cut in cases)
    text = metrics_of(live["base"])  # a head that never arrived has no route: "other"
    assert metric(text, "bitdance_responses_total", 'route="other",status="408"') >= heads


def test_a_client_that_stops_reading_its_stream_is_dropped_in_one_line(session):
    """The answer's writes are timed too: a stream whose client stops reading (its window
    stays full) is dropped after --client-timeout, counted 499 and logged as one line. The
    app is called as uvicorn calls it (ASGI 2.3), with a send that never finishes."""
    service = ImageService(ServeConfig(warmup=False, client_timeout=0.5), session)
    service.load()
    app = create_app(service, load="none")
    body = json.dumps({"prompt": "x", **FAST, "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
             "http_version": "1.1", "method": "POST", "scheme": "http", "path": URL,
             "raw_path": URL.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 9), "server": ("127.0.0.1", 80)}

    async def run():
        messages, never = [{"type": "http.request", "body": body}], asyncio.Event()

        async def receive():
            if messages:
                return messages.pop()
            await never.wait()  # the client is still there

        async def send(message):
            if b"image_generation.completed" in message.get("body", b""):
                await asyncio.sleep(60)  # the client's window is full, and stays full

        await app(scope, receive, send)

    try:
        with Collect() as logs:
            t0 = time.monotonic()
            asyncio.run(asyncio.wait_for(run(), 30))
            seconds = time.monotonic() - t0
    finally:
        service.close()
    text = service.metrics.render().decode()
    assert metric(text, "bitdance_requests_total", 'status="499"') == 1, text
    lines = [r.getMessage() for r in logs.records if " 499: " in r.getMessage()]
    assert len(lines) == 1 and "did not take the answer within 0.5 s" in lines[0], lines
    assert not any(r.exc_info for r in logs.records) and seconds < 20


def test_a_client_that_leaves_is_one_line_and_counted_499(live):
    base, port = live["base"], live["port"]
    before = metric(metrics_of(base), "bitdance_requests_total", 'status="499"')
    with Collect() as caplog:
        # leaves during its body, while queued or running, and in the middle of a stream
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(head("content-length", 100) + b'{"prompt"')
        time.sleep(0.3)
        s.close()
        for stream in (False, True):
            payload = json.dumps({"prompt": "x", **FAST, "steps": 300,
                                  "stream": stream}).encode()
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(head("content-length", len(payload)) + payload)
            if stream:
                s.recv(100)  # its first event came
            time.sleep(0.5)
            s.close()
        deadline = time.monotonic() + 20
        while metric(metrics_of(base), "bitdance_requests_total", 'status="499"') < before + 3:
            assert time.monotonic() < deadline, metrics_of(base)
            time.sleep(0.1)
        time.sleep(0.3)
    assert metric(metrics_of(base), "bitdance_requests_total", 'status="499"') == before + 3
    gone = [r for r in caplog.records if " 499: " in r.getMessage()]
    assert len(gone) == 3, [r.getMessage() for r in gone]
    assert not any(r.exc_info or "Traceback" in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records if r.exc_info]


# -- counting, leaks, messages --------------------------------------------------------------

def test_every_answer_is_counted_by_route_and_status(session):
    """A seeded mix of requests over every route; /metrics tallies exactly what was answered
    (its own answers included, but the one being rendered)."""
    seed = 5103
    rng = random.Random(seed)
    auth = {"Authorization": f"Bearer {KEY}"}
    menu = [
        ("GET", "/healthz", None, {}, 200),
        ("GET", "/v1/models", None, auth, 200),
        ("GET", "/v1/models", None, {}, 401),
        ("GET", "/metrics", None, auth, 200),
        ("GET", "/", None, auth, 200),
        ("GET", "/nope", None, auth, 404),
        ("GET", "/nope", None, {}, 401),
        ("DELETE", "/v1/models", None, auth, 405),
        ("POST", URL, b"{not json", auth, 400),
        ("POST", URL, b"{}", auth, 422),
        ("POST", URL, json.dumps({"prompt": "x", **FAST, "n": 0}).encode(), auth, 400),
        ("POST", URL, b"x" * (SERVE_MAX_BODY + 1), auth, 413),
        ("POST", URL, b"{}", {}, 401),
        ("GET", "/v1/models", "boom", auth, 500),
    ]
    c, service = client_for(session, api_key=KEY)
    models = service.models

    def boom():
        raise RuntimeError(f"cannot read {session.checkpoint}/model.safetensors")

    want = Counter()
    with c:
        for i in range(40):
            method, path, body, headers, status = rng.choice(menu)
            service.models = boom if body == "boom" else models
            r = c.request(method, path, content=None if body == "boom" else body,
                          headers=headers)
            assert r.status_code == status, (f"seed {seed} case {i}", method, path, r.text)
            want[(path if path in ROUTES else "other", str(status))] += 1
            if status >= 400:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}
                assert str(session.checkpoint) not in r.text, (f"seed {seed} case {i}", r.text)
        service.models = models
        text = c.get("/metrics", headers=auth).text
    got = Counter()
    for line in text.splitlines():
        m = re.match(r'bitdance_responses_total\{route="([^"]*)",status="(\d+)"\} (\S+)', line)
        if m:
            got[(m.group(1), m.group(2))] = int(float(m.group(3)))
    assert got == want, f"seed {seed}: {got} != {want}"
    images = {s: n for (route, s), n in want.items() if route == URL}
    for status, n in images.items():
        assert metric(text, "bitdance_requests_total", f'status="{status}"') == n, (seed, status)


class Failing:
    """The real session, but every run fails with a message holding ``path``."""

    def __init__(self, session, path):
        self._s, self.path = session, path

    def __getattr__(self, name):
        return getattr(self._s, name)

    def generate(self, *plans, **kw):
        raise OSError(f"[Errno 5] Input/output error: '{self.path}'")


def leaks(text, ckpt):
    found = [p for p in (str(ckpt), str(ckpt.parent), f"{socket.gethostname()}:{os.getpid()}")
             if p in text]
    found += re.findall(r"(?<![\w.~-])(?:/[^\s/'\"]+){2,}", re.sub(r"/v1/[\w/]+", "", text))
    return found


def test_no_answer_carries_a_server_path_host_or_pid(session, ckpt):
    seed = 5104
    rng = random.Random(seed)
    c, service = client_for(session)
    answers = []

    def keep(r):
        answers.append(r)
        return r

    with c:
        keep(c.get("/healthz"))
        keep(c.get("/v1/models"))
        keep(c.get("/metrics"))
        ok = keep(c.post(URL, json={"prompt": "a red fox", **FAST}))
        png = Image.open(io.BytesIO(base64.b64decode(ok.json()["data"][0]["b64_json"])))
        assert png.text["checkpoint"] == ckpt.name and png.text["model"] == session.spec.name
        with c.stream("POST", URL, json={"prompt": "a boat", **FAST, "stream": True}) as s:
            keep(s)
            events = "".join(s.iter_text())
        for k in range(4):  # a failing run whose error names a random server path
            parts = [rng.choice(["srv", "data", "home", "ckpt", "x y"]) for _ in range(3)]
            path = "/" + "/".join(parts) + f"/shard-{k}.bin"
            service.session = service.scheduler.session = Failing(session, path)
            r = keep(c.post(URL, json={"prompt": "x", **FAST}))
            msg = r.json()["error"]["message"]
            assert r.status_code == 500 and f"shard-{k}.bin" in msg, (seed, k, msg)
            assert path not in msg, (f"seed {seed} case {k}", msg)
        service.session = service.scheduler.session = session
        for bad in ({"prompt": ""}, {"prompt": "x", "size": "1x1"}, {"prompt": 1}):
            keep(c.post(URL, json=bad))
        keep(c.get("/nope"))
        keep(c.delete("/v1/models"))
        keep(c.post(URL, content=b"x" * (SERVE_MAX_BODY + 1)))
    # a model that failed to load with its path in the error
    broken = ImageService(ServeConfig(checkpoint=ckpt, warmup=False))
    broken.state, broken.error = "failed", OSError(f"cannot open {ckpt}/model.safetensors")
    with TestClient(create_app(broken, load="none")) as b:
        keep(b.get("/healthz"))
        keep(b.post(URL, json={"prompt": "x"}))
    for r in answers:
        text = events if r.headers.get("content-type", "").startswith("text/event-stream") \
            else r.text
        text = re.sub(r'"b64_json":\s*"[^"]*"', '"b64_json": ""', text)
        where = f"{r.request.method} {r.request.url.path} {r.status_code}"
        assert not leaks(text, ckpt), (where, leaks(text, ckpt), text[:300])
        assert not leaks(json.dumps(dict(r.headers)), ckpt), (where, dict(r.headers))
        if "x-served-by" in r.headers:  # random per process: neither host nor pid
            assert r.headers["x-served-by"] == SERVED_BY
            assert re.fullmatch("[0-9a-f]{8}", SERVED_BY), SERVED_BY
    # the checkpoint is named by its directory's name (the model's), never by its path
    assert answers[-2].json()["error"] == f"cannot open {ckpt.name}/model.safetensors"


def test_redact_keeps_only_the_last_part_of_every_absolute_path():
    seed = 5105
    rng = random.Random(seed)
    words = ["models", "BitDance-14B-64x", "tmp", "pytest-of-root", "a b", "v1", "data.bin"]
    for i in range(200):
        quoted = rng.random() < 0.5  # quoted, a path may hold spaces
        parts = [rng.choice(words) if quoted else rng.choice(words).replace(" ", "_")
                 for _ in range(rng.randint(2, 6))]
        path = "/" + "/".join(parts)
        if path in ROUTES:  # the server's own routes are named as they are
            continue
        text = rng.choice(["'{}': no such file", "[Errno 2] No such file or directory: '{}'",
                           'open("{}") failed'] if quoted else
                          ["cannot open {}", "{}: bad header", "(see {})"])
        out = redact(text.format(path))
        assert path not in out and parts[-1] in out, f"seed {seed} case {i}: {out!r}"
    for kept in ("GET /v1/models lists the sizes", "GET /healthz says", "1/2 and/or",
                 "send 'Authorization: Bearer KEY'", "see '/v1/models'"):
        assert redact(kept) == kept


def test_an_unknown_route_is_named_as_the_client_sent_it(session):
    """A 404 or 405 names the request's whole path (it is the client's, not the server's),
    cut to 200 characters, on one line."""
    seed = 5107
    rng = random.Random(seed)
    c, _ = client_for(session)
    with c:
        for i in range(12):
            parts = [rng.choice(["v1", "images", "a", "tmp", "x" * rng.randint(1, 60)])
                     for _ in range(rng.randint(1, 6))]
            path = "/" + "/".join(parts)
            if path in ROUTES:
                continue
            r = c.get(path)
            msg = r.json()["error"]["message"]
            case = f"seed {seed} case {i}: {path}"
            assert r.status_code == 404 and "\n" not in msg, (case, msg)
            shown = path if len(path) <= 200 else path[:197] + "..."
            assert msg.startswith(f"GET {shown}: Not Found"), (case, msg)
        r = c.delete("/v1/models")
        assert r.json()["error"]["message"].startswith("DELETE /v1/models: Method Not Allowed")


def test_n_is_checked_against_the_servers_own_limit(session):
    seed = 5106
    rng = random.Random(seed)
    for i, most in enumerate([1, MAX_IMAGES, *rng.sample(range(2, MAX_IMAGES), 3)]):
        c, _ = client_for(session, max_batch=most)
        with c:
            for n in sorted({0, -1, most + 1, rng.randint(most + 1, 200)}):
                r = c.post(URL, json={"prompt": "x", **FAST, "n": n})
                msg = r.json()["error"]["message"]
                case = f"seed {seed} case {i}: --max-batch {most}, n {n}"
                assert r.status_code == 400 and r.json()["error"]["param"] == "n", (case, msg)
                assert f"n must be from 1 to {most} on this server" in msg, (case, msg)
                assert "number of images" not in msg, (case, msg)  # not the library's 1..64


def test_a_stream_reports_its_real_block_total_from_the_first_event(session):
    c, service = client_for(session)
    p = session.spec.parallel_num
    with c:
        with c.stream("POST", URL, json={"prompt": "a boat", **FAST, "stream": True}) as s:
            text = "".join(s.iter_text())
        progress = [json.loads(e.split("data: ", 1)[1]) for e in text.split("\n\n")
                    if e.startswith("event: image_generation.progress")]
        assert progress and all(e["blocks_total"] == 14 for e in progress), progress[:3]
        seed = 5107
        rng = random.Random(seed)
        sizes = [f"{w}x{h}" for h, w in session.spec.info.sizes]
        for size in rng.sample(sizes, 5):  # every size: known at submission, before a block
            w, h = map(int, size.split("x"))
            plan = service.request_from(_body(size))
            job = service.submit(plan)
            assert job.blocks_total == (h // 16) * (w // 16) // p, (f"seed {seed}", size, job)
            service.cancel(job, "disconnected")


def test_a_stream_is_counted_by_how_it_ended(session):
    c, _ = client_for(session, timeout=0.3)
    with c:
        with c.stream("POST", URL, json={"prompt": "x", **FAST, "steps": 100,
                                         "stream": True}) as s:
            assert s.status_code == 200
            text = "".join(s.iter_text())
        assert "event: error" in text and '"code": 504' in text
        metrics = c.get("/metrics").text
    assert metric(metrics, "bitdance_requests_total", 'status="504"') == 1, metrics
    assert metric(metrics, "bitdance_requests_total", 'status="200"') == 0, metrics


def _body(size):
    from bitdance_rt.serve.api import parse_body

    return parse_body(json.dumps({"prompt": "x", "size": size, "steps": 1}).encode())


# -- startup --------------------------------------------------------------------------------

def test_an_api_key_no_client_can_send_is_refused_at_startup():
    seed = 5108
    rng = random.Random(seed)
    runner = CliRunner()
    port = str(free_port())
    cases = [({"BITDANCE_API_KEY": ""}, [], "is empty"),
             ({"BITDANCE_API_KEY": "   "}, [], "is empty"),
             ({}, ["--api-key", ""], "is empty"),
             ({"BITDANCE_API_KEY": "s3cret "}, [], "white space"),
             ({}, ["--api-key", " s3cret"], "white space"),
             ({"BITDANCE_API_KEY": "caf\u00e9"}, [], "HTTP header")]
    for _ in range(4):
        pad = "".join(rng.choice(" \t\n") for _ in range(rng.randint(1, 3)))
        key = "k" + str(rng.randint(0, 10**6))
        key = rng.choice([pad + key, key + pad, pad + key + pad])
        cases.append(({"BITDANCE_API_KEY": key}, [], "white space"))
    for i, (env, args, words) in enumerate(cases):
        r = runner.invoke(rt_app, ["serve", "--port", port, *args], env=env)
        try:
            # an empty value on the command line is refused by the rule every option follows
            one_line_error(r, *(("--api-key", words) if args == ["--api-key", ""]
                                else ("API key", words)))
        except AssertionError as e:
            raise AssertionError(f"seed {seed} case {i}: {env} {args}: {e}") from None
    # unset: no authentication, as documented
    assert ServeConfig(api_key=None).check().api_key is None


# -- SIGTERM --------------------------------------------------------------------------------

def test_sigterm_drain_is_bounded_and_exits_0(ckpt, tmp_path):
    port = free_port()
    log = open(tmp_path / "server.log", "w+")
    drain = 2.0
    proc = subprocess.Popen(
        [sys.executable, "-c", "from bitdance_rt.cli import rt_entry; rt_entry()", "serve",
         "-c", str(ckpt), "--port", str(port), "--device", "cpu", "--no-warmup",
         "--max-batch", "1", "--drain-timeout", str(drain)],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(f"http://127.0.0.1:{port}", 120, proc)

        def post(body):
            s = socket.create_connection(("127.0.0.1", port))
            data = json.dumps(body).encode()
            s.sendall(head("content-length", len(data)) + data)
            return s

        half = socket.create_connection(("127.0.0.1", port))  # holds its connection
        half.sendall(head("content-length", 100) + b'{"prompt"')
        running = post({"prompt": "long", "size": "512x2048", "steps": 1000})
        time.sleep(0.5)
        queued = post({"prompt": "queued", **FAST})
        time.sleep(0.5)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        answers = {name: read_answer(s, timeout=drain + 10)
                   for name, s in [("running", running), ("queued", queued), ("half", half)]}
        assert proc.wait(drain + 15) == 0
        seconds = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.seek(0)
        text = log.read()
    for name in ("running", "queued"):
        status, headers, body, _ = answers[name]
        assert status == 503 and "--drain-timeout" in json.loads(body)["error"]["message"], \
            (name, answers[name], text[-2000:])
    assert answers["half"][0] is None and answers["half"][3]  # closed, unanswered
    assert drain <= seconds <= drain + 10, (seconds, text[-2000:])
    line = [x for x in text.splitlines() if "passed its bound" in x]
    assert len(line) == 1 and "dropped 1 queued and 1 running request(s)" in line[0], text
    assert "closed 1 connection(s)" in line[0], line
    assert "Traceback" not in text and "terminate called" not in text, text[-3000:]
