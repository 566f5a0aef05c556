"""Optimizer-state offload (``train.offload``) in one process: host memory and files on disk give
bit-identical steps at every ZeRO stage; the disk store streams tiles and leaves nothing behind;
a model whose optimizer states exceed a memory cap trains under that cap with disk offload."""

import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from tedmoe.config import TrainConfig
from tedmoe.parallel.topology import Topology
from tedmoe.runtime.offload import DiskStates, OffloadDirectory
from tests.distributed.test_engine import build, micro_batches


def _engine(**kw):
    cfg = TrainConfig(**{"lr": 1e-2, "warmup_steps": 0, "max_steps": 10, "grad_clip": 0.05, "tile_size": 97,
                         "weight_decay": 0.1, **kw})
    return build(Topology.single(), cfg)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_offloaded_steps_are_bit_identical(tmp_path, stage, precision):
    kw = {"zero_stage": stage, "reduce_bucket_size": 700, "precision": precision}
    base = _engine(**kw)
    host = _engine(offload="cpu", **kw)
    (tmp_path / "mine.txt").write_text("a user's file")
    disk = _engine(offload="disk", offload_path=str(tmp_path), **kw)
    made = [p for p in tmp_path.iterdir() if p.name.startswith("tedmoe-offload-rank0-")]
    assert len(made) == 1 and sorted(f.name for f in made[0].iterdir())  # one directory of ours, with files
    for step in range(3):
        outs = [e.train_step(micro_batches(step)) for e in (base, host, disk)]
        assert outs[0]["loss"] == outs[1]["loss"] == outs[2]["loss"]
    for e in (host, disk):
        with e.optimizer.whole_parameters(), base.optimizer.whole_parameters():
            for p, q in zip(base.model.parameters(), e.model.parameters()):
                assert torch.equal(p, q)
        for g0, g in zip(base.optimizer.groups, e.optimizer.groups):
            for name in ("master", "exp_avg", "exp_avg_sq"):
                assert torch.equal(getattr(g0, name), getattr(g, name)), name
    disk.optimizer.close()
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]  # ours removed, the user's kept


def test_disk_tiles_overlap_reads_and_keep_three_tiles(tmp_path):
    """The store reads tile k + 1 before tile k is handed out for update; updates written back
    are what the next pass reads; the whole array round-trips."""
    directory = OffloadDirectory(tmp_path, 0)
    store = DiskStates(["a", "b"], 1000, directory.path / "x.f32")
    store.set("a", torch.arange(1000.0))
    log, submit = [], store.pool.submit

    def logged(fn, *args):
        log.append((fn.__name__, args[0]))
        return submit(fn, *args)

    store.pool.submit = logged
    threads = set()
    read = store._read
    store._read = lambda *a: threads.add(threading.current_thread().name) or read(*a)
    for s, tiles in store.tiles(300):
        log.append(("update", s.start))
        tiles["a"].mul_(2)
        tiles["b"].add_(s.start)
    # tile k + 1's read is issued before tile k is updated, tile k's write right after its update
    assert log == [("read", 0), ("read", 300), ("update", 0), ("write", 0), ("read", 600), ("update", 300),
                   ("write", 300), ("read", 900), ("update", 600), ("write", 600), ("update", 900), ("write", 900)]
    assert all(t.startswith("tedmoe-offload") for t in threads)  # in the background
    assert torch.equal(store.get("a"), torch.arange(1000.0) * 2)
    assert torch.equal(store.get("b"), torch.tensor([float(i // 300 * 300) for i in range(1000)]))
    store.close()
    directory.close()
    assert not list(tmp_path.iterdir())


CAP_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import torch
    from tedmoe.config import ModelConfig, MoEConfig, TrainConfig
    from tedmoe.model.transformer import GPTMoE
    from tedmoe.parallel.topology import Topology
    from tedmoe.runtime.engine import Engine

    cap, offload, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    torch.manual_seed(0)
    moe = MoEConfig(ffn_hidden_size=1024, num_experts=16, top_k=2, capacity_factor=1.0, min_capacity=1)
    model = GPTMoE(ModelConfig(vocab_size=256, hidden_size=512, num_layers=4, num_heads=4, ffn_hidden_size=1024,
                               max_seq_len=32, moe=moe), Topology.single())  # 40M parameters: 321 MB of moments
    model.init_weights(seed=0)
    numel = sum(p.numel() for p in model.parameters())
    if cap:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    kw = {"offload": offload, "offload_path": path} if offload == "disk" else {}
    try:
        engine = Engine(model, Topology.single(), TrainConfig(lr=1e-3, warmup_steps=0, max_steps=3, tile_size=1 << 16, **kw))
        g = torch.Generator().manual_seed(1)
        losses = []
        for step in range(3):
            ids = torch.randint(0, 256, (2, 32), generator=g)
            losses.append(engine.train_step([(ids, ids.roll(-1, 1))])["loss"])
        engine.optimizer.close()
    except (MemoryError, RuntimeError) as err:  # torch's allocator raises RuntimeError("... can't allocate memory")
        if not isinstance(err, MemoryError) and "allocate memory" not in str(err):
            raise
        print(json.dumps({"memory_error": True}))
        sys.exit(0)
    vm = {k: int(v.split()[0]) * 1024 for k, v in (l.split(":") for l in open("/proc/self/status")) if k in ("VmPeak",)}
    print(json.dumps({"losses": losses, "numel": numel, **vm}))
""")


def _capped(cap, offload, path):
    env = {**os.environ, "MALLOC_ARENA_MAX": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CAP_SCRIPT, str(cap), offload, str(path)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_disk_offload_trains_under_a_cap_the_states_exceed(tmp_path):
    """Peak address space with states in memory vs on disk, both measured; a cap between the two
    stops the in-memory run (MemoryError) and lets the disk run train with the same losses."""
    memory, disk = _capped(0, "none", tmp_path), _capped(0, "disk", tmp_path)
    states = 8 * memory["numel"]  # Adam's two fp32 moments (the fp32 parameters are the master)
    assert memory["VmPeak"] - disk["VmPeak"] > states / 2, (memory, disk)
    cap = (memory["VmPeak"] + disk["VmPeak"]) // 2
    assert cap < disk["VmPeak"] + states  # the cap is below what the states alone would add
    assert _capped(cap, "none", tmp_path) == {"memory_error": True}
    capped = _capped(cap, "disk", tmp_path)
    assert capped["losses"] == memory["losses"]
    assert not list(tmp_path.iterdir())
