"""Hugging Face model directories: ``config.json``, ``generation_config.json`` and the weights as
``model.safetensors`` or shards with ``model.safetensors.index.json``. ``load`` and ``save`` move
full (single-process) state dicts; ``load_into`` fills a model of any layout, each rank reading only
its slices. The families' names and shapes live in ``families.py``; tokenizers are written as
``tokenizers`` JSON that ``AutoTokenizer`` loads.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from tedmoe.config import ModelConfig
from tedmoe.fileio import new_directory
from tedmoe.interop import families

INDEX = "model.safetensors.index.json"


def read_config(path: str | Path) -> ModelConfig:
    """The ``ModelConfig`` of a Hugging Face directory (``ValueError`` for one tedmoe cannot read)."""
    p = Path(path) / "config.json"
    if not p.is_file():
        raise ValueError(f"{path} has no config.json; pass a Hugging Face model directory")
    try:
        hf = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{p} is not valid JSON: {err}") from None
    return families.model_config(hf)


def weight_map(path: str | Path) -> dict[str, str]:
    """Tensor name -> the safetensors file in ``path`` that holds it."""
    from safetensors import safe_open

    root = Path(path)
    if (root / INDEX).is_file():
        try:
            return json.loads((root / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{root / INDEX} is not a safetensors index ({err})") from None
    if (root / "model.safetensors").is_file():
        with safe_open(str(root / "model.safetensors"), "pt") as f:
            return dict.fromkeys(f.keys(), "model.safetensors")
    raise ValueError(f"{path} has neither model.safetensors nor {INDEX}")


def load_into(model, path: str | Path, only: set[int] | None = None) -> None:
    """Load a Mixtral or Qwen3-MoE directory into ``model`` (a ``GPTMoE`` built for any TP x EP x DP x SP
    layout): each rank reads only its slices, straight from the files (its TP share of every
    weight and its local experts); names and shapes are checked first, so a mismatch changes
    nothing. ``only``: the ids of the parameters to load (ZeRO-3 materialises block by block)."""
    from tedmoe.parallel.sharding import is_expert, tp_dim

    wanted, family = families.to_hf_shapes(model.config), families.family_of(model.config)
    tp, ep = model.topology.axis("tp"), model.topology.axis("ep")
    with contextlib.ExitStack() as stack:
        files = _open_checked(path, model.config, stack)

        def read(name: str, dim: int | None) -> torch.Tensor:  # this TP rank's share along ``dim``
            piece = files[name].get_slice(name)
            if dim is None or tp.size == 1:
                return piece[:]
            n = wanted[name][dim] // tp.size
            index = [slice(None)] * len(wanted[name])
            index[dim] = slice(tp.rank * n, (tp.rank + 1) * n)
            return piece[tuple(index)]

        with torch.no_grad():
            for name, p in model.named_parameters():
                if only is not None and id(p) not in only:
                    continue
                if is_expert(p):  # blocks.N.mlp.experts.wK: this rank's experts, each sliced over tp
                    layer, w = name.split(".")[1], name.rsplit(".", 1)[1]
                    first = ep.rank * p.shape[0]
                    p.copy_(torch.stack([read(family.expert_name(layer, e, w), 0 if w in ("w1", "w3") else 1).t()
                                         for e in range(first, first + p.shape[0])]))
                else:
                    p.copy_(read(families.hf_name(name, model.config), tp_dim(p)))


def check_weights(path: str | Path, cfg: ModelConfig) -> None:
    """``ValueError`` unless ``path`` holds every tensor ``cfg`` needs, in its shape (reads only
    the files' headers)."""
    with contextlib.ExitStack() as stack:
        _open_checked(path, cfg, stack)


def _open_checked(path: str | Path, cfg: ModelConfig, stack: contextlib.ExitStack) -> dict:
    """Tensor name -> the open safetensors file holding it, for the tensors ``cfg`` needs, after
    checking their names and shapes from the files' headers; the files close with ``stack``."""
    from safetensors import safe_open

    root, where = Path(path), weight_map(path)
    present = [n for n in families.to_hf_shapes(cfg) if n in where]
    handles = {}
    for shard in sorted({where[n] for n in present}):
        if not (root / shard).is_file():
            raise ValueError(f"{path}: shard {shard} named by {INDEX} is missing")
        handles[shard] = stack.enter_context(safe_open(str(root / shard), "pt"))
    files = {n: handles[where[n]] for n in present}
    families.check_shapes({n: tuple(f.get_slice(n).get_shape()) for n, f in files.items()}, cfg)
    return files


ARCHITECTURE = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "qk_norm",
                "ffn_hidden_size", "max_seq_len", "rope_theta", "norm_eps", "moe_every")
