"""Start-up of the evaluate job: its script's imports in a fresh interpreter.

Baseline: the same imports plus what diffprune imported eagerly before (diffusers through
diffprune.status -> diffprune.diffusion, clean-fid through diffprune.features and
diffprune.metrics); those modules are now imported only where they are used.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import time
from pathlib import Path

from rows import row

SCRIPT = Path(__file__).resolve().parent.parent / "workflow" / "scripts" / "evaluate.py"
EAGER_BEFORE = "import diffprune.diffusion, cleanfid.fid, cleanfid.inception_torchscript"


def script_imports(path: Path) -> str:
    tree = ast.parse(path.read_text())
    nodes = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    return "\n".join(ast.unparse(n) for n in nodes)


def startup_seconds(code: str, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        best = min(best, time.perf_counter() - start)
    return best


def bench_imports(repeats: int = 3) -> list[dict]:
    imports = script_imports(SCRIPT)
    new = startup_seconds(imports, repeats)
    old = startup_seconds(imports + "\n" + EAGER_BEFORE, repeats)
    return [
        row(
            "evaluate job start-up (its imports)",
            baseline="with diffusers and clean-fid imported eagerly",
            value=new, baseline_value=old, unit="s",
            notes=f"fresh interpreter, best of {repeats}; `python -X importtime` of the same "
            "imports names torch and pandas as what remains",
        )
    ]  # fmt: skip
