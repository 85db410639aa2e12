import os

import torch

# Without a GPU the Triton kernels are tested on CPU tensors in interpreter mode, which triton reads
# when it is first imported: set it before anything (torch.compile included) imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import mtssm  # noqa: E402


@pytest.fixture(params=["cpp", "torch"])
def scan_backend(request):
    """Run a test once per CPU implementation of the scan ops (C++ kernel, pure PyTorch)."""
    if request.param == "cpp" and mtssm._ops.selective_scan.LIBRARY_PATH is None:
        pytest.skip(f"the C++ op library is not available: {mtssm._ops._library.failure()}")
    with mtssm.scan_backend(request.param):
        yield request.param


@pytest.fixture(scope="session")
def mamba_ref():
    """mamba-ssm's own selective_scan_ref (installed by the test extras' setup)."""
    from mtssm._ops.mamba_reference import load_mamba_selective_scan_ref

    try:
        return load_mamba_selective_scan_ref()
    except ImportError as exc:
        pytest.skip(str(exc))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


#: Test folders whose tiny models run on one thread: on a shared 2-core machine, multi-threaded
#: kernels on tensors this small mostly wait for each other.
ONE_THREAD_FOLDERS = ("engine", "faults", "recipes")


@pytest.fixture(autouse=True)
def _one_thread(request):
    if request.path.parent.name not in ONE_THREAD_FOLDERS:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
