"""The planner's predicted communication equals the ledger's measurement of a real training step."""


import pytest
import torch

from tedmoe.config import ModelConfig, MoEConfig, TrainConfig
from tedmoe.model.transformer import GPTMoE
from tedmoe.parallel.activation_checkpoint import apply_checkpointing
from tedmoe.parallel import comm
from tedmoe.parallel.topology import Topology
from tedmoe.planner.predict import Plan, step_comm
from tedmoe.runtime.engine import Engine

CASES = {4: [(2, 2, True, "none"), (2, 2, False, "plain"), (1, 4, True, "cac"), (4, 1, True, "plain"),
             (4, 1, False, "none"), (2, 2, True, "none", 2), (1, 4, False, "cac", 2), (2, 2, True, "none", 3),
             (1, 4, False, "cac", 3), (1, 2, True, "plain", 3)],
         8: [(2, 2, True, "cac"), (2, 4, False, "none"), (4, 2, True, "plain"), (8, 1, True, "none"),
             (2, 2, True, "plain", 2), (2, 2, True, "plain", 3), (1, 2, False, "cac", 3)]}
# (tp, ep, dtd, checkpointing[, ZeRO stage]); ZeRO-3 with experts whole (edp 1) and sharded (edp 2, 4)
MICRO, SEQ, ACCUM = 2, 16, 2


def model_config(dtd):
    moe = MoEConfig(ffn_hidden_size=32, num_experts=4, top_k=2, capacity_factor=1.0, dtd=dtd)
    return ModelConfig(vocab_size=64, hidden_size=32, num_layers=3, num_heads=8, num_kv_heads=8, ffn_hidden_size=64,
                       max_seq_len=SEQ, moe=moe)


def check_predictions(world):
    results = []
    for tp, ep, dtd, ckpt, *stage in CASES[world]:
        train = TrainConfig(checkpointing=ckpt, zero_stage=(stage or [1])[0], reduce_bucket_size=3000)
        topo = Topology(world, tp=tp, ep=ep)
        cfg = model_config(dtd)
        model = GPTMoE(cfg, topo)
        apply_checkpointing(model, ckpt)
        model.init_weights(0)
        engine = Engine(model, topo, train)
        g = torch.Generator().manual_seed(topo.coord("dp"))
        data = torch.randint(0, 64, (ACCUM, MICRO, SEQ + 1), generator=g)
        with comm.LEDGER.capture():
            engine.train_step([(d[:, :-1], d[:, 1:]) for d in data])
        plan = Plan(cfg, world, tp, ep, micro_batch=MICRO, seq_len=SEQ, micro_batches=ACCUM, train=train)
        measured = comm.LEDGER.as_dict()
        # the first step also checks once that every rank's micro-batches agree (not a per-step cost)
        assert measured.pop("checks") == {"all_gather/world": {"calls": 1, "bytes": (world - 1) * 32, "payload": 32}}
        results.append(((tp, ep, dtd, ckpt, *stage), measured, step_comm(plan)))
    return results


@pytest.mark.parametrize("world", [4, 8])
def test_predicted_bytes_equal_measured(world, request):
    for per_rank in request.getfixturevalue(f"world{world}").run(check_predictions, world):
        for case, measured, predicted in per_rank:
            diff = {(phase, key): (measured.get(phase, {}).get(key), predicted.get(phase, {}).get(key))
                    for phase in measured.keys() | predicted.keys()
                    for key in measured.get(phase, {}).keys() | predicted.get(phase, {}).keys()
                    if measured.get(phase, {}).get(key) != predicted.get(phase, {}).get(key)}
            assert not diff, (case, "(measured, predicted):", diff)
            if case[4:] == (3,):  # ZeRO-3 was really on: per-unit gathers, and none in the step
                assert measured["fwd"]["all_gather/dp"]["calls"] and "all_gather/dp" in measured["bwd"], case
                assert not any(k.startswith("all_gather") for k in measured["step"]), case
