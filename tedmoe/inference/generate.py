"""Loading a model for inference (any saved layout into any serving layout) and generating text:
on the engine (KV cache, batched, across ranks), or by recomputing the whole context per token
(the reference)."""

from __future__ import annotations

from pathlib import Path

import torch

from tedmoe.config import from_dict
from tedmoe.config.loader import model_config_from_dict
from tedmoe.data.tokenizer import load_tokenizer
from tedmoe.inference.engine import InferenceEngine, inference_config
from tedmoe.inference.sampling import SamplingParams, sample
from tedmoe.model.transformer import GPTMoE
from tedmoe.parallel.topology import Topology
from tedmoe.runtime.checkpoint import CheckpointError, latest_checkpoint, load_model_weights, read_meta


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the newest one of a run directory or a ``checkpoints/`` directory."""
    from tedmoe.data.dataset import is_dataset

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{path} does not exist; pass a run directory or a checkpoint directory")
    if is_dataset(p):
        raise CheckpointError(f"{path} is a prepared dataset, not a checkpoint; pass a run directory "
                              "(e.g. runs/default) or one of its checkpoints/step_* directories")
    if (p / "meta.json").is_file() and "config" in read_meta(p):
        return p
    for root in (p / "checkpoints", p):
        found = latest_checkpoint(root) if root.is_dir() else None
        if found is not None:
            return found
    raise CheckpointError(f"no complete checkpoint at {path}")


def is_hf_directory(path: str | Path) -> bool:
    """A Hugging Face model directory (its config.json names a ``model_type``; a run directory's
    config.json is tedmoe's own)."""
    import json

    p = Path(path) / "config.json"
    try:
        return p.is_file() and "model_type" in json.loads(p.read_text())
    except (ValueError, OSError):
        return False


def model_config_of(path: str | Path):
    """The ``ModelConfig`` of a run, a checkpoint, a Hugging Face or a compressed directory, without its weights."""
    from tedmoe.compress import model as compressed

    if compressed.is_compressed(path):
        return model_config_from_dict(compressed.read_meta(path)["model"])
    if is_hf_directory(path):
        from tedmoe.interop import hf

        return hf.read_config(path)
    return from_dict(read_meta(resolve_checkpoint(path))["config"]).model


def load_model(path: str | Path, topology: Topology | None = None, routing: str | None = None,
               device=None) -> tuple[GPTMoE, object]:
    """A run, a checkpoint, a Hugging Face or a compressed directory as a model in eval mode (one process, or
    this rank's shards of ``topology``, each rank reading only its slices), and its tokenizer.
    ``routing``: ``None`` keeps the trained config; ``dropless`` / ``training`` as
    ``inference_config``."""
    from tedmoe.compress import model as compressed

    topology = topology or Topology.single()
    if compressed.is_compressed(path):  # integer weights, computed by integer kernels
        cfg = model_config_of(path)
        model = GPTMoE(cfg if routing is None else inference_config(cfg, routing), topology, device=device)
        compressed.load_into(model, path)
        return model.eval(), load_tokenizer(path)
    if is_hf_directory(path):
        from tedmoe.interop import hf

        if not (Path(path) / "tokenizer.json").is_file():
            raise ValueError(f"{path} has no tokenizer.json; generation needs the model's tokenizer "
                             "(tedmoe export writes one)")
        cfg = hf.read_config(path)
        model = GPTMoE(cfg if routing is None else inference_config(cfg, routing), topology, device=device)
        hf.load_into(model, path)
        return model.eval(), load_tokenizer(path)
    ckpt = resolve_checkpoint(path)
    run = from_dict(read_meta(ckpt)["config"])
    cfg = run.model
    model = GPTMoE(cfg if routing is None else inference_config(cfg, routing), topology, device=device)
    load_model_weights(ckpt, model, topology)
    if run.compress.method != "none":  # trained with binary/ternary/N:M weights: use them as the forward did
        from tedmoe.compress import qat

        c = run.compress
        qat.apply(model, c.method, c.n, c.m, c.refresh_every)
        qat.bake(model)
    return model.eval(), load_tokenizer(ckpt)


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