MOE_ARCHITECTURE = ("ffn_hidden_size", "num_experts", "top_k", "normalize_gates", "activation")


def apply_init_from(cfg) -> None:
    """With ``cfg.init_from`` set, take the model's architecture from that directory (the
    training-time routing options, capacity and loss weights stay ``cfg``'s). Idempotent."""
    if cfg.init_from is None:
        return
    arch = read_config(cfg.init_from)
    for name in ARCHITECTURE:
        setattr(cfg.model, name, getattr(arch, name))
    for name in MOE_ARCHITECTURE:
        setattr(cfg.model.moe, name, getattr(arch.moe, name))
    check_weights(cfg.init_from, cfg.model)  # before any process starts or anything is written


def load(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A Hugging Face directory as a tedmoe config and full state dict."""
    cfg = read_config(path)
    with contextlib.ExitStack() as stack:
        tensors = {name: f.get_tensor(name) for name, f in _open_checked(path, cfg, stack).items()}
    return cfg, families.from_hf(tensors, cfg)


def byte_level_unicode() -> list[str]:
    """The printable character that byte-level BPE writes for each byte 0..255 (printable Latin-1
    bytes stand for themselves, the others for code points from 256 on, in byte order)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def tokenizer_json(tokenizer) -> str:
    """A ``tokenizers`` JSON that gives the same ids as tedmoe's ``tokenizer``: the BPE one as it
    is; the byte one as a byte-level BPE with the 256 byte symbols (byte b is id b) and no merges."""
    if tokenizer.kind in ("bpe", "hf"):
        return tokenizer.tok.to_str()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={c: b for b, c in enumerate(byte_level_unicode())}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    """The tensors in name order, cut into groups of at most ``max_shard_bytes`` (a tensor larger
    than that is a group of its own)."""
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = tensors[name]
        size += nbytes
    return groups


def save(state: dict[str, torch.Tensor], cfg: ModelConfig, out: str | Path, tokenizer=None,
         max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write a full tedmoe state dict (and ``tokenizer``, if given) as a Hugging Face directory
    ``out``, through a temporary directory and a rename; refuses an ``out`` that exists (nothing
    is overwritten). Weights above ``max_shard_bytes`` go to ``model-0000k-of-0000n.safetensors``
    files with an index, as transformers writes them."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} exists; export into a new directory (nothing is overwritten)")
    config = families.hf_config(cfg)  # refuses before anything is written
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in families.to_hf(state, cfg).items()}
    with new_directory(out) as tmp:
        groups = shards(tensors, max_shard_bytes)
        if len(groups) == 1:
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            names = [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
            for name, group in zip(names, groups):
                save_file(group, str(tmp / name), metadata={"format": "pt"})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total},
                     "weight_map": {t: name for name, group in zip(names, groups) for t in group}}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps({"do_sample": False}, indent=2) + "\n")
        if tokenizer is not None:
            (tmp / "tokenizer.json").write_text(tokenizer_json(tokenizer))
            settings = json.loads(getattr(tokenizer, "config_text", None) or "{}")  # a directory's: bos/eos, chat
            settings = {"tokenizer_class": "PreTrainedTokenizerFast", **settings, "model_max_length": cfg.max_seq_len}
            (tmp / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    return out
