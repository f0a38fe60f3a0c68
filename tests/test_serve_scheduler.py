"""The serving scheduler on a stand-in session (no model): what runs together, in what order,
the bounded queue, cancellation (a run with nobody waiting is abandoned at the next block), a
failing run failing only its requests, and draining on close."""

import threading
import time

import pytest
import torch

from bitdance_rt.errors import BitDanceError
from bitdance_rt.request import GenerationRequest, ImagePlan
from bitdance_rt.serve.scheduler import (CANCELLED, DONE, FAILED, Job, QueueFull, Scheduler,
                                         SchedulerClosed)


class StandIn:
    """Records every run; each run takes ``blocks`` steps, waiting for ``gate`` before the
    first; fails any run holding the prompt "boom"."""

    settings = {"device": "cpu"}

    def __init__(self, blocks=3, step_s=0.0):
        self.runs, self.blocks, self.step_s = [], blocks, step_s
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()

    def generate(self, *plans, on_step=None, timer=None):
        reqs = [p.request for p in plans]  # the scheduler passes the plans it was given
        self.runs.append([r.prompt for r in reqs])
        self.started.set()
        self.gate.wait(10)
        if any(r.prompt == "boom" for r in reqs):
            raise RuntimeError("kaboom")
        for k in range(self.blocks):
            time.sleep(self.step_s)
            on_step(k + 1, self.blocks)
        return [torch.full((r.num_images, 2, 2, 3), r.seed, dtype=torch.uint8) for r in reqs]


class Observer:
    def __init__(self):
        self.done, self.failed, self.abandoned = [], 0, 0

    def run_done(self, timer, images, seconds):
        self.done.append(images)

    def run_failed(self):
        self.failed += 1

    def run_abandoned(self):
        self.abandoned += 1


def req(prompt, size=(256, 896), n=1, seed=1, steps=1):
    """A one-request plan, as the server makes it (no model here: stand-in token ids)."""
    r = GenerationRequest(prompt, size[0], size[1], steps=steps, guidance=3.0, seed=seed,
                          num_images=n)
    return ImagePlan(size[0] // 16, size[1] // 16, cond_ids=((1,),) * n, uncond_ids=(0,),
                     steps=steps, guidance=3.0, requests=(r,))


def wait_over(*jobs, timeout=10):
    deadline = time.monotonic() + timeout
    while not all(j.over for j in jobs):
        assert time.monotonic() < deadline, [j.state for j in jobs]
        time.sleep(0.005)


def held(session, max_batch=4, max_queue=8):
    """A scheduler whose first run waits at the gate (so later requests queue behind it)."""
    obs = Observer()
    s = Scheduler(session, max_batch=max_batch, max_queue=max_queue, observer=obs)
    session.gate.clear()
    first = Job(req("first", size=(512, 512)))
    s.submit(first)
    assert session.started.wait(5)
    return s, obs, first


def test_compatible_requests_share_a_run_in_arrival_order_up_to_max_batch():
    session = StandIn()
    s, obs, first = held(session, max_batch=4)
    # each request its own seed: the stand-in paints its images with it, so every job's images
    # show whose they are
    jobs = [Job(req("a1", seed=11)), Job(req("b", size=(512, 512), seed=12)),
            Job(req("a2", n=2, seed=13)), Job(req("a3", n=2, seed=14)),
            Job(req("a4", steps=2, seed=15)), Job(req("a5", seed=16))]
    for j in jobs:
        s.submit(j)
    session.gate.set()
    wait_over(first, *jobs)
    # oldest first; later compatible requests join while they fit (a3 would make 5 images)
    assert session.runs == [["first"], ["a1", "a2", "a5"], ["b"], ["a3"], ["a4"]]
    assert obs.done == [1, 4, 1, 2, 1]
    assert all(j.state == DONE for j in jobs)
    assert jobs[0].batch_images == 4 and jobs[1].batch_images == 1
    for j in jobs:  # a batch's images are split back to their requests, in order
        assert j.images.shape == (j.request.num_images, 2, 2, 3), j.request.prompt
        assert (j.images == j.request.seed).all(), (j.request.prompt, j.images.unique())
    assert jobs[0].blocks_done == jobs[0].blocks_total == session.blocks
    s.close()


def test_full_queue_is_refused_with_a_retry_time():
    session = StandIn()
    s, _, first = held(session, max_batch=2, max_queue=2)
    s.submit(Job(req("q1")))
    s.submit(Job(req("q2")))
    with pytest.raises(QueueFull) as e:
        s.submit(Job(req("q3")))
    assert e.value.retry_after >= 1 and "--max-queue" in str(e.value)
    with pytest.raises(BitDanceError, match="--max-batch"):
        s.submit(Job(req("big", n=3)))
    session.gate.set()
    s.close()
    assert len(session.runs) == 2  # first, then q1 and q2 together


def test_cancelled_requests_leave_the_queue_and_an_empty_run_is_abandoned():
    session = StandIn(blocks=50, step_s=0.01)
    s, obs, first = held(session)
    waiting = Job(req("waiting", size=(512, 512)))
    s.submit(waiting)
    assert s.cancel(waiting, "timeout") and waiting.reason == "timeout"
    assert s.queued() == 0 and not s.cancel(waiting, "again")
    session.gate.set()
    while first.blocks_done < 2:
        time.sleep(0.005)
    s.cancel(first, "disconnected")
    s.close()
    assert first.state == CANCELLED and first.blocks_done < 50
    assert obs.abandoned == 1 and obs.done == []
    assert session.runs == [["first"]]


def test_one_cancelled_request_does_not_stop_its_batch():
    session = StandIn(blocks=20, step_s=0.01)
    s, obs, first = held(session)
    a, b = Job(req("a")), Job(req("b"))
    s.submit(a)
    s.submit(b)
    session.gate.set()
    while a.blocks_done < 2:
        time.sleep(0.005)
    s.cancel(a, "disconnected")
    wait_over(b)
    assert (a.state, b.state) == (CANCELLED, DONE)
    assert obs.abandoned == 0
    s.close()


def test_a_failing_run_fails_only_its_requests():
    session = StandIn()
    s, obs, first = held(session)
    bad = [Job(req("boom", size=(256, 1024))), Job(req("x", size=(256, 1024)))]
    good = Job(req("fine"))
    for j in (*bad, good):
        s.submit(j)
    session.gate.set()
    wait_over(first, good, *bad)
    assert [j.state for j in bad] == [FAILED, FAILED] and "kaboom" in str(bad[0].error)
    assert good.state == DONE and obs.failed == 1
    after = Job(req("after"))
    s.submit(after)
    wait_over(after)
    assert after.state == DONE
    s.close()


def test_close_finishes_queued_work_then_refuses():
    session = StandIn()
    s, _, first = held(session)
    later = Job(req("later", size=(512, 1024)))
    s.submit(later)
    closer = threading.Thread(target=s.close)
    closer.start()
    time.sleep(0.05)
    with pytest.raises(SchedulerClosed):
        s.submit(Job(req("too late")))
    session.gate.set()
    closer.join(10)
    assert first.state == DONE and later.state == DONE
