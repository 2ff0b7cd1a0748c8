import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
# Without a GPU the Triton kernels run in Triton's interpreter (tests/test_kernel*.py). Set it before anything can
# import triton: the whole suite imports modules in an order that a per-module setting cannot control.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """name → directory of a tiny random checkpoint written by transformers' save_pretrained."""
    from tiny import save_checkpoint

    made = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = save_checkpoint(name, tmp_path_factory.mktemp(f"ckpt_{name}"))
        return made[name]

    return get
