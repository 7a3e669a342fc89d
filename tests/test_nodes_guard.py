"""The non-finite guarantee without a GPU->host wait per model evaluation: quantized outputs
are summed on the device into one check per sampling run (SAMPLER_SAMPLE wrapper), read once
at its end; a run that produced inf/NaN is redone with stock attention."""
import logging

import pytest
import torch

from test_nodes_support import STOCK, FakePatcher, TinyDiT, apply_model

from sageattn2_pack.nodes import finite
from sageattn2_pack.nodes import override as ov

SIGMAS = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]


def sample_run(patcher, model, sigmas, seed=0):
    """One sampling run as ComfyUI's CFGGuider.inner_sample makes it: the SAMPLER_SAMPLE
    wrappers around the sampler, which evaluates the model once per step and feeds each
    output into the next step's input (so a NaN reaches the result, as in a real sampler)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, model.tokens, model.w[next(iter(model.w))].shape[0], generator=gen)
    sample_sigmas = torch.tensor(sigmas)
    chain = [fn for fns in patcher.wrappers.get("sampler_sample", {}).values() for fn in fns]

    def sampler(guider, sigmas_t, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar):
        x = noise
        for i, s in enumerate(sigmas[:-1]):
            denoised = apply_model(patcher, model, x * (0.5 + s), s, sigmas_t)
            x = x + (denoised - x) * (sigmas[i] - sigmas[i + 1])
        return x

    class Executor:
        def __init__(self, idx):
            self.idx = idx

        def __call__(self, *args, **kwargs):
            return Executor(self.idx + 1).execute(*args, **kwargs)

        def execute(self, *args, **kwargs):
            if self.idx == len(chain):
                return sampler(*args, **kwargs)
            return chain[self.idx](self, *args, **kwargs)

    patcher.run_callbacks("on_pre_run")
    try:
        return Executor(0).execute(None, sample_sigmas, {}, None, noise, None, None, True)
    finally:
        patcher.run_callbacks("on_cleanup")


@pytest.fixture
def reads(monkeypatch):
    """Every FiniteCheck.finite() that read the device (had outputs to read)."""
    seen = []
    real = finite.FiniteCheck.finite

    def counted(self):
        seen.append(self.outputs)
        return real(self)

    monkeypatch.setattr(finite.FiniteCheck, "finite", counted)
    return seen


def patch(base, precision="int8+fp16"):
    state = ov.PatchState(ov.PatchSettings(precision=precision, min_seq_len=0, backend="reference"))
    return ov.install(base, state), state


def device_reads(seen):
    return [n for n in seen if n]


def test_a_clean_run_reads_the_device_once(reads):
    dit = TinyDiT()
    patched, state = patch(FakePatcher())
    out = sample_run(patched, dit, SIGMAS)
    assert torch.isfinite(out).all()
    n = dit.attention_calls_per_forward() * (len(SIGMAS) - 1)
    assert state.stats[("sage", "int8+fp16")] == n
    # One read, of all n quantized outputs, at the end of the run: none per evaluation.
    assert device_reads(reads) == [n]


def test_inf_in_one_evaluation_redoes_the_run_with_stock(monkeypatch, reads, caplog):
    dit = TinyDiT()
    base = FakePatcher()
    STOCK.calls.clear()
    ref = sample_run(base, dit, SIGMAS)
    assert torch.isfinite(ref).all()
    real = ov.sa2.sageattn
    calls = [0]

    def inf_in_the_third_evaluation(*args, **kwargs):
        out = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == 2 * dit.attention_calls_per_forward() + 3:
            out.view(-1)[5] = float("inf")
        return out

    monkeypatch.setattr(ov.sa2, "sageattn", inf_in_the_third_evaluation)
    patched, state = patch(base)
    with caplog.at_level(logging.INFO, logger="sageattn2.nodes"):
        out = sample_run(patched, dit, SIGMAS)
    # Without the guard the inf reaches the result (the control); with it, the result is the
    # stock run's, exactly.
    assert torch.equal(out, ref)
    assert state.stats["rerun"] == 1 and state.stats["recomputed"] == 0
    assert sum("sampling run is redone with stock attention" in r.message for r in caplog.records) == 1
    assert device_reads(reads) == [dit.attention_calls_per_forward() * (len(SIGMAS) - 1)]
    # The next run is quantized again, and reads once.
    calls[0] = -10 ** 9
    reads.clear()
    out = sample_run(patched, dit, SIGMAS)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert state.stats["rerun"] == 1 and len(device_reads(reads)) == 1


def test_the_control_an_unguarded_run_keeps_the_inf(monkeypatch):
    """What the guard prevents: the same poisoned run without the SAMPLER_SAMPLE wrapper."""
    dit = TinyDiT()
    real = ov.sa2.sageattn

    def always_inf(*args, **kwargs):
        out = real(*args, **kwargs)
        out.view(-1)[5] = float("inf")
        return out

    monkeypatch.setattr(ov.sa2, "sageattn", always_inf)
    patched, _ = patch(FakePatcher())
    patched.wrappers.pop("sampler_sample")
    monkeypatch.setattr(finite.FiniteCheck, "finite", lambda self: True)  # and no per-evaluation check
    out = sample_run(patched, dit, SIGMAS)
    assert not torch.isfinite(out).all()


def test_a_model_that_overflows_by_itself_is_redone_once(monkeypatch, caplog):
    """Stock attention gives inf too (the model overflows): the run is redone once, the
    user is told, and later runs are not redone (they would be as broken, and twice as slow)."""
    dit = TinyDiT()
    real_forward = dit.forward
    evaluations = [0]

    def overflowing(x, transformer_options):
        evaluations[0] += 1
        return real_forward(x * float("inf"), transformer_options)

    monkeypatch.setattr(dit, "forward", overflowing)
    patched, state = patch(FakePatcher())
    steps = len(SIGMAS) - 1
    with caplog.at_level(logging.INFO, logger="sageattn2.nodes"):
        sample_run(patched, dit, SIGMAS)
        assert evaluations[0] == 2 * steps and state.stats["rerun"] == 1
        sample_run(patched, dit, SIGMAS)
    assert evaluations[0] == 3 * steps
    assert sum("not finite either" in r.message for r in caplog.records) == 1


def test_finite_check_folds_and_keeps_nan():
    check = finite.FiniteCheck()
    assert check.finite()
    for i in range(600):
        check.add(torch.full((3, 4), float(i)))
    assert len(check._sums) < 300 and check.outputs == 600 and check.finite()
    check.add(torch.tensor([1.0, float("nan")]))
    for _ in range(300):
        check.add(torch.ones(2))
    assert not check.finite() and not check.finite()


def test_half_precision_outputs_are_summed_in_float32():
    """A bf16 output near its max is finite; its sum in bf16 would overflow (a needless rerun)."""
    check = finite.FiniteCheck()
    check.add(torch.full((64,), 3.0e38, dtype=torch.bfloat16).div(64))
    check.add(torch.full((1024,), 60000.0, dtype=torch.float16))
    assert check.finite()
