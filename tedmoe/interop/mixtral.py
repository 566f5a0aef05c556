"""The Hugging Face Mixtral layout, both ways: which tedmoe models it expresses, their config
there, and the names and shapes of their tensors (``model.layers.N.block_sparse_moe.experts.M.w1.weight``,
the layout of the published Mixtral checkpoints, which ``transformers`` reads and writes).

A tedmoe model is a Mixtral model when every block is an MoE block (``model.moe_every=1``), the
experts are SwiGLU (``model.moe.activation="swiglu"``: ``w2(silu(w1 x) * w3 x)``) and the top-k
gates are renormalised (``model.moe.normalize_gates=true``, or top-1). Mixtral computes every routed
token at inference, which is tedmoe's ``dropless`` mode: a model trained with a capacity routes
the same way there, but keeps the tokens it would have dropped. Router noise and the auxiliary
losses are training settings and do not change the exported model.

Tensors: ours ``w1``/``w3`` are ``[E, H, F]`` and ``w2`` ``[E, F, H]`` (the batched-matmul
layout); Mixtral stores ``nn.Linear`` weights, ``[F, H]`` and ``[H, F]`` per expert.
"""

from __future__ import annotations

from typing import Any

import torch

from tedmoe.config import ModelConfig, MoEConfig

EXPERT_WEIGHTS = ("w1", "w2", "w3")
BLOCK_NAMES = {  # ours (under blocks.N.) -> Mixtral's (under model.layers.N.)
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q.weight": "self_attn.q_proj.weight",
    "attn.k.weight": "self_attn.k_proj.weight",
    "attn.v.weight": "self_attn.v_proj.weight",
    "attn.o.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.router.weight": "block_sparse_moe.gate.weight",
}
TOP_NAMES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "head.weight": "lm_head.weight"}


def check_expressible(cfg: ModelConfig) -> None:
    """``ValueError`` naming the first setting that the Mixtral architecture cannot express."""
    moe = cfg.moe
    if cfg.moe_every != 1:
        raise ValueError(f"model.moe_every={cfg.moe_every}: Mixtral has an MoE MLP in every block and this model has "
                         "dense blocks; only models trained with model.moe_every=1 export to the Mixtral layout")
    if moe.activation != "swiglu":
        raise ValueError(f"model.moe.activation={moe.activation!r}: Mixtral's experts are SwiGLU; only models trained "
                         "with model.moe.activation='swiglu' export to the Mixtral layout")
    if moe.top_k > 1 and not moe.normalize_gates:
        raise ValueError("model.moe.normalize_gates=false: Mixtral renormalises the top-k gates to sum to 1; only "
                         "models trained with model.moe.normalize_gates=true (or top_k=1) export to the Mixtral layout")


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """``config.json`` of the Mixtral model equal to ``cfg`` (``transformers`` loads it without custom code)."""
    check_expressible(cfg)
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.moe.ffn_hidden_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.hidden_size // cfg.num_heads,
            "num_local_experts": cfg.moe.num_experts, "num_experts_per_tok": cfg.moe.top_k, "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "tie_word_embeddings": False, "sliding_window": None, "attention_dropout": 0.0,
            "router_aux_loss_coef": cfg.aux_loss_coef, "router_jitter_noise": 0.0, "output_router_logits": False,
            "torch_dtype": "float32", "use_cache": True}


def model_config(hf: dict[str, Any]) -> ModelConfig:
    """The tedmoe ``ModelConfig`` of a Mixtral ``config.json`` (dropless routing, as Mixtral's)."""
    if hf.get("model_type") != "mixtral":
        raise ValueError(f"config.json has model_type={hf.get('model_type')!r}; this reader takes 'mixtral'")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"rope scaling {rope.get('rope_type', rope.get('type'))!r} is not supported; "
                         "tedmoe implements the default rotary embedding")
    if hf.get("sliding_window") not in (None, 0) and hf["sliding_window"] < hf.get("max_position_embeddings", 0):
        raise ValueError(f"sliding_window={hf['sliding_window']} is not supported; tedmoe attends to the whole sequence")
    if hf.get("tie_word_embeddings"):
        raise ValueError("tie_word_embeddings=true is not supported; tedmoe's output head is its own weight")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported; Mixtral experts are SwiGLU ('silu')")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hidden // heads):
        raise ValueError(f"head_dim={hf['head_dim']} differs from hidden_size / num_attention_heads = {hidden // heads}; "
                         "tedmoe derives the head size from them")
    moe = MoEConfig(ffn_hidden_size=hf["intermediate_size"], num_experts=hf["num_local_experts"],
                    top_k=hf["num_experts_per_tok"], dropless=True, normalize_gates=True, activation="swiglu")
    return ModelConfig(vocab_size=hf["vocab_size"], hidden_size=hidden, num_layers=hf["num_hidden_layers"],
                       num_heads=heads, num_kv_heads=hf.get("num_key_value_heads", heads),
                       ffn_hidden_size=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 4096),
                       rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 1e6))),
                       norm_eps=float(hf.get("rms_norm_eps", 1e-5)), moe_every=1,
                       aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.01)), moe=moe)


