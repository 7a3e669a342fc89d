"""The non-finite guarantee inside ComfyUI's own sampler (SAMPLER_SAMPLE wrapper of a real
tree): one device read per sampling run, and a run that met an inf is redone with stock
attention, giving exactly the stock result."""
import torch

from test_comfyui import patch, tiny_wan

from sageattn2_pack.nodes import finite
from sageattn2_pack.nodes import override as ov


def test_an_inf_redoes_the_run_with_stock_and_clean_runs_read_once(monkeypatch):
    wan = tiny_wan()
    ref = wan.sample(wan.patcher)
    reads = []
    real_finite = finite.FiniteCheck.finite
    monkeypatch.setattr(finite.FiniteCheck, "finite", lambda self: (reads.append(self.outputs), real_finite(self))[1])
    real = ov.sa2.sageattn
    calls = [0]

    def inf_once(*args, **kwargs):
        out = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == 5:
            out.view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(ov.sa2, "sageattn", inf_once)
    patched, state = patch(wan.patcher)
    out = wan.sample(patched)
    assert torch.equal(out, ref) and state.stats["rerun"] == 1
    served = state.stats[("sage", "int8+fp8")]
    assert [n for n in reads if n] == [served]  # one read, at the end of the first attempt
    reads.clear()
    out = wan.sample(patched)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert [n for n in reads if n] == [state.stats[("sage", "int8+fp8")] - served]
