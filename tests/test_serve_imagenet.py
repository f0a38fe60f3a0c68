"""The server with a class-conditional ImageNet checkpoint (FastAPI's test client over a real
ImageNetSession of a tiny P = 4 model: 128x128 images, 16 AR steps; 2 head steps a request):
the class in ``class`` or ``prompt``, the image ``bitdance-rt generate --class`` writes (bit for
bit on the CPU in float32, alone and batched with others), progress events in AR steps,
``/v1/models``, bad input answered 4xx with one line naming the field, the existing limits
(API key, body size, queue, timeout), and the startup checks of ``--backend``/``--export-dir``.

Random choices come from fixed seeds; each assertion names its seed."""

import base64
import io
import json
import random
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from bitdance_rt.cli import rt_app
from bitdance_rt.errors import BitDanceError
from bitdance_rt.imagenet import sample
from bitdance_rt.imagenet.classes import class_name, synsets
from bitdance_rt.imagenet.serving import ImageNetSession
from bitdance_rt.imagenet.tiny import make_tiny
from bitdance_rt.serve.app import create_app
from bitdance_rt.serve.client import metric
from bitdance_rt.serve.config import ServeConfig
from bitdance_rt.serve.service import ImageService

from conftest import one_line_error

URL = "/v1/images/generations"
STEPS = 2         # head steps per request: the run's cost is the 16 AR steps
BLOCKS = 16       # AR steps of the tiny P = 4 model (8x8 latent, 2x2 tokens a step)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("sv-imagenet") / "tiny-in4", parallel_num=4,
                     seed=0)


@pytest.fixture(scope="module")
def session(ckpt):
    return ImageNetSession.open(ckpt, device="cpu", dtype="float32")


def client_for(ckpt, session, **config):
    service = ImageService(ServeConfig(**{"checkpoint": ckpt, "max_batch": 4,
                                          "warmup": False, **config}), session)
    return TestClient(create_app(service, load="startup")), service


def pngs(r):
    """The images of a JSON answer, as PIL images."""
    return [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in r.json()["data"]]


def alone(session, label, n, seed, guidance=None):
    """What the library (the CLI's ``generate``) makes for one request alone."""
    g = session.defaults["guidance"] if guidance is None else guidance
    return sample.generate(session.model, [label] * n, STEPS, g, seed).numpy()


def cli_generate(ckpt, out, *args):
    """``bitdance-rt generate -c CKPT ... --out OUT`` in this process (same CPU threads)."""
    r = CliRunner().invoke(rt_app, ["generate", "-c", str(ckpt), "--device", "cpu",
                                    "--no-progress", "--steps", str(STEPS), "--out", str(out),
                                    *args])
    assert r.exit_code == 0, r.output
    return r


def served_text(cli_text: dict, ckpt) -> dict:
    """The CLI's PNG text as the server writes it: the checkpoint by its name only."""
    return {**cli_text, "checkpoint": ckpt.name} if "checkpoint" in cli_text else cli_text


class Gated:
    """The real session, except that each run is recorded (its requests' label, seed, images)
    and waits for ``gate`` before it starts."""

    def __init__(self, session):
        self._s = session
        self.gate = threading.Event()
        self.runs = []

    def __getattr__(self, name):
        return getattr(self._s, name)

    def generate(self, *plans, **kw):
        self.runs.append([(r.label, r.seed, r.num_images) for p in plans for r in p.requests])
        self.gate.wait(120)
        return self._s.generate(*plans, **kw)


def wait_for(condition, what, timeout=60.0):
    t0 = time.monotonic()
    while not condition():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.01)


# -- what the server says of its model ----------------------------------------------------------


def test_models_health_and_page(ckpt, session):
    c, _ = client_for(ckpt, session)
    with c:
        m = c.get("/v1/models").json()["data"]
        assert len(m) == 1
        m = m[0]
        assert (m["family"], m["sizes"], m["default_size"], m["num_classes"]) == (
            "imagenet", ["128x128"], "128x128", 1000), m
        assert m["defaults"] == {"steps": 100, "guidance": 4.6, "seed": 42}, m
        assert m["id"] == session.name and m["ar_steps"] == BLOCKS and m["max_images"] == 4
        h = c.get("/healthz")
        assert h.status_code == 200 and h.json()["status"] == "ready"
        page = c.get("/")
        assert page.status_code == 200 and "<textarea" in page.text
        assert str(ckpt) not in json.dumps(m)


