"""Parameter layout (tedmoe/parallel/sharding.py): layout-invariant init, full state dicts
gathered from and loaded into every layout, replicas that stay identical, and which axis each
parameter is reduced and sharded over."""

import torch

from tedmoe.model.transformer import GPTMoE
from tedmoe.parallel import comm
from tedmoe.parallel.sharding import full_state_dict, load_full_state_dict, replica_axis, tp_dim
from tedmoe.parallel.topology import Topology
from tests.distributed.test_engine import LAYOUTS, build, micro_batches, model_config, train_config


def check_state_dicts(world):
    """Layout-invariant init gathers to the single-process weights; a full state dict loads into
    any layout; parameters replicated over tp stay identical on the TP ranks through training."""
    ref = build(Topology.single(), train_config()).model.state_dict()
    for tp, ep in LAYOUTS[world]:
        topo = Topology(world, tp=tp, ep=ep)
        engine = build(topo, train_config())
        full = full_state_dict(engine.model, topo)
        assert full.keys() == ref.keys()
        assert all(torch.equal(full[k], ref[k]) for k in ref), (tp, ep)
        other = GPTMoE(model_config(), topo)
        load_full_state_dict(other, full, topo)
        assert all(torch.equal(a, b) for a, b in zip(other.parameters(), engine.model.parameters()))
        for s in range(3):
            engine.train_step(micro_batches(s, topo.size("dp"), topo.coord("dp")))
        for name, p in engine.model.named_parameters():
            if tp_dim(p) is None:
                copies = comm.all_gather(p.detach().unsqueeze(0), topo.axis("tp"))
                assert all(torch.equal(c, copies[0]) for c in copies), (tp, ep, name)


def test_state_dicts_and_replicas(world8):
    world8.run(check_state_dicts, 8)


def test_replica_axis_follows_the_tags():
    """Experts are averaged and ZeRO-sharded over edp, everything else over dsp."""
    model = GPTMoE(model_config(), Topology.single())
    axes = {name: replica_axis(p) for name, p in model.named_parameters()}
    assert {n for n, a in axes.items() if a == "edp"} == {n for n in axes if ".experts." in n} != set()
    assert set(axes.values()) == {"dsp", "edp"}
