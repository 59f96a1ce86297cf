"""A short run of the load benchmark, so that it keeps working between the runs that measure."""

import json
import pathlib
import subprocess
import sys

BENCHMARK = pathlib.Path(__file__).parents[2] / "benchmarks" / "load.py"


def test_load_benchmark_short_run(tmp_path):
    figures_path = tmp_path / "load.json"

    completed = subprocess.run(
        [sys.executable, str(BENCHMARK), "--clients", "4", "--duration-s", "2", "--processes", "1", "--json", str(figures_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert completed.returncode == 0, completed.stdout + completed.stderr
    figures = json.loads(figures_path.read_text())
    assert figures["failed"] == 0
    assert figures["problems"] == []
    assert figures["total"] > 0
    assert "p50 ms" in completed.stdout
