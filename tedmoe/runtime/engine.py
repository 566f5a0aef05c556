"""The training engine: micro-batches, gradient accumulation, mixed precision, the optimizer step."""

from __future__ import annotations

import torch
from torch import nn

from tedmoe.config import TrainConfig
from tedmoe.parallel import comm
from tedmoe.parallel.topology import Topology
from tedmoe.runtime.zero_optimizer import ZeroAdamW

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Engine:
    """Trains a ``GPTMoE``-shaped model: ``forward(ids, targets)`` returns ``(loss, parts)``,
    ``moe_stats()`` lists the last forward's MoE statistics, ``token_context`` says which tokens a
    micro-batch holds (the routers key their random draws on it).

    ``train_step`` takes this rank's micro-batches (its DP shard of the global batch, split
    for accumulation, and with ``sp > 1`` its chunk of every sequence); the result equals one
    single-process step on the whole global batch.
    """

    def __init__(self, model: nn.Module, topology: Topology, config: TrainConfig, materialize=None):
        """``materialize``: for a model built on the meta device (ZeRO-3 only), a function that
        gives real values to a list of parameters (allocated in the model dtype) in place."""
        config.validate()
        self.model, self.topology, self.config = model, topology, config
        model.to(DTYPES[config.precision])
        self.optimizer = ZeroAdamW(model, topology, config, materialize)
        self.poison_next_step = False  # fault injection: the next step's loss becomes NaN
        self._agreed_shapes = None

    def _check_ranks_agree(self, micro_batches) -> None:
        """Ranks whose micro-batches differ in count or shape would issue collectives of different
        sizes (a hang or garbage); compare them once per new shape, before any such collective."""
        shapes = (len(micro_batches),) + tuple(micro_batches[0][0].shape)
        if self.topology.world_size == 1 or shapes == self._agreed_shapes:
            return
        mine = torch.tensor(shapes + (0,) * (4 - len(shapes)), dtype=torch.int64)
        with comm.LEDGER.phase("checks"):
            every = comm.all_gather(mine.unsqueeze(0), self.topology.axis("world")).tolist()
        if any(row != every[0] for row in every):
            bad = [r for r, row in enumerate(every) if row != every[0]]
            raise ValueError(f"ranks disagree on the micro-batches (count, batch, seq): rank 0 has {every[0][:3]}, "
                             f"ranks {bad} have {[every[r][:3] for r in bad]}; every rank must get the same shapes")
        self._agreed_shapes = shapes

    def full_gradients(self, num_micro_batches: int) -> dict[str, torch.Tensor]:
        """The synchronised gradient of the global-batch mean loss, gathered to full shape, from
        the accumulated ``p.grad`` (left untouched). For tests and debugging: it communicates."""
        from tedmoe.parallel.sharding import full_of, replica_axis

        scale = 1.0 / (self.topology.size("dp") * num_micro_batches * self.optimizer.loss_scale)
        summed = {}  # ZeRO-2 and 3: the gradients live reduced in the owners' shards
        if self.config.zero_stage >= 2:
            summed = {id(p): g for group in self.optimizer.groups for p, g in zip(group.params, group.gradients())}
        out = {}
        for name, p in self.model.named_parameters():
            if id(p) in summed:
                g = summed[id(p)].float() * scale
            else:
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                g = comm.all_reduce(g.float(), self.topology.axis(replica_axis(p))) * scale
            out[name] = full_of(g, p, self.topology)
        return out

    def set_token_context(self, micro_batches: list, index: int) -> None:
        """Tell the model which tokens micro-batch ``index`` holds: its sequences' place in the
        step's global batch (this DP rank's consecutive share) and, with ``sp > 1``, its chunk's
        place in the sequence. The routers key their random draws on it."""
        ctx = self.model.token_context
        sp, dp_rank = self.topology.axis("sp"), self.topology.coord("dp")
        local = sum(ids.shape[0] for ids, _ in micro_batches)
        ctx.step = self.optimizer.step_count
        ctx.first_sequence = dp_rank * local + sum(ids.shape[0] for ids, _ in micro_batches[:index])
        length = micro_batches[index][0].shape[1]
        ctx.first_position, ctx.sequence_length = sp.rank * length, length * sp.size

    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
        """Forward and backward every micro-batch, then one optimizer step. Returns metrics:
        the global-batch mean loss and its parts, grad norm, lr, loss scale, skipped, and per
        MoE layer the tokens per expert and drop fraction summed / averaged over this rank's
        micro-batches."""
        if not micro_batches:
            raise ValueError("train_step needs at least one micro-batch")
        self._check_ranks_agree(micro_batches)
        self.model.train()
        sums: dict[str, torch.Tensor] = {}
        load, drops = None, None
        for j, (ids, targets) in enumerate(micro_batches):
            self.set_token_context(micro_batches, j)
            loss, parts = self.model(ids, targets)
            if self.poison_next_step:
                loss = loss * float("nan")
            (loss * self.optimizer.loss_scale).backward()
            self.optimizer.micro_batch_done()
            for k, v in {"loss": loss.detach(), **parts}.items():
                sums[k] = sums.get(k, 0) + v.float()
            stats = self.model.moe_stats()
            if stats:
                step_load = torch.cat([s.tokens_per_expert for s in stats])  # layers may differ in experts (PR-MoE)
                step_drop = torch.stack([s.drop_fraction for s in stats])
                load = step_load if load is None else load + step_load
                drops = step_drop if drops is None else drops + step_drop
        names = sorted(sums)
        with comm.LEDGER.phase("metrics"):
            means = comm.all_reduce(torch.stack([sums[k] for k in names]), self.topology.axis("dsp"))
        means = (means / (len(micro_batches) * self.topology.size("dp"))).tolist()  # one host sync
        out = dict(zip(names, means))
        self.poison_next_step = False
        out.update(self.optimizer.step(len(micro_batches)))
        if load is not None:
            out["tokens_per_expert"] = [t.tolist() for t in load.split([len(s.tokens_per_expert) for s in stats])]
            out["drop_fraction"] = (drops / len(micro_batches)).tolist()
        return out
