import os

import pytest
import torch

# Without CUDA the Triton kernels run in Triton's CPU interpreter. ``triton.jit`` reads
# TRITON_INTERPRET when a kernel module is imported, so it is set here, before any test module
# is collected: no import order can leave a kernel compiled for a GPU this machine lacks.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bitdance_rt.tiny import make_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A make-tiny checkpoint with P = 4 (seed 0), shared by the session."""
    return make_tiny(tmp_path_factory.mktemp("tiny4"), parallel_num=4, seed=0)


@pytest.fixture(scope="session")
def tiny16_ckpt(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny16"), parallel_num=16, seed=1)


# Random tests take their inputs from a parameter named ``seed`` (a fixed list of seeds:
# ``@pytest.mark.parametrize("seed", [0, 1, 2])``) and say it in their assertion messages; in
# case an assertion does not (torch.testing, a helper), a failing test with a ``seed`` parameter
# gets a report section naming it and the command that reruns exactly that case.


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        seed = getattr(item, "funcargs", {}).get("seed")
        if seed is not None:
            report.sections.append(
                ("random seed", f"inputs drawn from seed {seed!r}; rerun this case with: "
                                f"python -m pytest '{item.nodeid}'"))
