"""Generation throughput on CPU: tedmoe's inference engine (blocked KV cache, ragged batches) vs the
old recompute-everything ``generate`` vs Hugging Face transformers (its default KV cache), on the
same random-weight Mixtral-style model, in one run.

Reproduce:  .venv/bin/python benchmarks/inference.py            (~290M parameters: V=32000, H=1024, 8 layers,
                                                                 16 heads / 4 kv heads, 8 SwiGLU experts F=1024,
                                                                 top-2; batches 1, 8, 32; prompts of 128; 32 new)
            .venv/bin/python benchmarks/inference.py --ragged   (prompt lengths 128 +-30%; transformers gets
                                                                 left padding and an attention mask)
            .venv/bin/python benchmarks/inference.py --quick    (a small model, batches 1 and 4: a smoke run)
            .venv/bin/python benchmarks/inference.py --threads 1   (see the last paragraph)

Single process, fp32, torch threads = the machine's cores (``--threads``) for every contender, no
gradients.
Prompts are random token ids (the same in every round). Each contender prefills its B prompts in
one forward, then decodes N new tokens greedily, one forward per token (argmax of the logits):

- ours: ``InferenceEngine.put`` with all prompts, then one ``put`` per step with each sequence's
  last token, then ``flush``; dropless routing (``inference_config``);
- transformers: the same weights exported by ``tedmoe.interop.hf.save`` and loaded by
  ``AutoModelForCausalLM.from_pretrained`` (its default attention, sdpa, and experts
  implementation, printed), driven the way its ``generate`` drives it: a prefill forward with
  ``use_cache=True`` (a fresh DynamicCache, generate's default), left padding, its attention mask,
  position ids from the mask and ``logits_to_keep=1``, then one forward per token with the cache,
  the mask grown by one; called "transformers (loop)" below. This split is our choice (of the two
  the issue allows) because it lets the decode steps interleave with ours step by step (below).
  ``model.generate`` itself (do_sample=False, max_new_tokens = min_new_tokens = N, no EOS, pad 0,
  its default cache) also runs, in the first round only, timed as one unit with a time stamp from
  a ``StoppingCriteria`` (called after every token it appends; it stops nothing): its row shows
  what generate's own overhead adds, and its tokens are checked against the loop's and ours.
  Skipped (one printed line) when transformers does not import;
- recompute: ``tedmoe.inference.generate.generate(..., greedy=True)``, which runs the whole context
  again for every token, one sequence at a time (a stamp after every ``model.logits``, through an
  instance wrapper). It is slow, so it runs only at ``--recompute-batches`` (default 1) with
  ``--recompute-tokens`` new tokens (default 8), as one unit after the others; its row says so.

Timing: prefill = the first forward (all prompts) + its argmax; prompt tok/s = real prompt tokens
/ prefill (padding not counted). Decode tok/s = B x (N - 1) / the sum of the N - 1 decode steps.
This machine's speed drifts by tens of percent between seconds (2 cores shared with other work),
so within a round the contenders' prefills run back to back and their decode steps alternate
step by step (ours, transformers, transformers, ours, ...; the first contender rotates from round
to round). "vs transformers" is the median over ``--rounds`` (default 3) of the ratio within a
round (of the sums of steps); "step pairs" is the median over every round's adjacent pairs of
decode steps of transformers' step time / ours. Other columns are medians of the rounds. One
untimed warm-up generation per contender comes first.

Also: greedy tokens of ours vs transformers (loop and generate) and vs recompute, every sequence,
first round; KV cache bytes per token (ours: ``engine.bytes_per_token``, and the preallocated
pool; transformers: the bytes of its cache tensors after the last step / the token slots they
hold, and / the real tokens); the split of our decode time between ``model.forward_cached`` and
the rest of ``put`` (Python bookkeeping of the block tables) + argmax; and (unless
``--no-profile``) the top operators by self CPU time over a few profiled decode steps of ours and
of transformers (loop) at ``--profile-batches``. The 1-minute load average is recorded with every
unit (other work on the machine shows there). Prints tables and writes
benchmarks/results/inference-<date>.json (all raw timings, per step, and the medians).

On a machine whose cores other processes share, a torch op that runs on all the cores waits
whenever one of its threads is descheduled (a scheduler slice, milliseconds), so a decode step
then costs about its number of parallel ops times a slice, whatever their size: rounds differ by
up to 7x, and the contender with fewer ops per step looks better (transformers' grouped_mm on CPU
runs one ``mm`` per expert). The load column shows when that happened; ``--threads 1`` measures
the work itself, steadier there.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.metadata
import inspect
import os
import statistics
import sys
import tempfile
import time

import torch

from tedmoe.config import ModelConfig, MoEConfig
from tedmoe.inference import generate as tedgen
from tedmoe.inference.engine import InferenceEngine, inference_config
from tedmoe.model.transformer import GPTMoE, count_parameters
from tedmoe.parallel.topology import Topology

import common

OURS, HF, HF_GEN, RECOMPUTE = "ours", "transformers (loop)", "transformers generate()", "recompute"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def load() -> float:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return float("nan")


def model_config(args) -> ModelConfig:
    moe = MoEConfig(ffn_hidden_size=args.expert_ffn, num_experts=args.experts, top_k=2, activation="swiglu")
    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                      num_kv_heads=args.kv_heads, ffn_hidden_size=args.expert_ffn, moe_every=1,
                      max_seq_len=args.max_seq_len, moe=moe)
    return inference_config(cfg)


def make_prompts(args, B: int, seed: int) -> list[list[int]]:
    """B prompts of random ids (3 .. V-1, clear of the usual special ids); lengths ``prompt_len``, or
    uniform in +-30% of it with ``--ragged``."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (round(0.7 * args.prompt_len), round(1.3 * args.prompt_len)) if args.ragged else \
        (args.prompt_len, args.prompt_len)
    lengths = torch.randint(lo, hi + 1, (B,), generator=g).tolist()
    return [torch.randint(3, args.vocab, (n,), generator=g).tolist() for n in lengths]


