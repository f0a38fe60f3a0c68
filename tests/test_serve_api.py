"""The images API in process (FastAPI's test client over a real Session of a tiny P=64 model):
bad input never reaches the model and gets the library's (the CLI's) one-line messages; the API
key guards every route but /healthz; JSON and streamed answers carry the same PNG with the
CLI's metadata; a failing batch fails only its requests; timeouts answer 504; /metrics is
Prometheus text."""

import base64
import io
import json
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from bitdance_rt.errors import BitDanceError
from bitdance_rt.request import GenerationRequest
from bitdance_rt.runtime.session import Session
from bitdance_rt.serve.app import create_app
from bitdance_rt.serve.client import metric
from bitdance_rt.serve.config import ServeConfig
from bitdance_rt.serve.service import ImageService
from bitdance_rt.tiny import make_tiny

URL = "/v1/images/generations"
FAST = {"size": "896x256", "steps": 1, "guidance": 3.0}   # 14 blocks with P = 64


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    ckpt = make_tiny(tmp_path_factory.mktemp("tiny64"), parallel_num=64, seed=0)
    return Session.open(ckpt, device="cpu")


def client_for(session, **config):
    service = ImageService(ServeConfig(**{"max_batch": 4, "warmup": False, **config}), session)
    return TestClient(create_app(service, load="startup")), service


@pytest.fixture(scope="module")
def client(session):
    c, _ = client_for(session)
    with c:
        yield c


def library_message(session, **fields):
    with pytest.raises(BitDanceError) as e:
        session.plan(GenerationRequest(**fields))
    return str(e.value)


def test_bad_input_gets_4xx_and_the_clis_message(client, session):
    lib = dict(height=256, width=896)
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (b'{"prompt": "' + b"x" * (2 << 20) + b'"}', 413, "over 1024 KiB"),
        ({}, 422, "prompt is required"),
        ({"prompt": 7}, 422, "prompt must be a string"),
        ({"prompt": "x", "n": "2"}, 422, "n must be an integer"),
        ({"prompt": "x", "n": True}, 422, "n must be an integer"),
        ({"prompt": "x", "seed": 1.5}, 422, "seed must be an integer"),
        ({"prompt": "x", "guidance": "high"}, 422, "guidance must be a number"),
        ({"prompt": "x", "seeds": 3}, 422, "unknown field 'seeds'"),
        ({"prompt": "", **FAST}, 400, library_message(session, prompt="", **lib)),
        ({"prompt": "   ", **FAST}, 400, library_message(session, prompt="   ", **lib)),
        # n: the server's own limit (--max-batch 4 here), not the library's
        ({"prompt": "x", **FAST, "n": 0}, 400, "n must be from 1 to 4 on this server"),
        ({"prompt": "x", **FAST, "n": 65}, 400, "n must be from 1 to 4 on this server"),
        ({"prompt": "x", **FAST, "n": 5}, 400, "n must be from 1 to 4 on this server"),
        ({"prompt": "x", **FAST, "steps": 0}, 400,
         library_message(session, prompt="x", steps=0, **lib)),
        ({"prompt": "x", **FAST, "guidance": 0.5}, 400,
         library_message(session, prompt="x", guidance=0.5, **lib)),
        ({"prompt": "x", **FAST, "seed": -1}, 400,
         library_message(session, prompt="x", seed=-1, **lib)),
        ({"prompt": "word " * 9000, **FAST}, 400,
         library_message(session, prompt="word " * 9000, **lib)),
        ({"prompt": "x", "size": "300x300"}, 400,
         "size 300x300 (width x height) is not supported by this model; choose one of: "
         "512x2048"),
        ({"prompt": "x", "size": "huge"}, 400, "size must be \"WIDTHxHEIGHT\""),
        ({"prompt": "x", "response_format": "url"}, 400, "use \"b64_json\""),
        ({"prompt": "x", "model": "dall-e-3"}, 400, "is not served here"),
        ({"prompt": "x", "negative_prompt": "blur"}, 400, "negative_prompt is not supported"),
    ]
    for body, status, message in cases:
        r = client.post(URL, content=body if isinstance(body, bytes) else json.dumps(body))
        err = r.json()["error"]
        assert (r.status_code, message in err["message"]) == (status, True), (body, err)
        assert "\n" not in err["message"]
    r = client.post(URL, content=b'{"prompt": "x", "guidance": NaN, "size": "896x256"}')
    assert r.status_code == 400 and "guidance must be a number" in r.json()["error"]["message"]
    # nothing reached the model
    assert metric(client.get("/metrics").text, "bitdance_runs_total", 'outcome="ok"') == 0


