"""Tiny random Hugging Face MoE checkpoints, built offline while the tests run (transformers + torch CPU), and
Hugging Face's own blocks (attention, router, MLP / MoE of one layer) as references for per-block tests.

initializer_range 0.2 keeps router scores and logits far from ties, so top-k and argmax are
stable between implementations. Tensors transformers initialises to zero (DeepSeek / GLM score-correction
bias, gpt-oss expert biases) are drawn at random before saving, large enough to change routing and outputs,
so a test sees them. `save_tokenizer` adds a tokenizer.json trained on a few strings (no download).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Shared shape: 8 experts (EP up to 8), 8 heads / 2 kv heads (TP4 replicates kv heads), head_dim independent of
# hidden size (except OLMoE, whose q/k norms need head_dim = hidden / heads), 3 layers (uneven over 2 stages) or
# 4 with a dense first layer (DeepSeek / GLM: PP2 puts the stage boundary inside the MoE stack), vocab 128.
_COMMON = dict(vocab_size=128, hidden_size=48, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
               num_experts_per_tok=2, initializer_range=0.2, max_position_embeddings=1024,
               rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
# DeepSeek-V3 / GLM-4.5 structure: 1 dense layer then 3 MoE layers, one shared expert.
_GROUPED = dict(num_hidden_layers=4, first_k_dense_replace=1, n_routed_experts=8, moe_intermediate_size=32,
                intermediate_size=64, n_shared_experts=1, norm_topk_prob=True)

FAMILIES = {
    "mixtral": ("MixtralConfig", dict(head_dim=16, num_local_experts=8, intermediate_size=32, rope_theta=10000.0)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=8, moe_intermediate_size=32, intermediate_size=64,
                                         norm_topk_prob=False, rope_theta=1000000.0)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(head_dim=16, num_experts=8, moe_intermediate_size=32, intermediate_size=64,
                                         shared_expert_intermediate_size=40, norm_topk_prob=True, qkv_bias=True)),
    # MLA with query compression; N = K = 8 heads (MLA has no kv heads); transformers' head_dim is the rope width.
    "deepseek_v3": ("DeepseekV3Config", dict(**_GROUPED, num_key_value_heads=8, head_dim=8, q_lora_rank=24,
                                             kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                                             n_group=4, topk_group=2, routed_scaling_factor=2.5)),
    "glm4_moe": ("Glm4MoeConfig", dict(**_GROUPED, head_dim=16, use_qk_norm=True, attention_bias=True,
                                       partial_rotary_factor=0.5, n_group=1, topk_group=1, routed_scaling_factor=1.5)),
    "olmoe": ("OlmoeConfig", dict(num_experts=8, intermediate_size=32)),  # head_dim 48 / 8 = 6
    # Sliding (window 8) and full layers alternate; swiglu_limit low enough that the clamp cuts some activations.
    "gpt_oss": ("GptOssConfig", dict(
        head_dim=16, num_hidden_layers=4, num_local_experts=8, intermediate_size=32, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2, swiglu_limit=2.0,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 256})),
}
# Further checkpoints of a family: name -> (family, overrides of its FAMILIES config).
VARIANTS = {
    "deepseek_v3_no_q_lora": ("deepseek_v3", dict(q_lora_rank=None)),
    "deepseek_v3_yarn_bias": ("deepseek_v3", dict(attention_bias=True, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0})),
    "olmoe_clip_qkv": ("olmoe", dict(clip_qkv=2.0)),
}
# Tensors transformers zero-initialises (or draws small), drawn here with this standard deviation instead.
_RANDOMIZED = {"mlp.gate.e_score_correction_bias": 0.5, "self_attn.sinks": 1.0, "mlp.router.bias": 0.5,
               "mlp.experts.gate_up_proj_bias": 0.5, "mlp.experts.down_proj_bias": 0.2}


def hf_config(name: str, **overrides):
    """The transformers config of FAMILIES or VARIANTS entry `name`, with `overrides`."""
    import transformers

    family, variant = VARIANTS.get(name, (name, {}))
    cls_name, extra = FAMILIES[family]
    kwargs = {**_COMMON, **extra, **variant, **overrides}
    return getattr(transformers, cls_name)(**kwargs)


def build(name: str, path: Path, seed: int = 0, **overrides):
    """Save a random HF checkpoint of `name` (a FAMILIES or VARIANTS entry) to `path`; return the torch model
    (float32, eager)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(name, **overrides), dtype=torch.float32,
                                             attn_implementation="eager", experts_implementation="eager")
    with torch.no_grad():
        for key, tensor in [*model.named_parameters(), *model.named_buffers()]:
            std = next((s for suffix, s in _RANDOMIZED.items() if key.endswith(suffix)), None)
            if std is not None:
                tensor.copy_(std * torch.randn(tensor.shape))
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    import torch

    with torch.no_grad():
        ids = torch.tensor([prompt])
        # An explicit mask: otherwise HF infers one from pad_token_id and masks prompt tokens equal to it.
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


