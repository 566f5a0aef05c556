"""Which tokens go into each forward of the engine: Dynamic SplitFuse, and two policies to compare.

A request is a prompt, a number of tokens to generate, sampling settings and stop tokens. The
scheduler owns the requests and the engine; ``step()`` builds one ragged batch, runs it, samples a
token for every sequence whose chunk reached the end of its context, and reports the tokens made
and the requests finished.

- ``splitfuse`` (DeepSpeed-FastGen's Dynamic SplitFuse): every forward takes at most
  ``token_budget`` tokens and ``max_seqs`` sequences. Running sequences' decode tokens go first;
  prompts fill the rest: a long prompt is split into chunks over several forwards (its remainder
  stays at the front of the queue), short ones are fused into one forward. A prompt is admitted
  only when the blocks for its whole prompt are free (so its later chunks cannot be starved). When
  a decode finds no free block, the newest running sequence is pre-empted: its blocks are freed
  and it is queued again (at the front) to be recomputed from its prompt and the tokens it made.
- ``prefill-first`` (continuous batching as vLLM's first scheduler did it): whole waiting prompts
  first, as many as fit (blocks and ``max_seqs``), in a forward of their own; decodes otherwise.
- ``static``: admit up to ``max_seqs`` requests together, run them until all have finished (whole
  prompts in one forward, then decodes), then admit the next group.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import torch

from tedmoe.inference.sampling import SamplingParams, sample

POLICIES = ("splitfuse", "prefill-first", "static")


@dataclass
class Request:
    """One generation request and its progress."""

    uid: int
    prompt: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset[int] = frozenset()
    seed: int = 0
    arrival: float = field(default_factory=time.monotonic)
    generated: list[int] = field(default_factory=list)
    cached: int = 0  # tokens of ``context`` in the KV cache
    first_token_time: float | None = None
    finish_reason: str | None = None  # "length", "stop" or "cancelled"
    preemptions: int = 0
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    @property
    def context(self) -> list[int]:
        """The tokens the model has to have seen: the prompt and what it generated so far."""
        return self.prompt + self.generated

    @property
    def pending(self) -> int:
        """Context tokens not yet in the cache."""
        return len(self.prompt) + len(self.generated) - self.cached


@dataclass
class StepResult:
    tokens: list[tuple[Request, int]]  # (request, new token) for every sequence that produced one
    finished: list[Request]
    batch_tokens: int
    batch_seqs: int


class Scheduler:
    """Feeds ``engine`` (an ``InferenceEngine`` on the leader rank) by ``policy``."""

    def __init__(self, engine, policy: str = "splitfuse", token_budget: int = 512, max_seqs: int = 32):
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r}: use one of {', '.join(POLICIES)}")
        if token_budget < 1 or max_seqs < 1:
            raise ValueError(f"token_budget={token_budget} and max_seqs={max_seqs} must be >= 1")
        self.engine, self.policy = engine, policy
        self.token_budget, self.max_seqs = token_budget, max_seqs
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # admitted, in admission order
        self._static_group: list[Request] = []

    # ---- requests ---------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue a request; ``ValueError`` for one the engine could never run."""
        cfg, V = self.engine.config, self.engine.config.vocab_size
        if not request.prompt:
            raise ValueError("the prompt is empty; give at least one token")
        if any(not 0 <= t < V for t in request.prompt):
            raise ValueError(f"the prompt has token ids outside the model's vocabulary of {V}")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens={request.max_tokens} must be >= 1")
        if len(request.prompt) >= cfg.max_seq_len:
            raise ValueError(f"the prompt has {len(request.prompt)} tokens; the model takes at most "
                             f"{cfg.max_seq_len} (prompt + generated), so at most {cfg.max_seq_len - 1} in the prompt")
        need = self.engine.cache.blocks_for(min(len(request.prompt) + request.max_tokens, cfg.max_seq_len))
        if need > self.engine.cache.num_blocks:
            raise ValueError(f"the request needs up to {need} KV blocks and the cache has {self.engine.cache.num_blocks}; "
                             "ask for fewer tokens or give the server more --kv-memory-gib")
        request.params.validate()
        self.waiting.append(request)

    def cancel(self, uid: int, reason: str = "cancelled") -> Request | None:
        """Stop a request wherever it is (its blocks are freed now); ``None`` if it is not here."""
        for queue in (self.waiting, self.running):
            for r in list(queue):
                if r.uid == uid:
                    queue.remove(r)
                    self._release(r, reason)
                    return r
        return None

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    # ---- one forward ------------------------------------------------------------------------
    def step(self) -> StepResult:
        """Build one batch by the policy, run it, sample; nothing to do gives an empty result."""
        plan = {"splitfuse": self._plan_splitfuse, "prefill-first": self._plan_prefill_first,
                "static": self._plan_static}[self.policy]()
        if not plan:
            return StepResult([], [], 0, 0)
        uids = [r.uid for r, _ in plan]
        chunks = [r.context[r.cached:r.cached + n] for r, n in plan]
        logits = self.engine.put(uids, chunks)
        tokens, finished = [], []
        now = time.monotonic()
        for (r, n), row in zip(plan, logits):
            r.cached += n
            if r.pending:  # a prompt chunk that does not reach the end of the context yet
                continue
            token = sample(row, r.params, r.generator)
            r.generated.append(token)
            if r.first_token_time is None:
                r.first_token_time = now
            tokens.append((r, token))
            reason = self._finish_reason(r, token)
            if reason:
                self.running.remove(r)
                self._release(r, reason)
                finished.append(r)
        return StepResult(tokens, finished, sum(n for _, n in plan), len(plan))

    def _finish_reason(self, r: Request, token: int) -> str | None:
        if token in r.stop_ids:
            return "stop"
        if len(r.generated) >= r.max_tokens or len(r.context) >= self.engine.config.max_seq_len:
            return "length"
        return None

    def _release(self, r: Request, reason: str) -> None:
        r.finish_reason = reason
        self.engine.flush(r.uid)
        r.cached = 0

    def _admissible(self, r: Request, reserved: int) -> bool:
        """Whether ``r``'s whole remaining context fits the free blocks, beyond ``reserved`` of them."""
        need = self.engine.blocks_needed(r.uid, r.pending)
        return need + reserved <= self.engine.free_blocks

    def _decodes(self) -> list[tuple[Request, int]]:
        """One token for every running sequence whose context is all cached, pre-empting the
        newest running sequences while the blocks they need are not free."""
        while True:
            ready = [r for r in self.running if r.pending == 1]
            need = sum(self.engine.blocks_needed(r.uid, 1) for r in ready)
            if need <= self.engine.free_blocks or len(self.running) <= 1:
                return [(r, 1) for r in ready]
            self._preempt(self.running[-1])

    def _preempt(self, r: Request) -> None:
        """Recompute later: free the blocks, keep the tokens made, queue at the front."""
        self.running.remove(r)
        self.engine.flush(r.uid)
        r.cached = 0
        r.preemptions += 1
        self.waiting.appendleft(r)

    def _plan_splitfuse(self) -> list[tuple[Request, int]]:
        plan = self._decodes()[:min(self.max_seqs, self.token_budget)]
        budget = self.token_budget - len(plan)
        # running sequences with a prompt remainder (a split prompt) continue first
        for r in self.running:
            if budget <= 0 or len(plan) >= self.max_seqs:
                break
            if r.pending > 1:
                n = min(r.pending, budget)
                plan.append((r, n))
                budget -= n
        reserved = sum(self.engine.blocks_needed(r.uid, n) for r, n in plan)
        while self.waiting and budget > 0 and len(plan) < self.max_seqs and len(self.running) < self.max_seqs:
            r = self.waiting[0]
            if not self._admissible(r, reserved):
                break  # first come, first served: wait for blocks rather than let later requests pass
            self.waiting.popleft()
            self.running.append(r)
            n = min(r.pending, budget)
            reserved += self.engine.blocks_needed(r.uid, r.pending)  # the whole prompt is held for it
            plan.append((r, n))
            budget -= n
        return plan

    def _plan_prefill_first(self) -> list[tuple[Request, int]]:
        plan, reserved = [], 0
        while self.waiting and len(self.running) < self.max_seqs and self._admissible(self.waiting[0], reserved):
            r = self.waiting.popleft()
            self.running.append(r)
            reserved += self.engine.blocks_needed(r.uid, r.pending)
            plan.append((r, r.pending))
        return plan or self._decodes()

    def _plan_static(self) -> list[tuple[Request, int]]:
        if not self.running:
            reserved = 0
            while self.waiting and len(self.running) < self.max_seqs:
                r = self.waiting[0]
                whole = min(len(r.prompt) + r.max_tokens, self.engine.config.max_seq_len)
                need = self.engine.cache.blocks_for(whole)  # a static batch reserves its full length
                if need + reserved > self.engine.free_blocks:
                    break
                self.running.append(self.waiting.popleft())
                reserved += need
            return [(r, r.pending) for r in self.running]
        return self._decodes()