def test_json_and_streamed_answers_carry_the_same_png_with_the_clis_metadata(client, session):
    body = {"prompt": "a red fox", "seed": 5, **FAST}
    r = client.post(URL, json=body)
    assert r.status_code == 200 and r.headers["x-batch-images"] == "1"
    png = base64.b64decode(r.json()["data"][0]["b64_json"])
    image = Image.open(io.BytesIO(png))
    assert image.size == (896, 256)
    req = GenerationRequest("a red fox", 256, 896, steps=1, guidance=3.0, seed=5)
    # the CLI's metadata, but the checkpoint by its name: an answer holds no server path
    assert image.text == {k: str(v) for k, v in {**session.metadata(req), "image_index": 0,
                                                 "checkpoint": session.checkpoint.name}.items()}
    alone = session.generate(req)[0][0].numpy()
    assert np.array_equal(alone, np.asarray(image))

    events = []
    with client.stream("POST", URL, json={**body, "stream": True}) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        for chunk in s.iter_text():
            events += [e for e in chunk.split("\n\n") if e.strip()]
    parsed = [(e.split("\n")[0][7:], json.loads(e.split("\n")[1][6:])) for e in events]
    progress = [d for name, d in parsed if name == "image_generation.progress"]
    done = [d for name, d in parsed if name == "image_generation.completed"]
    blocks = [p["blocks_done"] for p in progress if p["blocks_total"]]
    assert blocks == sorted(blocks) and blocks[-1] == 14 and len(blocks) >= 2
    assert len(done) == 1 and base64.b64decode(done[0]["b64_json"]) == png
    assert done[0]["size"] == "896x256" and done[0]["seed"] == 5


def test_until_loaded_healthz_and_generations_answer_503(session):
    service = ImageService(ServeConfig(warmup=False), session)
    with TestClient(create_app(service, load="none")) as c:
        h = c.get("/healthz")
        assert h.status_code == 503 and h.json()["status"] == "loading"
        r = c.post(URL, json={"prompt": "x"})
        assert r.status_code == 503 and "still loading" in r.json()["error"]["message"]
        assert int(r.headers["retry-after"]) > 0


def test_api_key_guards_every_route_but_healthz(session):
    c, _ = client_for(session, api_key="s3cret")
    with c:
        assert c.get("/healthz").status_code == 200
        for method, path in [("GET", "/"), ("GET", "/v1/models"), ("GET", "/metrics"),
                             ("POST", URL)]:
            r = c.request(method, path, json={"prompt": "x"})
            assert r.status_code == 401, path
            assert "Authorization: Bearer" in r.json()["error"]["message"]
        assert c.get("/").headers["www-authenticate"].startswith("Basic")
        for wrong in ({"Authorization": "Bearer nope"}, {"Authorization": "Basic eDp5"},
                      {"Authorization": "Token s3cret"}):
            r = c.get("/v1/models", headers=wrong)
            assert r.status_code == 401, wrong  # a key was sent: it says the key is wrong
            assert "is not this server's" in r.json()["error"]["message"], wrong
        good = {"Authorization": "Bearer s3cret"}
        assert c.get("/v1/models", headers=good).json()["data"][0]["id"] == session.spec.name
        assert c.get("/", auth=("anyone", "s3cret")).status_code == 200  # the browser's way
        assert "bitdance_requests_total" in c.get("/metrics", headers=good).text


class Flaky:
    """The real session, except that a run holding the prompt "boom" fails."""

    def __init__(self, session):
        self._s = session

    def __getattr__(self, name):
        return getattr(self._s, name)

    def generate(self, *plans, **kw):
        if any(p.request.prompt == "boom" for p in plans):
            raise RuntimeError("CUDA error: an illegal memory access (simulated)\nmore lines")
        return self._s.generate(*plans, **kw)


def test_a_failing_batch_fails_only_its_requests(session):
    c, service = client_for(session, max_batch=4)
    replies = {}

    def post(prompt, size):
        replies[prompt] = c.post(URL, json={"prompt": prompt, **FAST, "size": size})

    with c:
        service.session = service.scheduler.session = Flaky(session)
        threads = [threading.Thread(target=post, args=a)
                   for a in [("boom", "1024x256"), ("fine", "896x256")]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        bad = replies["boom"]
        assert bad.status_code == 500
        msg = bad.json()["error"]["message"]
        assert "illegal memory access" in msg and "more lines" not in msg
        assert replies["fine"].status_code == 200
        assert c.post(URL, json={"prompt": "after", **FAST}).status_code == 200
        text = c.get("/metrics").text
        assert metric(text, "bitdance_runs_total", 'outcome="failed"') == 1
        assert metric(text, "bitdance_requests_total", 'status="500"') == 1


def test_timeout_answers_504_and_metrics_are_prometheus_text(session):
    c, _ = client_for(session, timeout=0.3)
    with c:
        r = c.post(URL, json={"prompt": "slow", **FAST, "steps": 200})
        assert r.status_code == 504 and "--timeout" in r.json()["error"]["message"]
        text = c.get("/metrics").text
    assert metric(text, "bitdance_requests_total", 'status="504"') == 1
    assert metric(text, "bitdance_ready") == 1
    for name in ("bitdance_queue_depth", "bitdance_images_per_second",
                 'bitdance_stage_seconds_bucket{le="0.005",stage="total"}',
                 "# TYPE bitdance_stage_seconds histogram"):
        assert name in text, name
