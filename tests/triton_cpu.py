"""Whether Triton's interpreter can run our kernels in a fresh process (TRITON_INTERPRET=1 set first).

The subprocess suites of test_kernels.py and test_fused.py ask this before they start, so a Triton whose
interpreter cannot run the kernels (see ``triton_gptq_lora.interpreter_problem``) skips them with the reason.
"""

from __future__ import annotations

import os
import subprocess
import sys


def interpreter_env() -> dict[str, str]:
    """The environment the subprocess suites run in."""
    return dict(os.environ, TRITON_INTERPRET="1", PEFT_EORA_TRITON_SUBPROCESS="1")


def subprocess_problem() -> str | None:
    """None when a fresh interpreted process runs the kernels, else the reason it cannot."""
    probe = subprocess.run(
        [sys.executable, "-c", "from peft_eora.kernels.triton_gptq_lora import interpreter_problem as p; "
         "print(p() or '')"], env=interpreter_env(), capture_output=True, text=True, timeout=300,
    )
    if probe.returncode != 0:
        raise RuntimeError(f"the Triton interpreter probe failed: {probe.stderr[-2000:]}")
    return probe.stdout.strip() or None
