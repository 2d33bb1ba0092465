import pytest
import torch
from toyrun import make_toy


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The two-mode training toy (tests/toyrun.py): ``(root, tokens (n, 4, 2))``."""
    return make_toy(tmp_path_factory.mktemp("toy"))


@pytest.fixture
def one_thread():
    """One intra-op thread: fast on 2 busy cores, and the same kernels in a test and its subprocesses."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
