"""The inference engine in one process: the block allocator, attention over block tables against a
dense reference, and the engine's next-token logits against recomputing each whole sequence, for
ragged batches that mix prompts, prompt chunks continuing a cached prefix and decode tokens."""

import random

import pytest
import torch

from tedmoe.config import ModelConfig, MoEConfig
from tedmoe.inference.engine import InferenceEngine, inference_config
from tedmoe.inference.kv_cache import BlockAllocator, KVCache, Prefill, RaggedBatch, attend
from tedmoe.model.transformer import GPTMoE
from tedmoe.parallel.topology import Topology

TOL = {"rtol": 1e-5, "atol": 1e-5}


def model_config(**kw):
    moe = MoEConfig(ffn_hidden_size=32, num_experts=4, top_k=2, activation="swiglu", capacity_factor=1.0,
                    min_capacity=1)
    return ModelConfig(**{"vocab_size": 64, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                          "max_seq_len": 64, "moe_every": 1, "moe": moe, **kw})


def build(cfg=None, routing="dropless", topology=None, seed=0):
    """A model whose routing and logits are far from uniform (weights scaled up)."""
    model = GPTMoE(inference_config(cfg or model_config(), routing), topology or Topology.single())
    model.init_weights(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(5.0)
    return model.eval()


def reference(model, tokens):
    return model.logits(torch.tensor([tokens]))[0, -1]


def test_the_allocator_hands_out_lowest_ids_and_takes_them_back():
    a = BlockAllocator(5)
    assert a.allocate(2) == [0, 1] and a.allocate(1) == [2] and a.free_blocks == 2
    a.free([0, 1])
    assert a.allocate(3) == [0, 1, 3] and a.free_blocks == 1
    with pytest.raises(RuntimeError, match="KV cache exhausted: 2 blocks wanted, 1 free"):
        a.allocate(2)


def test_attention_over_block_tables_equals_dense_attention():
    """Scattered blocks, GQA, a decode row, a whole prompt and a chunk after a cached prefix."""
    torch.manual_seed(0)
    P, b, G, h, D = 12, 4, 2, 4, 8
    cache = KVCache(model_config(num_heads=h, num_kv_heads=G, hidden_size=h * D, num_layers=1), 1, P, b,
                    torch.float32)
    k_cache, v_cache = cache.k[0], cache.v[0]
    lengths = {"decode": (9, 1), "prompt": (6, 6), "chunk": (11, 5)}  # (context, new tokens)
    tables = {"decode": [7, 2, 9], "prompt": [4, 0], "chunk": [1, 11, 5]}
    full_k = {s: torch.randn(c, G, D) for s, (c, _) in lengths.items()}
    full_v = {s: torch.randn(c, G, D) for s, (c, _) in lengths.items()}
    for s, (c, n) in lengths.items():  # the cached prefixes
        for t in range(c - n):
            k_cache[tables[s][t // b], t % b] = full_k[s][t]
            v_cache[tables[s][t // b], t % b] = full_v[s][t]
    order = ["decode", "prompt", "chunk"]
    q = {s: torch.randn(n, h, D) for s, (_, n) in lengths.items()}
    positions = torch.cat([torch.arange(c - n, c) for c, n in (lengths[s] for s in order)])
    slots = torch.cat([torch.tensor([tables[s][t // b] * b + t % b for t in range(c - n, c)])
                       for s, (c, n) in ((s, lengths[s]) for s in order)])
    batch = RaggedBatch(positions=positions, slots=slots, decode_rows=torch.tensor([0]),
                        decode_tables=torch.tensor([tables["decode"]]), decode_context=torch.tensor([9]),
                        prefills=[Prefill(1, 6, 6, torch.tensor(tables["prompt"])),
                                  Prefill(7, 5, 11, torch.tensor(tables["chunk"]))])
    new = lambda full: torch.cat([full[s][lengths[s][0] - lengths[s][1]:] for s in order])  # noqa: E731
    out = attend(torch.cat([q[s] for s in order]), new(full_k), new(full_v), k_cache, v_cache, batch)
    row = 0
    for s in order:
        c, n = lengths[s]
        k = full_k[s].repeat_interleave(h // G, dim=1)  # [c, h, D]
        v = full_v[s].repeat_interleave(h // G, dim=1)
        scores = torch.einsum("nhd,chd->hnc", q[s], k) / D ** 0.5
        visible = torch.arange(c)[None, :] <= torch.arange(c - n, c)[:, None]
        want = torch.einsum("hnc,chd->nhd", scores.masked_fill(~visible, float("-inf")).softmax(-1), v)
        torch.testing.assert_close(out[row:row + n], want, **TOL, msg=lambda m: f"{s}: {m}")
        row += n


def random_schedule(engine, model, seqs, rng, max_chunk=7):
    """Feed every sequence to the engine in random chunks, several sequences per forward, checking
    each forward's logits against recomputing the sequences; returns the number of forwards."""
    done = {u: 0 for u in seqs}
    forwards = 0
    while any(done[u] < len(seqs[u]) for u in seqs):
        live = [u for u in seqs if done[u] < len(seqs[u])]
        uids = rng.sample(live, rng.randint(1, len(live)))
        chunks = [seqs[u][done[u]:done[u] + rng.choice([1, 1, rng.randint(1, max_chunk)])] for u in uids]
        assert engine.can_schedule(uids, [len(c) for c in chunks])
        logits = engine.put(uids, chunks)
        forwards += 1
        for u, c, row in zip(uids, chunks, logits):
            done[u] += len(c)
            assert engine.query(u).length == done[u]
            torch.testing.assert_close(row, reference(model, seqs[u][:done[u]]), **TOL,
                                       msg=lambda m: f"uid {u} at {done[u]} tokens: {m}")
    return forwards


@pytest.mark.parametrize("cfg", [model_config(), model_config(head_dim=12, qk_norm=True, num_kv_heads=4)],
                         ids=["mixtral", "qwen3"])
def test_ragged_batches_give_the_recomputed_logits(cfg):
    model = build(cfg)
    engine = InferenceEngine(model, block_size=4, num_blocks=40)
    rng = random.Random(0)
    g = torch.Generator().manual_seed(1)
    seqs = {u: torch.randint(0, 64, (rng.randint(3, 30),), generator=g).tolist() for u in (3, 11, 5, 8)}
    assert random_schedule(engine, model, seqs, rng) > 6
    for u in seqs:
        assert len(engine.query(u).blocks) == -(-len(seqs[u]) // 4)
        engine.flush(u)
    assert engine.free_blocks == 40 and engine.query(3) is None  # nothing leaks


def test_no_block_leaks_after_any_mix_of_puts_and_flushes():
    model = build()
    engine = InferenceEngine(model, block_size=3, num_blocks=30)
    rng = random.Random(2)
    held = {}
    for step in range(60):
        if held and rng.random() < 0.3:
            uid = rng.choice(list(held))
            engine.flush(uid)
            del held[uid]
        else:
            uid = rng.choice([u for u in range(8) if u not in held] or list(held))
            n = rng.randint(1, 6)
            if not engine.can_schedule([uid], [n]):
                continue
            engine.put([uid], [[1] * n])
            held[uid] = held.get(uid, 0) + n
        in_use = sum(len(engine.query(u).blocks) for u in held)
        assert in_use == sum(-(-n // 3) for n in held.values()) == 30 - engine.free_blocks
    for uid in list(held):
        engine.flush(uid)
    assert engine.free_blocks == 30


def test_running_out_of_blocks_is_told_before_it_happens():
    model = build()
    engine = InferenceEngine(model, block_size=4, num_blocks=5)
    assert engine.capacity_tokens == 20
    engine.put([1], [[1] * 12])  # 3 blocks
    assert engine.can_schedule([2], [8]) and not engine.can_schedule([2], [9])
    assert not engine.can_schedule([1, 2], [1, 8])  # 1 needs a fourth block, 2 needs two
    before = (engine.free_blocks, engine.query(1).length)
    with pytest.raises(ValueError, match="the KV cache has 2 free blocks and this put needs 3"):
        engine.put([1, 2], [[1], [2] * 8])
    assert (engine.free_blocks, engine.query(1).length, engine.query(2)) == (*before, None)  # nothing changed
    assert not engine.can_schedule([1], [64 - 12 + 1])  # beyond max_seq_len, whatever the blocks


@pytest.mark.parametrize("uids,chunks,message", [
    ([1, 1], [[1], [2]], "a uid appears twice"),
    ([1], [[]], "uid 1: empty chunk"),
    ([1], [[64]], "token ids outside the model's vocabulary of 64"),
    ([1], [[1] * 65], "uid 1: 65 tokens exceed the model's max_seq_len=64"),
    ([1, 2], [[1]], "2 uids but 1 chunks"),
])
def test_bad_puts_are_one_line_and_change_nothing(uids, chunks, message):
    engine = InferenceEngine(build(), block_size=4, num_blocks=40)
    with pytest.raises(ValueError, match=message):
        engine.put(uids, chunks)
    assert engine.free_blocks == 40 and not engine.seqs


def test_budget_and_bad_settings():
    cfg = model_config()  # 2 layers x 2 kv heads x head size 8, fp32: 256 bytes of keys+values per token
    engine = InferenceEngine(build(cfg), block_size=16, kv_bytes=10 * 16 * 256 + 100)
    assert (engine.cache.num_blocks, engine.capacity_tokens, engine.bytes_per_token) == (10, 160, 256)
    assert engine.cache.nbytes == 10 * 16 * 256
    with pytest.raises(ValueError, match="holds 0 blocks of 16 tokens; give it at least 4096 bytes"):
        InferenceEngine(build(cfg), kv_bytes=1000)
    with pytest.raises(ValueError, match="routing='capacity'"):
        inference_config(cfg, "capacity")


def test_dropless_is_the_default_and_training_routing_stays_available():
    """A capacity-trained model: the engine computes every routed token by default (equal to the
    dropless full recompute), or routes with the training capacity when asked (then its logits
    are the capacity model's on the same tokens, computed in one forward)."""
    cfg = model_config()
    cfg.moe.capacity_factor, cfg.moe.min_capacity = 0.5, 1
    served = build(cfg)
    assert served.config.moe.dropless and not cfg.moe.dropless
    tokens = torch.randint(0, 64, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    engine = InferenceEngine(served, block_size=4, num_blocks=10)
    torch.testing.assert_close(engine.put([0], [tokens])[0], reference(served, tokens), **TOL)
    trained = build(cfg, routing="training")
    engine = InferenceEngine(trained, block_size=4, num_blocks=10)
    capped = engine.put([0], [tokens])[0]
    torch.testing.assert_close(capped, reference(trained, tokens), **TOL)
    assert not torch.allclose(capped, reference(served, tokens), atol=1e-3)  # the capacity did drop tokens


def test_engine_generation_equals_recomputing_generation():
    from tedmoe.inference.generate import generate, generate_batch
    from tedmoe.inference.sampling import SamplingParams

    model = build()
    engine = InferenceEngine(model, block_size=4, num_blocks=64)
    prompts = [[5, 17, 42, 8], [1, 2], [60, 3, 9, 9, 9, 12, 40]]
    outs = generate_batch(engine, prompts, 24, SamplingParams(temperature=0.0))
    for prompt, out in zip(prompts, outs):
        assert out == generate(model, prompt, 24, greedy=True)
    assert len(set(outs[0][4:])) > 3 and engine.free_blocks == 64
    sampled = generate_batch(engine, prompts, 12, SamplingParams(temperature=0.9, top_k=20), seed=7)
    assert sampled[1] == generate(model, prompts[1], 12, temperature=0.9, top_k=20, seed=8)  # seed + index


def test_generation_stops_sequences_the_cache_cannot_hold():
    """Two sequences each needing a new block with one free: the first continues, the second
    stops there (no failed put), and every block comes back."""
    from tedmoe.inference.generate import generate, generate_batch
    from tedmoe.inference.sampling import SamplingParams

    model = build()
    engine = InferenceEngine(model, block_size=4, num_blocks=5)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16]]
    outs = generate_batch(engine, prompts, 4, SamplingParams(temperature=0.0))
    assert outs[0] == generate(model, prompts[0], 4, greedy=True)  # 12 tokens: 3 blocks
    assert outs[1] == generate(model, prompts[1], 1, greedy=True)  # 2 blocks, then none was left
    assert engine.free_blocks == 5