# -- one request: the image generate writes -----------------------------------------------------


def test_one_request_is_the_image_generate_writes(ckpt, session, tmp_path):
    seed = 7301
    rng = random.Random(seed)
    label = rng.randrange(1000)
    name = synsets()[label][1][0]
    image_seed = rng.randrange(1 << 20)
    n = rng.choice([1, 2])
    cli_generate(ckpt, tmp_path / "cli.png", "--class", name, "--seed", str(image_seed),
                 "-n", str(n))
    files = [tmp_path / ("cli.png" if n == 1 else f"cli_{i}.png") for i in range(n)]
    cli = [Image.open(f) for f in files]
    case = f"seed {seed}: class {label} ({name!r}), image seed {image_seed}, n {n}"

    c, _ = client_for(ckpt, session)
    with c:
        r = c.post(URL, json={"class": name, "seed": image_seed, "steps": STEPS, "n": n})
        assert r.status_code == 200, (case, r.text)
        assert r.headers["x-batch-images"] == str(n), case
        served = pngs(r)
        assert len(served) == n, case
        for i, (got, want) in enumerate(zip(served, cli)):
            assert got.size == (128, 128), case
            assert np.array_equal(np.asarray(got), np.asarray(want)), (case, i)
            assert got.text == served_text(want.text, ckpt), (case, i, got.text)
            assert got.text["class"] == str(label) and got.text["class_name"] == class_name(label)
            assert str(ckpt) not in json.dumps(got.text), (case, got.text)
        raw = [base64.b64decode(d["b64_json"]) for d in r.json()["data"]]

        # the same class by index, in class (an integer) and in prompt (OpenAI clients), and
        # the model's own size: the same PNGs
        for body in ({"class": label}, {"prompt": str(label)}, {"prompt": name.upper()},
                     {"class": str(label), "size": "128x128", "model": session.name}):
            r2 = c.post(URL, json={**body, "seed": image_seed, "steps": STEPS, "n": n})
            assert r2.status_code == 200, (case, body, r2.text)
            assert [base64.b64decode(d["b64_json"]) for d in r2.json()["data"]] == raw, (
                case, body)

        # streamed: progress in AR steps (the total known from the first event), then the PNGs
        events = []
        with c.stream("POST", URL, json={"class": label, "seed": image_seed, "steps": STEPS,
                                         "n": n, "stream": True}) as s:
            assert s.headers["content-type"].startswith("text/event-stream"), case
            for chunk in s.iter_text():
                events += [e for e in chunk.split("\n\n") if e.strip()]
    parsed = [(e.split("\n")[0][7:], json.loads(e.split("\n")[1][6:])) for e in events]
    progress = [d for kind, d in parsed if kind == "image_generation.progress"]
    done = [d for kind, d in parsed if kind == "image_generation.completed"]
    assert all(p["blocks_total"] == BLOCKS for p in progress), (case, progress)
    steps = [p["blocks_done"] for p in progress if p["state"] == "running"]
    assert steps == sorted(steps) and steps[-1] == BLOCKS and len(set(steps)) >= 2, (case, steps)
    assert [base64.b64decode(d["b64_json"]) for d in done] == raw, case
    assert all(d["size"] == "128x128" and d["seed"] == image_seed for d in done), case


# -- several requests in one run --------------------------------------------------------------


