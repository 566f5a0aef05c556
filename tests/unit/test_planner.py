import dataclasses
import itertools
import subprocess
import sys

import pytest

from tedmoe.model.transformer import count_parameters
from tedmoe.parallel.topology import ParallelDims
from tedmoe.planner.hardware import PRESETS, load_hardware
from tedmoe.planner.predict import Plan, crosses_nodes, eq5_lower_bound, memory, model_state_bytes, param_counts
from tedmoe.planner.search import layouts, paper_model, paper_train


@pytest.mark.parametrize("np_base,experts,tp,world", [(1.3e9, 16, 1, 32), (6.7e9, 16, 4, 128), (13e9, 64, 8, 512),
                                                      (2.7e9, 8, 2, 64)])
def test_eq5_is_the_model_state_special_case(np_base, experts, tp, world):
    # MLPs are 2/3 of a block, every other block is MoE, one expert per EP rank
    got = model_state_bytes(2 * np_base / 3, experts * np_base / 3, tp, experts, world)
    assert got == pytest.approx(eq5_lower_bound(np_base, experts, tp, world), rel=1e-12)


def test_memory_model_states_match_the_formula_for_a_real_model():
    model = paper_model("6.7b", 16)
    plan = Plan(model, 128, 4, 16, micro_batch=1, seq_len=2048, train=paper_train("none"))
    mem = memory(plan)
    counts = param_counts(model, 4, 16)
    full = param_counts(model)
    states = mem["parameters"] + mem["gradients"] + mem["optimizer"]
    expect = model_state_bytes(full["total"] - full["expert_total"], full["expert_total"], 4, 16, 128)
    # the formula splits every non-expert parameter over tp; norms and routers are replicated (0.04%)
    assert states == pytest.approx(expect, rel=1e-3) and states > expect
    assert counts["expert"] * 4 * 16 == full["expert_total"]


def test_zero2_shards_the_gradients_in_the_memory_model():
    model = paper_model("6.7b", 16)
    one = Plan(model, 128, 4, 16, micro_batch=1, seq_len=2048, train=paper_train("none"))
    two = Plan(model, 128, 4, 16, micro_batch=1, seq_len=2048,
               train=dataclasses.replace(paper_train("none"), zero_stage=2, reduce_bucket_size=1 << 20))
    a, b = memory(one), memory(two)
    assert b["parameters"] == a["parameters"] and b["optimizer"] == a["optimizer"]
    counts, d = param_counts(model, 4, 16), two.dims
    shard = counts["non_expert"] / d.dp + counts["expert"] / d.edp
    assert b["gradients"] == pytest.approx(4 * shard + 2 * (1 << 20) * 2, rel=1e-3)
    assert b["total"] < a["total"]
    full = param_counts(model)
    n_ne, n_e = full["total"] - full["expert_total"], full["expert_total"]
    states = b["parameters"] + (b["gradients"] - 2 * (1 << 20) * 2) + b["optimizer"]
    assert states == pytest.approx(model_state_bytes(n_ne, n_e, 4, 16, 128, stage=2), rel=2e-3)


def test_param_counts_agree_with_the_model():
    cfg = paper_model("1.3b", 8)
    counts = param_counts(cfg)
    real = count_parameters(cfg)
    assert (counts["total"], counts["expert_total"]) == (real["total"], real["expert"])


def test_search_returns_only_valid_layouts():
    for name, gpus, hw in itertools.product(("1.3b", "13b"), (24, 64, 96), ("summit", "dgx-a100")):
        model = paper_model(name, 16)
        cands = layouts(model, gpus, PRESETS[hw], global_batch=192)
        assert cands, (name, gpus, hw)
        for c in cands:
            dims = ParallelDims(gpus, c.tp, c.ep)  # raises if invalid
            model.validate(c.tp, c.ep)
            assert (dims.dp, dims.edp) == (c.dp, c.edp) and 192 % dims.dp == 0
            assert c.tp <= PRESETS[hw].gpus_per_node
            assert c.fits == (c.memory["total"] <= PRESETS[hw].memory_bytes)
        fitting = [c.time["total"] for c in cands if c.fits]
        assert fitting == sorted(fitting)


