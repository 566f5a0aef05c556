"""The Mixtral layout against ``transformers`` itself (a test dependency; nothing is downloaded:
tiny random models are built with ``MixtralConfig`` + ``MixtralForCausalLM``): a checkpoint that
transformers wrote imports with equal logits, an export loads into transformers with equal logits,
import -> export gives the same tensors, and models Mixtral cannot express are refused."""

import json

import pytest
import torch

from tedmoe.config import ModelConfig, MoEConfig
from tedmoe.interop import families, hf
from tedmoe.model.transformer import GPTMoE
from tedmoe.parallel.topology import Topology
from tests.unit import hf_helpers
from tests.unit.hf_helpers import (assert_export_has_equal_logits, assert_greedy_generation_equal,
                                   assert_round_trip_keeps_the_tensors, assert_same_logits,
                                   assert_train_init_from_keeps_the_logits, imported, random_hf_model, token_ids)

transformers = pytest.importorskip("transformers")

TOL = hf_helpers.TOL  # tests/distributed/test_mixtral.py takes it from here


def hf_model(tmp_path, seed=0):
    """A tiny random Mixtral written by transformers (GQA, 4 experts, top-2, a rope base of its own)."""
    cfg = transformers.MixtralConfig(vocab_size=80, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                                     num_attention_heads=6, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64, rope_theta=5000.0,
                                     rms_norm_eps=1e-6, tie_word_embeddings=False)
    return random_hf_model(tmp_path / "hf", transformers.MixtralForCausalLM, cfg, seed), tmp_path / "hf"


def ids():
    return token_ids(80)


def test_a_transformers_checkpoint_imports_with_equal_logits(tmp_path):
    model, path = hf_model(tmp_path)
    cfg, ours = imported(path)
    assert (cfg.num_kv_heads, cfg.rope_theta, cfg.norm_eps, cfg.moe.dropless) == (2, 5000.0, 1e-6, True)
    assert_same_logits(ours, model, ids())


def test_an_export_loads_into_transformers_with_equal_logits(tmp_path):
    cfg = ModelConfig(vocab_size=72, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=32,
                      rope_theta=20000.0, moe_every=1,
                      moe=MoEConfig(ffn_hidden_size=24, num_experts=4, top_k=2, activation="swiglu", dropless=True))
    config = assert_export_has_equal_logits(cfg, tmp_path / "export", "MixtralForCausalLM")
    assert config["model_type"] == "mixtral"


def test_import_then_export_gives_the_same_tensors(tmp_path):
    _, path = hf_model(tmp_path)
    assert_round_trip_keeps_the_tensors(path, tmp_path / "again")


@pytest.mark.parametrize("change,message", [
    ({"moe_every": 2}, "model.moe_every=2: Mixtral has an MoE MLP in every block"),
    ({"activation": "gelu"}, "model.moe.activation='gelu': Mixtral's experts are SwiGLU"),
    ({"normalize_gates": False}, "model.moe.normalize_gates=false"),
])
def test_what_mixtral_cannot_express_is_refused_before_writing(tmp_path, change, message):
    moe = MoEConfig(ffn_hidden_size=16, num_experts=4, activation=change.get("activation", "swiglu"),
                    normalize_gates=change.get("normalize_gates", True))
    cfg = ModelConfig(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, max_seq_len=8,
                      moe_every=change.get("moe_every", 1), moe=moe)
    state = GPTMoE(cfg, Topology.single()).state_dict()
    with pytest.raises(ValueError, match=message):
        hf.save(state, cfg, tmp_path / "out")
    assert not list(tmp_path.iterdir())  # nothing written


