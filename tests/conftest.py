import pytest

from bitdance_rt.tiny import make_tiny


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A make-tiny checkpoint with P = 4 (seed 0), shared by the session."""
    return make_tiny(tmp_path_factory.mktemp("tiny4"), parallel_num=4, seed=0)


@pytest.fixture(scope="session")
def tiny16_ckpt(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny16"), parallel_num=16, seed=1)
