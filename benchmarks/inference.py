"""Generation throughput on CPU: tedmoe's inference engine (blocked KV cache, ragged batches) vs the
old recompute-everything ``generate`` vs Hugging Face transformers' ``generate`` (its default KV
cache), on the same random-weight Mixtral-style model, in one run.

Reproduce:  .venv/bin/python benchmarks/inference.py            (~290M parameters: V=32000, H=1024, 8 layers,
                                                                 16 heads / 4 kv heads, 8 SwiGLU experts F=1024,
                                                                 top-2; batches 1, 8, 32; prompts of 128; 32 new)
            .venv/bin/python benchmarks/inference.py --ragged   (prompt lengths 128 +-30%; transformers gets
                                                                 left padding and an attention mask)
            .venv/bin/python benchmarks/inference.py --quick    (a small model, batches 1 and 4: a smoke run)

Single process, fp32, torch threads = the machine's cores for every contender, no gradients.
Prompts are random token ids (the same in every round). Each contender prefills its B prompts in
one forward and then decodes N new tokens greedily, one forward per token:

- ours: ``InferenceEngine.put`` with all prompts, then one ``put`` per step with each sequence's
  last token (argmax on the returned logits), then ``flush``; dropless routing
  (``inference_config``);
- recompute: ``tedmoe.inference.generate.generate(..., greedy=True)``, which runs the whole context
  again for every token, one sequence at a time; it is slow, so it runs only at the batch sizes in
  ``--recompute-batches`` (default 1) with ``--recompute-tokens`` new tokens (default 8): its row
  says so;
- transformers: ``model.generate(ids, attention_mask, generation_config)`` with do_sample=False,
  max_new_tokens = min_new_tokens = N, no EOS, pad id 0, its default cache (DynamicCache), its
  default attention (sdpa) and experts implementation (printed), on the weights of our model
  exported by ``tedmoe.interop.hf.save`` and loaded by ``AutoModelForCausalLM.from_pretrained``.
  Skipped (one printed line) when transformers does not import.

Prefill vs decode: every contender is timed inside one generation call by time stamps taken when
each next token is known: ours after each ``put`` + argmax, recompute after each ``model.logits``
(an instance wrapper), transformers by a ``StoppingCriteria`` (called by ``generate`` after every
token it appends; it never stops anything). Prefill = start to the first token (the first forward
over all prompts, transformers' set-up included); prompt tok/s = real prompt tokens / prefill
(padding not counted); decode tok/s = B x (N - 1) / (first token to last token). One forward per
token everywhere, so nothing is subtracted.

Rounds: ``--rounds`` (default 3) after one untimed warm-up generation per contender; in each
round every batch size runs every contender back to back (their order rotates from round to
round). This machine's speed drifts by tens of percent between seconds, so "vs transformers" is
the median over rounds of the ratio of decode tok/s (or prompt tok/s) within a round; the other
columns are medians of the rounds.

Also: greedy tokens of ours vs transformers (every sequence, first round) and vs recompute; KV
cache bytes per token (ours: ``engine.bytes_per_token``, and the preallocated pool; transformers:
the bytes of its cache tensors after generation / the token slots they hold); the split of our
decode time between ``model.forward_cached`` and the rest of ``put`` (Python bookkeeping of the
block tables) + argmax; and (unless ``--no-profile``) the top operators by self CPU time in a few
profiled decode steps of ours and of transformers at ``--profile-batches``.
Prints tables and writes benchmarks/results/inference-<date>.json (all raw timings and medians).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.metadata
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

OURS, RECOMPUTE, HF = "ours", "recompute", "transformers"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def model_config(args) -> ModelConfig:
    moe = MoEConfig(ffn_hidden_size=args.expert_ffn, num_experts=args.experts, top_k=2, activation="swiglu")
    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                      num_kv_heads=args.kv_heads, ffn_hidden_size=args.expert_ffn, moe_every=1,
                      max_seq_len=args.max_seq_len, moe=moe)
    return inference_config(cfg)


def make_prompts(args, B: int, seed: int) -> list[list[int]]:
    """B prompts of random ids (3.. V-1, clear of the usual special ids); lengths ``prompt_len``, or
    uniform in +-30% of it with ``--ragged``."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (round(0.7 * args.prompt_len), round(1.3 * args.prompt_len)) if args.ragged else \
        (args.prompt_len, args.prompt_len)
    lengths = torch.randint(lo, hi + 1, (B,), generator=g).tolist()
    return [torch.randint(3, args.vocab, (n,), generator=g).tolist() for n in lengths]


