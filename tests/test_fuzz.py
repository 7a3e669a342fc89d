"""The CPU part of the randomized API test (tests/gpu/fuzz_attention.py): SA2_FUZZ_CASES
cases (default 200) of seed SA2_FUZZ_SEED (default 1) against float64 attention, quantized
levels through the reference, plus the bad and extreme inputs in one child process."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "gpu"))

import fuzz_attention  # noqa: E402


def test_fuzz_cpu(tmp_path, capsys):
    rc = fuzz_attention.main(["--device", "cpu", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, "\n".join(line for line in out.splitlines() if line.startswith(("FAIL", "SUMMARY")))


def test_floor_table_covers_every_level_and_data_kind():
    floors = fuzz_attention.load_floors()
    levels = ("exact", "int8+fp16", "int8+fp8", "int4+fp16", "int4+fp8")
    assert set(floors) == {(lvl, data) for lvl in levels for data in fuzz_attention.DATA_KINDS}


def test_cases_are_deterministic_by_seed_and_index():
    a = fuzz_attention.make_case(5, 17, 131072, 1 << 31)
    assert a == fuzz_attention.make_case(5, 17, 131072, 1 << 31)
    assert a != fuzz_attention.make_case(6, 17, 131072, 1 << 31)
    q1, k1, v1 = fuzz_attention.make_inputs(a, 5, __import__("torch").device("cpu"))
    q2, k2, v2 = fuzz_attention.make_inputs(a, 5, __import__("torch").device("cpu"))
    assert all(x.equal(y) for x, y in ((q1, q2), (k1, k2), (v1, v2)))


def test_a_wrong_result_is_caught(monkeypatch):
    """The checks can fail: a slightly wrong output, a NaN, a modified input are each reported."""
    import torch

    real = fuzz_attention.sageattn2.sageattn
    case = fuzz_attention.make_case(1, 3, 64, 1 << 14)
    case = fuzz_attention.Case(**{**case.__dict__, "precision": "int8+fp16", "data": "normal", "lse": False})
    floors = fuzz_attention.load_floors()
    cpu = torch.device("cpu")
    assert fuzz_attention.run_case(case, 1, cpu, floors, 1 << 14)["failures"] == []
    for wrong, expect in ((lambda o, q: o * 1.1, "accuracy"), (lambda o, q: o.fill_(float("nan")), "NaN"),
                          (lambda o, q: (q.view(-1)[:1].add_(1.0), o)[1], "inputs changed")):
        monkeypatch.setattr(fuzz_attention.sageattn2, "sageattn", lambda q, k, v, **kw: wrong(real(q, k, v, **kw), q))
        failures = fuzz_attention.run_case(case, 1, cpu, floors, 1 << 14)["failures"]
        assert any(expect in f for f in failures), failures
