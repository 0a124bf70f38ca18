"""tests/gpu: what only CUDA devices can show. Skipped without CUDA; one command on a GPU machine:

    python -m pytest tests/gpu -v

The launch helpers of tests/integration are reused (CUDA_VISIBLE_DEVICES is left to the machine)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "integration"))


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA devices")
        for item in items:
            if "tests/gpu/" in str(item.fspath).replace(os.sep, "/"):
                item.add_marker(skip)
