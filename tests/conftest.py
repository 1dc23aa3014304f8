import os

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    # Triton kernels run in the interpreter on CPU; triton must see this before torch._dynamo imports it.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch._dynamo  # noqa: E402

import lukv_compile  # noqa: E402, F401  (registers the backend and the generate hook)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no recompile limits or counters leak between tests."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()
