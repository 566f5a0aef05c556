"""Loading a model for inference (any saved layout into any serving layout) and generating text:
on the engine (KV cache, batched, across ranks), or by recomputing the whole context per token
(the reference)."""

from __future__ import annotations

from pathlib import Path

import torch

from tedmoe.inference.engine import InferenceEngine, inference_config
from tedmoe.inference.sampling import SamplingParams, sample
from tedmoe.model.transformer import GPTMoE
from tedmoe.parallel.topology import Topology
from tedmoe.runtime import loading
from tedmoe.runtime.loading import is_hf_directory, model_config_of, resolve_checkpoint, trained_compression

__all__ = ["generate", "generate_batch", "is_hf_directory", "load_model", "model_config_of", "resolve_checkpoint",
           "trained_compression"]


def load_model(path: str | Path, topology: Topology | None = None, routing: str | None = None,
               device=None) -> tuple[GPTMoE, object]:
    """``tedmoe.runtime.loading.load_model`` for inference: ``routing`` ``None`` keeps the trained
    config; ``dropless`` / ``training`` as ``inference_config``."""
    return loading.load_model(path, topology, None if routing is None else lambda c: inference_config(c, routing),
                              device)


def check_prompt(ids: list[int], vocab_size: int) -> None:
    if not ids:
        raise ValueError("the prompt is empty; give at least one character with --prompt (the model continues it)")
    if any(not 0 <= i < vocab_size for i in ids):
        raise ValueError(f"the prompt has token ids outside the model's vocabulary of {vocab_size}")


def sampling_params(temperature: float, top_k: int | None, greedy: bool) -> SamplingParams:
    if temperature <= 0 and not greedy:
        raise ValueError(f"temperature={temperature} must be > 0 (or use --greedy)")
    return SamplingParams(temperature=0.0 if greedy else temperature, top_k=top_k or 0)


@torch.no_grad()
def generate(model: GPTMoE, ids: list[int], max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             greedy: bool = False, seed: int = 0) -> list[int]:
    """Append ``max_new_tokens`` tokens to ``ids`` by running the whole context again for every
    token (the context is cropped to ``max_seq_len``): the reference the engine is held to."""
    check_prompt(ids, model.config.vocab_size)
    params = sampling_params(temperature, top_k, greedy)
    g = torch.Generator().manual_seed(seed)
    out = list(ids)
    for _ in range(max_new_tokens):
        context = torch.tensor([out[-model.config.max_seq_len:]])
        out.append(sample(model.logits(context)[0, -1], params, g))
    return out


def generate_batch(engine: InferenceEngine, prompts: list[list[int]], max_new_tokens: int,
                   params: SamplingParams, seed: int = 0) -> list[list[int]]:
    """Continue every prompt by ``max_new_tokens`` tokens on the engine (leader rank): one forward
    takes all prompts, then each forward one new token of every sequence. Sequence i samples from
    its own generator seeded ``seed + i``. A sequence stops at ``max_seq_len``, or when the KV cache
    has no block left for it (earlier sequences first)."""
    for p in prompts:
        check_prompt(p, engine.config.vocab_size)
    params.validate()
    uids = list(range(len(prompts)))
    if not engine.can_schedule(uids, [len(p) for p in prompts]):
        raise ValueError(f"the prompts ({sum(map(len, prompts))} tokens) do not fit the KV cache of "
                         f"{engine.capacity_tokens} tokens or the model's max_seq_len={engine.config.max_seq_len}")
    gens = [torch.Generator().manual_seed(seed + i) for i in uids]
    out = [list(p) for p in prompts]
    live, chunks = uids, [list(p) for p in prompts]
    try:
        for _ in range(max_new_tokens):
            logits = engine.put(live, chunks)
            for uid, row in zip(live, logits):
                out[uid].append(sample(row, params, gens[uid]))
            go = []  # continue while the cache holds the next token of all of them together
            for u in live:
                if len(out[u]) < engine.config.max_seq_len and engine.can_schedule(go + [u], [1] * (len(go) + 1)):
                    go.append(u)
            live = go
            if not live:
                break
            chunks = [[out[u][-1]] for u in live]
    finally:
        for uid in uids:
            engine.flush(uid)
    return out
