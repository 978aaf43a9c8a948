"""The benchmarks' shared Hugging Face checkpoint: random Mixtral weights for a mixtral-family model config.

`moejax.bench.decode` runs it against Hugging Face `generate`, `moejax.bench.vs_vllm` against vLLM's CPU engine,
`moejax.bench.load_memory` loads it; torch and transformers are imported only when it is built.
"""

from __future__ import annotations

from pathlib import Path


def build_checkpoint(cfg, path: Path, seed: int = 0):
    """Random HF Mixtral checkpoint for a mixtral-family ModelConfig; returns the torch model (float32, eager)."""
    import torch
    import transformers

    if cfg.family != "mixtral":
        raise ValueError(f"the decode benchmark builds Mixtral checkpoints; got family {cfg.family!r}")
    hf_cfg = transformers.MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.moe_intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
    return model
