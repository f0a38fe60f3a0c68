"""A real `bitdance-rt serve` process on loopback (tiny P = 64 model, 14 blocks per image): a full
queue answers 429 and clients that go away leave the queue or abandon their run without
stalling the request behind them; 16 concurrent requests get valid PNGs; a batched image
equals the same request served alone and `bitdance-rt generate`; SIGTERM answers everything
already received and exits 0. The tests run in file order on one server; the last stops it."""

import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from bitdance_rt.cli import rt_app
from bitdance_rt.serve.client import call, free_port, generate, metric, wait_ready
from bitdance_rt.tiny import make_tiny

FAST = {"size": "896x256", "steps": 1, "guidance": 3.0}
MAX_QUEUE = 15


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny64"), parallel_num=64, seed=0)


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("serve") / "server.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from bitdance_rt.cli import rt_entry; rt_entry()", "serve",
         "-c", str(ckpt), "--port", str(port), "--max-batch", "16", "--max-queue",
         str(MAX_QUEUE), "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, 180, proc)
        yield {"base": base, "port": port, "proc": proc, "log": log}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.seek(0)
        print(log.read()[-3000:])


def metrics(base):
    return call(base + "/metrics").body.decode()


def wait_for(check, timeout=60, what="condition"):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def raw_post(port, body):
    """Send a request on a socket of our own (so we can walk away from it)."""
    s = socket.create_connection(("127.0.0.1", port))
    data = json.dumps(body).encode()
    s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: "
              b"application/json\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
    return s


def test_overload_gets_429_and_clients_that_leave_do_not_stall_the_rest(server):
    base, port = server["base"], server["port"]
    # a long streamed run (300 head steps a block): its events time the blocks
    long = raw_post(port, {"prompt": "long", **FAST, "steps": 300, "stream": True})
    blocks = []

    def read_events():
        buf = b""
        try:
            while True:
                chunk = long.recv(65536)
                if not chunk:
                    return
                buf += chunk
                for line in buf.split(b"\n"):
                    if line.startswith(b"data: ") and b'"blocks_done": ' in line:
                        d = json.loads(line[6:])
                        if d["blocks_done"] and d["blocks_done"] not in [b for b, _ in blocks]:
                            blocks.append((d["blocks_done"], time.monotonic()))
                buf = buf[buf.rfind(b"\n") + 1:]
        except OSError:
            return

    threading.Thread(target=read_events, daemon=True).start()
    wait_for(lambda: len(blocks) >= 2, 120, "two blocks of the long run")
    t_block = blocks[1][1] - blocks[0][1]
    # fill the queue: 14 clients that will walk away, then one that waits
    leaving = [raw_post(port, {"prompt": f"q{i}", **FAST, "size": "1024x256", "seed": i})
               for i in range(MAX_QUEUE - 1)]
    wait_for(lambda: metric(metrics(base), "bitdance_queue_depth") == MAX_QUEUE - 1, 30,
             "the queue to fill")
    waiting = {}
    stayer = threading.Thread(target=lambda: waiting.update(
        r=generate(base, prompt="stays", **{**FAST, "size": "640x384"})))
    stayer.start()
    wait_for(lambda: metric(metrics(base), "bitdance_queue_depth") == MAX_QUEUE, 30, "full")
    for _ in range(3):
        r = generate(base, prompt="too many", **FAST)
        assert r.status == 429 and "--max-queue" in r.message
        assert int(r.headers["retry-after"]) >= 1
    assert call(base + "/healthz").status == 200
    # everyone but the stayer walks away mid-run
    done_at_leave = blocks[-1][0]
    t_leave = time.monotonic()
    for s in [long, *leaving]:
        s.close()
    stayer.join(300)
    after = time.monotonic() - t_leave
    assert waiting["r"].status == 200 and waiting["r"].headers["x-batch-images"] == "1"
    remaining = (14 - done_at_leave) * t_block
    assert after < 0.5 * remaining, (after, remaining, t_block)
    text = metrics(base)
    assert metric(text, "bitdance_runs_total", 'outcome="abandoned"') == 1
    assert metric(text, "bitdance_requests_total", 'status="499"') == MAX_QUEUE
    assert metric(text, "bitdance_requests_total", 'status="429"') == 3
    assert metric(text, "bitdance_queue_depth") == 0


def test_sixteen_concurrent_requests_get_valid_pngs_and_batched_equals_alone(server, ckpt,
                                                                            tmp_path):
    base = server["base"]
    replies = [None] * 16

    def post(i):
        replies[i] = generate(base, prompt=["a red fox", "a small boat at dawn"][i % 2],
                              seed=100 + i, **FAST)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert [r.status for r in replies] == [200] * 16, [r.message for r in replies]
    for i, r in enumerate(replies):
        (png,) = r.pngs()
        image = Image.open(io.BytesIO(png))
        image.verify()
        image = Image.open(io.BytesIO(png))
        assert image.size == (896, 256) and image.text["seed"] == str(100 + i)
    batched = max(range(16), key=lambda i: int(replies[i].headers["x-batch-images"]))
    assert int(replies[batched].headers["x-batch-images"]) >= 8
    prompt, seed = ["a red fox", "a small boat at dawn"][batched % 2], 100 + batched

    alone = generate(base, prompt=prompt, seed=seed, **FAST)
    assert alone.headers["x-batch-images"] == "1"
    out = tmp_path / "cli.png"
    cli = CliRunner().invoke(rt_app, ["generate", "-c", str(ckpt), "-p", prompt, "--height",
                                      "256", "--width", "896", "--steps", "1", "--guidance",
                                      "3.0", "--seed", str(seed), "--device", "cpu",
                                      "--no-progress", "--out", str(out)])
    assert cli.exit_code == 0, cli.output
    served = Image.open(io.BytesIO(replies[batched].pngs()[0]))
    by_cli = Image.open(out)
    for other in (Image.open(io.BytesIO(alone.pngs()[0])), by_cli):
        assert np.array_equal(np.asarray(served), np.asarray(other))
    # the CLI's metadata, word for word, but the checkpoint by its name (no server path)
    assert served.text == {**by_cli.text, "checkpoint": ckpt.name}


def test_sigterm_answers_what_was_received_and_exits_0(server):
    base, proc = server["base"], server["proc"]
    replies = {}

    def post(name, **fields):
        replies[name] = generate(base, prompt=name, **{**FAST, **fields})

    threads = [threading.Thread(target=post, args=("running",), kwargs={"steps": 30})]
    threads[0].start()
    wait_for(lambda: metric(metrics(base), "bitdance_running_requests") == 1, 60, "a run")
    threads += [threading.Thread(target=post, args=(f"queued{i}",), kwargs={"seed": i,
                                                                             "size": "1024x256"})
                for i in range(2)]
    for t in threads[1:]:
        t.start()
    wait_for(lambda: metric(metrics(base), "bitdance_queue_depth") == 2, 30, "two queued")
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(OSError):  # no new connections while draining
        call(base + "/healthz", timeout=5)
    for t in threads:
        t.join(300)
    assert proc.wait(120) == 0
    assert sorted(replies) == ["queued0", "queued1", "running"]
    assert all(r.status == 200 and len(r.pngs()) == 1 for r in replies.values())
    server["log"].seek(0)
    assert "drained and stopped" in server["log"].read()
