"""radit-fast: a fast, faithful implementation of RA-DIT (Retrieval-Augmented Dual Instruction Tuning).

The package imports without its native module; every op then runs its PyTorch reference.
"""
from __future__ import annotations

import logging

from radit_fast._native import HAS_NATIVE, HAS_NATIVE_CUDA

__version__ = "0.1.0"
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["HAS_NATIVE", "HAS_NATIVE_CUDA", "__version__"]
