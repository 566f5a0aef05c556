"""Qwen3-MoE's block in TED layouts: a checkpoint written by ``transformers`` loads into TP x EP x
DP layouts (each rank reading its slices) with transformers' logits, and training with per-head
q/k norms and a free head size gives the single-process loss, gradients and curve in layouts that
split the heads over TP (the norms' weights see every rank's heads) and over SP (Ulysses)."""

import pytest
import torch

import tests.distributed.test_engine as te
from tedmoe.config import ModelConfig, MoEConfig
from tedmoe.interop import hf
from tedmoe.model.transformer import GPTMoE
from tedmoe.parallel.activation_checkpoint import apply_checkpointing
from tedmoe.parallel.topology import Topology
from tests.distributed.harness import assert_matches_reference, train_and_gather
from tests.distributed.test_mixtral import assert_layouts_give_transformers_logits
from tests.unit.test_qwen3_moe import hf_model, ids

transformers = pytest.importorskip("transformers")

TRAIN_LAYOUTS = [(2, 2, 1, "none"), (4, 1, 1, "cac"), (1, 2, 2, "plain"), (2, 1, 2, "none")]  # tp, ep, sp, ckpt
STEPS = 5


def test_layouts_load_a_transformers_checkpoint_with_equal_logits(world4, tmp_path):
    assert_layouts_give_transformers_logits(world4, *hf_model(tmp_path), ids())


def check_sp_load(path):
    """With sp > 1 (and dp, ep) each rank's parameters are its slices of the directory's tensors."""
    from tedmoe.parallel.sharding import full_state_dict

    cfg = hf.read_config(path)
    model = GPTMoE(cfg, Topology(4, tp=1, ep=2, sp=2))
    hf.load_into(model, path)
    state = full_state_dict(model, model.topology)  # collective: every rank gathers
    return state if torch.distributed.get_rank() == 0 else None


def test_an_sp_layout_loads_the_same_weights(world4, tmp_path):
    _, path = hf_model(tmp_path)
    _, state = hf.load(path)
    got = world4.run(check_sp_load, str(path))[0]
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


def model_config():
    moe = MoEConfig(ffn_hidden_size=32, num_experts=4, top_k=2, dropless=True, activation="swiglu",
                    normalize_gates=False)  # dropless, as Qwen3-MoE routes (and as SP layouts need for invariance)
    return ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, head_dim=12, qk_norm=True,
                       ffn_hidden_size=64, max_seq_len=te.SEQ, moe_every=1, moe=moe)


def run(topology, checkpointing="none"):
    model = GPTMoE(model_config(), topology)
    model.init_weights(seed=0)
    with torch.no_grad():  # norms away from 1, so that a wrong norm gradient shows in the curve
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(torch.linspace(0.5, 1.5, p.numel()))
    apply_checkpointing(model, checkpointing)
    engine = te.Engine(model, topology, te.train_config())
    return train_and_gather(engine, lambda step: te.rank_batches(step, topology), STEPS, te.MICRO_BATCHES)


def check_train_layouts():
    out = {}
    for tp, ep, sp, ckpt in TRAIN_LAYOUTS:
        result = run(Topology(4, tp=tp, ep=ep, sp=sp), ckpt)
        out[(tp, ep, sp, ckpt)] = result if torch.distributed.get_rank() == 0 else None
    return out


def test_qk_norm_and_head_dim_train_as_in_one_process(world4):
    reference = run(Topology.single())
    assert reference[2][-1][0] < reference[2][0][0] - 0.3  # it trains
    assert reference[1]["blocks.0.attn.q_norm.weight"].abs().min() > 0  # the norms learn
    for (tp, ep, sp, ckpt), result in world4.run(check_train_layouts)[0].items():
        assert_matches_reference(f"tp={tp} ep={ep} sp={sp} checkpointing={ckpt}", result, reference)