# ---- Hugging Face's blocks of one layer, float32 numpy in and out ----------------------------------------------


class _Captured(Exception):
    pass


def _attention_kwargs(model, layer: int, batch: int, tokens: int) -> dict:
    """The keyword arguments layer `layer` passes its attention (rotary cos/sin from the model's rotary_emb, the
    causal or sliding-window mask of that layer, position ids 0..T-1) in a forward of `batch` x `tokens` tokens:
    captured from the model's own forward, stopped there, so every family's way of calling it is replicated."""
    import torch

    captured = {}

    def hook(module, args, kwargs):
        captured.update(kwargs)
        raise _Captured

    handle = model.model.layers[layer].self_attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(torch.zeros((batch, tokens), dtype=torch.long))
    except _Captured:
        pass
    finally:
        handle.remove()
    captured.pop("hidden_states", None)
    return captured


def hf_attention(model, layer: int, x: np.ndarray) -> np.ndarray:
    """Output [B, T, D] of `model.model.layers[layer].self_attn` (eager) for input `x` [B, T, D] (the attention
    norm's output) at positions 0..T-1, with the layer's own mask (causal, or sliding-window where it has one)."""
    import torch

    kwargs = _attention_kwargs(model, layer, *x.shape[:2])
    with torch.no_grad():
        out = model.model.layers[layer].self_attn(hidden_states=torch.tensor(x, dtype=torch.float32), **kwargs)
    return out[0].float().numpy()


def hf_router(model, layer: int, x: np.ndarray, by_expert: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(weights, expert ids), each [B*T, X], that layer `layer`'s router gives the tokens `x` [B, T, D] (the MLP
    norm's output): as the family's router returns them (DeepSeek / GLM: unordered within a row; the others by
    descending weight), or each row ordered by expert id if `by_expert`."""
    import torch

    mlp = model.model.layers[layer].mlp
    router = getattr(mlp, "router", None) or getattr(mlp, "gate", None)
    if router is None or isinstance(router, torch.nn.Linear):
        raise ValueError(f"layer {layer} of this {model.config.model_type} model is not an MoE layer (no router)")
    with torch.no_grad():
        _, weights, ids = router(torch.tensor(x, dtype=torch.float32).reshape(-1, x.shape[-1]))
    weights, ids = weights.float().numpy(), ids.numpy()
    if by_expert:
        order = np.argsort(ids, axis=-1)
        weights, ids = np.take_along_axis(weights, order, -1), np.take_along_axis(ids, order, -1)
    return weights, ids


def hf_mlp(model, layer: int, x: np.ndarray) -> np.ndarray:
    """Output [B, T, D] of `model.model.layers[layer].mlp` (the MoE block with its shared expert, or a dense FFN)
    for `x` [B, T, D] (the MLP norm's output)."""
    import torch

    with torch.no_grad():
        out = model.model.layers[layer].mlp(torch.tensor(x, dtype=torch.float32))
    return (out[0] if isinstance(out, tuple) else out).float().numpy()  # gpt-oss also returns the router scores


TOKENIZER_TEXTS = ("the quick brown fox jumps over the lazy dog", "hello world", "moejax serves mixtures of experts")


def save_tokenizer(path: Path, vocab_size: int = 128):
    """Save a word-level tokenizer.json of `vocab_size` words (every id decodes to a word): "<unk>", "<s>" (added
    first on encode, as Mixtral's tokenizer does), the words of TOKENIZER_TEXTS, then fillers "w<id>"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    words = ["<unk>", "<s>"] + sorted({w for t in TOKENIZER_TEXTS for w in t.split()})
    words += [f"w{i}" for i in range(len(words), vocab_size)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.add_special_tokens(["<unk>", "<s>"])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    Path(path).mkdir(parents=True, exist_ok=True)
    tok.save(str(Path(path) / "tokenizer.json"))
    return tok
