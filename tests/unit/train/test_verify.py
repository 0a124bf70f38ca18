"""The probe-logits comparison of the final read-back, with CPU and GPU facts (issue 24 item 7)."""
from __future__ import annotations

import pytest
import torch

from qlaunch.train.verify import logits_mismatch


def logits(scale: float = 20.0) -> torch.Tensor:
    return torch.linspace(-scale, scale, 1000).reshape(1, 10, 100)


def ulps(x: torch.Tensor, n: float, dtype: torch.dtype) -> torch.Tensor:
    return x + n * torch.finfo(dtype).eps * x.abs().max()


def test_on_a_cpu_the_two_forwards_must_be_bit_equal():
    x = logits()
    assert logits_mismatch(x, x.clone(), exact=True, compute_dtype=torch.float32) is None
    problem = logits_mismatch(x, ulps(x, 1, torch.float32), exact=True, compute_dtype=torch.float32)
    assert problem and "differ" in problem and "allowed" not in problem


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_on_a_gpu_a_few_ulps_of_the_compute_dtype_pass_and_real_differences_fail(dtype):
    x = logits()
    # cuBLAS may pick another algorithm for another allocation: last-place differences are not a failure
    assert logits_mismatch(x, ulps(x, 2, dtype), exact=False, compute_dtype=dtype) is None
    # a wrong or missing adapter moves logits by far more than rounding
    problem = logits_mismatch(x, x + 0.05 * x.abs().max(), exact=False, compute_dtype=dtype)
    assert problem and "allowed" in problem and str(dtype).replace("torch.", "") in problem
    # the bound follows the logits' scale
    small = logits(scale=0.5)
    assert logits_mismatch(small, ulps(small, 2, dtype), exact=False, compute_dtype=dtype) is None
    assert logits_mismatch(small, small + 0.05, exact=False, compute_dtype=dtype) is not None


def test_nan_logits_never_match():
    x = logits()
    y = x.clone()
    y[0, 0, 0] = float("nan")
    assert logits_mismatch(x, y, exact=False, compute_dtype=torch.bfloat16) is not None
    assert logits_mismatch(x, y, exact=True, compute_dtype=torch.float32) is not None