# ---- the contenders: each returns {"prefill_s", "decode_s", "tokens": [[new ids] per sequence], ...} ------


def run_ours(engine: InferenceEngine, prompts: list[list[int]], n: int) -> dict:
    """One put with every prompt, then one put per step with each sequence's last token."""
    model = engine.model
    forward = model.forward_cached
    fwd_times: list[float] = []

    def timed_forward(*a, **kw):
        t = time.perf_counter()
        out = forward(*a, **kw)
        fwd_times.append(time.perf_counter() - t)
        return out

    model.forward_cached = timed_forward  # instance attribute: times the model inside put
    uids = list(range(len(prompts)))
    out: list[list[int]] = [[] for _ in uids]
    try:
        t0 = time.perf_counter()
        logits = engine.put(uids, prompts)
        nxt = logits.argmax(-1).tolist()
        t1 = time.perf_counter()
        for _ in range(n - 1):
            for o, t in zip(out, nxt):
                o.append(t)
            logits = engine.put(uids, [[t] for t in nxt])
            nxt = logits.argmax(-1).tolist()
        t2 = time.perf_counter()
        for o, t in zip(out, nxt):
            o.append(t)
    finally:
        del model.forward_cached
        for uid in uids:
            engine.flush(uid)
    decode_fwd = sum(fwd_times[1:])
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "prefill_forward_s": fwd_times[0],
            "decode_forward_s": decode_fwd, "decode_outside_forward_s": (t2 - t1) - decode_fwd, "tokens": out}


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
    return {"prefill_s": prefill, "decode_s": decode, "tokens": out}


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


def run_hf(hf_model, prompts: list[list[int]], n: int, gen_config) -> dict:
    from transformers import StoppingCriteria, StoppingCriteriaList

    stamps: list[float] = []

    class Stamp(StoppingCriteria):  # called after every appended token; never stops
        def __call__(self, input_ids, scores, **kwargs):
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    ids, mask = hf_inputs(prompts)
    with torch.no_grad():
        t0 = time.perf_counter()
        res = hf_model.generate(ids, attention_mask=mask, generation_config=gen_config,
                                stopping_criteria=StoppingCriteriaList([Stamp()]))
        t2 = time.perf_counter()
    seqs = res.sequences[:, ids.shape[1]:]
    assert seqs.shape[1] == n and len(stamps) == n, (seqs.shape, len(stamps))
    kv, slots = cache_bytes(returned_cache(res))
    return {"prefill_s": stamps[0] - t0, "decode_s": t2 - stamps[0], "tokens": seqs.tolist(),
            "kv_cache_bytes": kv, "kv_cache_slots": slots * len(prompts),
            "kv_cache_real_tokens": sum(map(len, prompts)) + len(prompts) * (n - 1)}


# ---- set-up ---------------------------------------------------------------------------------------


def load_transformers(model: GPTMoE, cfg: ModelConfig, tmp: str):
    """Our weights as a transformers model (or the reason it is skipped)."""
    try:
        import transformers  # noqa: F401
        from transformers import AutoModelForCausalLM, GenerationConfig
    except Exception as err:  # noqa: BLE001 - any import failure skips the peer
        return None, None, f"{type(err).__name__}: {err}"
    from transformers.utils import logging as hf_logging

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


def profile_decode(fn_prefill, fn_step, steps: int, top: int) -> list[dict]:
    """Top operators by self CPU time over ``steps`` profiled decode steps (after an unprofiled prefill)."""
    from torch.profiler import profile

    state = fn_prefill()
    with profile() as prof:
        for _ in range(steps):
            state = fn_step(state)
    rows = sorted(prof.key_averages(), key=lambda r: -r.self_cpu_time_total)
    total = sum(r.self_cpu_time_total for r in rows)
    return [{"op": r.key, "self_ms_per_step": r.self_cpu_time_total / 1e3 / steps, "calls_per_step": r.count / steps,
             "share": r.self_cpu_time_total / total} for r in rows[:top]] + \
        [{"op": "(total)", "self_ms_per_step": total / 1e3 / steps, "calls_per_step": 0, "share": 1.0}]


