"""bench/bench_sampler.py's table logic (CPU): ratios per round, rotation, aggregation over
processes, auto's verdict agreement."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_sampler as bs  # noqa: E402


def test_ratios_pair_each_round_with_its_own_stock_run():
    # Round 2 was slow for everyone (clock drop): per-round ratios cancel it, medians of
    # times would not.
    times = {"stock": [100.0, 200.0, 100.0], "int8+fp8": [90.0, 180.0, 95.0], "auto": [100.0, 190.0, 101.0]}
    r = bs.worker_ratios(times)
    assert r["int8+fp8"] == pytest.approx(100 / 90)  # median of 1.111, 1.111, 1.053
    assert r["auto"] == pytest.approx(1.0)  # median of 1.0, 1.053, 0.990
    assert set(r) == {"int8+fp8", "auto"}


def test_rotation_starts_each_round_with_another_variant():
    v = ["stock", "a", "b"]
    assert [bs.rotated(v, r)[0] for r in range(4)] == ["stock", "a", "b", "stock"]
    assert all(sorted(bs.rotated(v, r)) == sorted(v) for r in range(5))


def test_majority_counts_the_processes_that_differ():
    assert bs.majority(["sage", "stock", "sage", "sage", "stock"]) == ("sage", 2)
    assert bs.majority(["stock"] * 5) == ("stock", 0)
    assert bs.majority([]) == ("", 0)


def result(sampler, forward, verdict, first=None):
    return {"device": "GPU", "torch": "2", "slices": {"flux": {
        "label": "Flux", "stock_ms": 250.0, "variants": {
            "int8+fp8": {"sampler": sampler * 0.97, "forward": forward, "ms": 1.0},
            "auto": {"sampler": sampler, "forward": 1.0, "ms": 1.0, "verdict": verdict, "first_run": first},
        }}}}


def test_aggregate_reports_every_process_the_worst_and_disagreement():
    results = [result(1.00, 0.97, "stock", 0.98), result(0.995, 0.97, "stock", 0.97),
               result(0.90, 0.98, "sage", 0.95)]
    lines = bs.aggregate(results)
    assert lines[0].startswith("| slice | variant |") and lines[1].startswith("|---")
    stock, q, auto, first = lines[2:6]
    assert stock.startswith("| Flux | stock | 250 ms")
    # int8+fp8: per-process sampler ratios, worst, forward median, sampler/forward median
    assert "0.970x, 0.965x, 0.873x" in q and "| 0.873x |" in q and "| 0.970x |" in q
    assert "| 0.995 |" in q  # median of 0.970/0.97, 0.965/0.97, 0.873/0.98
    assert "stock, stock, sage" in auto and "| 1/3 |" in auto and "| 0.900x |" in auto
    assert first.startswith("| | auto, first (deciding) run | 0.980x, 0.970x, 0.950x")
    assert len(lines) == 6


def test_host_cost_times_the_stock_and_the_patched_path():
    lines = bs.host_cost(evaluations=3)
    rows = [line for line in lines if line.startswith("| stock |") or line.startswith("| int8+fp8 |")]
    assert len(rows) == 2
    from sageattn2_pack.nodes import override as ov
    import sageattn2

    assert ov.sa2.sageattn is sageattn2.sageattn  # the fake kernel is removed again
