"""Fresh Python processes for tests: started early (their slow imports overlap the test's work), and
optionally unable to import peft_eora (a machine where only stock PEFT/transformers are installed).

    >>> child = WarmChild(CODE, workdir, env, block_peft_eora=True)   # starts importing now
    >>> report = child.run({"adapter": "..."})                        # the JSON the child printed last
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

#: Runs first in a child that must behave as if peft-eora were not installed: any import of
#: peft_eora (editable install, PYTHONPATH, sys.path) raises ImportError.
BLOCK_PEFT_EORA = textwrap.dedent(
    """
    import importlib.abc, sys

    class _NoPeftEora(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "peft_eora" or name.startswith("peft_eora."):
                raise ImportError(f"No module named {name!r} (blocked: this process plays a machine without peft-eora)")
            return None

    sys.meta_path.insert(0, _NoPeftEora())
    """
)

_WAIT_FOR_JOB = textwrap.dedent(
    """
    import json, os, sys, time

    def wait_for_job(timeout=600):
        deadline = time.monotonic() + timeout
        while not os.path.exists(sys.argv[1]):
            if time.monotonic() > deadline:
                raise SystemExit("no job arrived")
            time.sleep(0.05)
        with open(sys.argv[1]) as f:
            return json.load(f)
    """
)


class WarmChild:
    """A fresh Python process started early, so that its slow imports overlap this process's work.

    The child runs ``code`` up to ``args = wait_for_job()``, which blocks until :meth:`run`
    hands it a JSON job; :meth:`run` returns the JSON object the child prints last.
    """

    def __init__(self, code: str, workdir: Path, env: dict[str, str], block_peft_eora: bool = False) -> None:
        self.job, self.stdout, self.stderr = workdir / "job.json", workdir / "stdout.txt", workdir / "stderr.txt"
        prelude = (BLOCK_PEFT_EORA if block_peft_eora else "") + _WAIT_FOR_JOB
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", prelude + textwrap.dedent(code), str(self.job)],
                stdout=out, stderr=err, env=env,
            )  # fmt: skip

    def run(self, job: dict, timeout: float = 300) -> dict:
        tmp = self.job.with_suffix(".tmp")
        tmp.write_text(json.dumps(job))
        os.replace(tmp, self.job)
        returncode = self.proc.wait(timeout)
        assert returncode == 0, self.stderr.read_text()[-3000:]
        return json.loads(self.stdout.read_text().strip().splitlines()[-1])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
