"""The README's ops example runs as printed (it ends with its own check against the separate ops)."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_ops_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    ops = [b for b in blocks if "from radit_fast.ops import" in b]
    assert len(ops) == 1, "the README should hold exactly one ops example"
    exec(compile(ops[0], str(README), "exec"), {})
