import dataclasses
import itertools
import subprocess
import sys

import pytest

from tedmoe.model.transformer import GPTMoE, count_parameters
from tedmoe.parallel.topology import ParallelDims, Topology
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
    d = plan.dims
    assert d.dp > 1 and d.edp > 1
    reduced = 2 * (-(-counts["non_expert"] // d.dp) + -(-counts["expert"] // d.edp))  # the step's gradient shard
    states = mem["parameters"] + mem["gradients"] - reduced + mem["optimizer"]
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
    # staged: the buckets the largest gradient spans (a layer's local experts' w1, one tensor), and one more
    from tedmoe.parallel.sharding import is_expert, tp_dim

    largest = max(p.numel() // (4 if tp_dim(p) is not None else 1) // (16 if is_expert(p) else 1)
                  for p in GPTMoE(model, Topology.single(), device="meta").parameters())
    staged = (-(-largest // (1 << 20)) + 1) * (1 << 20) * 2
    assert b["gradients"] == pytest.approx(4 * shard + staged, rel=1e-3)
    assert b["total"] < a["total"]
    full = param_counts(model)
    n_ne, n_e = full["total"] - full["expert_total"], full["expert_total"]
    states = b["parameters"] + (b["gradients"] - staged) + b["optimizer"]
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


def _odd_model():
    from tedmoe.config import ModelConfig, MoEConfig

    return ModelConfig(vocab_size=96, hidden_size=32, num_layers=4, num_heads=4, head_dim=12, qk_norm=True,
                       moe_every=1, expert_counts=(2, 2, 4, 8),
                       moe=MoEConfig(ffn_hidden_size=24, num_experts=4, top_k=2, residual=True, activation="swiglu"))


ZERO3_MODELS = {"paper 1.3b": lambda: paper_model("1.3b", 8), "pyramid, residual, qk norms, swiglu": _odd_model}


@pytest.mark.parametrize("name", list(ZERO3_MODELS))
def test_zero3_units_are_the_models_blocks(name):
    from tedmoe.model.transformer import GPTMoE
    from tedmoe.parallel.sharding import is_expert
    from tedmoe.parallel.topology import Topology
    from tedmoe.planner.zero import units

    cfg = ZERO3_MODELS[name]()
    model = GPTMoE(cfg, Topology.single(), device="meta")

    def split(params):
        params = list(params)
        return {"dp": sum(p.numel() for p in params if not is_expert(p)),
                "edp": sum(p.numel() for p in params if is_expert(p))}

    in_blocks = {id(p) for p in model.blocks.parameters()}
    real = [split(p for p in model.parameters() if id(p) not in in_blocks)] + [split(b.parameters()) for b in model.blocks]
    assert units(cfg) == real
    for tp, ep in ((2, 2), (4, 1), (1, 2)):  # the per-rank splits add up to param_counts' (the ledger test holds them)
        try:
            cfg.validate(tp, ep)
        except ValueError:
            continue
        counts, per_rank = param_counts(cfg, tp, ep), units(cfg, tp, ep)
        assert sum(u["dp"] for u in per_rank) == counts["non_expert"], (tp, ep)
        assert sum(u["edp"] for u in per_rank) == counts["expert"], (tp, ep)


def _zero(stage, offload="none", precision="fp16"):
    return dataclasses.replace(paper_train("none"), zero_stage=stage, offload=offload, precision=precision,
                               offload_path="/nvme" if offload == "disk" else None)


def test_zero3_memory_keeps_shards_the_root_and_two_blocks():
    from tedmoe.planner.zero import units

    model = paper_model("6.7b", 16)
    plan = lambda train: Plan(model, 128, 4, 8, micro_batch=1, seq_len=2048, train=train)  # noqa: E731
    d = plan(_zero(3)).dims
    assert (d.dp, d.edp) == (32, 4)
    us = units(model, 4, 8)
    shard = lambda c, n: -(-c // n)  # noqa: E731
    owned = sum(shard(u["dp"], d.dp) + shard(u["edp"], d.edp) for u in us)
    whole = [d.dp * shard(u["dp"], d.dp) + d.edp * shard(u["edp"], d.edp) for u in us]
    pair = max(whole[i] + whole[i + 1] for i in range(1, len(whole) - 1))
    prefetched = max(shard(u["dp"], d.dp) + shard(u["edp"], d.edp) for u in us[1:])  # copied from the master
    three, cpu, disk = memory(plan(_zero(3))), memory(plan(_zero(3, "cpu"))), memory(plan(_zero(3, "disk")))
    assert three["parameters"] == 2 * (owned + whole[0] + pair)
    assert three["gradients"] == 4 * owned + 2 * (whole[0] + max(whole[1:]))  # staged: the root's and one block's
    assert three["optimizer"] == 12 * owned and three["host"] == three["disk"] == 0
    # the model states alone (no working set) are ZeRO-3's 18 bytes per parameter over all ranks
    full = param_counts(model)
    n_ne, n_e = full["total"] - full["expert_total"], full["expert_total"]
    states = 2 * owned + 4 * owned + three["optimizer"]
    assert states == pytest.approx(model_state_bytes(n_ne, n_e, 4, 8, 128, stage=3), rel=1e-3)
    assert three["total"] < memory(plan(_zero(2)))["total"] < memory(plan(_zero(1)))["total"]
    # cpu: the optimizer states move to host memory; the master there is the parameter shards' only copy
    assert cpu["host"] == three["optimizer"] and cpu["optimizer"] == 0 and cpu["disk"] == 0
    assert cpu["total"] == pytest.approx(three["total"] - three["optimizer"] - 2 * owned + 2 * prefetched)
    assert (cpu["parameters"], cpu["gradients"]) == (2 * (whole[0] + pair + prefetched), three["gradients"])
    # disk: the states go to files, the master there is the parameter shards' only copy; the
    # device keeps 3 states x 3 tiles of the step
    assert disk["disk"] == three["optimizer"] and disk["host"] == 0
    assert disk["optimizer"] == 3 * 4 * 3 * (1 << 24)
    assert disk["parameters"] == 2 * (whole[0] + pair + prefetched) and disk["gradients"] == three["gradients"]
    # fp32: the parameter shard is the master weight (Adam's m and v are the states), unless offloaded
    fp32 = memory(plan(_zero(3, precision="fp32")))
    assert fp32["optimizer"] == 8 * owned and fp32["parameters"] == 4 * (owned + whole[0] + pair)
    fp32_cpu = memory(plan(_zero(3, "cpu", precision="fp32")))
    assert fp32_cpu["host"] == 12 * owned and fp32_cpu["parameters"] == 4 * (whole[0] + pair + prefetched)


def test_zero3_units_on_an_axis_of_one_are_never_sharded():
    from tedmoe.planner.zero import units

    model = paper_model("1.3b", 16)
    plan = Plan(model, 64, 4, 16, micro_batch=1, seq_len=2048, train=_zero(3, "disk"))  # dp 16 = ep: edp 1
    assert plan.dims.edp == 1
    mem, us = memory(plan), units(model, 4, 16)
    experts = sum(u["edp"] for u in us)  # whole on every rank, never gathered, kept on the device
    whole = [16 * -(-u["dp"] // 16) for u in us]
    pair = max(whole[i] + whole[i + 1] for i in range(1, len(whole) - 1))
    prefetched = max(-(-u["dp"] // 16) for u in us[1:])  # its shard, copied from the offloaded master
    assert mem["parameters"] == 2 * (experts + whole[0] + pair + prefetched)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_offload_moves_model_states_without_losing_any(stage):
    args = (2 / 3 * 6.7e9, 16 / 3 * 6.7e9, 4, 16, 128)
    everything = model_state_bytes(*args, stage=stage)
    for offload in ("cpu", "disk"):
        places = {w: model_state_bytes(*args, stage=stage, offload=offload, where=w) for w in ("device", "host", "disk")}
        # offloaded at stage 3 the 16-bit parameter shard is gone: the offloaded fp32 master is its copy
        dropped = 2 * (args[0] + args[1]) / args[4] if stage == 3 else 0
        assert sum(places.values()) == pytest.approx(everything - dropped, rel=1e-12), offload
        assert places["host" if offload == "cpu" else "disk"] > 0 and places["device"] < everything
    if stage == 1:
        assert everything == pytest.approx(eq5_lower_bound(6.7e9, 16, 4, 128), rel=1e-12)


def test_offloaded_bytes_must_fit_the_nodes_host_memory_and_disk():
    from tedmoe.planner.hardware import fits
    from tedmoe.planner.search import largest_layers

    hw = PRESETS["dgx-a100"]
    mem = {"total": 1.0, "host": 300 * 2**30, "disk": 0.0}
    assert not fits(mem, hw) and fits({**mem, "host": 200 * 2**30}, hw)  # a GPU's share: 2 TiB / 8
    assert fits(mem, dataclasses.replace(hw, host_memory_bytes=None))  # not stated: not checked
    model = paper_model("6.7b", 16)
    kw = {"global_batch": 64, "max_tp": 8}
    depth = {(s, o): largest_layers(model, 64, hw, train=_zero(s, o), **kw) for s, o in ((1, "none"), (3, "none"), (3, "cpu"))}
    # (ZeRO-2 may fit fewer than ZeRO-1: with edp 1 its fp32 gradient "shard" of the experts is all of them)
    assert 0 < depth[(1, "none")] < depth[(3, "none")] < depth[(3, "cpu")]
    tight = dataclasses.replace(hw, host_memory_bytes=8 * 2**30)
    assert largest_layers(model, 64, tight, train=_zero(3, "cpu"), **kw) < depth[(3, "cpu")]


def test_plan_cli_zero3_with_offload_splits_the_memory():
    import json

    out = _plan("--model", "6.7b", "--gpus", "64", "--hardware", "dgx-a100", "--zero-stage", "3", "--offload", "cpu")
    assert out.returncode == 0, out.stderr
    assert "ZeRO-3, offload cpu" in out.stdout and "dev GiB host GiB" in out.stdout and " yes " in out.stdout
    assert "disk GiB" not in out.stdout and "within 80.0 GiB per device and 256.0 GiB of host memory" in out.stdout
    out = _plan("--model", "6.7b", "--gpus", "64", "--hardware", "dgx-a100", "--zero-stage", "3", "--offload", "disk",
                "--json")
    assert out.returncode == 0, out.stderr
    cands = json.loads(out.stdout)
    assert all(c["memory"]["disk"] > 0 and c["memory"]["host"] == 0 for c in cands)
