"""The Qwen3-MoE layout against ``transformers`` itself (nothing downloaded: tiny random models
built with ``Qwen3MoeConfig`` + ``Qwen3MoeForCausalLM``). What differs from Mixtral is exercised:
per-head q/k RMSNorm, a head size of its own (heads x head size != width), unnormalised top-k
gates (``norm_topk_prob: false``, Qwen3's default) as well as normalised ones, other tensor names."""

import json

import pytest

from tedmoe.config import ModelConfig, MoEConfig
from tedmoe.interop import families, hf
from tests.unit.hf_helpers import (assert_export_has_equal_logits, assert_greedy_generation_equal,
                                   assert_round_trip_keeps_the_tensors, assert_same_logits,
                                   assert_train_init_from_keeps_the_logits, imported, random_hf_model, token_ids)

transformers = pytest.importorskip("transformers")

VOCAB = 96


def hf_model(tmp_path, seed=0, norm_topk_prob=False, **extra):
    """A tiny random Qwen3-MoE written by transformers: 6 heads of 12 (72 != 48), GQA 2, 4 experts top-2."""
    cfg = transformers.Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, moe_intermediate_size=40,
                                      num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=12,
                                      num_experts=4, num_experts_per_tok=2, norm_topk_prob=norm_topk_prob,
                                      max_position_embeddings=64, rope_parameters={"rope_type": "default",
                                                                                   "rope_theta": 7000.0},
                                      rms_norm_eps=1e-6, **extra)
    path = tmp_path / f"qwen-{seed}-{norm_topk_prob}"
    return random_hf_model(path, transformers.Qwen3MoeForCausalLM, cfg, seed, vary_norms=True), path


def ids():
    return token_ids(VOCAB)


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_a_transformers_checkpoint_imports_with_equal_logits(tmp_path, norm_topk_prob):
    model, path = hf_model(tmp_path, norm_topk_prob=norm_topk_prob)
    cfg, ours = imported(path)
    assert (cfg.head_dim, cfg.qk_norm, cfg.moe.normalize_gates, cfg.rope_theta) == (12, True, norm_topk_prob, 7000.0)
    assert_same_logits(ours, model, ids())


def test_import_then_export_gives_the_same_tensors_and_config(tmp_path):
    _, path = hf_model(tmp_path)
    cfg, out = assert_round_trip_keeps_the_tensors(path, tmp_path / "again")
    assert hf.read_config(out) == cfg


def test_a_qk_norm_model_exports_as_qwen3_moe_with_equal_logits(tmp_path):
    cfg = ModelConfig(vocab_size=72, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=10,
                      qk_norm=True, max_seq_len=32, rope_theta=20000.0, moe_every=1,
                      moe=MoEConfig(ffn_hidden_size=24, num_experts=4, top_k=2, activation="swiglu", dropless=True,
                                    normalize_gates=False))
    config = assert_export_has_equal_logits(cfg, tmp_path / "export", "Qwen3MoeForCausalLM", vary_norms=True)
    assert (config["model_type"], config["norm_topk_prob"], config["head_dim"]) == ("qwen3_moe", False, 10)


def test_greedy_generation_equals_transformers_token_for_token(tmp_path):
    assert_greedy_generation_equal(*hf_model(tmp_path, seed=4))


@pytest.mark.parametrize("change,message", [
    ({"decoder_sparse_step": 2}, r"decoder_sparse_step=2, mlp_only_layers=\[\]: only Qwen3-MoE models with an MoE MLP "
                                 "in every layer"),
    ({"mlp_only_layers": [1]}, r"mlp_only_layers=\[1\]"),
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"use_sliding_window": True, "sliding_window": 16}, "sliding_window=16 is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
])
def test_what_tedmoe_cannot_read_is_refused_in_one_line(tmp_path, change, message):
    _, path = hf_model(tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=message) as err:
        hf.load(path)
    assert "\n" not in str(err.value)


def test_the_family_follows_qk_norm_and_mixtral_still_refuses_unnormalised_gates():
    moe = MoEConfig(ffn_hidden_size=16, num_experts=4, activation="swiglu", normalize_gates=False)
    cfg = ModelConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, moe_every=1, moe=moe)
    with pytest.raises(ValueError, match="Qwen3-MoE keeps them as they are, but needs model.qk_norm=true"):
        families.family_of(cfg)
    cfg.qk_norm = True
    assert families.family_of(cfg) is families.QWEN3_MOE
    cfg.moe_every = 2
    with pytest.raises(ValueError, match="model.moe_every=2: Qwen3-MoE has an MoE MLP in every block"):
        families.family_of(cfg)


def test_train_init_from_a_qwen3_moe_directory(tmp_path, capsys):
    """``tedmoe train --init-from`` takes the Qwen3-MoE architecture (head size, q/k norms, gates)
    from the directory; after one step at a negligible learning rate the export equals it. Under
    ZeRO-3, which builds the model on the meta device and reads the directory one block at a time."""
    config = transformers.Qwen3MoeConfig(vocab_size=256, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=16, num_experts=4, num_experts_per_tok=2,
                                         max_position_embeddings=64)
    tuned, printed = assert_train_init_from_keeps_the_logits(tmp_path, capsys, transformers.Qwen3MoeForCausalLM,
                                                             config, "train.zero_stage=3")
    assert "Qwen3-MoE layout" in printed
    assert type(tuned).__name__ == "Qwen3MoeForCausalLM" and tuned.config.head_dim == 16