def test_bad_directories_are_named(tmp_path):
    _, path = hf_model(tmp_path)
    with pytest.raises(ValueError, match="exists; export into a new directory"):
        hf.save({}, ModelConfig(moe_every=1, moe=MoEConfig(activation="swiglu")), path)
    with pytest.raises(ValueError, match="has no config.json"):
        hf.load(tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type='llama'; this reader takes 'mixtral' or 'qwen3_moe'"):
        hf.load(path)
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 44}))
    with pytest.raises(ValueError, match=r"block_sparse_moe.experts.0.w1.weight has shape \(40, 48\) but the config "
                                         r"needs \(44, 48\)"):
        hf.load(path)
    (path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="lacks .* tensor"):
        hf.load(path)
    assert families.to_hf_shapes(hf.read_config(path))["lm_head.weight"] == (80, 48)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny trained runs (one process): the tiny preset (Mixtral-expressible; dropless here so
    that transformers computes the same tokens) and one with the paper's GELU experts every other
    block."""
    import os

    from tedmoe.config import load_run_config
    from tedmoe.runtime.trainer import train

    os.environ["TEDMOE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    root = tmp_path_factory.mktemp("runs")
    paper = ["model.moe_every=2", 'model.moe.activation="gelu"']
    for name, extra in (("mixtral", ["model.moe.dropless=true"]), ("gelu", paper)):
        train(load_run_config(None, "tiny", ["train.max_steps=2", "export=false", f'out_dir="{root / name}"', *extra]))
    yield root
    os.environ.pop("TEDMOE_CACHE")


def test_tedmoe_export_writes_what_transformers_loads(runs, tmp_path, capsys):
    from tedmoe.cli import main
    from tedmoe.inference.generate import load_model

    assert main(["export", str(runs / "mixtral"), "--out", str(tmp_path / "hf")]) == 0
    assert "wrote" in capsys.readouterr().out
    ours, tokenizer = load_model(runs / "mixtral")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    text = "def main():\n    return 0"
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").encode(text) == tokenizer.encode(text)
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    assert_same_logits(ours, theirs, x)


@pytest.mark.parametrize("run,out,message", [
    ("gelu", "new", "model.moe_every=2: Mixtral has an MoE MLP in every block"),
    ("mixtral", "existing", "exists; export into a new directory"),
    ("missing", "new", "does not exist"),
])
def test_tedmoe_export_refuses_in_one_line_and_writes_nothing(runs, tmp_path, capsys, run, out, message):
    from tedmoe.cli import main

    (tmp_path / "existing").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["export", str(runs / run), "--out", str(tmp_path / out)])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("tedmoe: error: ") and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


TEXTS = ["def f(x):\n    return x  # héllo, wörld ✓", "  leading spaces\tand tabs\n\n", "日本語 and emoji 🎉"]


def test_exported_tokenizers_give_tedmoe_ids_in_transformers(tmp_path):
    from tedmoe.data.tokenizer import BPETokenizer, ByteTokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS * 20))
    cfg = ModelConfig(vocab_size=320, hidden_size=16, num_layers=1, num_heads=2, max_seq_len=8, moe_every=1,
                      moe=MoEConfig(ffn_hidden_size=16, num_experts=2, top_k=1, activation="swiglu"))
    state = GPTMoE(cfg, Topology.single()).state_dict()
    for name, tok in (("byte", ByteTokenizer()), ("bpe", BPETokenizer.train([str(corpus)], 300))):
        out = hf.save(state, cfg, tmp_path / name, tok)
        theirs = transformers.AutoTokenizer.from_pretrained(out)
        for text in TEXTS:
            ids = tok.encode(text)
            assert theirs.encode(text, add_special_tokens=False) == ids, (name, text)
            assert theirs.decode(ids) == text, (name, text)


def test_greedy_generation_equals_transformers_token_for_token(tmp_path):
    assert_greedy_generation_equal(*hf_model(tmp_path, seed=4))


def test_tedmoe_generate_reads_a_hugging_face_directory(runs, tmp_path, capsys):
    from tedmoe.cli import main

    assert main(["export", str(runs / "mixtral"), "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    args = ["--prompt", "def ", "--greedy", "--max-new-tokens", "8"]
    assert main(["generate", "--ckpt", str(tmp_path / "hf"), *args]) == 0
    from_hf = capsys.readouterr().out
    assert main(["generate", "--ckpt", str(runs / "mixtral"), *args]) == 0
    assert capsys.readouterr().out == from_hf and from_hf.startswith("def ")
    (tmp_path / "hf" / "tokenizer.json").unlink()
    assert main(["generate", "--ckpt", str(tmp_path / "hf"), *args]) == 2
    assert "has no tokenizer.json" in capsys.readouterr().err


def test_train_init_from_starts_from_the_checkpoint(tmp_path, capsys):
    """``tedmoe train --init-from DIR``: the architecture comes from the directory (the tiny
    preset's differs) and the weights too: after one step at a negligible learning rate the
    exported model still gives transformers' logits."""
    config = transformers.MixtralConfig(vocab_size=256, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                                        num_attention_heads=6, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False)
    tuned, _ = assert_train_init_from_keeps_the_logits(tmp_path, capsys, transformers.MixtralForCausalLM, config)
    assert tuned.config.hidden_size == 48 and tuned.config.num_local_experts == 4


def test_a_large_export_is_sharded_with_an_index_that_both_sides_read(tmp_path):
    model, path = hf_model(tmp_path)
    cfg, state = hf.load(path)
    out = hf.save(state, cfg, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert_same_logits(loaded, model, ids())
    cfg2, state2 = hf.load(out)
    assert cfg2 == cfg and all(torch.equal(state2[k], state[k]) for k in state)
    (out / files[1]).unlink()
    with pytest.raises(ValueError, match=f"shard {files[1]} named by model.safetensors.index.json is missing"):
        hf.load(out)


def test_the_presets_export_to_mixtral_and_the_paper_preset_keeps_its_block():
    from tedmoe.config import preset

    for name in ("default", "tiny", "small"):
        families.check_expressible(preset(name).model)
    paper = preset("paper").model
    assert (paper.moe_every, paper.moe.activation) == (2, "gelu")
    with pytest.raises(ValueError, match="model.moe_every=2"):
        families.check_expressible(paper)
