import os
import zlib

# numpy's OpenBLAS (what tl.dot runs on in the Triton interpreter) starts a busy-waiting thread per
# core; on a shared 2-core box a 32x64x256 dot then takes ~50 ms instead of 0.5 ms. Set before numpy
# is first imported (torch imports it).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

# Triton kernels run on CPU through the interpreter; it must be on before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from rlp_engine.ops._backend import cpp_available  # noqa: E402

ALL_BACKENDS = ("torch", "cpp", "triton")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed(request):
    # A fresh, reproducible seed per test (derived from its name): random inputs differ across tests.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture(params=ALL_BACKENDS)
def backend_name(request):
    if request.param == "cpp" and not cpp_available():
        pytest.fail("rlp_engine._C is not built: the cpp backend cannot be tested")
    return request.param


def device_for(backend_name: str) -> str:
    return "cuda" if backend_name == "triton" and torch.cuda.is_available() else "cpu"
