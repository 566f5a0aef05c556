"""The inference engine across ranks: rank 0 leads (its ``put`` calls are broadcast), every rank
runs the forward with its shards (heads and dense MLPs over tp, experts over ep, dropless
all-to-all). Next-token logits of ragged batches equal one process's (rtol 1e-5) and greedy
generation equals it token for token, in EP 2, TP 2, EP 2 x TP 2 and TP 3 x EP 2."""

import pytest
import torch

from tedmoe.inference.engine import InferenceEngine
from tedmoe.inference.generate import generate_batch
from tedmoe.inference.sampling import SamplingParams
from tedmoe.parallel.topology import Topology
from tests.unit.test_inference_engine import TOL, build, model_config

LAYOUTS = {2: [(1, 2), (2, 1)], 4: [(2, 2)], 6: [(3, 2)]}  # (tp, ep)
PROMPTS = [[5, 17, 42, 8, 33, 2, 19], [1, 2], [60, 3, 9, 9, 9, 12, 40, 41, 7, 7, 30], [4]]
# (uids, chunk lengths) per forward: whole prompts, prompt chunks after a cached prefix, decodes
SCHEDULE = [([0, 2], [4, 6]), ([0, 1, 2], [3, 2, 5]), ([3, 1, 0], [1, 1, 1]), ([2, 3], [1, 1])]
NEW_TOKENS = 20


def config(world):
    if world == 6:  # heads, kv heads, widths and vocabulary divisible by 3
        cfg = model_config(vocab_size=66, hidden_size=48, num_heads=6, num_kv_heads=3, ffn_hidden_size=96)
        cfg.moe.ffn_hidden_size = 30
        return cfg
    return model_config()


def scheduled(engine, world):
    """Run SCHEDULE (chunks of PROMPTS, then decode tokens 1, 2, ...) and greedy generation."""
    done, logits = [0] * len(PROMPTS), []
    for uids, lengths in SCHEDULE:
        chunks = []
        for u, n in zip(uids, lengths):
            seq = PROMPTS[u] + list(range(1, 20))
            chunks.append(seq[done[u]:done[u] + n])
            done[u] += n
        logits.append(engine.put(uids, chunks))
    for u in range(len(PROMPTS)):
        engine.flush(u)
    outs = generate_batch(engine, PROMPTS, NEW_TOKENS, SamplingParams(temperature=0.0))
    return logits, outs, engine.free_blocks


def run_layouts(world):
    results = {}
    for tp, ep in LAYOUTS[world]:
        engine = InferenceEngine(build(config(world), topology=Topology(world, tp=tp, ep=ep)), block_size=4,
                                 num_blocks=32)
        if engine.rank == 0:
            try:
                results[(tp, ep)] = scheduled(engine, world)
            finally:
                engine.stop()
        else:
            engine.follow()
    return results


@pytest.mark.parametrize("world", [2, 4, 6])
def test_layouts_serve_the_single_process_logits_and_tokens(world, request):
    reference = scheduled(InferenceEngine(build(config(world)), block_size=4, num_blocks=32), world)
    assert len(set(reference[1][0][len(PROMPTS[0]):])) > 3  # greedy output is not one repeated token
    results = request.getfixturevalue(f"world{world}").run(run_layouts, world)
    assert all(not r for r in results[1:])  # followers return nothing
    for (tp, ep), (logits, outs, free) in results[0].items():
        for step, (got, want) in enumerate(zip(logits, reference[0])):
            torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"tp={tp} ep={ep} forward {step}: {m}")
        assert outs == reference[1], f"tp={tp} ep={ep}"
        assert free == 32


def compressed_logits(path, x):
    from tedmoe.inference.generate import load_model

    model, _ = load_model(path, Topology(4, tp=2, ep=2), routing="dropless")
    return model.logits(x)


def test_compressed_models_load_into_layouts_with_the_one_process_logits(world4, tmp_path):
    """INT8, INT4, packed ternary (one scale per row, kept whole where tp splits the inputs) and
    N:M directories sliced per rank (rows or columns over tp, experts over ep) give the logits of
    the same directory in one process."""
    import copy

    from tedmoe.compress import model as compressed
    from tedmoe.compress import qat
    from tedmoe.data.tokenizer import ByteTokenizer
    from tedmoe.inference.generate import load_model
    from tests.unit.test_compress import float_model

    model = float_model()
    x = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(6))
    for method in ("int8", "int4", "ternary", "nm"):
        path = tmp_path / method
        state = model.state_dict()
        if method in compressed.TRAINED:  # the weights a quantisation-aware run's forward uses
            trained = copy.deepcopy(model)
            qat.apply(trained, method)
            qat.bake(trained)
            state = trained.state_dict()
        compressed.save(state, model.config, method, 32 if method in compressed.GROUPED else None, path,
                        ByteTokenizer())
        want = load_model(path, routing="dropless")[0].logits(x)
        for rank, got in enumerate(world4.run(compressed_logits, str(path), x)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"{method} rank {rank}: {m}")
