"""Evaluation of retrieval-augmented LMs: metrics, ensemble scoring, mixture decoding and the report."""
from __future__ import annotations
