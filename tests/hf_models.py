"""Tiny random Hugging Face MoE checkpoints, built offline while the tests run (transformers + torch CPU).

initializer_range 0.2 keeps router scores and logits far from ties, so top-k and argmax are
stable between implementations. `save_tokenizer` adds a tokenizer.json trained on a few strings (no download).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Shared shape: 8 experts (EP up to 8), 8 heads / 2 kv heads (TP4 replicates kv heads),
# head_dim independent of hidden size, 3 layers (uneven over 2 stages), vocab 128.
_COMMON = dict(vocab_size=128, hidden_size=48, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
               head_dim=16, num_experts_per_tok=2, initializer_range=0.2, max_position_embeddings=1024,
               rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)

FAMILIES = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=8, intermediate_size=32, rope_theta=10000.0)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=8, moe_intermediate_size=32, intermediate_size=64,
                                         norm_topk_prob=False, rope_theta=1000000.0)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=8, moe_intermediate_size=32, intermediate_size=64,
                                         shared_expert_intermediate_size=40, norm_topk_prob=True, qkv_bias=True)),
}


def hf_config(family: str, **overrides):
    import transformers

    cls_name, extra = FAMILIES[family]
    kwargs = {**_COMMON, **extra, **overrides}
    return getattr(transformers, cls_name)(**kwargs)


def build(family: str, path: Path, seed: int = 0, **overrides):
    """Save a random HF checkpoint of `family` to `path`; return the torch model (float32, eager)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, **overrides), dtype=torch.float32,
                                             attn_implementation="eager", experts_implementation="eager")
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