def test_batched_requests_get_the_images_they_get_alone(ckpt, session, tmp_path):
    """Requests of the same steps and guidance share one AR run (each with its own seed);
    another guidance runs apart. Every image equals the one made alone (and the CLI's)."""
    seed = 7302
    rng = random.Random(seed)
    gated = Gated(session)
    c, service = client_for(ckpt, gated, max_batch=8)
    default_g = session.defaults["guidance"]
    reqs = {}   # name -> (label, n, seed, guidance or None)
    for key in "abcd":
        reqs[key] = (rng.randrange(1000), rng.choice([1, 2]), rng.randrange(1 << 20), None)
    reqs["e"] = (rng.randrange(1000), 1, rng.randrange(1 << 20), 2.5)   # another guidance
    case = f"seed {seed}: {reqs}"
    replies = {}

    def post(key):
        label, n, s, g = reqs[key]
        body = {"class": label, "n": n, "seed": s, "steps": STEPS}
        if g is not None:
            body["guidance"] = g
        replies[key] = c.post(URL, json=body)

    with c:
        threads = {k: threading.Thread(target=post, args=(k,)) for k in reqs}
        try:
            threads["a"].start()                    # runs alone, held at the gate
            wait_for(lambda: len(gated.runs) == 1, "the first run")
            for k in "bcde":
                threads[k].start()
                wait_for(lambda: service.scheduler.queued() == "bcde".index(k) + 1,
                         f"request {k} queued")
        finally:
            gated.gate.set()
        for t in threads.values():
            t.join(300)
    runs = [[(label, s, n) for label, s, n in run] for run in gated.runs]
    want_runs = [[(reqs[k][0], reqs[k][2], reqs[k][1]) for k in ks] for ks in ("a", "bcd", "e")]
    assert runs == want_runs, case
    batch = sum(reqs[k][1] for k in "bcd")
    for key, (label, n, s, g) in reqs.items():
        r = replies[key]
        assert r.status_code == 200, (case, key, r.text)
        expect = batch if key in "bcd" else n
        assert r.headers["x-batch-images"] == str(expect), (case, key)
        want = alone(session, label, n, s, g)
        got = [np.asarray(im) for im in pngs(r)]
        assert len(got) == n, (case, key)
        for i in range(n):
            assert np.array_equal(got[i], want[i]), (case, key, i)
    # and one batched request against the CLI's file
    label, n, s, _ = reqs["c"]
    cli_generate(ckpt, tmp_path / "c.png", "--class", str(label), "--seed", str(s), "-n", "1")
    with Image.open(tmp_path / "c.png") as im:
        assert np.array_equal(np.asarray(pngs(replies["c"])[0]), np.asarray(im)), case


# -- bad input -----------------------------------------------------------------------------------


def test_bad_input_gets_4xx_naming_the_field(ckpt, session):
    seed = 7303
    rng = random.Random(seed)
    bad_index = rng.choice([1000, 1001, 5000, -1, -rng.randrange(2, 100)])
    unknown = "".join(rng.choice("qxzjkv") for _ in range(rng.randrange(6, 12)))
    wrong = rng.choice(["256x256", "64x64", "128x256", "512x512"])
    cases = [
        ({"class": unknown}, 400, f"class {unknown!r} is not an ImageNet class name", "class"),
        ({"prompt": unknown}, 400, f"prompt {unknown!r} is not an ImageNet class name",
         "prompt"),
        ({"class": "golden retrievr"}, 400, "did you mean 'golden retriever' (207)", "class"),
        ({"class": bad_index}, 400, f"class {bad_index}: the model has classes 0 to 999",
         "class"),
        ({"class": "crane"}, 400, "names 2 classes", "class"),
        ({"class": "x" * 5000}, 400, "got a text of 5000 characters", "class"),
        ({"class": 10 ** 4000}, 400, "got a number of 4001 digits", "class"),
        ({"class": 3, "size": wrong}, 400, f"size {wrong} (width x height) is not supported "
         "by this model; it makes 128x128 images only", "size"),
        ({"class": 3, "size": "huge"}, 400, "size must be \"WIDTHxHEIGHT\"", "size"),
        ({"class": 3, "n": 5}, 400, "n must be from 1 to 4 on this server", "n"),
        ({"class": 3, "n": 0}, 400, "n must be from 1 to 4 on this server", "n"),
        ({"class": 3, "steps": 0}, 400, "steps must be between 1 and", "steps"),
        ({"class": 3, "guidance": 0.5}, 400, "guidance must be a number from 1.0", "guidance"),
        ({"class": 3, "seed": -1}, 400, "the seed must be an integer from 0", "seed"),
        ({"class": 3, "model": "dall-e-3"}, 400, "is not served here", "model"),
        ({"class": 3, "prompt": "a dog"}, 400, "give the class in class or in prompt", "prompt"),
        ({}, 422, "class is required", "class"),
        ({"n": 1}, 422, "class is required", "class"),
        ({"class": 1.5}, 422, "class must be an integer (a class index) or a string", "class"),
        ({"class": [3]}, 422, "class must be an integer (a class index) or a string", "class"),
        ({"class": True}, 422, "class must be an integer (a class index) or a string", "class"),
        ({"class": 3, "classes": 4}, 422, "unknown field 'classes'; the fields are: prompt, "
         "class, n", "classes"),
    ]
    rng.shuffle(cases)
    c, _ = client_for(ckpt, session)
    with c:
        for body, status, message, param in cases:
            r = c.post(URL, json=body)
            err = r.json()["error"]
            case = f"seed {seed}: {str(body)[:80]}"
            assert (r.status_code, err["param"]) == (status, param), (case, err)
            assert message in err["message"] and "\n" not in err["message"], (case, err)
            assert str(ckpt) not in r.text, (case, r.text)
        # nothing reached the model
        assert metric(c.get("/metrics").text, "bitdance_runs_total", 'outcome="ok"') == 0


