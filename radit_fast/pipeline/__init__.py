"""``radit run``: index, evaluate, tune the LM (RA-IT) and the retriever (LSR), evaluate again, report."""
from __future__ import annotations
