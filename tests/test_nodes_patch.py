"""Installing the override on a model: per-model scope, bypass, chaining, re-installation,
per-forward layer counting, schedules over a sampling run, the non-finite guard."""
import copy
import logging

import pytest
import torch

from test_nodes_support import STOCK, DiscreteSampling, FakePatcher, FlowSampling, TinyDiT, sample

from sageattn2_pack.nodes import override as ov
from sageattn2_pack.nodes.schedule import parse

FLOW_SIGMAS = [1.0, 0.9, 0.75, 0.5, 0.25, 0.0]


def patch(model, precision="int8+fp16", schedule=None, **kw):
    settings = dict(precision=precision, min_seq_len=0, backend="reference")
    settings.update(kw)
    state = ov.PatchState(ov.PatchSettings(**settings), parse(schedule) if schedule else None)
    state.trace = []
    return ov.install(model, state), state


def cos(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def counts(state):
    out = {}
    for key, n in state.stats.items():
        if isinstance(key, tuple):
            out[key] = n
    return out


class Counting:
    """A previous override from another node: counts, then runs func."""

    def __init__(self):
        self.n = 0

    def __call__(self, func, *args, **kwargs):
        self.n += 1
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def dit():
    return TinyDiT()


def test_patch_is_a_clone_and_bypass_keeps_stock(dit):
    base = FakePatcher()
    patched, state = patch(base)
    assert patched is not base and "optimized_attention_override" not in base.model_options["transformer_options"]
    assert not base.wrappers and not base.callbacks
    ref = sample(base, dit, FLOW_SIGMAS)
    assert len(STOCK.calls) == dit.attention_calls_per_forward() * 5
    STOCK.calls.clear()
    out = sample(patched, dit, FLOW_SIGMAS)
    # Every attention call of the model went through the override, and was served.
    assert sum(counts(state).values()) == dit.attention_calls_per_forward() * 5
    assert counts(state) == {("sage", "int8+fp16"): dit.attention_calls_per_forward() * 5}
    assert not STOCK.calls
    assert all(cos(a, b) > 0.999 for a, b in zip(out, ref))
    # The unpatched model is still stock afterwards.
    again = sample(base, dit, FLOW_SIGMAS)
    assert all(torch.equal(a, b) for a, b in zip(again, ref))


def test_clones_of_the_patched_model_share_one_state(dit):
    patched, state = patch(FakePatcher())
    later = patched.clone()  # e.g. a LoRA loader after the patch node
    o1 = patched.model_options["transformer_options"]["optimized_attention_override"]
    o2 = later.model_options["transformer_options"]["optimized_attention_override"]
    assert o1 is o2 and copy.deepcopy(o1) is o1
    sample(later, dit, FLOW_SIGMAS[-2:])
    assert sum(counts(state).values()) == dit.attention_calls_per_forward()


def test_two_models_keep_their_own_settings(dit):
    base = FakePatcher()
    a, sa = patch(base, "int8+fp16")
    b, sb = patch(base, "int4+fp8", schedule="single: exact")
    for _ in range(2):
        sample(a, dit, FLOW_SIGMAS[:3] + [0.0])
        sample(b, dit, FLOW_SIGMAS[:3] + [0.0])
    n = dit.attention_calls_per_forward() * 3 * 2
    assert counts(sa) == {("sage", "int8+fp16"): n}
    singles = 2 * 3 * 3 * 2  # 3 single blocks, self + cross, 3 evaluations, 2 runs
    assert counts(sb) == {("sage", "int4+fp8"): n - singles, ("declined", "exact"): singles}
    assert {lvl for _, _, lvl in sa.trace} == {"int8+fp16"}
    assert len(STOCK.calls) == singles


def test_previous_override_receives_exactly_the_declined_calls(dit):
    base = FakePatcher()
    prev = Counting()
    base.model_options["transformer_options"]["optimized_attention_override"] = prev
    patched, state = patch(base, "int8+fp8", schedule="double 0: exact")
    # clone() deep-copied model_options, the previous override included (as ComfyUI does)
    prev = patched.model_options["transformer_options"]["optimized_attention_override"].previous
    assert isinstance(prev, Counting)
    sample(patched, dit, FLOW_SIGMAS)
    assert prev.n == 2 * 5  # double 0's self and cross attention, 5 evaluations
    assert len(STOCK.calls) == prev.n
    assert counts(state)[("declined", "exact")] == prev.n


def test_patching_again_replaces_our_patch_and_keeps_the_chain(dit):
    base = FakePatcher()
    prev = Counting()
    base.model_options["transformer_options"]["optimized_attention_override"] = prev
    first, s1 = patch(base, "int8+fp8")
    second, s2 = patch(first, "exact")
    o = second.model_options["transformer_options"]["optimized_attention_override"]
    prev = o.previous
    assert o.state is s2 and isinstance(prev, Counting)
    assert len(second.wrappers["apply_model"]["sageattn2"]) == 1
    sample(second, dit, FLOW_SIGMAS[-2:])
    assert prev.n == dit.attention_calls_per_forward() and not s1.stats


def test_later_writer_is_kept_behind_us(dit, caplog):
    patched, state = patch(FakePatcher(), schedule="double: exact")
    later = patched.clone()
    foreign = Counting()
    later.model_options["transformer_options"]["optimized_attention_override"] = foreign
    with caplog.at_level(logging.INFO, logger="sageattn2.nodes"):
        sample(later, dit, FLOW_SIGMAS)
        sample(later, dit, FLOW_SIGMAS)
    per_run = dit.attention_calls_per_forward() * 5
    double_calls = 2 * 2 * 5
    assert foreign.n == 2 * double_calls  # only what we declined
    assert counts(state)[("sage", "int8+fp16")] == 2 * (per_run - double_calls)
    assert sum("another attention override" in r.message for r in caplog.records) == 1


def test_a_later_override_chaining_to_us_is_not_handled_twice(dit):
    patched, state = patch(FakePatcher(), "exact")
    ours = patched.model_options["transformer_options"]["optimized_attention_override"]

    class ChainsToUs:
        n = 0

        def __call__(self, func, *args, **kwargs):
            self.n += 1
            return ours(func, *args, **kwargs)  # declines everything back to what it wrapped

    later = patched.clone()
    foreign = ChainsToUs()
    later.model_options["transformer_options"]["optimized_attention_override"] = foreign
    out = sample(later, dit, FLOW_SIGMAS[-2:])
    n = dit.attention_calls_per_forward()
    assert foreign.n == n and len(STOCK.calls) == n and torch.isfinite(out[0]).all()
    # The call that came back through the foreign override was not handled a second time
    # (that would also shift per-forward layer counting).
    assert counts(state) == {("declined", "exact"): n}


def test_schedule_switches_levels_at_the_right_sigmas(dit):
    ms = FlowSampling(3.0)
    base = FakePatcher(ms)
    patched, state = patch(base, "exact", schedule="0-20%: int8+fp16; 20-90%: int4+fp8; 90-100%: int8+fp8")
    at = ms.percent_to_sigma
    sigmas = [1.0, at(0.1), at(0.2) * (1 + 1e-4), at(0.2) * (1 - 1e-4), at(0.5), at(0.9) * (1 + 1e-4),
              at(0.9) * (1 - 1e-4), at(0.97), 0.0]
    sample(patched, dit, sigmas)
    levels = [lvl for _, _, lvl in state.trace]
    n = dit.attention_calls_per_forward()
    assert [set(levels[i * n : (i + 1) * n]) for i in range(len(sigmas) - 1)] == (
        [{"int8+fp16"}] * 3 + [{"int4+fp8"}] * 3 + [{"int8+fp8"}] * 2)


def test_schedule_rebinds_when_model_sampling_changes(dit):
    base = FakePatcher(FlowSampling(1.0))
    patched, state = patch(base, "exact", schedule="0-50%: int8+fp16")
    # sigma 0.6 is 40% with shift 1 but 67% with shift 3 (a ModelSamplingSD3 node after the patch)
    sample(patched, dit, [0.6, 0.0])
    patched.model.model_sampling = FlowSampling(3.0)
    sample(patched, dit, [0.6, 0.0])
    n = dit.attention_calls_per_forward()
    assert [lvl for _, _, lvl in state.trace] == ["int8+fp16"] * n + ["exact"] * n


def test_sigma_is_read_only_when_something_uses_it(dit, monkeypatch):
    # Reading sigma waits for the GPU, once per model evaluation: a plain patch must not.
    reads = []
    real = ov._sigma_value
    monkeypatch.setattr(ov, "_sigma_value", lambda t: reads.append(t) or real(t))
    plain, state = patch(FakePatcher(FlowSampling(1.0)), "int8+fp16")
    state.trace = None
    out = sample(plain, dit, [1.0, 0.5, 0.0])
    assert reads == [] and all(torch.isfinite(o).all() for o in out)
    assert counts(state) == {("sage", "int8+fp16"): 2 * dit.attention_calls_per_forward()}
    scheduled, _ = patch(FakePatcher(FlowSampling(1.0)), "exact", schedule="0-50%: int8+fp16")
    sample(scheduled, dit, [1.0, 0.5, 0.0])
    assert len(reads) == 2


def test_discrete_model_percent_windows():
    ms = DiscreteSampling()
    dit = TinyDiT(blocks=(("double", 1),))
    patched, state = patch(FakePatcher(ms), "exact", schedule="0-50%: int8+fp16")
    early, late = ms.percent_to_sigma(0.3), ms.percent_to_sigma(0.7)
    sample(patched, dit, [14.6, early, late, 0.0])
    assert [lvl for _, _, lvl in state.trace[::2]] == ["int8+fp16", "int8+fp16", "exact"]


def test_layer_rules_without_block_keys_count_calls():
    dit = TinyDiT(keys=False)  # like SD3/LTXV: no block keys, every call is a layer
    patched, state = patch(FakePatcher(), "int4+fp8", schedule="blocks 0-1: exact\nblocks last 2: int8+fp16")
    sample(patched, dit, [1.0, 0.5, 0.0])
    n = dit.attention_calls_per_forward()
    first, second = [lvl for _, _, lvl in state.trace[:n]], [lvl for _, _, lvl in state.trace[n:]]
    # First forward: the layer count is not known yet, so 'last 2' may apply anywhere: the
    # more accurate of the candidates runs. Afterwards exactly the last two calls.
    assert first == ["exact"] * 2 + ["int8+fp16"] * (n - 2)
    assert second == ["exact"] * 2 + ["int4+fp8"] * (n - 4) + ["int8+fp16"] * 2
    assert [name for _, name, _ in state.trace[:n]] == [f"blocks {i}" for i in range(n)]


def test_layer_rules_with_block_keys(dit):
    patched, state = patch(FakePatcher(), "int4+fp8", schedule="blocks last 2: int8+fp16\nsingle last 1: exact")
    sample(patched, dit, [1.0, 0.5, 0.0])
    per_forward = [(name, lvl) for _, name, lvl in state.trace[::2]]  # one entry per layer (self attention)
    first, second = per_forward[:5], per_forward[5:]
    assert first == [("double 0", "int8+fp16"), ("double 1", "int8+fp16"), ("single 0", "int8+fp16"),
                     ("single 1", "int8+fp16"), ("single 2", "exact")]
    assert second == [("double 0", "int4+fp8"), ("double 1", "int4+fp8"), ("single 0", "int4+fp8"),
                      ("single 1", "int8+fp16"), ("single 2", "exact")]


def test_non_finite_output_recomputes_the_evaluation_with_stock(dit, monkeypatch, caplog):
    base = FakePatcher()
    ref = sample(base, dit, FLOW_SIGMAS)
    real = ov.sa2.sageattn
    poison = {"on": True}

    def sometimes_nan(*args, **kwargs):
        out = real(*args, **kwargs)
        if poison["on"]:
            out.view(-1)[3] = float("inf")
        return out

    monkeypatch.setattr(ov.sa2, "sageattn", sometimes_nan)
    patched, state = patch(base, "int8+fp8")
    STOCK.calls.clear()
    with caplog.at_level(logging.INFO, logger="sageattn2.nodes"):
        out = sample(patched, dit, FLOW_SIGMAS)
    # The first evaluation was recomputed, the rest of the run used stock attention: the
    # output is exactly the stock one.
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert state.stats["recomputed"] == 1
    assert len(STOCK.calls) == dit.attention_calls_per_forward() * 5
    assert sum("non-finite" in r.message for r in caplog.records) == 1
    # The next run starts quantized again.
    poison["on"] = False
    out = sample(patched, dit, FLOW_SIGMAS)
    assert state.stats[("sage", "int8+fp8")] == dit.attention_calls_per_forward() * (5 + 1)


def test_auto_declines_to_stock_when_quantizing_does_not_pay(dit, monkeypatch):
    """`auto` asks the per-shape timing cache; a 'stock is faster' verdict sends the call to
    ComfyUI's own function (timed against it), an 'ours is faster' verdict serves it."""
    from sageattn2_pack.sageattn2 import AttnConfig, Plan, autotune

    # Pretend a GPU kernel serves int8+fp16 here; the quantized run itself is the reference.
    monkeypatch.setattr(ov.sa2, "plan", lambda *a, **kw: Plan("mma", AttnConfig("int8", "fp16")))
    real_sageattn = ov.sa2.sageattn
    monkeypatch.setattr(ov.sa2, "sageattn", lambda *a, **kw: real_sageattn(*a, **{**kw, "backend": "reference"}))
    seen = []

    def verdict(q, k, layout, is_causal, run_quantized, run_exact, reference):
        assert reference == "comfyui"  # decisions against ComfyUI's function, not the API's SDPA
        seen.append(run_exact)
        return pays

    monkeypatch.setattr(autotune, "quantized_pays_off", verdict)
    for pays, want in ((False, ("declined", "auto: stock attention is faster for this shape")), (True, ("sage", "auto"))):
        STOCK.calls.clear()
        seen.clear()
        patched, state = patch(FakePatcher(), precision="auto", backend="auto")
        sample(patched, dit, FLOW_SIGMAS[:2])
        assert set(counts(state)) == {want}
        assert bool(STOCK.calls) == (not pays)
        assert seen and all(callable(f) for f in seen)
        # A 'stock' verdict is remembered per call signature: later calls of that shape go to
        # stock without asking again (host time), while 'ours' asks the (cached) timing each call.
        served = counts(state)[want]
        assert (1 <= len(seen) < served) if not pays else len(seen) == served