def test_which_axes_cross_nodes():
    model = paper_model("1.3b", 16)
    assert crosses_nodes(Plan(model, 24, 4, 2), "tp", 6)  # groups [4..7] straddle Summit's nodes of 6
    assert not crosses_nodes(Plan(model, 24, 2, 1), "tp", 6)
    assert not crosses_nodes(Plan(model, 32, 8, 1), "tp", 8) and crosses_nodes(Plan(model, 32, 8, 1), "dp", 8)


def test_hardware_from_toml(tmp_path):
    (tmp_path / "mine.toml").write_text("gpus_per_node = 4\npeak_flops = 1e15\nmemory_bytes = 8e10\n"
                                        "intra_bw_gbps = 900\ninter_bw_gbps = 100\n")
    hw = load_hardware(str(tmp_path / "mine.toml"))
    assert (hw.name, hw.intra_bw, hw.inter_bw) == ("mine", 900e9, 100e9)
    with pytest.raises(ValueError, match="unknown hardware 'tpu'"):
        load_hardware("tpu")


def _plan(*args):
    return subprocess.run([sys.executable, "-m", "tedmoe.cli", "plan", *args], capture_output=True, text=True)


def test_plan_cli_table_and_errors():
    out = _plan("--model", "1.3b", "--gpus", "32", "--hardware", "dgx-a100")
    assert out.returncode == 0 and "tp  ep   dp" in out.stdout and " yes " in out.stdout
    out = _plan("--model", "1.3b", "--gpus", "32", "--tp", "3")
    assert out.returncode == 2 and "tp=3 does not divide world_size=32" in out.stderr
    out = _plan("--model", "6.7b", "--gpus", "8", "--hardware", "summit", "--global-batch", "64")
    assert out.returncode == 2 and "no layout fits" in out.stderr and "the smallest cluster that fits is" in out.stderr


def test_plan_cli_reads_a_model_toml(tmp_path):
    (tmp_path / "m.toml").write_text("[model]\nhidden_size = 512\nnum_layers = 8\nnum_heads = 8\nvocab_size = 32000\n"
                                     "ffn_hidden_size = 2048\n[model.moe]\nnum_experts = 8\nffn_hidden_size = 2048\n")
    out = _plan("--model", str(tmp_path / "m.toml"), "--gpus", "16", "--hardware", "dgx-a100", "--json")
    assert out.returncode == 0, out.stderr
    import json

    cands = json.loads(out.stdout)
    assert cands and all(c["tp"] * c["dp"] == 16 and 8 % c["ep"] == 0 for c in cands)
    out = _plan("--model", str(tmp_path / "missing.toml"))
    assert out.returncode == 2 and "model file" in out.stderr and "does not exist" in out.stderr


def test_dropless_models_are_refused_not_guessed():
    from tedmoe.planner.predict import step_comm

    model = paper_model("1.3b", 16)
    step_comm(Plan(model, 32, 2, 16))  # capacity mode: predicted (held to the ledger in tests/distributed)
    model.moe.dropless = True
    with pytest.raises(ValueError, match="the planner predicts capacity-mode MoE layers only"):
        step_comm(Plan(model, 32, 2, 16))


def test_param_counts_agree_with_the_model_for_pyramids_residuals_and_qk_norms():
    from tedmoe.config import ModelConfig, MoEConfig

    for activation in ("gelu", "swiglu"):
        cfg = ModelConfig(vocab_size=96, hidden_size=32, num_layers=4, num_heads=4, head_dim=12, qk_norm=True,
                          moe_every=1, expert_counts=(2, 2, 4, 8),
                          moe=MoEConfig(ffn_hidden_size=24, num_experts=4, top_k=2, residual=True,
                                        activation=activation))
        counts, real = param_counts(cfg), count_parameters(cfg)
        assert (counts["total"], counts["expert_total"]) == (real["total"], real["expert"]), activation
        per_expert = 32 * 24 * (3 if activation == "swiglu" else 2)
        assert real["active_per_token"] == real["non_expert"] + 4 * 2 * per_expert  # top-2 in each of 4 layers
