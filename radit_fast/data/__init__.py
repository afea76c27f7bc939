"""Task files, the RA-DIT prompt template and its tokenisation, and the embedded demo data."""
from __future__ import annotations

from radit_fast.data.prompts import (
    Instance,
    bucket_batches,
    build_instance,
    build_prompt,
    collate_packed,
    collate_padded,
    format_prompt,
    pack_rows,
)
from radit_fast.data.tasks import Example, check_disjoint, load_tasks, write_tasks

__all__ = [
    "Example", "Instance", "bucket_batches", "build_instance", "build_prompt", "check_disjoint",
    "collate_packed", "collate_padded", "format_prompt", "load_tasks", "pack_rows", "write_tasks",
]
