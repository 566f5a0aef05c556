"""ZeroQuant's layer-by-layer knowledge distillation (LKD), before INT8 quantisation.

Each block in turn is the student: a copy of it whose quantised weights are, in the forward,
exactly what ``tedmoe compress`` will store (group-wise INT8, straight-through gradients), trained
to give the float block's output from the float model's input to that block (the mean squared
error over a small calibration set of the run's training data). Only that block's parameters
change; the next block's inputs still come from the float model, so the layers can be distilled
in any order and no labels are needed. One process.
"""

from __future__ import annotations

import copy

import torch

from tedmoe.compress import qat


def calibration_set(path, batches: int) -> list[torch.Tensor]:
    """``batches`` batches of token ids ``[B, T]`` from the training split of the run at ``path``."""
    from tedmoe.config import from_dict
    from tedmoe.data.dataset import BatchSampler, TokenDataset
    from tedmoe.runtime.loading import is_hf_directory, resolve_checkpoint
    from tedmoe.runtime.checkpoint import read_meta
    from tedmoe.runtime.trainer import data_dir

    if is_hf_directory(path):
        raise ValueError(f"--lkd calibrates on a tedmoe run's training data; {path} is a Hugging Face directory "
                         "(import it with `tedmoe train --init-from` first, or compress without --lkd)")
    cfg = from_dict(read_meta(resolve_checkpoint(path))["config"])
    where = data_dir(cfg)
    if not (where / "meta.json").is_file():
        raise ValueError(f"--lkd needs the run's training data, which is not at {where} any more; prepare it again "
                         "(tedmoe data prepare, or train once) or compress without --lkd")
    sampler = BatchSampler(TokenDataset(where, "train", verify=False), cfg.seq_len, min(cfg.global_batch_size, 8),
                           cfg.seed + 2)
    return [sampler.batch(i)[:, :-1] for i in range(batches)]


def _block_inputs(model, batches: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The float model's input to every block, per batch: ``[layer][batch]``."""
    out = [[] for _ in model.blocks]
    with torch.no_grad():
        for ids in batches:
            x = model.embed(ids)
            for i, block in enumerate(model.blocks):
                out[i].append(x)
                x = block(x)[0]
    return out


def distil(model, path, group_size: int, batches: int = 8, steps: int = 100, lr: float = 1e-5,
           bits: int = 8) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict after LKD of every block of ``model`` (a one-process float model), and a
    one-line summary of the blocks' output error against the float blocks, before and after."""
    data = calibration_set(path, batches)
    model.eval()
    inputs = _block_inputs(model, data)
    student = copy.deepcopy(model)
    qat.apply(student, f"int{bits}", group_size=group_size)  # refuses a group size that does not fit
    before, after, kept = [], [], 0
    for i, (teacher, block) in enumerate(zip(model.blocks, student.blocks)):
        with torch.no_grad():
            targets = [teacher(x)[0] for x in inputs[i]]

        def error() -> float:
            with torch.no_grad():
                return sum(torch.mean((block(x)[0] - y) ** 2).item() for x, y in zip(inputs[i], targets)) / len(targets)

        before.append(error())
        start = {k: v.detach().clone() for k, v in block.state_dict().items()}
        params = [p for p in block.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr)
        decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
        for step in range(steps):
            j = step % len(targets)
            loss = torch.mean((block(inputs[i][j])[0] - targets[j]) ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            decay.step()
        after.append(error())
        if after[-1] > before[-1]:  # distillation made this block worse: keep its rounded float weights
            block.load_state_dict(start)
            after[-1], kept = before[-1], kept + 1
    state = {k: v.detach() for k, v in student.state_dict().items()}
    summary = (f"{len(before)} blocks, {batches} calibration batches, {steps} steps each; block output MSE vs "
               f"float: {sum(before) / len(before):.3g} with rounding alone -> {sum(after) / len(after):.3g} after LKD"
               + (f" ({kept} block(s) kept as they were: LKD did not lower their error)" if kept else ""))
    return state, summary
