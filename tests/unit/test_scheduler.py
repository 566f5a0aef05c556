"""The schedulers against recomputation: whatever the policy, chunking and pre-emption, every
request's greedy tokens equal generating it alone by recomputing the whole context; and each
policy keeps its own rules (SplitFuse's token budget and decode-first order, prefill-first's
separate prompt forwards, static batches)."""

import random

import pytest
import torch

from tedmoe.inference.engine import InferenceEngine
from tedmoe.inference.generate import generate
from tedmoe.inference.sampling import SamplingParams
from tedmoe.inference.scheduler import Request, Scheduler
from tests.unit.test_inference_engine import build


@pytest.fixture(scope="module")
def model():
    return build()


def requests(n, seed=0, lengths=(3, 40), new=(2, 12)):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    return [Request(uid=i, prompt=torch.randint(0, 64, (rng.randint(*lengths),), generator=g).tolist(),
                    max_tokens=rng.randint(*new), params=SamplingParams(temperature=0.0)) for i in range(n)]


def run(scheduler, reqs, arrivals=None):
    """Add the requests (all at once, or request i before step arrivals[i]) and step until idle."""
    arrivals = arrivals or [0] * len(reqs)
    steps, done, t = [], [], 0
    while len(done) < len(reqs):
        for r, a in zip(reqs, arrivals):
            if a == t:
                scheduler.add(r)
        result = scheduler.step()
        steps.append(result)
        done += result.finished
        t += 1
        assert t < 10_000
    return steps


def reference(model, r):
    return generate(model, r.prompt, r.max_tokens, greedy=True)[len(r.prompt):]


@pytest.mark.parametrize("policy", ["splitfuse", "prefill-first", "static"])
def test_every_policy_gives_each_request_its_own_greedy_tokens(model, policy):
    engine = InferenceEngine(model, block_size=4, num_blocks=60)
    reqs = requests(9)
    run(Scheduler(engine, policy, token_budget=24, max_seqs=4), reqs, arrivals=[0, 0, 0, 1, 2, 2, 5, 9, 9])
    for r in reqs:
        assert r.generated == reference(model, r), (policy, r.uid)
        assert r.finish_reason == "length" and r.first_token_time is not None
    assert engine.free_blocks == 60


def test_splitfuse_keeps_the_budget_decodes_first_and_splits_long_prompts(model):
    engine = InferenceEngine(model, block_size=4, num_blocks=80)
    reqs = requests(6, seed=1, lengths=(2, 5), new=(20, 30)) + requests(1, seed=2, lengths=(50, 55))
    reqs[-1].uid = 99
    scheduler = Scheduler(engine, "splitfuse", token_budget=16, max_seqs=8)
    steps = run(scheduler, reqs, arrivals=[0, 0, 0, 0, 0, 0, 3])
    assert all(s.batch_tokens <= 16 and s.batch_seqs <= 8 for s in steps)
    long_chunks = [s for s in steps[3:8]]
    # while the 50-token prompt is split over several forwards, the six short requests keep decoding
    assert all(len([t for t in s.tokens if t[0].uid != 99]) == 6 for s in long_chunks)
    assert len(reqs[-1].prompt) > 16 and reqs[-1].generated == reference(model, reqs[-1])


def test_preemption_by_recompute_when_blocks_run_out(model):
    engine = InferenceEngine(model, block_size=2, num_blocks=24)  # 48 tokens for 6 requests of up to ~30
    reqs = requests(6, seed=3, lengths=(4, 10), new=(15, 20))
    run(Scheduler(engine, "splitfuse", token_budget=32, max_seqs=6), reqs)
    assert sum(r.preemptions for r in reqs) > 0
    for r in reqs:
        assert r.generated == reference(model, r), r.uid
    assert engine.free_blocks == 24


def test_prefill_first_runs_prompts_in_forwards_of_their_own(model):
    engine = InferenceEngine(model, block_size=4, num_blocks=60)
    reqs = requests(6, seed=4)
    scheduler = Scheduler(engine, "prefill-first", token_budget=8, max_seqs=6)
    steps = run(scheduler, reqs, arrivals=[0, 0, 2, 3, 3, 6])
    for s in steps:
        prompts = [r for r, _ in s.tokens if len(r.generated) == 1]
        assert not prompts or len(prompts) == len(s.tokens)  # a forward is all prompts or all decodes
    assert max(s.batch_tokens for s in steps) > 8  # whole prompts, whatever the budget


def test_static_batches_wait_for_the_whole_group(model):
    engine = InferenceEngine(model, block_size=4, num_blocks=60)
    reqs = requests(5, seed=5)
    scheduler = Scheduler(engine, "static", max_seqs=2)
    for r in reqs:
        scheduler.add(r)
    groups = []
    while not scheduler.idle:
        was_empty = not scheduler.running
        scheduler.step()
        if was_empty:  # every request makes at least 2 tokens, so the group is still running
            groups.append(sorted(r.uid for r in scheduler.running))
    assert groups == [[0, 1], [2, 3], [4]]
    assert all(r.generated == reference(model, r) for r in reqs)


def test_stop_tokens_cancel_and_bad_requests(model):
    engine = InferenceEngine(model, block_size=4, num_blocks=20)
    scheduler = Scheduler(engine, "splitfuse", token_budget=32)
    r = requests(1, seed=6, new=(10, 10))[0]
    first = reference(model, r)[2]
    r.stop_ids = frozenset({first})
    run(scheduler, [r])
    assert r.finish_reason == "stop" and r.generated[-1] == first and len(r.generated) <= 3
    other = requests(2, seed=7)
    for q in other:
        scheduler.add(q)
    scheduler.step()
    assert scheduler.cancel(other[0].uid).finish_reason == "cancelled"
    assert scheduler.cancel(12345) is None
    with pytest.raises(ValueError, match="the prompt is empty"):
        scheduler.add(Request(uid=5, prompt=[], max_tokens=3))
    with pytest.raises(ValueError, match="at most 63 in the prompt"):
        scheduler.add(Request(uid=5, prompt=[1] * 64, max_tokens=3))
    with pytest.raises(ValueError, match="needs up to 6 KV blocks and the cache has 3"):
        Scheduler(InferenceEngine(model, block_size=4, num_blocks=3)).add(Request(uid=5, prompt=[1] * 20,
                                                                                    max_tokens=3))
    with pytest.raises(ValueError, match="policy='fifo'"):
        Scheduler(engine, "fifo")


@pytest.mark.parametrize("policy", ["splitfuse", "prefill-first", "static"])
def test_no_more_sequences_run_than_max_seqs(model, policy):
    engine = InferenceEngine(model, block_size=4, num_blocks=80)
    scheduler = Scheduler(engine, policy, token_budget=24, max_seqs=3)  # prompts span several forwards
    reqs = requests(8, seed=8, lengths=(10, 30), new=(2, 5))
    for r in reqs:
        scheduler.add(r)
    while not scheduler.idle:
        result = scheduler.step()
        assert len(scheduler.running) <= 3 and result.batch_seqs <= 3
    assert all(r.generated == reference(model, r) for r in reqs)
