"""`bitdance-rt serve --ray --replicas 2` on a local Ray instance: the same app behind Ray
Serve's proxy answers concurrent requests from both replicas with the images a single Session
gives, and SIGTERM stops it cleanly (exit 0) after answering what it holds.

Slow (a Ray instance starts in about 15 s) and needs `pip install 'bitdance-rt[ray]'`:
``python -m pytest -m slow tests/test_serve_ray.py``."""

import io
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from bitdance_rt.request import GenerationRequest
from bitdance_rt.runtime.session import Session
from bitdance_rt.serve.client import free_port, generate, wait_ready
from bitdance_rt.tiny import make_tiny

pytestmark = pytest.mark.slow
FAST = {"size": "896x256", "steps": 1, "guidance": 3.0}


def test_two_ray_replicas_serve_the_same_images(tmp_path):
    pytest.importorskip("ray.serve")
    ckpt = make_tiny(tmp_path / "tiny64", parallel_num=64, seed=0)
    port = free_port()
    logfile = tmp_path / "ray.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", "from bitdance_rt.cli import rt_entry; rt_entry()", "serve",
         "--ray", "--replicas", "2", "-c", str(ckpt), "--port", str(port), "--max-batch", "4"],
        stdout=open(logfile, "w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, 300, proc)
        deadline = time.monotonic() + 120
        while "serving on http" not in logfile.read_text():  # every replica is up
            assert time.monotonic() < deadline and proc.poll() is None, logfile.read_text()
            time.sleep(0.5)
        replies = [None] * 8

        def post(i):
            replies[i] = generate(base, prompt="a red fox", seed=10 + i, **FAST)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        assert [r.status for r in replies] == [200] * 8, [r.message for r in replies]
        assert len({r.headers["x-served-by"] for r in replies}) == 2  # both replicas served
        session = Session.open(ckpt, device="cpu")
        for i in (0, 5):
            want = session.generate(GenerationRequest("a red fox", 256, 896, steps=1,
                                                      guidance=3.0, seed=10 + i))[0][0]
            got = np.asarray(Image.open(io.BytesIO(replies[i].pngs()[0])))
            assert np.array_equal(got, want.numpy())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