# ---- step-wise drivers: prefill(prompts) -> state, step(state) -> state, finish(state) -> new tokens ----


class Ours:
    """The engine through ``put``; ``forward_s`` collects the time of every ``model.forward_cached``."""

    def __init__(self, engine: InferenceEngine):
        self.engine, self.forward_s = engine, []

    def _put(self, uids, chunks) -> list[int]:
        model = self.engine.model
        forward = model.forward_cached

        def timed(*a, **kw):
            t = time.perf_counter()
            y = forward(*a, **kw)
            self.forward_s.append(time.perf_counter() - t)
            return y

        model.forward_cached = timed  # an instance attribute, for this put only
        try:
            return self.engine.put(uids, chunks).argmax(-1).tolist()
        finally:
            del model.forward_cached

    def prefill(self, prompts):
        uids = list(range(len(prompts)))
        return uids, [[t] for t in self._put(uids, prompts)]

    def step(self, state):
        uids, out = state
        for o, t in zip(out, self._put(uids, [o[-1:] for o in out])):
            o.append(t)
        return state

    def finish(self, state):
        uids, out = state
        for uid in uids:
            self.engine.flush(uid)
        return out


def hf_inputs(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids (pad 0) and the attention mask."""
    T = max(map(len, prompts))
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = 1
    return ids, mask


def returned_cache(out):
    """The cache of a transformers output (``cache`` in 5.x, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def cache_bytes(cache) -> tuple[int, int]:
    """(bytes of the key/value tensors, token slots per sequence) of a transformers cache."""
    layers = getattr(cache, "layers", None)
    pairs = [(layer.keys, layer.values) for layer in layers] if layers is not None else list(cache)
    total = sum(t.numel() * t.element_size() for kv in pairs for t in kv[:2])
    return total, pairs[0][0].shape[-2]


class Transformers:
    """transformers' model driven as its ``generate`` drives it (greedy, default DynamicCache)."""

    def __init__(self, hf_model):
        self.model = hf_model
        names = inspect.signature(hf_model.forward).parameters
        self.cache_kw = "cache" if "cache" in names else "past_key_values"

    def _forward(self, **kw):
        with torch.no_grad():
            out = self.model(**kw, use_cache=True, logits_to_keep=1)
        return returned_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)

    def prefill(self, prompts):
        ids, mask = hf_inputs(prompts)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache, nxt = self._forward(input_ids=ids, attention_mask=mask, position_ids=pos)
        return {"cache": cache, "mask": mask, "pos": pos[:, -1:], "out": [nxt], "real": sum(map(len, prompts))}

    def step(self, s):
        s["mask"] = torch.cat([s["mask"], s["mask"].new_ones(len(s["mask"]), 1)], 1)
        s["pos"] = s["pos"] + 1
        s["cache"], nxt = self._forward(input_ids=s["out"][-1], attention_mask=s["mask"], position_ids=s["pos"],
                                        **{self.cache_kw: s["cache"]})
        s["out"].append(nxt)
        return s

    def finish(self, s):
        self.last_cache = cache_bytes(s["cache"]) + (s["real"] + len(s["mask"]) * (len(s["out"]) - 1),)
        return torch.cat(s["out"], 1).tolist()


def interleaved(drivers: dict, prompts, n: int) -> dict[str, dict]:
    """Prefills back to back in ``drivers``' order, then the decode steps alternating (the order
    reversed every other step). Per contender: prefill seconds, every decode step's seconds, tokens."""
    states, res = {}, {name: {"load": load()} for name in drivers}
    for name, d in drivers.items():
        t0 = time.perf_counter()
        states[name] = d.prefill(prompts)
        res[name]["prefill_s"] = time.perf_counter() - t0
        res[name]["steps_s"] = []
    names = list(drivers)
    for i in range(n - 1):
        for name in names if i % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            states[name] = drivers[name].step(states[name])
            res[name]["steps_s"].append(time.perf_counter() - t0)
    for name, d in drivers.items():
        res[name]["tokens"] = d.finish(states[name])
        res[name]["decode_s"] = sum(res[name]["steps_s"])
    return res


# ---- units timed whole (stamps inside) --------------------------------------------------------------


def run_recompute(model: GPTMoE, prompts: list[list[int]], n: int) -> dict:
    """The old ``generate``, one sequence after the other; a stamp after every ``model.logits``."""
    logits = model.logits
    stamps: list[float] = []

    def stamped(*a, **kw):
        y = logits(*a, **kw)
        stamps.append(time.perf_counter())
        return y

    model.logits = stamped
    prefill = decode = 0.0
    out = []
    l0 = load()
    try:
        for p in prompts:
            stamps.clear()
            t0 = time.perf_counter()
            ids = tedgen.generate(model, p, n, greedy=True)
            t2 = time.perf_counter()
            prefill += stamps[0] - t0
            decode += t2 - stamps[0]
            out.append(ids[len(p):])
    finally:
        del model.logits
    return {"prefill_s": prefill, "decode_s": decode, "tokens": out, "load": l0}


def run_hf_generate(hf_model, prompts: list[list[int]], n: int, gen_config) -> dict:
    from transformers import StoppingCriteria, StoppingCriteriaList

    stamps: list[float] = []

    class Stamp(StoppingCriteria):  # called after every appended token; never stops
        def __call__(self, input_ids, scores, **kwargs):
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    ids, mask = hf_inputs(prompts)
    l0 = load()
    with torch.no_grad():
        t0 = time.perf_counter()
        res = hf_model.generate(ids, attention_mask=mask, generation_config=gen_config,
                                stopping_criteria=StoppingCriteriaList([Stamp()]))
        t2 = time.perf_counter()
    seqs = res.sequences[:, ids.shape[1]:]
    assert seqs.shape[1] == n and len(stamps) == n, (seqs.shape, len(stamps))
    kv, slots = cache_bytes(returned_cache(res))
    return {"prefill_s": stamps[0] - t0, "decode_s": t2 - stamps[0], "tokens": seqs.tolist(), "load": l0,
            "kv_cache_bytes": kv, "kv_cache_slots": slots * len(prompts)}


# ---- set-up -------------------------------------------------------------------------------------


def load_transformers(model: GPTMoE, cfg: ModelConfig, tmp: str):
    """Our weights as a transformers model and generate's config (or the reason it is skipped)."""
    try:
        from transformers import AutoModelForCausalLM, GenerationConfig
        from transformers.utils import logging as hf_logging
    except Exception as err:  # noqa: BLE001 - any import failure skips the peer
        return None, None, f"{type(err).__name__}: {err}"
    from tedmoe.interop import hf

    hf_logging.disable_progress_bar()
    path = hf.save(model.state_dict(), cfg, os.path.join(tmp, "hf"))
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    gen = GenerationConfig(do_sample=False, eos_token_id=None, bos_token_id=None, pad_token_id=0,
                           return_dict_in_generate=True)
    return hf_model, gen, None


def hf_generation_config(base, n: int):
    gen = copy.deepcopy(base)
    gen.max_new_tokens = gen.min_new_tokens = n
    return gen


def profile_decode(driver, prompts, steps: int, top: int) -> list[dict]:
    """Top operators by self CPU time over ``steps`` profiled decode steps (after an unprofiled prefill)."""
    from torch.profiler import profile

    state = driver.prefill(prompts)
    try:
        with profile() as prof:
            for _ in range(steps):
                state = driver.step(state)
    finally:
        driver.finish(state)
    rows = sorted(prof.key_averages(), key=lambda r: -r.self_cpu_time_total)
    total = sum(r.self_cpu_time_total for r in rows)
    return [{"op": r.key, "self_ms_per_step": r.self_cpu_time_total / 1e3 / steps, "calls_per_step": r.count / steps,
             "share": r.self_cpu_time_total / total} for r in rows[:top]] + \
        [{"op": "(total)", "self_ms_per_step": total / 1e3 / steps, "calls_per_step": 0, "share": 1.0}]


# ---- the run ------------------------------------------------------------------------------------


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads or cores())
    torch.manual_seed(0)
    cfg = model_config(args)
    counts = count_parameters(cfg)
    model = GPTMoE(cfg, Topology.single())
    model.init_weights(args.seed)
    model.eval()
    longest = round(1.3 * args.prompt_len) if args.ragged else args.prompt_len
    engine = InferenceEngine(model, block_size=args.block_size,
                             num_blocks=max(args.batches) * -(-(longest + args.new_tokens) // args.block_size))
    print(f"model: V={cfg.vocab_size} H={cfg.hidden_size} layers={cfg.num_layers} heads={cfg.num_heads}/"
          f"{cfg.kv_heads} kv, {cfg.moe.num_experts} SwiGLU experts F={cfg.moe.ffn_hidden_size} top-{cfg.moe.top_k}, "
          f"moe_every=1: {counts['total'] / 1e6:.1f}M parameters ({counts['active_per_token'] / 1e6:.1f}M active per "
          f"token), fp32; torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    print(f"prompts: {args.prompt_len} tokens{' +-30% (ragged)' if args.ragged else ''}, {args.new_tokens} new tokens "
          f"greedy; batches {args.batches}; {args.rounds} rounds; our KV cache pool {engine.capacity_tokens} tokens "
          f"({engine.cache.nbytes / 2**20:.0f} MiB, blocks of {args.block_size})")
    with tempfile.TemporaryDirectory() as tmp:  # kept while transformers may read its files
        hf_model, gen_base, skipped = (None, None, "--no-transformers") if args.no_transformers else \
            load_transformers(model, cfg, tmp)
        return measure(args, cfg, counts, model, engine, hf_model, gen_base, skipped)


def measure(args, cfg, counts, model, engine, hf_model, gen_base, skipped) -> int:
    hf_info = {}
    if hf_model is None:
        print(f"transformers skipped: {skipped}")
    else:
        hf_info = {"transformers": importlib.metadata.version("transformers"),
                   "attn_implementation": hf_model.config._attn_implementation,
                   "experts_implementation": getattr(hf_model.config, "_experts_implementation", None),
                   "cache": "DynamicCache (generate's default)"}
        print(f"transformers {hf_info['transformers']}: attention {hf_info['attn_implementation']}, experts "
              f"{hf_info['experts_implementation']}, {sum(p.numel() for p in hf_model.parameters()) / 1e6:.1f}M "
              "parameters")
    ours = Ours(engine)
    drivers = {OURS: ours} | ({HF: Transformers(hf_model)} if hf_model is not None else {})
    gens = {}

    def generate_hf(prompts, n):
        if n not in gens:
            gens[n] = hf_generation_config(gen_base, n)
        return run_hf_generate(hf_model, prompts, n, gens[n])

    warm = make_prompts(args, 2, seed=999)  # first-call allocations, lazy imports
    interleaved(drivers, warm, 3)
    run_recompute(model, warm[:1], 2)
    if hf_model is not None:
        generate_hf(warm, 3)

    raw = {B: {} for B in args.batches}
    agreement = {}
    t_start = time.perf_counter()
    for r in range(args.rounds):
        for B in args.batches:
            prompts = make_prompts(args, B, seed=B)
            names = list(drivers)
            names = names[r % len(names):] + names[:r % len(names)]  # who goes first rotates
            ours.forward_s = []
            res = interleaved({name: drivers[name] for name in names}, prompts, args.new_tokens)
            fwd = ours.forward_s
            res[OURS].update(prefill_forward_s=fwd[0], decode_forward_s=sum(fwd[1:]))
            res[OURS]["decode_outside_forward_s"] = res[OURS]["decode_s"] - res[OURS]["decode_forward_s"]
            if r == 0 and hf_model is not None:
                res[HF_GEN] = generate_hf(prompts, args.new_tokens)
            if B in args.recompute_batches:
                res[RECOMPUTE] = run_recompute(model, prompts, min(args.new_tokens, args.recompute_tokens))
            tokens = {}
            for name, x in res.items():
                n_new = len(x["tokens"][0])
                x.update(round=r, new_tokens=n_new, prompt_tokens=sum(map(len, prompts)))
                x["prompt_tok_s"] = x["prompt_tokens"] / x["prefill_s"]
                x["decode_tok_s"] = B * (n_new - 1) / x["decode_s"] if n_new > 1 else None
                tokens[name] = x.pop("tokens")
                raw[B].setdefault(name, []).append(x)
                print(f"  round {r} B={B:>3} {name:>23}: prefill {x['prefill_s']:7.2f} s ({x['prompt_tok_s']:7.1f} "
                      f"tok/s), decode {x['decode_s']:7.2f} s ({x['decode_tok_s'] or 0:7.2f} tok/s), load {x['load']:.1f}",
                      flush=True)
            if r == 0:
                agreement[B] = agree(tokens)
    elapsed = time.perf_counter() - t_start

    rows = summarize(raw, hf_model is not None)
    print_table(args, rows, hf_model is not None)
    print("\ngreedy tokens, first round: sequences whose compared new tokens all agree / whose first agrees / all")
    for B, a in agreement.items():
        print(f"  B={B}: " + "; ".join(f"{k}: {v['all_agree']}/{v['first_agree']}/{v['sequences']} "
                                         f"(first {v['compared_tokens']} tokens)" for k, v in a.items()))

    memory = {"ours_bytes_per_token": engine.bytes_per_token, "ours_pool_bytes": engine.cache.nbytes,
              "ours_pool_tokens": engine.capacity_tokens, "ours_block_size": args.block_size}
    print(f"\nKV cache per token: ours {engine.bytes_per_token} B (a pool of {engine.capacity_tokens} tokens, "
          f"{engine.cache.nbytes / 2**20:.1f} MiB, allocated up front; a sequence holds ceil(len / {args.block_size}) "
          "blocks)")
    if hf_model is not None:
        kv, slots, real = drivers[HF].last_cache
        memory.update(transformers_batch=max(args.batches), transformers_cache_bytes=kv,
                      transformers_cache_slots=slots * max(args.batches), transformers_real_tokens=real,
                      transformers_bytes_per_slot=kv / (slots * max(args.batches)),
                      transformers_bytes_per_real_token=kv / real)
        print(f"                    transformers {memory['transformers_bytes_per_slot']:.0f} B per cached slot, "
              f"{memory['transformers_bytes_per_real_token']:.0f} B per real token (B={max(args.batches)}: "
              f"{kv / 2**20:.1f} MiB after the last step; DynamicCache grows by concatenation)")

    split = {}
    print("\nours, decode time per step (median over rounds): model.forward_cached | the rest of put + argmax")
    for B in args.batches:
        runs = raw[B][OURS]
        steps = max(runs[0]["new_tokens"] - 1, 1)
        fwd = median([x["decode_forward_s"] for x in runs]) * 1e3 / steps
        rest = median([x["decode_outside_forward_s"] for x in runs]) * 1e3 / steps
        split[B] = {"forward_ms_per_step": fwd, "outside_forward_ms_per_step": rest}
        print(f"  B={B:>3}: {fwd:8.2f} ms | {rest:6.2f} ms  ({100 * rest / (fwd + rest):.1f}% outside the forward)")

    prof = {}
    for B in [] if args.no_profile else args.profile_batches:
        prompts = make_prompts(args, B, seed=B)
        prof[str(B)] = {"load": load()}
        for name, d in drivers.items():
            ops = prof[str(B)][name] = profile_decode(d, prompts, args.profile_steps, args.profile_top)
            print(f"\n{name}: top ops by self CPU time, {args.profile_steps} profiled decode steps at B={B} "
                  f"(load {prof[str(B)]['load']:.1f})")
            print(f"  {'op':<44} {'ms/step':>8} {'calls/step':>10} {'share':>6}")
            for o in ops:
                print(f"  {o['op'][:44]:<44} {o['self_ms_per_step']:8.2f} {o['calls_per_step']:10.1f} "
                      f"{100 * o['share']:5.1f}%")

    config = dict(vars(args))
    config["model"] = dataclasses.asdict(cfg)
    result = {"parameters": counts, "cores": cores(), **hf_info, "elapsed_s": elapsed, "rows": rows,
              "raw": {str(B): v for B, v in raw.items()},
              "agreement_first_round": {str(B): v for B, v in agreement.items()}, "kv_cache": memory,
              "ours_decode_split": {str(B): v for B, v in split.items()}, "profile": prof}
    common.write_result("inference", config, result)
    return 0


def agree(tokens: dict[str, list[list[int]]]) -> dict:
    """Ours vs each other contender: sequences whose compared tokens all agree, whose first agrees,
    and the mean length of the agreeing prefix; and transformers' loop vs its generate()."""
    pairs = [(OURS, name) for name in tokens if name != OURS]
    if HF in tokens and HF_GEN in tokens:
        pairs.append((HF, HF_GEN))
    out = {}
    for a_name, b_name in pairs:
        other = tokens[b_name]
        mine = tokens[a_name][:len(other)]
        n = min(len(other[0]), len(mine[0]))
        out[f"{a_name} vs {b_name}"] = {
            "sequences": len(other), "compared_tokens": n,
            "all_agree": sum(a[:n] == b[:n] for a, b in zip(mine, other)),
            "first_agree": sum(a[0] == b[0] for a, b in zip(mine, other)),
            "agreeing_prefix_mean": statistics.mean(next((i for i in range(n) if a[i] != b[i]), n)
                                                    for a, b in zip(mine, other))}
    return out


def summarize(raw: dict, have_hf: bool) -> list[dict]:
    rows = []
    for B, by_name in raw.items():
        hf = {x["round"]: x for x in by_name.get(HF, [])}
        for name, runs in by_name.items():
            row = {"batch": B, "contender": name, "rounds": len(runs), "new_tokens": runs[0]["new_tokens"],
                   "prompt_tok_s": median([x["prompt_tok_s"] for x in runs]),
                   "decode_tok_s": median([x["decode_tok_s"] for x in runs]),
                   "decode_tok_s_best": max((x["decode_tok_s"] or 0) for x in runs),
                   "prefill_s": median([x["prefill_s"] for x in runs]),
                   # one decode forward: for the whole batch; recompute's: one sequence's whole context
                   "decode_ms_per_forward": median([x["decode_s"] / max(x["new_tokens"] - 1, 1) for x in runs]) * 1e3
                   / (B if name == RECOMPUTE else 1)}
            if have_hf:  # ratios within each round, then their median
                row["prompt_vs_transformers"] = median([x["prompt_tok_s"] / hf[x["round"]]["prompt_tok_s"]
                                                        for x in runs])
                per_round = [x["decode_tok_s"] / hf[x["round"]]["decode_tok_s"] for x in runs if x["decode_tok_s"]]
                row["decode_vs_transformers"] = median(per_round)
                row["decode_vs_transformers_rounds"] = per_round
                if name == OURS:  # adjacent step pairs: transformers' step time / ours
                    row["decode_vs_transformers_step_pairs"] = median(
                        h / o for x in runs for h, o in zip(hf[x["round"]]["steps_s"], x["steps_s"]))
            rows.append(row)
    return rows


def print_table(args, rows: list[dict], have_hf: bool) -> None:
    print("\nmedians of the rounds; 'vs transformers' = median over rounds of the ratio within a round to "
          "transformers (loop); [min-max] over rounds; 'step pairs' = median of its step time / ours over adjacent "
          "decode steps")
    head = f"| {'B':>3} | {'contender':<36} | {'prompt tok/s':>12} | {'decode tok/s':>12} | {'ms/fwd':>8} |"
    if have_hf:
        head += f" {'prompt vs tf':>12} | {'decode vs tf [min-max]':>22} | {'step pairs':>10} |"
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        notes = [f"{r['new_tokens']} new"] if r["new_tokens"] != args.new_tokens else []
        if r["rounds"] != args.rounds:
            notes.append(f"{r['rounds']} round" + ("s" if r["rounds"] > 1 else ""))
        name = r["contender"] + (f" ({', '.join(notes)})" if notes else "")
        line = f"| {r['batch']:>3} | {name:<36} | {r['prompt_tok_s']:>12.1f} | {r['decode_tok_s'] or 0:>12.2f} | " \
               f"{r['decode_ms_per_forward']:>8.1f} |"
        if have_hf:
            rr = r["decode_vs_transformers_rounds"]
            span = f"{r['decode_vs_transformers']:.2f} [{min(rr):.2f}-{max(rr):.2f}]"
            pairs = r.get("decode_vs_transformers_step_pairs")
            line += f" {r['prompt_vs_transformers']:>12.2f} | {span:>22} | " \
                    f"{'' if pairs is None else f'{pairs:.2f}':>10} |"
        print(line)
    print("(ms/fwd: one decode forward, for the whole batch; recompute's forwards are one sequence's whole context)")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small model, batches 1 and 4, 1 round: a smoke run")
    p.add_argument("--vocab", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--experts", type=int)
    p.add_argument("--expert-ffn", type=int)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--batches", type=int, nargs="+")
    p.add_argument("--prompt-len", type=int)
    p.add_argument("--new-tokens", type=int)
    p.add_argument("--ragged", action="store_true", help="prompt lengths uniform in prompt_len +-30%%")
    p.add_argument("--rounds", type=int)
    p.add_argument("--recompute-batches", type=int, nargs="*", default=[1],
                   help="batch sizes at which the old recompute generate runs (default 1; none: skip it)")
    p.add_argument("--recompute-tokens", type=int, help="its new tokens (default 8; quick 4)")
    p.add_argument("--threads", type=int, help="torch threads for every contender (default: the machine's cores)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-transformers", action="store_true", help="ours and recompute only")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--profile-batches", type=int, nargs="*", help="default 1 8 (quick 1 4)")
    p.add_argument("--profile-steps", type=int, default=4)
    p.add_argument("--profile-top", type=int, default=15)
    args = p.parse_args()
    defaults = dict(vocab=1000, hidden=128, layers=2, heads=4, kv_heads=2, experts=4, expert_ffn=256,
                    batches=[1, 4], prompt_len=32, new_tokens=8, rounds=1, recompute_tokens=4, profile_batches=[1, 4]) \
        if args.quick else \
        dict(vocab=32000, hidden=1024, layers=8, heads=16, kv_heads=4, experts=8, expert_ffn=1024,
             batches=[1, 8, 32], prompt_len=128, new_tokens=32, rounds=3, recompute_tokens=8, profile_batches=[1, 8])
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (one prefill token, then decode)")
    if round(1.3 * args.prompt_len) + args.new_tokens > args.max_seq_len:
        p.error(f"--max-seq-len {args.max_seq_len} is shorter than the longest prompt + new tokens")
    return args


if __name__ == "__main__":
    sys.exit(main())