def profiles(args, engine, hf_model, B: int) -> dict:
    prompts = make_prompts(args, B, seed=1000 + B)
    uids = list(range(B))
    result = {}

    def ours_prefill():
        return engine.put(uids, prompts).argmax(-1).tolist()

    def ours_step(nxt):
        return engine.put(uids, [[t] for t in nxt]).argmax(-1).tolist()

    try:
        result[OURS] = profile_decode(ours_prefill, ours_step, args.profile_steps, args.profile_top)
    finally:
        for u in uids:
            engine.flush(u)
    if hf_model is not None:
        import inspect

        ids, mask = hf_inputs(prompts)
        cache_kw = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"

        def hf_prefill():
            with torch.no_grad():
                out = hf_model(input_ids=ids, attention_mask=mask, use_cache=True)
            return returned_cache(out), out.logits[:, -1].argmax(-1, keepdim=True), mask

        def hf_step(state):
            cache, nxt, m = state
            m = torch.cat([m, m.new_ones(B, 1)], 1)
            with torch.no_grad():
                out = hf_model(input_ids=nxt, attention_mask=m, **{cache_kw: cache}, use_cache=True)
            return returned_cache(out), out.logits[:, -1].argmax(-1, keepdim=True), m

        result[HF] = profile_decode(hf_prefill, hf_step, args.profile_steps, args.profile_top)
    return result


# ---- the run ------------------------------------------------------------------------------------


def median(xs):
    return statistics.median(xs) if xs else None


