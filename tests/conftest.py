import os

import pytest
import torch

# Tests run on 2 shared CPU cores; keep torch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def label_set():
    from guidegen.labels import load_label_set

    return load_label_set()
