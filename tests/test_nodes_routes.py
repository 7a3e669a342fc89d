"""The override's per-signature routes (PatchState.route): each call form is worked out once
(layout, views, plan, declines) and later calls of the same signature reuse it; the output is
exactly the kernel's on the same tensors, for every call form ComfyUI uses."""
import pytest
import torch

from test_nodes_support import STOCK, _stock, exact_reference

from sageattn2_pack.nodes import override as ov


def state_and_override(**kw):
    settings = dict(precision="int8+fp16", min_seq_len=0, backend="reference")
    settings.update(kw)
    state = ov.PatchState(ov.PatchSettings(**settings))
    return state, ov.SageOverride(state)


@pytest.fixture
def plans(monkeypatch):
    """Counts the node's plan look-ups."""
    seen = []
    real = ov.sa2.plan

    def counted(*a, **kw):
        seen.append(kw.get("layout"))
        return real(*a, **kw)

    monkeypatch.setattr(ov.sa2, "plan", counted)
    return seen


def tensors(shape, seed, outliers=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    if outliers:
        x[..., 0] *= 8.0
    return x


def forms():
    """(name, args, kwargs, expected q/k/v views for the kernel, layout)."""
    b, n, h, d = 2, 160, 4, 32
    q, k, v = (tensors((b, n, h * d), s) for s in (1, 2, 3))
    kq = tensors((b, n, 2 * d), 4)  # GQA: 2 key/value heads
    vq = tensors((b, n, 2 * d), 5)
    qh, kh, vh = (tensors((b, h, n, d), s).transpose(1, 2).contiguous().transpose(1, 2) for s in (6, 7, 8))
    return [
        ("NHD", (q, k, v, h), {}, (q.view(b, n, h, d), k.view(b, n, h, d), v.view(b, n, h, d)), "NHD"),
        ("NHD, heads keyword", (q, k, v), {"heads": h}, (q.view(b, n, h, d), k.view(b, n, h, d),
                                                          v.view(b, n, h, d)), "NHD"),
        ("GQA", (q, kq, vq, h), {"enable_gqa": True}, (q.view(b, n, h, d), kq.view(b, n, 2, d),
                                                       vq.view(b, n, 2, d)), "NHD"),
        ("HND strided", (qh, kh, vh, h), {"skip_reshape": True}, (qh, kh, vh), "HND"),
        ("NHD in, HND out", (q, k, v, h), {"skip_output_reshape": True},
         (q.view(b, n, h, d), k.view(b, n, h, d), v.view(b, n, h, d)), "NHD"),
    ]


@pytest.mark.parametrize("name,args,kwargs,views,layout", forms(), ids=[f[0] for f in forms()])
def test_routed_calls_are_exactly_the_kernel_on_the_same_tensors(plans, name, args, kwargs, views, layout):
    state, override = state_and_override()
    kwargs = dict(kwargs, transformer_options={})
    outs = [torch.full((1,), float("nan"))] * 3  # poisoned until served
    for i in range(3):
        outs[i] = state.handle(override, _stock, args, kwargs)
    assert len(plans) == 1 and len(state._routes) == 1  # worked out once, reused twice
    assert state.stats[("sage", "int8+fp16")] == 3 and not STOCK.calls
    want = ov.sa2.sageattn(*views, tensor_layout=layout, precision="int8+fp16", backend="reference")
    if kwargs.get("skip_output_reshape"):
        want = want.transpose(1, 2).contiguous() if layout == "NHD" else want
    elif layout == "HND":
        want = want.transpose(1, 2).flatten(2)
    else:
        want = want.flatten(2)
    for out in outs:
        assert torch.equal(out, want)
    # And it is attention: close to float64 exact attention.
    q, k, v, heads = args[0], args[1], args[2], args[3] if len(args) > 3 else kwargs["heads"]
    ref = exact_reference(q, k, v, heads, skip_reshape=layout == "HND")
    got = outs[0].transpose(1, 2).flatten(2) if kwargs.get("skip_output_reshape") else outs[0]
    cos = torch.nn.functional.cosine_similarity(got.double().flatten(), ref.flatten(), dim=0)
    assert cos > 0.995


def test_new_shapes_get_their_own_route_and_declines_are_remembered(plans):
    state, override = state_and_override(min_seq_len=128)
    short, long = (tensors((1, n, 64), n) for n in (96, 160))
    to = {"transformer_options": {}}
    STOCK.calls.clear()
    state.handle(override, _stock, (short, short, short, 2), to)
    assert len(STOCK.calls) == 1 and state.stats[("declined", "sequences shorter than min_seq_len=128 tokens")] == 1
    out = state.handle(override, _stock, (long, long, long, 2), to)
    assert state.stats[("sage", "int8+fp16")] == 1 and out.shape == long.shape
    state.handle(override, _stock, (short, short, short, 2), to)
    assert len(STOCK.calls) == 2 and len(state._routes) == 2
    assert len(plans) == 1  # the declined shape never reached the planner
    STOCK.calls.clear()


def test_unhashable_or_odd_arguments_are_declined_without_a_route():
    state, override = state_and_override()
    q = tensors((1, 160, 64), 0)
    STOCK.calls.clear()
    with pytest.raises(Exception):
        _stock(q, q, q, [2])  # stock itself cannot serve it either: the call reaches it unchanged
    STOCK.calls.clear()
    with pytest.raises(Exception):
        state.handle(override, _stock, (q, q, q, [2]), {"transformer_options": {}})
    assert state.stats[("declined", "heads=[2]")] == 1 and not state._routes
    assert len(STOCK.calls) == 1
    STOCK.calls.clear()
