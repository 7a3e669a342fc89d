"""The verdicts tests/gpu/sanitize.sh prints per compute-sanitizer tool, from its logs (the
GPU run itself is a device call; this checks that a dirty, cut or broken run is never
reported CLEAN)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "gpu"))

import sanitize_cases  # noqa: E402

CASES = "TOTAL 3 (mma 2, wgmma 1)\nok     mma a\nok     wgmma b\nok     mma c\nCASES 3 ok 3\n"


@pytest.mark.parametrize("log, rc, verdict", [
    (CASES + "========= ERROR SUMMARY: 0 errors\n", "rc=0 seconds=80", "CLEAN"),
    (CASES + "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 2 warnings)\n", "rc=0 seconds=9", "CLEAN"),
    (CASES + "========= RACECHECK SUMMARY: 3 hazards displayed (1 error, 2 warnings)\n", "rc=9 seconds=9", "ERRORS"),
    ("TOTAL 3\nok     mma a\n========= Invalid __global__ read\n" + CASES[25:] + "========= ERROR SUMMARY: 1 error\n",
     "rc=9 seconds=5", "ERRORS"),
    ("TOTAL 3\nok     mma a\n", "rc=124 seconds=480", "INCOMPLETE"),
    ("TOTAL 3\nok     mma a\nRAISED KernelError: x wgmma b\nok     mma c\nCASES 3 ok 2\n"
     "========= ERROR SUMMARY: 0 errors\n", "rc=1 seconds=5", "FAILED"),
    ("no kernel library: none\n", "rc=2 seconds=1", "FAILED"),
    ("", "", "FAILED"),
])
def test_tool_verdict(log, rc, verdict):
    assert sanitize_cases.tool_verdict(log, rc)["verdict"] == verdict


def test_summary_table_and_status(tmp_path, capsys):
    (tmp_path / "sanitize_memcheck.txt").write_text(CASES + "========= ERROR SUMMARY: 0 errors\n")
    (tmp_path / "sanitize_memcheck.rc").write_text("rc=0 seconds=80\n")
    assert sanitize_cases.summarize(tmp_path, ["memcheck"]) == 0
    assert "| memcheck | CLEAN | 0 | 0 | 3/3 | 80 |" in (tmp_path / "sanitize_summary.md").read_text()
    assert sanitize_cases.summarize(tmp_path, ["memcheck", "racecheck"]) == 1  # racecheck never ran
    out = capsys.readouterr().out
    assert "memcheck: CLEAN (0 errors; 3/3 cases ok, 80 s)" in out and "racecheck: FAILED" in out
