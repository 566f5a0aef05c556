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


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny runs trained in this process: float, binary, ternary, and N:M (2:4, masks refreshed
    every 2 steps) uninterrupted and stopped after 3 steps then resumed."""
    import os

    from tedmoe.cli import main

    root = tmp_path_factory.mktemp("runs")
    saved = os.environ.get("TEDMOE_CACHE")
    os.environ["TEDMOE_CACHE"] = str(root / "cache")
    try:
        def train(name, *sets, extra=()):
            args = ["train", "--preset", "tiny", "--nproc", "1", "--out", str(root / name), "--set", "progress=false",
                    *[a for kv in sets for a in ("--set", kv)], *extra]
            assert main(args) == 0

        train("float", "train.max_steps=6")
        for method in ("binary", "ternary"):
            train(method, "train.max_steps=4", f"compress.method={method}")
        train("ternary-kd", "train.max_steps=4", "compress.method=ternary", f"compress.teacher={root / 'float'}",
              "compress.distill_weight=0.25", "compress.temperature=2")
        nm = ("train.max_steps=6", "compress.method=nm", "compress.refresh_every=2")
        train("nm", *nm)
        train("nm-resumed", *nm, "stop_after=3")
        train("nm-resumed", *nm, extra=("--resume",))
        yield root
    finally:
        if saved is None:
            os.environ.pop("TEDMOE_CACHE", None)
        else:
            os.environ["TEDMOE_CACHE"] = saved


def test_train_with_ternary_weights_then_serve_them(runs):
    """``tedmoe train --set compress.method=ternary``: the saved run loads with the ternary weights
    the forward used (each row: -a, 0 or a), and its export holds them too."""
    model, _ = load_model(runs / "ternary")
    w = model.blocks[0].attn.q.weight
    for row in w:
        assert len(torch.unique(row.abs())) <= 2 and (row == 0).any()
    exported = load_file(str(runs / "ternary" / "model.safetensors"))
    torch.testing.assert_close(exported["blocks.0.attn.q.weight"], w)


def test_training_distils_from_a_teacher_run(runs):
    """``compress.teacher``: the run's loss is 0.75 CE + 0.25 T^2 KL (+ the MoE losses) every step."""
    import json

    from tedmoe.config import preset

    cfg = preset("tiny").model
    rows = [json.loads(line) for line in (runs / "ternary-kd" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    for r in rows:
        assert r["kd"] > 0
        mixed = 0.75 * r["ce"] + 0.25 * r["kd"] + cfg.aux_loss_coef * r["aux"] + cfg.z_loss_coef * r["z"]
        assert r["loss"] == pytest.approx(mixed, rel=1e-5)
    plain = [json.loads(line) for line in (runs / "ternary" / "metrics.jsonl").read_text().splitlines()]
    assert plain[0]["ce"] == pytest.approx(rows[0]["ce"], rel=1e-6) and "kd" not in plain[0]  # same start, same data
    # validation measures the model's own loss (no teacher term): the runs part ways, so compare scales only
    assert abs(rows[2]["val_loss"] - plain[2]["val_loss"]) < 0.5 < rows[2]["val_loss"]


def test_nm_masks_are_saved_so_resume_is_exact(runs):
    """Masks are refreshed at steps 0, 2, 4: the run resumed after step 3 must keep step 2's mask
    (recomputing it from step 3's weights changes the losses; checked by hand)."""
    import json

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert losses(runs / "nm-resumed") == losses(runs / "nm")
    meta = json.loads((runs / "nm" / "checkpoints" / "step_0000006" / "meta.json").read_text())
    assert meta["nm_masks"]
    model, _ = load_model(runs / "nm")
    w = model.blocks[1].mlp.experts.w2  # ours [E, F, H]: groups of 4 along F (the inputs)
    assert ((w.transpose(1, 2).reshape(4, 32, -1, 4) != 0).sum(-1) <= 2).all()


@pytest.mark.parametrize("method", ["binary", "ternary", "nm"])
def test_trained_weights_export_packed_and_compute_the_same(runs, tmp_path, method, capsys):
    from tedmoe.cli import main

    assert main(["compress", str(runs / method), "--method", method, "--out", str(tmp_path / "c")]) == 0
    report = capsys.readouterr().out
    assert "MiB on disk" in report and "in memory when served" in report
    tensors = load_file(str(tmp_path / "c" / "model.safetensors"))
    meta = compressed.read_meta(tmp_path / "c")
    name = "blocks.0.attn.q.weight"  # [32, 32]
    if method == "nm":
        assert tensors[f"{name}.values"].shape == (32, 16) and tensors[f"{name}.mask"].shape == (32, 4)
        assert (meta["n"], meta["m"]) == (2, 4)
    else:
        assert tensors[f"{name}.qweight"].dtype == torch.uint8
        assert tensors[f"{name}.qweight"].shape == (32, 32 // (8 if method == "binary" else 4))
        assert tensors[f"{name}.scales"].shape == (32, 1)
    assert tensors["blocks.1.mlp.experts.w2.scales" if method != "nm" else "blocks.1.mlp.experts.w2.values"].shape[0] == 4
    trained, _ = load_model(runs / method)
    ours, _ = load_model(tmp_path / "c")
    if method != "nm":  # INT8 kernels on -1/0/1 with one scale per row; no float copy kept
        assert ours.blocks[0].attn.q.quantized.kernel_q.dtype == torch.int8
        assert "blocks.0.attn.q.weight" not in dict(ours.named_parameters())
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours.logits(ids), trained.logits(ids), rtol=1e-4, atol=1e-4)


def test_lkd_lowers_the_quantised_blocks_error(runs, tmp_path, capsys):
    """The distilled weights, rounded to INT4, give block outputs closer to the float blocks' (from
    the float model's inputs, on the calibration set) than the float weights rounded alone:
    measured here with a loop of the test's own. Then the CLI writes a directory that loads."""
    import copy

    from tedmoe.cli import main
    from tedmoe.compress import lkd

    model, _ = load_model(runs / "float")
    state, summary = lkd.distil(copy.deepcopy(model), runs / "float", 32, batches=4, steps=60, lr=1e-5, bits=4)
    data = lkd.calibration_set(runs / "float", 4)

    def rounded(weights):
        m = copy.deepcopy(model)
        m.load_state_dict(weights)
        q = dict(m.named_parameters())
        with torch.no_grad():
            for name in compressed.quantized_weights(m):
                w = q[name] if q[name].dim() == 2 else q[name].transpose(1, 2)
                flat = w.reshape(-1, w.shape[-1])
                w.copy_(quant.dequantize(*quant.quantize(flat, 4, 32)).reshape(w.shape))
        return m

    def block_error(m):
        total = 0.0
        with torch.no_grad():
            for ids in data:
                x = model.embed(ids)
                for ours, float_block in zip(m.blocks, model.blocks):
                    y = float_block(x)[0]
                    total += torch.mean((ours(x)[0] - y) ** 2).item()
                    x = y
        return total

    plain, distilled = block_error(rounded(model.state_dict())), block_error(rounded(state))
    assert distilled < plain, (distilled, plain, summary)
    assert main(["compress", str(runs / "float"), "--method", "int4", "--group-size", "32", "--lkd",
                 "--calibration-batches", "2", "--lkd-steps", "5", "--out", str(tmp_path / "c")]) == 0
    assert "LKD: 2 blocks, 2 calibration batches, 5 steps each" in capsys.readouterr().out
    ours, _ = load_model(tmp_path / "c")
    assert ours.logits(torch.randint(0, 256, (1, 8))).isfinite().all()


@pytest.mark.parametrize("args,message", [
    (["ternary", "--method", "binary"], "--method binary packs the weights of a run trained with --set "
     "compress.method=binary; {root}/ternary was trained with compress.method=ternary"),
    (["float", "--method", "nm"], "was trained with compress.method=none"),
    (["binary", "--method", "binary", "--group-size", "32"], "--group-size is for int8, int4 and zeroquant"),
    (["float", "--method", "int8", "--lkd"], "group size 128 does not divide"),
    (["ternary", "--method", "ternary", "--lkd"], "--lkd distils each layer towards its INT8/INT4 form"),
    (["float", "--method", "int4", "--group-size", "48"], "group size 48 does not divide"),
])
def test_bad_compress_input_is_one_line(runs, tmp_path, capsys, args, message):
    from tedmoe.cli import main

    code = main(["compress", str(runs / args[0]), *args[1:], "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message.format(root=runs) in err[0], err
    assert not (tmp_path / "c").exists()


def test_bad_compress_settings_for_training_are_one_line(runs, tmp_path, capsys):
    from tedmoe.cli import main

    capsys.readouterr()
    for override, message in (("compress.n=5", "compress.n=5 exceeds compress.m=4"),
                              ("compress.m=5", "N:M groups of m=5 must divide the"),
                              (f"compress.teacher={tmp_path / 'none'}", "does not exist"),
                              ("compress.distill_weight=1.5", "compress.distill_weight")):
        code = main(["train", "--preset", "tiny", "--nproc", "1", "--out", str(tmp_path / "bad"), "--set",
                     "compress.method=nm", "--set", override])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
        assert not (tmp_path / "bad").exists()