def main() -> int:
    args = parse_args()
    torch.set_num_threads(cores())
    torch.manual_seed(0)
    cfg = model_config(args)
    counts = count_parameters(cfg)
    model = GPTMoE(cfg, Topology.single())
    model.init_weights(args.seed)
    model.eval()
    engine = InferenceEngine(model, block_size=args.block_size,
                             num_blocks=-(-(max(args.batches) * (round(1.3 * args.prompt_len) + args.new_tokens + 1)) //
                                          args.block_size) + 1)
    print(f"model: V={cfg.vocab_size} H={cfg.hidden_size} layers={cfg.num_layers} heads={cfg.num_heads}/"
          f"{cfg.kv_heads} kv, {cfg.moe.num_experts} SwiGLU experts F={cfg.moe.ffn_hidden_size} top-{cfg.moe.top_k}, "
          f"moe_every=1: {counts['total'] / 1e6:.1f}M parameters ({counts['active_per_token'] / 1e6:.1f}M active per "
          f"token), fp32; torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    print(f"prompts: {args.prompt_len} tokens{' +-30% (ragged)' if args.ragged else ''}, {args.new_tokens} new tokens "
          f"greedy; batches {args.batches}; {args.rounds} rounds; KV cache pool {engine.capacity_tokens} tokens "
          f"({engine.cache.nbytes / 2**20:.0f} MiB, block {args.block_size})")

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

    gens = {}

    def contenders(B: int):
        names = [OURS] + ([HF] if hf_model is not None else []) + ([RECOMPUTE] if B in args.recompute_batches else [])
        return names

    def run(name: str, prompts, n: int) -> dict:
        if name == OURS:
            return run_ours(engine, prompts, n)
        if name == RECOMPUTE:
            return run_recompute(model, prompts, min(n, args.recompute_tokens))
        if n not in gens:
            gens[n] = hf_generation_config(gen_base, n)
        return run_hf(hf_model, prompts, n, gens[n])

    # warm-up: every contender once, small (first-call allocations, lazy imports)
    warm = make_prompts(args, 2, seed=999)
    for name in [OURS] + ([HF] if hf_model is not None else []) + [RECOMPUTE]:
        run(name, warm[:1] if name == RECOMPUTE else warm, 3)

    raw = {B: {name: [] for name in contenders(B)} for B in args.batches}
    agreement = {}
    t_start = time.perf_counter()
    for r in range(args.rounds):
        for B in args.batches:
            prompts = make_prompts(args, B, seed=B)
            names = contenders(B)
            names = names[r % len(names):] + names[:r % len(names)]  # rotate the order round by round
            tokens = {}
            for name in names:
                res = run(name, prompts if name != RECOMPUTE else prompts[:B], args.new_tokens)
                n_new = len(res["tokens"][0])
                res["round"], res["new_tokens"] = r, n_new
                res["prompt_tokens"] = sum(map(len, prompts))
                res["prompt_tok_s"] = res["prompt_tokens"] / res["prefill_s"]
                res["decode_tok_s"] = B * (n_new - 1) / res["decode_s"] if n_new > 1 else None
                tokens[name] = res.pop("tokens")
                raw[B][name].append(res)
                print(f"  round {r} B={B:>3} {name:>12}: prefill {res['prefill_s']:7.2f} s "
                      f"({res['prompt_tok_s']:7.1f} tok/s), decode {res['decode_s']:7.2f} s "
                      f"({res['decode_tok_s'] or 0:7.1f} tok/s)", flush=True)
            if r == 0:
                agreement[B] = agree(tokens)
    elapsed = time.perf_counter() - t_start

    rows = summarize(raw, hf_model is not None)
    print_table(args, rows, hf_model is not None)
    print("\ngreedy tokens, first round (sequences whose new tokens all agree / first token agrees / all):")
    for B, a in agreement.items():
        print(f"  B={B}: " + "; ".join(f"{k}: {v['all_agree']}/{v['first_agree']}/{v['sequences']} "
                                         f"(first {v['compared_tokens']} tokens)" for k, v in a.items()))

    memory = {"ours_bytes_per_token": engine.bytes_per_token, "ours_pool_bytes": engine.cache.nbytes,
              "ours_pool_tokens": engine.capacity_tokens, "ours_block_size": args.block_size}
    if hf_model is not None:
        last = raw[max(args.batches)][HF][-1]
        memory.update(transformers_cache_bytes=last["kv_cache_bytes"], transformers_cache_slots=last["kv_cache_slots"],
                      transformers_bytes_per_slot=last["kv_cache_bytes"] / last["kv_cache_slots"],
                      transformers_bytes_per_real_token=last["kv_cache_bytes"] / last["kv_cache_real_tokens"])
    print("\nKV cache per token: ours " + f"{engine.bytes_per_token} B (pool of {engine.capacity_tokens} tokens "
          f"preallocated: {engine.cache.nbytes / 2**20:.1f} MiB; a sequence holds ceil(len / {args.block_size}) blocks)")
    if hf_model is not None:
        print(f"                    transformers {memory['transformers_bytes_per_slot']:.0f} B per cached slot, "
              f"{memory['transformers_bytes_per_real_token']:.0f} B per real token "
              f"(B={max(args.batches)}: {memory['transformers_cache_bytes'] / 2**20:.1f} MiB after generation, "
              "grown by concatenation)")

    split = {}
    print("\nours, decode time split (median over rounds, ms per step): model.forward_cached | rest of put + argmax")
    for B in args.batches:
        runs = raw[B][OURS]
        steps = max(runs[0]["new_tokens"] - 1, 1)
        fwd = median([x["decode_forward_s"] for x in runs]) * 1e3 / steps
        rest = median([x["decode_outside_forward_s"] for x in runs]) * 1e3 / steps
        split[B] = {"forward_ms_per_step": fwd, "outside_forward_ms_per_step": rest}
        print(f"  B={B:>3}: {fwd:8.2f} | {rest:6.2f}  ({100 * rest / (fwd + rest):.1f}% outside the forward)")

    prof = {}
    for B in [] if args.no_profile else args.profile_batches:
        prof[str(B)] = profiles(args, engine, hf_model, B)
        for name, ops in prof[str(B)].items():
            print(f"\n{name}: top ops by self CPU time, {args.profile_steps} profiled decode steps at B={B}")
            print(f"  {'op':<44} {'ms/step':>8} {'calls/step':>10} {'share':>6}")
            for o in ops:
                print(f"  {o['op'][:44]:<44} {o['self_ms_per_step']:8.2f} {o['calls_per_step']:10.1f} "
                      f"{100 * o['share']:5.1f}%")

    config = {k: v for k, v in vars(args).items()}
    config["model"] = dataclasses.asdict(cfg)
    result = {"parameters": counts, "cores": cores(), **hf_info, "elapsed_s": elapsed,
              "rows": rows, "raw": {str(B): v for B, v in raw.items()},
              "agreement_first_round": {str(B): v for B, v in agreement.items()}, "kv_cache": memory,
              "ours_decode_split": {str(B): v for B, v in split.items()}, "profile": prof}
    common.write_result("inference", config, result)
    return 0


