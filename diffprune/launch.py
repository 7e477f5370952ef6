"""Run a script on several data-parallel processes through ``accelerate launch``.

The train rule's script calls `relaunch` when ``train.num_processes`` > 1: it runs the same file
again under ``accelerate launch --multi_gpu --num_processes N`` (the file Snakemake runs carries
the job's ``snakemake`` object, so every process reads the same inputs and params) and waits for
it. Without CUDA the processes train on the CPU (accelerate's MULTI_CPU, gloo backend).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def launched() -> bool:
    """Whether this process was started by a distributed launcher (accelerate, torchrun)."""
    return "LOCAL_RANK" in os.environ


def is_main() -> bool:
    """Whether this is the main process (rank 0), or the only one."""
    return int(os.environ.get("RANK", "0")) == 0


def accelerate_command(script: str | os.PathLike, *, num_processes: int) -> list[str]:
    """The ``accelerate launch`` command line that runs `script` on `num_processes` processes
    of this machine (one GPU each where there are GPUs), on a free port."""
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
        "--mixed_precision", "no",  # train() passes its own precision, which wins
        "--dynamo_backend", "no", "--main_process_port", "0",
        str(Path(script).resolve()),
    ]  # fmt: skip


def relaunch(script: str | os.PathLike, *, num_processes: int, threads: int) -> None:
    """Run `script` on `num_processes` processes, `threads` CPU threads shared among them, and
    wait; raises CalledProcessError (with the launcher's exit status) when one fails."""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // num_processes))}
    subprocess.run(accelerate_command(script, num_processes=num_processes), check=True, env=env)
