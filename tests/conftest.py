"""Shared fixtures: the tiny demo model and data, built once per test session."""
from __future__ import annotations

import os

# One OpenMP thread per test process: oversubscribed OpenMP on 2 cores slows steps up to 40x.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """{"model", "train", "eval"} paths of the deterministic demo model and data."""
    from qlaunch.demo import build_demo

    return build_demo(str(tmp_path_factory.mktemp("demo")))


@pytest.fixture(scope="session")
def tokenizer(demo):
    from qlaunch.model.load import load_tokenizer

    return load_tokenizer(demo["model"])
