"""The prepared GPU check runs here with --smoke (tiny sizes, CPU), so it is known to work before a GPU is lent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_every_part_and_writes_its_tables(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_check.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    for part in ("tests", "throughput", "repro"):
        assert f"| {part} | yes |" in summary, summary
    assert "skipped" in (out / "tests.txt").read_text()  # no CUDA here: the cuda tests skip cleanly
    throughput = json.loads((out / "throughput.json").read_text())
    from wsss.distributed import resolve_precision

    native_bf16 = resolve_precision("auto", __import__("torch").device("cpu")) == "bf16"
    assert set(throughput) == ({"fp32", "bf16"} if native_bf16 else {"fp32"})
    for result in throughput.values():
        assert all(entry["seconds"] > 0 for entry in result["measured"].values())
        assert set(result["hours"]) == {"VOC 2012 (train_aug)", "LID 2020 (balanced, paper)"}
    repro = json.loads((out / "repro.json").read_text())
    assert [row["stage"] for row in repro["stages"]][-1] == "evaluate" and all(row["exit"] == 0 for row in repro["stages"])
    assert repro["evaluate"], "the evaluate stage wrote no metrics"
