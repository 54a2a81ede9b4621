import os

# The tests use tiny tensors on a 2-core (often shared) CPU: a second OpenMP thread only adds
# synchronisation waits there (measured 3–35× slower steps under load). Set before torch is
# imported so subprocesses (CLI tests) inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def label_set():
    from guidegen.labels import load_label_set

    return load_label_set()