def to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A full (single-process) tedmoe state dict under Mixtral's names and shapes."""
    check_expressible(cfg)
    out = {hf: state[ours] for ours, hf in TOP_NAMES.items()}
    for i in range(cfg.num_layers):
        out.update({f"model.layers.{i}.{hf}": state[f"blocks.{i}.{ours}"] for ours, hf in BLOCK_NAMES.items()})
        for w in EXPERT_WEIGHTS:
            full = state[f"blocks.{i}.mlp.experts.{w}"]
            for e in range(cfg.moe.num_experts):
                out[f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"] = full[e].t().contiguous()
    return out


def check_shapes(shapes: dict[str, tuple[int, ...]], cfg: ModelConfig) -> None:
    """``ValueError`` naming a tensor that ``cfg`` needs and ``shapes`` (name -> shape, as stored)
    lacks or has in another shape."""
    wanted = to_hf_shapes(cfg)
    missing = sorted(set(wanted) - set(shapes))
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} tensor(s) the config needs, e.g. {missing[0]}")
    for name, shape in wanted.items():
        if tuple(shapes[name]) != shape:
            raise ValueError(f"tensor {name} has shape {tuple(shapes[name])} but the config needs {shape}")


def from_hf(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Mixtral's tensors as a full tedmoe state dict; ``ValueError`` naming a missing or
    misshapen tensor."""
    check_shapes({name: tuple(t.shape) for name, t in tensors.items()}, cfg)
    state = {ours: tensors[hf] for ours, hf in TOP_NAMES.items()}
    for i in range(cfg.num_layers):
        state.update({f"blocks.{i}.{ours}": tensors[f"model.layers.{i}.{hf}"] for ours, hf in BLOCK_NAMES.items()})
        for w in EXPERT_WEIGHTS:
            state[f"blocks.{i}.mlp.experts.{w}"] = torch.stack(
                [tensors[f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"].t()
                 for e in range(cfg.moe.num_experts)])
    return state


def hf_name(ours: str) -> str:
    """Mixtral's name of one of our non-expert parameters (``blocks.3.attn.q.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``)."""
    if ours in TOP_NAMES:
        return TOP_NAMES[ours]
    _, index, rest = ours.split(".", 2)
    return f"model.layers.{index}.{BLOCK_NAMES[rest]}"


def to_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every Mixtral tensor name of ``cfg`` and its shape."""
    H, V, F, E = cfg.hidden_size, cfg.vocab_size, cfg.moe.ffn_hidden_size, cfg.moe.num_experts
    D = H // cfg.num_heads
    out = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    per_block = {"input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,),
                 "self_attn.q_proj.weight": (cfg.num_heads * D, H), "self_attn.k_proj.weight": (cfg.kv_heads * D, H),
                 "self_attn.v_proj.weight": (cfg.kv_heads * D, H), "self_attn.o_proj.weight": (H, cfg.num_heads * D),
                 "block_sparse_moe.gate.weight": (E, H)}
    for i in range(cfg.num_layers):
        out.update({f"model.layers.{i}.{k}": v for k, v in per_block.items()})
        for e in range(E):
            prefix = f"model.layers.{i}.block_sparse_moe.experts.{e}"
            out.update({f"{prefix}.w1.weight": (F, H), f"{prefix}.w3.weight": (F, H), f"{prefix}.w2.weight": (H, F)})
    return out
