"""Fused ops of radit-fast. Each op: launcher -> autograd.Function -> snake_case function, with ``impl=``."""
from __future__ import annotations