def agree(tokens: dict[str, list[list[int]]]) -> dict:
    """Ours vs each other contender: sequences whose compared tokens all agree, whose first agrees."""
    out = {}
    for name, other in tokens.items():
        if name == OURS:
            continue
        ours = tokens[OURS][:len(other)]
        n = min(len(other[0]), len(ours[0]))
        out[f"ours vs {name}"] = {"sequences": len(other), "compared_tokens": n,
                                  "all_agree": sum(a[:n] == b[:n] for a, b in zip(ours, other)),
                                  "first_agree": sum(a[0] == b[0] for a, b in zip(ours, other)),
                                  "agreeing_prefix_mean": statistics.mean(
                                      next((i for i in range(n) if a[i] != b[i]), n) for a, b in zip(ours, other))}
    return out


def summarize(raw: dict, have_hf: bool) -> list[dict]:
    rows = []
    for B, by_name in raw.items():
        for name, runs in by_name.items():
            row = {"batch": B, "contender": name, "new_tokens": runs[0]["new_tokens"],
                   "prompt_tok_s": median([x["prompt_tok_s"] for x in runs]),
                   "decode_tok_s": median([x["decode_tok_s"] for x in runs if x["decode_tok_s"]]),
                   "prefill_s": median([x["prefill_s"] for x in runs]),
                   "decode_ms_per_forward": median([x["decode_s"] / max(x["new_tokens"] - 1, 1) for x in runs]) * 1e3
                   / (B if name == RECOMPUTE else 1)}
            if have_hf:  # ratios within each round, then their median
                hf = {x["round"]: x for x in by_name[HF]}
                row["decode_vs_transformers"] = median([x["decode_tok_s"] / hf[x["round"]]["decode_tok_s"]
                                                        for x in runs if x["decode_tok_s"]])
                row["prompt_vs_transformers"] = median([x["prompt_tok_s"] / hf[x["round"]]["prompt_tok_s"]
                                                        for x in runs])
                row["decode_vs_transformers_rounds"] = [x["decode_tok_s"] / hf[x["round"]]["decode_tok_s"]
                                                        for x in runs if x["decode_tok_s"]]
            rows.append(row)
    return rows


def print_table(args, rows: list[dict], have_hf: bool) -> None:
    print(f"\nmedians of {args.rounds} rounds; 'vs transformers' = median of the within-round ratios")
    head = f"| {'B':>3} | {'contender':<26} | {'prompt tok/s':>12} | {'decode tok/s':>12} | {'ms/fwd':>8} |"
    if have_hf:
        head += f" {'prompt vs transformers':>22} | {'decode vs transformers':>22} |"
    print(head)
    print("|" + "|".join("-" * (len(c) + 0) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        name = r["contender"] + (f" ({r['new_tokens']} new)" if r["new_tokens"] != args.new_tokens else "")
        line = f"| {r['batch']:>3} | {name:<26} | {r['prompt_tok_s']:>12.1f} | {r['decode_tok_s'] or 0:>12.2f} | " \
               f"{r['decode_ms_per_forward']:>8.1f} |"
        if have_hf:
            line += f" {r['prompt_vs_transformers']:>22.2f} | {r['decode_vs_transformers']:>22.2f} |"
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
                   help="batch sizes at which the old recompute generate runs (default 1)")
    p.add_argument("--recompute-tokens", type=int, help="its new tokens (default 8; quick 4)")
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
    if round(1.3 * args.prompt_len) + args.new_tokens > args.max_seq_len:
        p.error(f"--max-seq-len {args.max_seq_len} is shorter than the longest prompt + new tokens")
    return args


if __name__ == "__main__":
    sys.exit(main())
