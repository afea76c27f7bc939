"""Shared test setup. Triton kernels run on CPU tensors through Triton's interpreter when no GPU exists;
the interpreter must be chosen before any kernel module is imported."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
