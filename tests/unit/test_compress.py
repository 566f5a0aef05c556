"""Compressed models: the stored weights are integers (INT8, INT4 two per byte) with group-wise
scales, the loaded model holds no float copy of them, and its logits equal those of a float model
carrying the dequantised weights (the integer kernels compute exactly that product); the engine
serves it; the CLI refuses what cannot work in one line."""

import pytest
import torch
from safetensors.torch import load_file

from tedmoe.compress import model as compressed
from tedmoe.compress import quant
from tedmoe.data.tokenizer import ByteTokenizer
from tedmoe.inference.generate import load_model
from tedmoe.model.transformer import GPTMoE
from tedmoe.parallel.topology import Topology
from tests.unit.test_inference_engine import build, model_config, reference

TOL = {"rtol": 1e-4, "atol": 1e-4}


def float_model():
    cfg = model_config(vocab_size=256, hidden_size=64, num_heads=4, num_kv_heads=2)
    cfg.moe.ffn_hidden_size = 64
    return build(cfg)


def dequantised(model, path):
    """A float copy of ``model`` whose quantised weights are the stored integers times their scales."""
    meta, tensors = compressed.read_meta(path), load_file(str(path / "model.safetensors"))
    state, kinds = model.state_dict(), compressed.quantized_weights(model)
    for name in meta["quantized"]:
        q = compressed._unstored(tensors[f"{name}.qweight"], meta["bits"])
        s = tensors[f"{name}.scales"]
        w = torch.stack([quant.dequantize(qe, se) for qe, se in zip(q.reshape(-1, *q.shape[-2:]),
                                                                      s.reshape(-1, *s.shape[-2:]))]).reshape(q.shape)
        state[name] = w if kinds[name] == "linear" else w.transpose(-1, -2)  # experts: ours are [E, K, N]
    copy = GPTMoE(model.config, Topology.single()).eval()
    copy.load_state_dict(state)
    return copy


@pytest.mark.parametrize("method,group", [("int8", 32), ("int8", 64), ("int4", 32), ("zeroquant", 64)])
def test_compressed_models_compute_with_their_integers(tmp_path, method, group):
    model = float_model()
    report = compressed.save(model.state_dict(), model.config, method, group, tmp_path / "c", ByteTokenizer())
    tensors = load_file(str(tmp_path / "c" / "model.safetensors"))
    w = model.state_dict()["blocks.0.attn.q.weight"]
    stored = tensors["blocks.0.attn.q.weight.qweight"]
    assert stored.dtype == (torch.uint8 if method == "int4" else torch.int8)
    assert stored.shape == ((64, 32) if method == "int4" else (64, 64)) and w.shape == (64, 64)
    assert tensors["blocks.1.mlp.experts.w2.qweight"].shape[0] == 4  # experts too, stacked
    state = model.state_dict()
    q_bytes = sum(state[n].numel() * 4 for n in compressed.read_meta(tmp_path / "c")["quantized"])
    bits = 4 if method == "int4" else 8
    # the quantised weights take bits/32 of their fp32 bytes, plus one fp32 scale per group
    expected = report["fp32_bytes"] - q_bytes + q_bytes * bits / 32 + q_bytes / group
    assert report["bytes_on_disk"] < expected + 20_000 and report["ratio"] > 1.5
    ours, _ = load_model(tmp_path / "c", routing="dropless")
    params = dict(ours.named_parameters())
    assert not any(name in params for name in compressed.read_meta(tmp_path / "c")["quantized"])
    assert ours.blocks[0].attn.q.quantized.kernel_q.dtype in (torch.int8, torch.uint8)
    ids = torch.randint(0, 256, (2, 21), generator=torch.Generator().manual_seed(4))
    got, want = ours.logits(ids), dequantised(model, tmp_path / "c").logits(ids)
    if method == "zeroquant":  # activations are rounded to INT8 per token as well: close, not equal
        assert (got - want).abs().max() < 0.05 * want.abs().max()
    else:
        torch.testing.assert_close(got, want, **TOL)
    floats = model.logits(ids)
    assert (got.argmax(-1) == floats.argmax(-1)).float().mean() > (0.8 if method != "int4" else 0.5)


def test_the_engine_serves_a_compressed_model(tmp_path):
    from tedmoe.inference.engine import InferenceEngine

    model = float_model()
    compressed.save(model.state_dict(), model.config, "int4", 32, tmp_path / "c", ByteTokenizer())
    ours, _ = load_model(tmp_path / "c", routing="dropless")
    engine = InferenceEngine(ours, block_size=4, num_blocks=32)
    tokens = torch.randint(0, 256, (19,), generator=torch.Generator().manual_seed(5)).tolist()
    torch.testing.assert_close(engine.put([0], [tokens[:12]])[0], reference(ours, tokens[:12]), **TOL)
    torch.testing.assert_close(engine.put([0], [tokens[12:13]])[0], reference(ours, tokens[:13]), **TOL)


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    from tedmoe.cli import main

    model = float_model()
    compressed.save(model.state_dict(), model.config, "int8", 64, tmp_path / "c", ByteTokenizer())
    with pytest.raises(ValueError, match="exists; compress into a new directory"):
        compressed.save(model.state_dict(), model.config, "int8", 64, tmp_path / "c")
    with pytest.raises(ValueError, match="group size 48 does not divide blocks.0.attn.q.weight's 64 input columns"):
        compressed.save(model.state_dict(), model.config, "int8", 48, tmp_path / "d")
    with pytest.raises(ValueError, match="the INT4 kernel takes 32, 64, 128, 256"):
        compressed.save(model.state_dict(), model.config, "int4", 16, tmp_path / "d")
    assert not (tmp_path / "d").exists()
    assert main(["compress", str(tmp_path / "c"), "--method", "int4", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is compressed already (int8); compress the float run" in err[0]
    assert not (tmp_path / "e").exists()


def test_train_with_ternary_weights_then_serve_them(tmp_path, monkeypatch, capsys):
    """``tedmoe train --set compress.method=ternary``: the saved run loads with the ternary weights
    the forward used (each row: -a, 0 or a), and its export holds them too."""
    from tedmoe.cli import main

    monkeypatch.setenv("TEDMOE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--nproc", "1", "--out", str(out), "--set", "train.max_steps=3",
                 "--set", "compress.method=ternary", "--set", "progress=false"]) == 0
    model, _ = load_model(out)
    w = model.blocks[0].attn.q.weight
    for row in w:
        assert len(torch.unique(row.abs())) <= 2 and (row == 0).any()
    exported = load_file(str(out / "model.safetensors"))
    torch.testing.assert_close(exported["blocks.0.attn.q.weight"], w)
    capsys.readouterr()
    for override, message in (("compress.n=5", "compress.n=5 exceeds compress.m=4"),
                              ("compress.m=5", "N:M groups of m=5 must divide the")):
        code = main(["train", "--preset", "tiny", "--nproc", "1", "--out", str(tmp_path / "bad"), "--set",
                     "compress.method=nm", "--set", override])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
