"""Tiny Hugging Face models, built offline from their config classes (random weights).

``build(family, **overrides)`` returns a ``*ForCausalLM`` (BERT: ``BertForMaskedLM``) of
hidden size 64, 2 layers, 4 heads (2 key/value heads where the family has GQA),
intermediate 128, vocab 128, 64 positions, no cache, no dropout. Overrides are config
fields (``num_hidden_layers=4``, ``tie_word_embeddings=True``, ...) under this module's
common names, mapped to GPT-2's, Starcoder2's and MPT's own names where they differ;
``attn_implementation`` is "sdpa" by default ("eager" for the explicit softmax path),
except Gemma2, which refuses "sdpa" (its attention logits are soft-capped) and gets "eager".

BERT is built as ``BertForMaskedLM`` rather than ``BertModel``: like the decoders it
ends in a (tied) vocabulary projection and takes ``labels`` for a loss, so the same
training step and the same embedding/head sharding questions apply; ``BertModel``
stops at hidden states plus a tanh pooler, which has no counterpart elsewhere.

``transformers`` is optional for the package: it is imported inside the functions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

# family -> (config class, model class) in the transformers namespace
_CLASSES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
    "bert": ("BertConfig", "BertForMaskedLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),
    "granite": ("GraniteConfig", "GraniteForCausalLM"),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "falcon": ("FalconConfig", "FalconForCausalLM"),
    "bloom": ("BloomConfig", "BloomForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "persimmon": ("PersimmonConfig", "PersimmonForCausalLM"),  # per-head q/k LayerNorm
    "apertus": ("ApertusConfig", "ApertusForCausalLM"),  # xIELU: min(x, eps), expm1
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM"),  # attention sinks, 3-D experts
    "cohere": ("CohereConfig", "CohereForCausalLM"),  # parallel residual, [H, hd] q/k norms
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),  # experts as 3-D Parameters
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),  # experts, q/k norms over the projection
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM"),  # experts, scaled residuals
    "mpt": ("MptConfig", "MptForCausalLM"),  # ALiBi built in forward from arange
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),  # q/k norms, sliding then full
    "phi": ("PhiConfig", "PhiForCausalLM"),  # Phi-2: parallel attention, partial rotary
    "opt": ("OPTConfig", "OPTForCausalLM"),  # learned positions offset by 2, post-LN optional
    "gptj": ("GPTJConfig", "GPTJForCausalLM"),  # rotate_every_two, attention beside the MLP
    "codegen": ("CodeGenConfig", "CodeGenForCausalLM"),  # qkv_proj in mp_num=4 blocks of q|v|k
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),  # MLA, shared + routed experts
}

FAMILIES: list[str] = list(_CLASSES)

HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, VOCAB, POSITIONS = 64, 2, 4, 2, 128, 128, 64

# families whose attention has separate key/value head counts (GQA)
# (Phi-3-mini has as many key/value heads as query heads, so phi3 is built that way; pass
# num_key_value_heads= for the GQA layout of Phi-3-medium)
_GQA = {"llama", "qwen2", "mistral", "gemma", "qwen3", "gemma2", "olmo2", "granite",
        "starcoder2", "qwen2_moe", "mixtral", "apertus", "gpt_oss", "cohere", "qwen3_moe",
        "olmoe", "granitemoe", "gemma3"}
# families whose config takes head_dim (several default it to 128 or 256, not hidden/heads)
_HEAD_DIM = {"llama", "mistral", "gemma", "qwen3", "gemma2", "gpt_oss", "qwen3_moe", "gemma3"}

# families that cannot take "sdpa" (transformers raises at construction)
_DEFAULT_ATTN = {"gemma2": "eager", "bloom": "eager", "gpt_oss": "eager", "mpt": "eager"}

# MPT spells the common fields its own way too
_MPT_NAMES = {"hidden_size": "d_model", "num_hidden_layers": "n_layers",
              "num_attention_heads": "n_heads", "max_position_embeddings": "max_seq_len"}

# GPT-2 spells the common fields its own way
_GPT2_NAMES = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer",
               "num_attention_heads": "n_head", "intermediate_size": "n_inner",
               "max_position_embeddings": "n_positions"}


def _common(family: str) -> dict[str, Any]:
    """The tiny size in this module's common names, plus per-family extras."""
    cfg: dict[str, Any] = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=INTERMEDIATE,
        max_position_embeddings=POSITIONS, use_cache=False,
        # the defaults of several families (Phi3 32000, GPT-2 50256, ...) lie outside vocab 128
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    if family in _GQA:
        cfg["num_key_value_heads"] = KV_HEADS
    if family in _HEAD_DIM:
        cfg["head_dim"] = HIDDEN // HEADS
    if family in ("llama", "qwen2", "mistral", "gemma", "phi3", "qwen3", "gemma2", "olmo2",
                  "granite", "starcoder2", "apertus"):
        cfg["attention_dropout"] = 0.0
    if family == "phi3":
        cfg.update(resid_pdrop=0.0, embd_pdrop=0.0, original_max_position_embeddings=POSITIONS)
    elif family == "gpt2":
        cfg.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    elif family == "bert":
        cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                   classifier_dropout=0.0)
    elif family == "gemma2":
        cfg.update(query_pre_attn_scalar=HIDDEN // HEADS, sliding_window=POSITIONS)
    elif family == "mistral":
        cfg.update(sliding_window=POSITIONS)
    elif family == "starcoder2":
        cfg.update(residual_dropout=0.0, embedding_dropout=0.0, sliding_window=POSITIONS)
    elif family == "gpt_neox":  # fused query_key_value, rotary on a quarter of each head
        cfg.update(hidden_dropout=0.0, attention_dropout=0.0, rotary_pct=0.25)
    elif family == "falcon":  # FalconLinear: x @ W.T; Falcon-40B's layout (GQA, parallel attn)
        cfg.update(new_decoder_architecture=True, num_kv_heads=KV_HEADS, parallel_attn=True,
                   bias=False, hidden_dropout=0.0, attention_dropout=0.0)
        cfg.pop("intermediate_size")  # its MLP is 4 x hidden, fixed
    elif family == "bloom":  # ALiBi; each block also returns its attention weights
        cfg.update(hidden_dropout=0.0, attention_dropout=0.0, n_layer=LAYERS, n_head=HEADS)
        for k in ("num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings"):
            cfg.pop(k)
    elif family == "mixtral":  # experts as 3-D Parameters (transformers 5), top 2 of 4
        cfg.update(attention_dropout=0.0, num_local_experts=4, num_experts_per_tok=2,
                   router_aux_loss_coef=0.0)
    elif family == "cohere":  # Command R+'s per-head q/k LayerNorms (one weight [H, hd])
        cfg.update(attention_dropout=0.0, use_qk_norm=True)
    elif family == "gpt_oss":  # sinks need the eager attention; sliding, then full
        cfg.update(attention_dropout=0.0, num_local_experts=4, num_experts_per_tok=2,
                   router_aux_loss_coef=0.0, sliding_window=POSITIONS // 8,
                   layer_types=["sliding_attention", "full_attention"],
                   rope_parameters={"rope_type": "default", "rope_theta": 150000.0})
    elif family == "qwen2_moe":  # 4 routed experts, top 2, a shared expert with a 1-wide gate
        cfg.update(attention_dropout=0.0, moe_intermediate_size=32,
                   shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                   router_aux_loss_coef=0.0)
    elif family in ("qwen3_moe", "olmoe", "granitemoe"):  # 4 experts, top 2
        experts = "num_local_experts" if family == "granitemoe" else "num_experts"
        cfg.update({"attention_dropout": 0.0, experts: 4, "num_experts_per_tok": 2,
                    "router_aux_loss_coef": 0.0})
        if family == "qwen3_moe":
            cfg["moe_intermediate_size"] = 32
    elif family == "gemma3":  # a 4-token window, shorter than the tests' 8
        cfg.update(attention_dropout=0.0, query_pre_attn_scalar=HIDDEN // HEADS,
                   sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    elif family == "phi":
        cfg.update(attention_dropout=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    elif family == "opt":
        cfg.pop("intermediate_size")
        cfg.update(ffn_dim=INTERMEDIATE, word_embed_proj_dim=HIDDEN, dropout=0.0,
                   attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0)
    elif family in ("gptj", "codegen"):  # GPT-2's names; rotary on the first 8 of 16 dims
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                  "max_position_embeddings", "intermediate_size"):
            cfg.pop(k)
        cfg.update(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=POSITIONS,
                   n_inner=INTERMEDIATE, rotary_dim=8, resid_pdrop=0.0, embd_pdrop=0.0,
                   attn_pdrop=0.0)
        if family == "codegen":
            cfg["n_ctx"] = POSITIONS
    elif family == "deepseek_v3":  # low-rank q and kv (MLA), a dense first layer, 4 experts
        cfg.update(num_key_value_heads=HEADS, q_lora_rank=32, kv_lora_rank=16,
                   qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4,
                   num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
                   n_group=1, topk_group=1, attention_dropout=0.0)
    elif family == "mpt":  # its MLP is expansion_ratio x d_model
        cfg.pop("intermediate_size")
        cfg.update(expansion_ratio=INTERMEDIATE // HIDDEN, resid_pdrop=0.0, emb_pdrop=0.0,
                   attn_config={"attn_pdrop": 0})  # its config type-checks an int
    return cfg


def config(family: str, **overrides: Any):
    """The family's transformers config object for the tiny size plus overrides."""
    import transformers

    if family not in _CLASSES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    cfg = _common(family)
    attn = overrides.pop("attn_implementation", _DEFAULT_ATTN.get(family, "sdpa"))
    cfg.update(overrides)
    if family in ("gpt2", "mpt"):
        names = _GPT2_NAMES if family == "gpt2" else _MPT_NAMES
        cfg = {names.get(k, k): v for k, v in cfg.items()}
    config_cls = getattr(transformers, _CLASSES[family][0])
    return config_cls(attn_implementation=attn, **cfg)


def build(family: str, **overrides: Any) -> nn.Module:
    """A tiny randomly initialised model of the family (float32, train mode, on CPU)."""
    import transformers

    cfg = config(family, **overrides)
    model_cls = getattr(transformers, _CLASSES[family][1])
    model = model_cls(cfg)
    if family == "gpt2":
        # its class name does not match "ForCausalLM", so transformers warns on every
        # loss and then uses that loss anyway; say it up front
        model.loss_type = "ForCausalLM"
    model.train()
    return model


def example_inputs(family: str, batch: int = 2, seq: int = 8) -> dict[str, torch.Tensor]:
    """Keyword inputs: random ``input_ids``, an all-ones ``attention_mask`` and ``labels``.

    Decoders shift ``labels`` inside the loss, so labels are the ids themselves; for BERT
    they are masked-LM targets, here every position (no -100s), which is fine for tests.
    """
    if family not in _CLASSES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    input_ids = torch.randint(3, VOCAB, (batch, seq))  # clear of pad/bos/eos
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "labels": input_ids.clone(),
    }
