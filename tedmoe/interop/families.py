"""The Hugging Face model families tedmoe reads and writes, both ways: which tedmoe models each
expresses, their ``config.json``, and the names and shapes of their tensors as the published
checkpoints store them (which ``transformers`` reads and writes).

Two families share one block: pre-norm attention with rotary positions and grouped-query heads,
then an MoE MLP of SwiGLU experts (``w2(silu(w1 x) * w3 x)``) chosen by a bias-free router that
takes a softmax over all experts and keeps the top k, with untied input and output embeddings.

- **Mixtral** (``model_type: "mixtral"``): the top-k gates are renormalised to sum to 1; tensors
  under ``block_sparse_moe`` (``experts.M.w1/w2/w3``, ``gate``).
- **Qwen3-MoE** (``model_type: "qwen3_moe"``): an RMSNorm over each head's query and key before the
  rotary embedding (tedmoe's ``model.qk_norm``), a head size of its own (``head_dim``, so heads x
  head size may differ from the width), renormalisation optional (``norm_topk_prob``); tensors
  under ``mlp`` (``experts.M.gate_proj/up_proj/down_proj``, ``gate``) and ``self_attn.q_norm/k_norm``.
  Only the all-MoE form is read (``decoder_sparse_step: 1``, no ``mlp_only_layers``): its dense
  blocks are SwiGLU MLPs, and tedmoe's dense blocks are GELU.

A tedmoe model exports as Qwen3-MoE when it has ``model.qk_norm``, else as Mixtral. Both compute
every routed token at inference, which is tedmoe's ``dropless`` mode: a model trained with a
capacity routes the same way there but keeps the tokens it would have dropped. Router noise and the
auxiliary losses are training settings and do not change the exported model.

Tensors: ours ``w1``/``w3`` are ``[E, H, F]`` and ``w2`` ``[E, F, H]`` (the batched-matmul layout);
the checkpoints store ``nn.Linear`` weights, ``[F, H]`` and ``[H, F]`` per expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tedmoe.config import ModelConfig, MoEConfig

EXPERT_WEIGHTS = ("w1", "w2", "w3")
ATTENTION_NAMES = {  # ours (under blocks.N.) -> theirs (under model.layers.N.)
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q.weight": "self_attn.q_proj.weight",
    "attn.k.weight": "self_attn.k_proj.weight",
    "attn.v.weight": "self_attn.v_proj.weight",
    "attn.o.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
}
QK_NORM_NAMES = {"attn.q_norm.weight": "self_attn.q_norm.weight", "attn.k_norm.weight": "self_attn.k_norm.weight"}
TOP_NAMES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "head.weight": "lm_head.weight"}


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str
    architecture: str
    moe: str
    """Module holding the router (``gate``) and the experts under ``model.layers.N.``."""
    experts: dict[str, str]
    """Our expert weights -> their per-expert module names."""
    qk_norm: bool

    def block_names(self) -> dict[str, str]:
        names = {**ATTENTION_NAMES, "mlp.router.weight": f"{self.moe}.gate.weight"}
        return {**names, **QK_NORM_NAMES} if self.qk_norm else names

    def expert_name(self, layer: int | str, expert: int, w: str) -> str:
        return f"model.layers.{layer}.{self.moe}.experts.{expert}.{self.experts[w]}.weight"


MIXTRAL = Family("Mixtral", "mixtral", "MixtralForCausalLM", "block_sparse_moe", {w: w for w in EXPERT_WEIGHTS},
                 qk_norm=False)
QWEN3_MOE = Family("Qwen3-MoE", "qwen3_moe", "Qwen3MoeForCausalLM", "mlp",
                   {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}, qk_norm=True)
FAMILIES = {f.model_type: f for f in (MIXTRAL, QWEN3_MOE)}


def family_of(cfg: ModelConfig) -> Family:
    """The family that expresses ``cfg``; ``ValueError`` naming the first setting none can express."""
    moe = cfg.moe
    family = QWEN3_MOE if cfg.qk_norm else MIXTRAL
    layout = f"the {family.name} layout"
    if cfg.moe_every != 1:
        raise ValueError(f"model.moe_every={cfg.moe_every}: {family.name} has an MoE MLP in every block and this "
                         f"model has dense blocks; only models trained with model.moe_every=1 export to {layout}")
    if cfg.expert_counts or moe.residual:
        setting = "model.expert_counts (PR-MoE's pyramid)" if cfg.expert_counts else "model.moe.residual (Residual-MoE)"
        raise ValueError(f"{setting}: {family.name} has the same experts in every layer and no dense branch beside "
                         "them; serve such a model with tedmoe generate (the engine runs it)")
    if moe.activation != "swiglu":
        raise ValueError(f"model.moe.activation={moe.activation!r}: {family.name}'s experts are SwiGLU; only models "
                         f"trained with model.moe.activation='swiglu' export to {layout}")
    if family is MIXTRAL and moe.top_k > 1 and not moe.normalize_gates:
        raise ValueError("model.moe.normalize_gates=false: Mixtral renormalises the top-k gates to sum to 1; only "
                         "models trained with model.moe.normalize_gates=true (or top_k=1) export to the Mixtral "
                         "layout (Qwen3-MoE keeps them as they are, but needs model.qk_norm=true)")
    return family


def check_expressible(cfg: ModelConfig) -> None:
    """``ValueError`` naming the first setting that no supported family can express."""
    family_of(cfg)


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """``config.json`` of the Hugging Face model equal to ``cfg`` (``transformers`` loads it
    without custom code)."""
    family = family_of(cfg)
    common = {"architectures": [family.architecture], "model_type": family.model_type, "vocab_size": cfg.vocab_size,
              "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
              "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_size,
              "num_experts_per_tok": cfg.moe.top_k, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
              "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
              "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
              "tie_word_embeddings": False, "sliding_window": None, "attention_dropout": 0.0,
              "router_aux_loss_coef": cfg.aux_loss_coef, "output_router_logits": False,
              "torch_dtype": "float32", "use_cache": True}
    if family is MIXTRAL:
        return {**common, "intermediate_size": cfg.moe.ffn_hidden_size, "num_local_experts": cfg.moe.num_experts,
                "router_jitter_noise": 0.0}
    return {**common, "intermediate_size": cfg.ffn_hidden_size, "moe_intermediate_size": cfg.moe.ffn_hidden_size,
            "num_experts": cfg.moe.num_experts, "norm_topk_prob": cfg.moe.normalize_gates or cfg.moe.top_k == 1,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "attention_bias": False, "use_sliding_window": False}


def family_named(hf: dict[str, Any]) -> Family:
    """The family of a ``config.json``; ``ValueError`` naming the supported ones."""
    family = FAMILIES.get(hf.get("model_type"))
    if family is None:
        raise ValueError(f"config.json has model_type={hf.get('model_type')!r}; this reader takes "
                         + " or ".join(repr(t) for t in FAMILIES))
    return family


def model_config(hf: dict[str, Any]) -> ModelConfig:
    """The tedmoe ``ModelConfig`` of a Mixtral or Qwen3-MoE ``config.json`` (dropless routing, as theirs)."""
    family = family_named(hf)
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"rope scaling {rope.get('rope_type', rope.get('type'))!r} is not supported; "
                         "tedmoe implements the default rotary embedding")
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    if window not in (None, 0) and window < hf.get("max_position_embeddings", 0):
        raise ValueError(f"sliding_window={window} is not supported; tedmoe attends to the whole sequence")
    if hf.get("tie_word_embeddings"):
        raise ValueError("tie_word_embeddings=true is not supported; tedmoe's output head is its own weight")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported; the experts must be SwiGLU ('silu')")
    if hf.get("attention_bias"):
        raise ValueError("attention_bias=true is not supported; tedmoe's attention projections have no bias")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    if family is MIXTRAL:
        experts, expert_ffn, dense_ffn, normalize = hf["num_local_experts"], hf["intermediate_size"], \
            hf["intermediate_size"], True
    else:
        if hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers"):
            raise ValueError(f"decoder_sparse_step={hf.get('decoder_sparse_step', 1)}, mlp_only_layers="
                             f"{hf.get('mlp_only_layers')}: only Qwen3-MoE models with an MoE MLP in every layer are "
                             "read (their dense layers are SwiGLU MLPs, tedmoe's are GELU)")
        experts = hf.get("num_experts", hf.get("num_local_experts"))
        expert_ffn, dense_ffn = hf["moe_intermediate_size"], hf.get("intermediate_size", hf["moe_intermediate_size"])
        normalize = bool(hf.get("norm_topk_prob", False))
    head_dim = hf.get("head_dim") or hidden // heads
    moe = MoEConfig(ffn_hidden_size=expert_ffn, num_experts=experts, top_k=hf["num_experts_per_tok"], dropless=True,
                    normalize_gates=normalize, activation="swiglu")
    return ModelConfig(vocab_size=hf["vocab_size"], hidden_size=hidden, num_layers=hf["num_hidden_layers"],
                       num_heads=heads, num_kv_heads=hf.get("num_key_value_heads", heads),
                       head_dim=None if head_dim * heads == hidden else head_dim, qk_norm=family.qk_norm,
                       ffn_hidden_size=dense_ffn, max_seq_len=hf.get("max_position_embeddings", 4096),
                       rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 1e6))),
                       norm_eps=float(hf.get("rms_norm_eps", 1e-5)), moe_every=1,
                       aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.01)), moe=moe)


def to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A full (single-process) tedmoe state dict under its family's names and shapes."""
    family = family_of(cfg)
    out = {hf: state[ours] for ours, hf in TOP_NAMES.items()}
    for i in range(cfg.num_layers):
        out.update({f"model.layers.{i}.{hf}": state[f"blocks.{i}.{ours}"] for ours, hf in family.block_names().items()})
        for w in EXPERT_WEIGHTS:
            full = state[f"blocks.{i}.mlp.experts.{w}"]
            for e in range(cfg.moe.num_experts):
                out[family.expert_name(i, e, w)] = full[e].t().contiguous()
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
    """A family's tensors as a full tedmoe state dict; ``ValueError`` naming a missing or
    misshapen tensor."""
    family = family_of(cfg)
    check_shapes({name: tuple(t.shape) for name, t in tensors.items()}, cfg)
    state = {ours: tensors[hf] for ours, hf in TOP_NAMES.items()}
    for i in range(cfg.num_layers):
        state.update({f"blocks.{i}.{ours}": tensors[f"model.layers.{i}.{hf}"]
                      for ours, hf in family.block_names().items()})
        for w in EXPERT_WEIGHTS:
            state[f"blocks.{i}.mlp.experts.{w}"] = torch.stack(
                [tensors[family.expert_name(i, e, w)].t() for e in range(cfg.moe.num_experts)])
    return state


