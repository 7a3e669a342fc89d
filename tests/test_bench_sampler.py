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


def split(wall, evals):
    return {"wall": wall, "evaluations": evals, "count": 12, "load": 3.0, "gc": 0.0, "rest": wall - evals}


def result(sampler, forward, verdict, first=None, evals=None):
    return {"device": "GPU", "torch": "2", "slices": {"flux": {
        "label": "Flux", "stock_ms": 250.0, "stock": split(250.0, 230.0), "leaked_models": 0, "variants": {
            "int8+fp8": {"sampler": sampler * 0.97, "forward": forward, "ms": 1.0, "evaluations": evals,
                         "split": split(260.0, 235.0)},
            "auto": {"sampler": sampler, "forward": 1.0, "ms": 1.0, "verdict": verdict, "first_run": first},
        }}}}


def test_aggregate_reports_every_process_the_worst_and_disagreement():
    results = [result(1.00, 0.97, "stock", 0.98, 0.97), result(0.995, 0.97, "stock", 0.97, 0.96),
               result(0.90, 0.98, "sage", 0.95, 0.99)]
    lines = bs.aggregate(results)
    assert lines[0].startswith("| slice | variant |") and lines[1].startswith("|---")
    assert lines[0].count("|") == lines[1].count("|") == 11
    stock, q, auto, first = lines[2:6]
    assert stock.startswith("| Flux | stock | 250 ms per run (median): 12 evaluations 230 ms, rest 20 ms "
                            "(of which load_models_gpu 3 ms, gc 0 ms)")
    assert stock.count("|") == 11 and "| 20 |" in stock
    # int8+fp8: per-process sampler ratios, worst, forward median, sampler/forward median,
    # evaluations median, rest median
    assert "0.970x, 0.965x, 0.873x" in q and "| 0.873x |" in q and "| 0.970x |" in q
    assert "| 0.995 |" in q  # median of 0.970/0.97, 0.965/0.97, 0.873/0.98
    assert "| 0.970x | 25 |" in q  # evaluations: median of 0.97, 0.96, 0.99; rest 260 - 235
    assert "stock, stock, sage" in auto and "| 1/3 |" in auto and "| 0.900x |" in auto
    assert first.startswith("| | auto, first (deciding) run | 0.980x, 0.970x, 0.950x")
    assert all(line.count("|") == 11 for line in lines)
    assert len(lines) == 6
    leaky = result(1.0, 1.0, "stock")
    leaky["slices"]["flux"]["leaked_models"] = 2
    assert "ComfyUI held 2 dead model(s)" in bs.aggregate([leaky])[2]


def test_host_cost_times_the_stock_the_patched_and_both_auto_verdict_paths():
    lines = bs.host_cost(evaluations=5)
    rows = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ") and "---" not in line}
    assert set(rows) >= {"stock", "int8+fp8", "auto (stock verdict)", "auto (Sage verdict)"}
    from sageattn2_pack.nodes import override as ov
    import sageattn2

    # The fakes are removed again.
    assert ov.sa2.sageattn is sageattn2.sageattn and ov.sa2.plan is sageattn2.plan
    assert ov.input_key.__module__.endswith("race")


def test_host_cost_paths_serve_what_their_names_say(monkeypatch):
    """The `auto (Sage verdict)` path serves every call with the (fake) kernel, the stock-verdict
    path none: what the table times is the path it names."""
    from sageattn2_pack.nodes import override as ov

    served = {}
    real_install = ov.install

    def spy(model, state):
        served[id(state)] = state
        return real_install(model, state)

    monkeypatch.setattr(ov, "install", spy)
    bs.host_cost(evaluations=5)
    by_name = {}
    for state in served.values():
        verdicts = {d.verdict for d in state.auto.inputs.values()} if state.auto else {None}
        by_name[(state.settings.precision, verdicts.pop())] = state.stats
    assert by_name[("int8+fp8", None)][("sage", "int8+fp8")] > 0
    assert by_name[("auto", "sage")][("sage", "auto")] > 0 and not any(
        k[0] == "declined" for k in by_name[("auto", "sage")])
    assert not by_name[("auto", "stock")]  # no call reached the override
