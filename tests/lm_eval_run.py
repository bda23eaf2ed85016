"""lm-evaluation-harness in a subprocess on a local copy of ARC-Easy (tests only).

    >>> rows = run_arc_easy([sys.executable, "-m", "peft_eora", "lm-eval"], gptq_dir, adapter_dir, tmp_path)
    >>> [float(r[0]) for r in rows[0]["filtered_resps"]]      # lm-eval's per-choice log-likelihoods
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ARC_EASY = Path(__file__).parent / "data" / "tasks" / "arc" / "arc_easy_test.jsonl"


def run_arc_easy(launcher: list, pretrained: Path, adapter: Path, workdir: Path, limit: int = 4) -> list[dict]:
    """Run ``launcher`` (``lm_eval``'s command line) with ``peft=adapter`` on the first ``limit`` ARC-Easy
    questions; return lm-eval's logged samples sorted by document."""
    tasks = workdir / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    (tasks / "arc_easy_local.yaml").write_text(
        "task: arc_easy_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {ARC_EASY}\n"
        "output_type: multiple_choice\ntest_split: test\n"
        'doc_to_text: "{{query}}\\nAnswer:"\ndoc_to_target: "{{gold}}"\ndoc_to_choice: "{{choices}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    argv = [
        *launcher, "--model", "hf", "--model_args", f"pretrained={pretrained},peft={adapter},dtype=float32",
        "--include_path", tasks, "--tasks", "arc_easy_local", "--limit", limit, "--batch_size", 8, "--device", "cpu",
        "--output_path", workdir / "out", "--log_samples",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (samples,) = (workdir / "out").rglob("samples_arc_easy_local_*.jsonl")
    return sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda r: r["doc_id"])