def test_a_text_to_image_server_refuses_class():
    """Checked before the model is asked: a stand-in text-to-image session is enough."""
    t2i = SimpleNamespace(spec=SimpleNamespace(name="t2i-standin"), settings={"device": "cpu"})
    service = ImageService(ServeConfig(warmup=False), t2i)
    assert service.family == "text-to-image"
    with TestClient(create_app(service, load="startup")) as c:
        for body in ({"class": 207}, {"prompt": "a dog", "class": "golden retriever"}):
            r = c.post(URL, json=body)
            err = r.json()["error"]
            assert (r.status_code, err["param"]) == (400, "class"), (body, err)
            assert "class is for class-conditional ImageNet models" in err["message"], err
        r = c.post(URL, json={"n": 1})
        assert r.status_code == 422 and r.json()["error"]["message"] == "prompt is required"


# -- the limits every request is held to ---------------------------------------------------------


def test_api_key_body_size_queue_and_timeout_hold(ckpt, session):
    gated = Gated(session)
    c, service = client_for(ckpt, gated, api_key="k3y", max_queue=0, timeout=1.0)
    key = {"Authorization": "Bearer k3y"}
    replies = {}
    with c:
        try:
            r = c.post(URL, json={"class": 1})
            assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]["message"]
            r = c.post(URL, content=b'{"class": "' + b"x" * (2 << 20) + b'"}', headers=key)
            assert r.status_code == 413 and "over 1024 KiB" in r.json()["error"]["message"]

            def first():
                replies["a"] = c.post(URL, json={"class": 1, "steps": STEPS}, headers=key)

            t = threading.Thread(target=first)
            t.start()
            wait_for(lambda: len(gated.runs) == 1, "the first run")
            r = c.post(URL, json={"class": 2, "steps": STEPS}, headers=key)  # the queue: 0
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, r.text
            t.join(60)
            a = replies["a"]
            assert a.status_code == 504 and "--timeout" in a.json()["error"]["message"], a.text
        finally:
            gated.gate.set()
        # the run whose only client is gone is abandoned at its next AR step
        wait_for(lambda: service.scheduler.running() == 0, "the abandoned run", 120)
        text = c.get("/metrics", headers=key).text
        assert metric(text, "bitdance_runs_total", 'outcome="abandoned"') == 1
        assert metric(text, "bitdance_requests_total", 'status="504"') == 1


# -- startup -------------------------------------------------------------------------------------


def test_startup_refuses_graph_backends_and_export_dirs(ckpt, tmp_path):
    assert ServeConfig(checkpoint=ckpt).check().family == "imagenet"
    ServeConfig(checkpoint=ckpt, backend="reference").check()
    for kw, words in (({"backend": "onnxruntime"}, "--backend onnxruntime"),
                      ({"backend": "tensorrt", "engine_dir": tmp_path}, "--backend tensorrt"),
                      ({"engine_dir": tmp_path}, "--export-dir")):
        with pytest.raises(BitDanceError) as e:
            ServeConfig(checkpoint=ckpt, **kw).check()
        assert words in str(e.value) and "\n" not in str(e.value), (kw, e.value)
    for args, words in ((["--backend", "onnxruntime"], "--backend onnxruntime"),
                        (["--backend", "tensorrt", "--export-dir", str(tmp_path)],
                         "served with --backend torch or reference"),
                        (["--export-dir", str(tmp_path)], "leave --export-dir out")):
        r = CliRunner().invoke(rt_app, ["serve", "-c", str(ckpt), "--device", "cpu", *args])
        one_line_error(r, words, "class-conditional ImageNet checkpoint")