def hf_name(ours: str, cfg: ModelConfig) -> str:
    """The family's name of one of our non-expert parameters (``blocks.3.attn.q.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``)."""
    if ours in TOP_NAMES:
        return TOP_NAMES[ours]
    _, index, rest = ours.split(".", 2)
    return f"model.layers.{index}.{family_of(cfg).block_names()[rest]}"


def to_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of ``cfg``'s family and its shape."""
    family = family_of(cfg)
    H, V, F, E, D = cfg.hidden_size, cfg.vocab_size, cfg.moe.ffn_hidden_size, cfg.moe.num_experts, cfg.head_size
    out = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    shapes = {"attn_norm.weight": (H,), "mlp_norm.weight": (H,), "attn.q.weight": (cfg.num_heads * D, H),
              "attn.k.weight": (cfg.kv_heads * D, H), "attn.v.weight": (cfg.kv_heads * D, H),
              "attn.o.weight": (H, cfg.num_heads * D), "mlp.router.weight": (E, H),
              "attn.q_norm.weight": (D,), "attn.k_norm.weight": (D,)}
    per_block = {hf: shapes[ours] for ours, hf in family.block_names().items()}
    for i in range(cfg.num_layers):
        out.update({f"model.layers.{i}.{k}": v for k, v in per_block.items()})
        for e in range(E):
            out.update({family.expert_name(i, e, "w1"): (F, H), family.expert_name(i, e, "w3"): (F, H),
                        family.expert_name(i, e, "w2"): (H, F)})
    return out
