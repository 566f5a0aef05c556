"""Serving under load (DeepSpeed-FastGen's method, scaled to this CPU): closed-loop streaming clients
against a real ``tedmoe serve`` over loopback HTTP, per scheduling policy (Dynamic SplitFuse,
prefill-first continuous batching, static batches) and number of concurrent clients.

Reproduce:  .venv/bin/python benchmarks/serving.py            (H=256, 4 layers, 4 heads, 8 SwiGLU experts F=256,
                                                              top-2; prompts 256 +-30%, 32 +-30% new tokens;
                                                              1, 4, 16, 32 clients; token budget 256, and SplitFuse
                                                              with budgets 128 and 512 at 16 and 32 clients)
            .venv/bin/python benchmarks/serving.py --quick    (a small model, few requests, 1 and 4 clients:
                                                              a smoke run, under 2 minutes)

The model: a random-weight Mixtral-style ``GPTMoE`` (``init_weights(0)``) written as a Hugging Face
directory by ``tedmoe.interop.hf.save`` with the byte tokenizer, in a temporary directory. Its output
rows for bytes 128..255 are zeroed, so greedy decoding only ever picks ASCII bytes (the largest of
the other 128 logits is above 0): every token is then a whole character and the server streams it
as its own event (a byte >= 128 is an incomplete UTF-8 character, held back and merged into a later
event, which would hide its time). Byte models have no EOS, so every request generates exactly
``max_tokens``; the client checks that it received that many token events.

The servers: one ``python -m tedmoe.cli serve --ckpt DIR --port 0 --policy P --token-budget B
--max-seqs 32`` per policy (and per extra SplitFuse budget), all started fresh at the beginning and
warmed up with ``--warmup`` requests (4 at once); they stay up (idle) together, so the cells of one
client count run back to back, server after server, their order rotating from one client count to
the next (this machine is shared: its speed drifts by tens of percent over minutes, and running
policy after policy would put a drift between them); all stopped with SIGTERM at the end (exit code
must be 0). Server and clients share this machine's 2 cores, so the server runs its forwards on
``--server-threads`` (default 1) torch threads, and this process's own forwards (below) too:
measured here, with 2 OpenMP threads a forward becomes 5-35x slower as soon as any other process
(the clients, the server's own HTTP thread, other work on the machine) wants a core, while with 1
thread it degrades in proportion.

The load: for C clients, a list of ``--requests`` requests (200; fewer where a cell is slow:
``--single-requests`` 40 at 1 client, ``--low-requests`` 100 at 4 clients and for static) is drawn
once from a seed that depends only on C, so every policy gets the same requests: prompt length uniform in [0.7 m, 1.3 m] around ``--prompt-mean`` m (random token ids,
sent as a token list, so the length is exact) and ``max_tokens`` uniform in [0.7 g, 1.3 g] around
``--gen-mean`` g; ``temperature`` 0, ``stream`` true. Each client sends its next request as soon as
its previous one ends (closed loop) until the list is used up. Times are taken by the client
(``time.perf_counter`` when each SSE line arrives): TTFT from sending to the first token event;
token gaps between consecutive token events of a request.

Per cell (policy, budget, clients): throughput = requests / wall time of the cell (first send to
last finish, so the last wave, with fewer clients busy, is included) and generated tokens / s;
TTFT median and P95; per-token latency = the gaps between consecutive streamed tokens of all
requests pooled, median and P95 (the raw file also has each request's mean gap); effective throughput
= requests that meet the SLA / wall time.

The SLA (scaled to this machine, as FastGen scaled theirs to their hardware): before the cells, one
more fresh server (prefill-first, so a prompt is one forward), idle and warmed up, answers
``--calibration`` single requests of exactly m prompt tokens and g new tokens, one at a time. T_prefill = median TTFT / m
(seconds per prompt token, HTTP included); decode rate = median of (g - 1) / (last token time -
first token time). A request meets the SLA when
    TTFT <= 0.5 s + 4 x T_prefill x its prompt length   and
    its generation rate (tokens after the first / time after the first) >= decode rate / 4
and it received all its tokens without an error. The calibration server is then stopped.

Also, in this process on the same weights (no HTTP): the cost of one engine forward by shape
(a prompt chunk of N tokens, B decodes, B decodes + a prompt chunk: what SplitFuse fuses), and a
replay of the closed loop at ``--replay-clients`` driving ``tedmoe.inference.scheduler.Scheduler``
directly, which records every forward (its decode and prompt tokens, its time) per policy: what the
forwards look like and where the time goes, without HTTP.

Prints tables and writes benchmarks/results/serving-<date>.json: the summaries (configuration, model,
forward costs, each replay's summary, SLA and calibration, servers, each cell's summary as in the
table, the SplitFuse / prefill-first ratios); next to it serving-<date>.raw.json.gz, the raw data as
gzip-compressed JSON (``calibration``: the calibration requests' records; ``cells``: each cell's
every request record, with policy, budget, clients, prompt and generation length, TTFT, token times,
SLA verdict; ``replay``: each replay's every forward); and a PNG, drawn from the summaries:
effective throughput and P95 per-token latency vs clients, per policy.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tedmoe.config import ModelConfig, MoEConfig
from tedmoe.model.transformer import GPTMoE, count_parameters
from tedmoe.parallel.topology import Topology

import common

POLICIES = ("splitfuse", "prefill-first", "static")


# ---- the model --------------------------------------------------------------------------------
def model_config(args) -> ModelConfig:
    moe = MoEConfig(ffn_hidden_size=args.ffn, num_experts=args.experts, top_k=2, activation="swiglu")
    longest = int(1.3 * args.prompt_mean) + int(1.3 * args.gen_mean) + 2
    seq = 1 << max(longest - 1, 1).bit_length()
    return ModelConfig(vocab_size=256, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                       ffn_hidden_size=2 * args.ffn, max_seq_len=seq, moe_every=1, moe=moe)


def write_model(cfg: ModelConfig, out: Path) -> Path:
    """Random weights (seed 0), output rows of bytes >= 128 zeroed (greedy tokens are ASCII)."""
    from tedmoe.data.tokenizer import ByteTokenizer
    from tedmoe.interop import hf

    model = GPTMoE(cfg, Topology.single())
    model.init_weights(0)
    with torch.no_grad():
        model.head.weight[128:] = 0
    return hf.save(model.state_dict(), cfg, out, ByteTokenizer())


# ---- forward costs and the in-process replay ----------------------------------------------------
def median_ms(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def forward_costs(engine, args) -> list[dict]:
    """Median ms of one ``engine.put`` by shape: a fresh prompt chunk of N tokens, B decodes (each at
    a context of m), and B decodes + a chunk of budget - B tokens (a SplitFuse forward)."""
    rng = random.Random(1)
    m = args.prompt_mean
    rows, uid = [], [10**6]

    def fresh(n):
        def run():
            uid[0] += 1
            engine.put([uid[0]], [[rng.randrange(256) for _ in range(n)]])
            engine.flush(uid[0])
        return run

    for n in args.cost_prompts:
        rows.append({"shape": f"prompt chunk {n}", "decodes": 0, "prompt_tokens": n, "ms": median_ms(fresh(n), args.cost_repeats)})
    for b in args.cost_decodes:
        uids = list(range(b))
        engine.put(uids, [[rng.randrange(256) for _ in range(m)] for _ in uids])

        def decodes():  # every call adds a token to each context: they stay a few tokens over m
            engine.put(uids, [[1]] * b)

        def fused(extra):  # the decodes and a fresh prompt chunk in one forward
            def run():
                uid[0] += 1
                engine.put(uids + [uid[0]], [[1]] * b + [[rng.randrange(256) for _ in range(extra)]])
                engine.flush(uid[0])
            return run

        rows.append({"shape": f"{b} decodes", "decodes": b, "prompt_tokens": 0, "ms": median_ms(decodes, args.cost_repeats)})
        extra = min(args.token_budget - b, engine.config.max_seq_len - 1)
        if extra > 1:
            rows.append({"shape": f"{b} decodes + chunk {extra}", "decodes": b, "prompt_tokens": extra,
                         "ms": median_ms(fused(extra), args.cost_repeats)})
        for u in uids:
            engine.flush(u)
    for r in rows:
        r["ms_per_token"] = r["ms"] / (r["decodes"] + r["prompt_tokens"])
    return rows


def draw_requests(args, clients: int, n: int) -> list[dict]:
    """``n`` request specs for a cell with ``clients`` clients (the same for every policy)."""
    rng = random.Random(args.seed * 1000 + clients)
    specs = []
    for i in range(n):
        p = rng.randint(round(0.7 * args.prompt_mean), round(1.3 * args.prompt_mean))
        g = rng.randint(round(0.7 * args.gen_mean), round(1.3 * args.gen_mean))
        specs.append({"prompt": [rng.randrange(256) for _ in range(p)], "max_tokens": g, "seed": i})
    return specs


def replay(engine, args, policy: str, budget: int, clients: int, specs: list[dict]) -> dict:
    """The closed loop without HTTP: ``clients`` requests in flight, a new one added as soon as one
    finishes; every forward recorded (decode tokens, prompt tokens, sequences, forward and step ms)."""
    from tedmoe.inference.sampling import SamplingParams
    from tedmoe.inference.scheduler import Request, Scheduler

    sched = Scheduler(engine, policy, budget, args.max_seqs)
    put = engine.put
    forwards: list[dict] = []

    def timed_put(uids, chunks):
        t0 = time.perf_counter()
        out = put(uids, chunks)
        forwards.append({"decodes": sum(len(c) == 1 for c in chunks), "prompt_tokens": sum(len(c) for c in chunks if len(c) > 1),
                         "seqs": len(chunks), "forward_ms": 1e3 * (time.perf_counter() - t0)})
        return out

    engine.put = timed_put
    todo = list(enumerate(specs))
    sent: dict[int, float] = {}
    done: list[dict] = []
    first_tok: dict[int, float] = {}
    last_tok: dict[int, float] = {}
    gaps: list[float] = []

    def submit():
        i, s = todo.pop(0)
        sent[i] = time.perf_counter()
        sched.add(Request(uid=i, prompt=s["prompt"], max_tokens=s["max_tokens"], params=SamplingParams(temperature=0)))

    try:
        t0 = time.perf_counter()
        for _ in range(min(clients, len(todo))):
            submit()
        while not sched.idle:
            ts = time.perf_counter()
            res = sched.step()
            now = time.perf_counter()
            if forwards:
                forwards[-1]["step_ms"] = 1e3 * (now - ts)
            for r, _ in res.tokens:
                if r.uid not in first_tok:
                    first_tok[r.uid] = now
                else:
                    gaps.append(now - last_tok[r.uid])
                last_tok[r.uid] = now
            for r in res.finished:
                done.append({"ttft": first_tok[r.uid] - sent[r.uid], "tokens": len(r.generated)})
                if todo:
                    submit()
        wall = time.perf_counter() - t0
    finally:
        del engine.put
    fwd = sum(f["forward_ms"] for f in forwards) / 1e3
    step = sum(f.get("step_ms", 0) for f in forwards) / 1e3
    toks = [f["decodes"] + f["prompt_tokens"] for f in forwards]
    return {"policy": policy, "token_budget": budget, "clients": clients, "requests": len(done), "wall_s": wall,
            "requests_per_s": len(done) / wall, "tokens_per_s": sum(d["tokens"] for d in done) / wall,
            "forwards": len(forwards), "forward_s": fwd, "step_s": step, "forward_share": fwd / wall,
            "tokens_per_forward_mean": statistics.mean(toks), "tokens_per_forward_max": max(toks),
            "prompt_forwards": sum(f["prompt_tokens"] > 0 for f in forwards),
            "decode_only_forwards": sum(f["prompt_tokens"] == 0 for f in forwards),
            "decode_only_ms_median": _median([f["forward_ms"] for f in forwards if f["prompt_tokens"] == 0]),
            "with_prompt_ms_median": _median([f["forward_ms"] for f in forwards if f["prompt_tokens"] > 0]),
            "ttft_p50": _pct([d["ttft"] for d in done], 50), "gap_p50_ms": _ms(_pct(gaps, 50)),
            "gap_p95_ms": _ms(_pct(gaps, 95)), "forward_log": forwards}


def _median(xs):
    return statistics.median(xs) if xs else None


def _ms(x):
    return None if x is None else 1e3 * x


def _pct(xs, q):
    if not xs:
        return None
    import numpy as np

    return float(np.percentile(np.asarray(xs, dtype=float), q))


# ---- the server -------------------------------------------------------------------------------
class Server:
    """``tedmoe serve`` in a child process; ``url`` once it listens."""

    def __init__(self, ckpt: Path, policy: str, budget: int, args, log_dir: Path):
        cmd = [sys.executable, "-m", "tedmoe.cli", "serve", "--ckpt", str(ckpt), "--port", "0", "--policy", policy,
               "--token-budget", str(budget), "--max-seqs", str(args.max_seqs), "--kv-memory-gib", str(args.kv_memory_gib)]
        env = dict(os.environ)
        if args.server_threads:
            env["OMP_NUM_THREADS"] = str(args.server_threads)
        self.policy, self.budget, self.cmd = policy, budget, cmd
        self.log = log_dir / f"server-{policy}-{budget}-{time.monotonic_ns()}.log"
        self.err = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=self.err, text=True)
        self.started = time.perf_counter()
        deadline = time.monotonic() + 300
        while True:
            text = self.log.read_text()
            found = re.search(r"tedmoe: serving \S+ at (http://\S+/v1)(.*)", text)
            if found:
                self.url, self.banner = found.group(1), found.group(0)
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"the server did not start (exit {self.proc.poll()}):\n{text}")
            time.sleep(0.1)

    def stop(self) -> dict:
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.err.close()
        text = self.log.read_text()
        return {"policy": self.policy, "token_budget": self.budget, "command": " ".join(self.cmd[1:]),
                "banner": self.banner, "exit_code": code, "stderr_tail": text.strip().splitlines()[-3:]}


# ---- the clients ------------------------------------------------------------------------------
async def one_request(client, url: str, spec: dict, t_zero: float) -> dict:
    body = {"prompt": spec["prompt"], "max_tokens": spec["max_tokens"], "temperature": 0, "stream": True,
            "seed": spec["seed"]}
    rec = {"prompt_len": len(spec["prompt"]), "gen_len": spec["max_tokens"], "error": None, "finish_reason": None}
    times = []
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", url + "/completions", json=body) as resp:
            if resp.status_code != 200:
                rec["error"] = f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}"
            else:
                async for line in resp.aiter_lines():
                    now = time.perf_counter()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        rec["error"] = str(event["error"])[:300]
                        continue
                    choices = event.get("choices") or []
                    if choices:
                        if choices[0].get("text"):
                            times.append(now - t0)
                        if choices[0].get("finish_reason"):
                            rec["finish_reason"] = choices[0]["finish_reason"]
                    if event.get("usage"):
                        rec["completion_tokens"] = event["usage"].get("completion_tokens")
    except Exception as err:  # a failed request is a record too
        rec["error"] = f"{type(err).__name__}: {err}"[:300]
    rec["start"] = t0 - t_zero
    rec["end"] = time.perf_counter() - t_zero
    rec["token_times"] = [round(t, 6) for t in times]
    rec["tokens"] = len(times)
    rec["ttft"] = times[0] if times else None
    return rec


async def closed_loop(url: str, specs: list[dict], clients: int) -> tuple[list[dict], float]:
    import httpx

    todo = list(specs)
    records: list[dict] = []
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(None)) as client:
        t_zero = time.perf_counter()

        async def worker(k: int):
            while todo:
                rec = await one_request(client, url, todo.pop(0), t_zero)
                rec["client"] = k
                records.append(rec)

        await asyncio.gather(*(worker(k) for k in range(clients)))
        wall = time.perf_counter() - t_zero
    return records, wall


def run_load(url: str, specs: list[dict], clients: int) -> tuple[list[dict], float]:
    return asyncio.run(closed_loop(url, specs, clients))


# ---- SLA and summaries ------------------------------------------------------------------------
def calibrate(url: str, args) -> dict:
    m, g = args.prompt_mean, args.gen_mean
    rng = random.Random(args.seed + 7)
    specs = [{"prompt": [rng.randrange(256) for _ in range(m)], "max_tokens": g, "seed": i}
             for i in range(args.calibration)]
    recs = []
    for s in specs:
        recs += run_load(url, [s], 1)[0]
    bad = [r for r in recs if r["error"] or r["tokens"] != g]
    if bad:
        raise RuntimeError(f"calibration requests failed: {bad[0]['error'] or bad[0]['tokens']}")
    ttft = statistics.median(r["ttft"] for r in recs)
    rate = statistics.median((g - 1) / (r["token_times"][-1] - r["token_times"][0]) for r in recs)
    return {"prompt_tokens": m, "gen_tokens": g, "requests": len(recs), "ttft_median_s": ttft,
            "prefill_s_per_token": ttft / m, "decode_tokens_per_s": rate,
            "sla_ttft": f"TTFT <= 0.5 s + 4 x {ttft / m * 1e3:.3f} ms x prompt_len",
            "sla_ttft_base_s": 0.5, "sla_ttft_per_prompt_token_s": 4 * ttft / m,
            "sla_min_gen_rate": rate / 4, "records": recs}


def judge(rec: dict, sla: dict) -> None:
    """Adds the request's generation rate, gaps and whether it meets the SLA."""
    t = rec["token_times"]
    rec["gen_rate"] = (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 and t[-1] > t[0] else None
    rec["mean_gap"] = (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None
    complete = rec["error"] is None and rec["tokens"] == rec["gen_len"]
    rec["ttft_ok"] = rec["ttft"] is not None and rec["ttft"] <= sla["sla_ttft_base_s"] + sla["sla_ttft_per_prompt_token_s"] * rec["prompt_len"]
    rec["rate_ok"] = rec["gen_rate"] is not None and rec["gen_rate"] >= sla["sla_min_gen_rate"]
    rec["sla_ok"] = bool(complete and rec["ttft_ok"] and rec["rate_ok"])


def summarize(records: list[dict], wall: float) -> dict:
    ok = [r for r in records if r["error"] is None]
    gaps = [b - a for r in ok for a, b in zip(r["token_times"], r["token_times"][1:])]
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    return {"requests": len(records), "errors": len(records) - len(ok),
            "incomplete": sum(r["tokens"] != r["gen_len"] for r in records), "wall_s": wall,
            "requests_per_s": len(ok) / wall, "gen_tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "ttft_p50_s": _pct(ttfts, 50), "ttft_p95_s": _pct(ttfts, 95),
            "gap_p50_ms": _ms(_pct(gaps, 50)), "gap_p95_ms": _ms(_pct(gaps, 95)),
            "request_mean_gap_p50_ms": _ms(_pct([r["mean_gap"] for r in ok if r["mean_gap"]], 50)),
            "request_mean_gap_p95_ms": _ms(_pct([r["mean_gap"] for r in ok if r["mean_gap"]], 95)),
            "ttft_ok": sum(r["ttft_ok"] for r in records), "rate_ok": sum(r["rate_ok"] for r in records),
            "sla_ok": sum(r["sla_ok"] for r in records), "sla_fraction": sum(r["sla_ok"] for r in records) / len(records),
            "effective_requests_per_s": sum(r["sla_ok"] for r in records) / wall}


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def print_table(cells: list[dict], sla: dict) -> None:
    print(f"\nSLA: TTFT <= 0.5 s + prompt_len x {1e3 * sla['sla_ttft_per_prompt_token_s']:.3f} ms "
          f"(4 x T_prefill {1e3 * sla['prefill_s_per_token']:.3f} ms/token) and generation rate >= "
          f"{sla['sla_min_gen_rate']:.1f} tok/s (1/4 of the single-request {sla['decode_tokens_per_s']:.1f} tok/s)")
    print("gap = time between consecutive streamed tokens, all requests pooled; eff. req/s = requests meeting the SLA / wall time")
    head = ["policy", "budget", "clients", "reqs", "wall s", "req/s", "gen tok/s", "TTFT p50 s", "TTFT p95 s",
            "gap p50 ms", "gap p95 ms", "TTFT ok", "rate ok", "SLA met", "eff. req/s"]
    print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
    for c in cells:
        s = c["summary"]
        row = [c["policy"], str(c["token_budget"]) if c["policy"] == "splitfuse" else "-", str(c["clients"]),
               str(s["requests"]) + (f" ({s['errors']} err)" if s["errors"] else ""), fmt(s["wall_s"], ".1f"),
               fmt(s["requests_per_s"]), fmt(s["gen_tokens_per_s"], ".1f"), fmt(s["ttft_p50_s"], ".3f"),
               fmt(s["ttft_p95_s"], ".3f"), fmt(s["gap_p50_ms"], ".1f"), fmt(s["gap_p95_ms"], ".1f"),
               f"{s['ttft_ok']}", f"{s['rate_ok']}", f"{100 * s['sla_fraction']:.0f}%", fmt(s["effective_requests_per_s"])]
        print("| " + " | ".join(row) + " |")


def print_ratios(cells: list[dict], budget: int) -> list[dict]:
    """SplitFuse (each budget) vs prefill-first at every client count both ran."""
    pf = {c["clients"]: c["summary"] for c in cells if c["policy"] == "prefill-first"}
    out = []
    for c in cells:
        if c["policy"] != "splitfuse" or c["clients"] not in pf:
            continue
        s, p = c["summary"], pf[c["clients"]]
        out.append({"token_budget": c["token_budget"], "clients": c["clients"],
                    "effective_ratio": s["effective_requests_per_s"] / p["effective_requests_per_s"] if p["effective_requests_per_s"] else None,
                    "throughput_ratio": s["requests_per_s"] / p["requests_per_s"],
                    "gap_p95_ratio": s["gap_p95_ms"] / p["gap_p95_ms"], "ttft_p95_ratio": s["ttft_p95_s"] / p["ttft_p95_s"]})
    if out:
        print(f"\nSplitFuse / prefill-first (same clients, same requests; the main budget is {budget}):")
        print("| budget | clients | effective req/s ratio | req/s ratio | gap P95 ratio | TTFT P95 ratio |\n" + "|---" * 6 + "|")
        for o in out:
            print(f"| {o['token_budget']} | {o['clients']} | {fmt(o['effective_ratio'])} | {fmt(o['throughput_ratio'])} "
                  f"| {fmt(o['gap_p95_ratio'])} | {fmt(o['ttft_p95_ratio'])} |")
    return out


def split_raw(result: dict) -> dict:
    """Takes what ``result`` holds per request and per forward out of it (in place) and returns it,
    for the raw file: the calibration requests' records, each cell's records and each replay's
    forward log, cells and replays named by policy, budget and clients. What stays is the summaries."""
    def named(d: dict, key: str) -> dict:
        return {"policy": d["policy"], "token_budget": d["token_budget"], "clients": d["clients"], key: d.pop(key)}

    return {"calibration": result.get("sla", {}).pop("records", []),
            "cells": [named(c, "records") for c in result.get("cells", []) if "records" in c],
            "replay": [named(r, "forward_log") for r in result.get("replay", []) if "forward_log" in r]}


def write_raw(path: Path, raw: dict) -> Path:
    """``raw`` as gzip-compressed JSON next to the result ``path``: ``<its name>.raw.json.gz`` (no
    time stamp in the gzip header: the same data gives the same bytes). Prints and returns its path."""
    out = path.with_name(path.stem + ".raw.json.gz")
    with open(out, "xb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as z:
        z.write(json.dumps(raw, default=str).encode())
    print(f"wrote {out.relative_to(common.ROOT)}")
    return out


def plot(cells: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[str, list] = {}
    for c in cells:
        key = c["policy"] + (f" (budget {c['token_budget']})" if c["policy"] == "splitfuse" else "")
        series.setdefault(key, []).append(c)
    for key, cs in series.items():
        cs = sorted(cs, key=lambda c: c["clients"])
        x = [c["clients"] for c in cs]
        style = "o-" if len(cs) > 2 else "s--"  # the extra SplitFuse budgets: a few client counts
        a.plot(x, [c["summary"]["effective_requests_per_s"] for c in cs], style, label=key)
        b.plot(x, [c["summary"]["gap_p95_ms"] for c in cs], style, label=key)
    from matplotlib.ticker import ScalarFormatter

    clients = sorted({c["clients"] for c in cells})
    for ax, ylabel in ((a, "effective throughput (requests/s meeting the SLA)"), (b, "P95 per-token latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(clients, [str(c) for c in clients])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    b.set_yscale("log")
    b.yaxis.set_major_formatter(ScalarFormatter())
    b.yaxis.set_minor_formatter(ScalarFormatter())
    a.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path.relative_to(common.ROOT)}")


# ---- main -------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small model, few requests, 1 and 4 clients: a smoke run")
    p.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    p.add_argument("--clients", type=int, nargs="+", help="concurrent clients per cell (default 1 4 16 32)")
    p.add_argument("--requests", type=int, help="requests per cell (default 200)")
    p.add_argument("--low-requests", type=int, help="requests per cell at 2-15 clients and for static "
                   "(default 100)")
    p.add_argument("--single-requests", type=int, help="requests per cell at 1 client (default 40)")
    p.add_argument("--prompt-mean", type=int, help="mean prompt tokens (default 256; drawn +-30%%)")
    p.add_argument("--gen-mean", type=int, help="mean new tokens (default 32; drawn +-30%%)")
    p.add_argument("--token-budget", type=int, default=256, help="the servers' --token-budget (SplitFuse's)")
    p.add_argument("--sweep-budgets", type=int, nargs="*", help="more SplitFuse servers with these budgets, at "
                   "--sweep-clients (default 128 512)")
    p.add_argument("--sweep-clients", type=int, nargs="+", default=[16, 32])
    p.add_argument("--max-seqs", type=int, default=32)
    p.add_argument("--kv-memory-gib", type=float, default=0.25)
    p.add_argument("--server-threads", type=int, default=1, help="OMP_NUM_THREADS for the server and torch threads "
                   "for this process's forwards (0: torch's default)")
    p.add_argument("--warmup", type=int, default=4, help="requests (at once) before a server's first cell")
    p.add_argument("--calibration", type=int, default=5, help="single requests that set the SLA")
    p.add_argument("--replay-clients", type=int, nargs="*", help="in-process replay of the closed loop at these "
                   "client counts, every policy (default 16; none: skip)")
    p.add_argument("--replay-requests", type=int, help="requests per replay (default 64)")
    p.add_argument("--hidden", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--experts", type=int)
    p.add_argument("--ffn", type=int, help="each expert's hidden width")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    quick = dict(clients=[1, 4], requests=12, low_requests=8, single_requests=8, prompt_mean=64, gen_mean=16, sweep_budgets=[],
                 replay_clients=[4], replay_requests=8, hidden=64, layers=2, heads=4, experts=4, ffn=128)
    full = dict(clients=[1, 4, 16, 32], requests=200, low_requests=100, single_requests=40, prompt_mean=256, gen_mean=32,
                sweep_budgets=[128, 512], replay_clients=[16, 32], replay_requests=48, hidden=256, layers=4, heads=4,
                experts=8, ffn=256)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.cost_prompts = [16, 64, 128, 256, 512] if not args.quick else [16, 64]
    args.cost_decodes = [1, 4, 16, 32] if not args.quick else [1, 4]
    args.cost_repeats = 5 if not args.quick else 2
    if args.quick:
        args.calibration = min(args.calibration, 3)
        args.warmup = min(args.warmup, 2)
    return args


def requests_for(args, policy: str, clients: int) -> int:
    if clients == 1:
        return min(args.requests, args.single_requests)
    return args.requests if clients >= 16 and policy != "static" else min(args.requests, args.low_requests)


def main() -> int:
    args = parse_args()
    if args.server_threads:  # this process's forwards (costs, replay) run as the server's do
        torch.set_num_threads(args.server_threads)
    cfg = model_config(args)
    params = count_parameters(cfg)
    print(f"model: H={cfg.hidden_size} L={cfg.num_layers} heads={cfg.num_heads} E={cfg.moe.num_experts} "
          f"F={cfg.moe.ffn_hidden_size} top-2 SwiGLU, max_seq_len {cfg.max_seq_len}, {params['total'] / 1e6:.1f}M "
          f"parameters ({params['active_per_token'] / 1e6:.1f}M active); prompts {args.prompt_mean} +-30%, "
          f"{args.gen_mean} +-30% new tokens; torch {torch.__version__}, {torch.get_num_threads()} threads")
    result: dict = {"model": {"hidden": cfg.hidden_size, "layers": cfg.num_layers, "heads": cfg.num_heads,
                              "experts": cfg.moe.num_experts, "expert_ffn": cfg.moe.ffn_hidden_size, "top_k": 2,
                              "max_seq_len": cfg.max_seq_len, "parameters": params}}
    servers: list[dict] = []
    cells: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="tedmoe-serving-") as tmp:
        tmp = Path(tmp)
        ckpt = write_model(cfg, tmp / "serving-model")

        # the engine in this process: forward costs, then the replay (before any server runs)
        from tedmoe.inference.engine import InferenceEngine
        from tedmoe.inference.generate import load_model

        model, _ = load_model(ckpt, routing="dropless")
        engine = InferenceEngine(model, kv_bytes=int(args.kv_memory_gib * 2**30))
        result["forward_costs"] = costs = forward_costs(engine, args)
        print("\nOne engine forward in this process (median ms; decodes at a context of ~prompt mean):")
        print("| forward | ms | ms per token |\n|---|---|---|")
        for r in costs:
            print(f"| {r['shape']} | {r['ms']:.1f} | {r['ms_per_token']:.2f} |")
        replays = []
        for clients in args.replay_clients:
            specs = draw_requests(args, clients, args.replay_requests)
            for policy in args.policies:
                for budget in [args.token_budget] + (args.sweep_budgets if policy == "splitfuse" else []):
                    replays.append(replay(engine, args, policy, budget, clients, specs))
        if replays:
            print(f"\nIn-process replay of the closed loop (Scheduler + engine, no HTTP; {args.replay_requests} requests):")
            print("| policy | budget | clients | req/s | gen tok/s | forwards | tokens/forward mean | max | with prompt "
                  "| decode-only | decode-only ms p50 | with prompt ms p50 | forward share of wall | TTFT p50 s "
                  "| gap p50 ms | gap p95 ms |\n" + "|---" * 16 + "|")
            for r in replays:
                print(f"| {r['policy']} | {r['token_budget'] if r['policy'] == 'splitfuse' else '-'} | {r['clients']} "
                      f"| {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | {r['forwards']} "
                      f"| {r['tokens_per_forward_mean']:.1f} | {r['tokens_per_forward_max']} | {r['prompt_forwards']} "
                      f"| {r['decode_only_forwards']} | {fmt(r['decode_only_ms_median'], '.1f')} "
                      f"| {fmt(r['with_prompt_ms_median'], '.1f')} | {r['forward_share']:.2f} | {fmt(r['ttft_p50'], '.3f')} "
                      f"| {fmt(r['gap_p50_ms'], '.1f')} | {fmt(r['gap_p95_ms'], '.1f')} |")
        result["replay"] = replays
        del engine, model

        # every server up at once (fresh, warmed up, idle between its cells), so that the cells of one
        # client count run back to back, their order rotating: drifts of this shared machine hit all alike
        plan = [(policy, args.token_budget, args.clients) for policy in args.policies]
        if "splitfuse" in args.policies:
            plan += [("splitfuse", b, args.sweep_clients) for b in args.sweep_budgets if b != args.token_budget]
        up: list[tuple[Server, list[int]]] = []
        try:
            for policy, budget, client_counts in plan:
                up.append((Server(ckpt, policy, budget, args, tmp), client_counts))
                print(f"\n{up[-1][0].banner}", flush=True)
                run_load(up[-1][0].url, draw_requests(args, 0, args.warmup), args.warmup)
            # the SLA, from single requests on an idle fresh server (prefill-first: a prompt is one forward)
            calib = Server(ckpt, "prefill-first", args.token_budget, args, tmp)
            try:
                run_load(calib.url, draw_requests(args, 0, args.warmup), args.warmup)
                sla = calibrate(calib.url, args)
            finally:
                servers.append(calib.stop())
            print(f"\ncalibration ({sla['requests']} single requests, {args.prompt_mean} prompt tokens, {args.gen_mean} "
                  f"new): TTFT median {sla['ttft_median_s'] * 1e3:.1f} ms = {sla['prefill_s_per_token'] * 1e3:.3f} ms per "
                  f"prompt token; decode {sla['decode_tokens_per_s']:.1f} tok/s", flush=True)
            result["sla"] = sla
            for k, clients in enumerate(sorted({c for _, _, cs in plan for c in cs})):
                here = [(server, cs) for server, cs in up if clients in cs]
                here = here[k % len(here):] + here[:k % len(here)]
                for server, _ in here:
                    policy, budget = server.policy, server.budget
                    n = requests_for(args, policy, clients)
                    records, wall = run_load(server.url, draw_requests(args, clients, n), clients)
                    for r in records:
                        r.update(policy=policy, token_budget=budget, clients=clients)
                        judge(r, sla)
                    cell = {"policy": policy, "token_budget": budget, "clients": clients, "order": len(cells),
                            "summary": summarize(records, wall), "records": sorted(records, key=lambda r: r["start"])}
                    cells.append(cell)
                    s = cell["summary"]
                    print(f"  {policy} (budget {budget}), {clients:>2} clients: {n} requests in {wall:.1f} s, "
                          f"{s['requests_per_s']:.2f} req/s, TTFT p95 {fmt(s['ttft_p95_s'], '.3f')} s, gap p95 "
                          f"{fmt(s['gap_p95_ms'], '.1f')} ms, SLA met {s['sla_ok']}/{n}, errors {s['errors']}, "
                          f"incomplete {s['incomplete']}", flush=True)
        finally:
            for server, _ in up:
                servers.append(server.stop())
                print(f"server {server.policy} (budget {server.budget}) stopped: exit code {servers[-1]['exit_code']}",
                      flush=True)
        cells.sort(key=lambda c: (POLICIES.index(c["policy"]), c["token_budget"] != args.token_budget,
                                  c["token_budget"], c["clients"]))

    print_table(cells, sla)
    result["splitfuse_vs_prefill_first"] = print_ratios(cells, args.token_budget)
    result["servers"] = servers
    result["cells"] = cells
    result["raw"] = "the request records (calibration, cells) and replay forwards: <this file's name>.raw.json.gz"
    raw = split_raw(result)  # the cells keep their summaries, which the plot draws
    bad_exit = [s for s in servers if s["exit_code"] != 0]
    for s in bad_exit:
        print(f"server {s['policy']} (budget {s['token_budget']}) exited with {s['exit_code']}: {s['stderr_tail']}",
              file=sys.stderr)
    config = {k: v for k, v in vars(args).items()}
    path = common.write_result("serving", config, result)
    write_raw(path, raw)
    plot(cells, path.with_suffix(".png"),
         f"tedmoe serve, {params['total'] / 1e6:.1f}M-param MoE on {os.cpu_count()} CPU cores; prompts {args.prompt_mean}"
         f"+-30%, {args.gen_mean}+-30% new tokens; SLA: TTFT <= 0.5 s + {1e3 * sla['sla_ttft_per_prompt_token_s']:.2f} ms"
         f" x prompt, >= {sla['sla_min_gen_rate']:.1f} tok/s")
    errors = sum(c["summary"]["errors"] + c["summary"]["incomplete"] for c in cells)
    return 1 if bad_exit or errors else 0


if __name__ == "__main__":
    sys.exit(main())
