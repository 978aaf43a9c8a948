"""`moejax demo-checkpoint DIR`: a tiny Hugging Face checkpoint with a tokenizer, written offline.

The checkpoint is what `moejax.load` and `moejax generate --model DIR --prompt TEXT` read: `config.json` (the
Hugging Face config of a built-in model config, e.g. tiny-moe), `model.safetensors` (its random weights, the
same values as `Model.random(cfg, seed=...)`, stored in Hugging Face's names and layouts), and `tokenizer.json`,
a BPE tokenizer trained with the `tokenizers` library on the English text the package ships
(`moejax/data/demo_corpus.txt`). No download and no torch: the weights are written with `safetensors` directly.

The weights are random, so the text that comes out is random pieces of words: the checkpoint shows that text
goes in, through every layer on any layout, and comes out again. The model's vocabulary is the tokenizer's,
which is the config's `vocab_size` when the corpus yields that many tokens (tiny-moe's 512 does), smaller
otherwise (then the config's vocabulary shrinks to it, said in the summary).

The Hugging Face names come from the loader's own mapping tables (`moejax.checkpoint.families`), inverted
element by element (`moejax.checkpoint.hf.hf_tensors`), so writer and reader cannot disagree on a name or a
transpose.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import string
from importlib import resources
from pathlib import Path

import numpy as np

from moejax.config import ModelConfig

DEFAULT_MODEL = "tiny-moe"
CORPUS = "data/demo_corpus.txt"  # inside the package
MAX_PARAMETERS = 200_000_000  # random float32 weights: 800 MB on disk at most
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2; "<s>" starts every encoded prompt, as Mixtral's does
_MARK = "moejax_demo"  # key in config.json: this folder was written here (a later run may replace it)
_ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                  "qwen3_moe": "Qwen3MoeForCausalLM"}


def corpus_text() -> str:
    """The English text the demo tokenizer is trained on (self-written, shipped in the package)."""
    return resources.files("moejax").joinpath(CORPUS).read_text(encoding="utf-8")


def train_tokenizer(vocab_size: int):
    """A BPE `tokenizers.Tokenizer` of at most `vocab_size` tokens (fewer when the corpus runs out of merges).

    Sentencepiece-style (`▁` marks a word start), so every id decodes to plain text; printable ASCII is
    always in the alphabet, so any ASCII prompt encodes without `<unk>`. Deterministic: the same corpus and
    size give the same file.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    alphabet = sorted(set(string.printable) - set(string.whitespace))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=1,
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(corpus_text().splitlines(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok


def hf_config(cfg: ModelConfig) -> dict:
    """The Hugging Face config.json dict of `cfg`; ValueError if it cannot say `cfg` exactly.

    Checked by reading it back with `ModelConfig.from_hf`: a field Hugging Face's config of this family
    cannot express (e.g. q/k biases without an output bias in Qwen3) is refused, naming it.
    """
    if cfg.family not in _ARCHITECTURES:
        raise ValueError(f"model {cfg.name or cfg.family}: family {cfg.family!r} has no Hugging Face checkpoint "
                         f"form here; runtime families: {sorted(_ARCHITECTURES)}")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    out = {
        "architectures": [_ARCHITECTURES[cfg.family]], "model_type": cfg.family, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "num_experts_per_tok": cfg.num_experts_per_tok, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": rope, "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "bos_token_id": 1, "eos_token_id": 2, "dtype": "float32",
    }
    if cfg.family == "mixtral":
        out |= {"intermediate_size": cfg.moe_intermediate_size, "num_local_experts": cfg.num_experts,
                "sliding_window": cfg.sliding_window}
    else:
        out |= {"moe_intermediate_size": cfg.moe_intermediate_size, "intermediate_size": cfg.moe_intermediate_size,
                "num_experts": cfg.num_experts, "norm_topk_prob": cfg.norm_topk_prob, "decoder_sparse_step": 1,
                "mlp_only_layers": [], "use_sliding_window": cfg.sliding_window is not None,
                "sliding_window": cfg.sliding_window}
        if cfg.family == "qwen2_moe":
            out |= {"qkv_bias": cfg.qkv_bias, "shared_expert_intermediate_size": cfg.shared_expert_intermediate_size}
        else:
            out["attention_bias"] = cfg.qkv_bias
    back = ModelConfig.from_hf(out, name=cfg.name)
    differ = [f"{f}={getattr(cfg, f)!r} (reads back as {getattr(back, f)!r})" for f in cfg.__dataclass_fields__
              if getattr(back, f) != getattr(cfg, f)]
    if differ:
        raise ValueError(f"model {cfg.name}: a Hugging Face {cfg.family} config cannot express " + ", ".join(differ))
    return out


def hf_tensors(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Hugging Face tensor name -> float32 array: the weights of `Model.random(cfg, seed=seed)`."""
    from moejax.checkpoint import hf
    from moejax.weights import RandomSource

    source = RandomSource(cfg, seed)
    return hf.hf_tensors(cfg, lambda name, layer: source.read(  # in each family's default (hub) names
        name, layer, tuple(slice(None) for _ in source.shapes[name][0])))


def _parameters(cfg: ModelConfig) -> int:
    from moejax.weights import parameter_count

    return parameter_count(cfg)


def _check_target(path: Path) -> None:
    """Refuse a target that is a file, or a folder holding anything but an earlier demo checkpoint."""
    if not path.exists():
        return
    if not path.is_dir():
        raise ValueError(f"{path} exists and is not a folder; give a new folder for the demo checkpoint")
    if not any(path.iterdir()):
        return
    try:
        ours = _MARK in json.loads((path / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        ours = False
    if not ours:
        raise ValueError(f"{path} exists and holds other files (not a checkpoint written by demo-checkpoint); give a "
                         f"new or empty folder")


def write_demo_checkpoint(path: str | Path, model: str = DEFAULT_MODEL, seed: int = 0) -> dict:
    """Write a demo checkpoint (config.json, model.safetensors, tokenizer.json) of config `model` into `path`.

    Args:
      path: a new or empty folder, or one an earlier call wrote (replaced whole).
      model: a built-in config name (`configs/models/`), a YAML path or a checkpoint folder (its shapes).
      seed: random-weight seed; the weights equal `Model.random(cfg, seed=seed)`'s.

    Returns:
      A summary: path, model, family, parameters, vocab_size (the tokenizer's), config_vocab_size, seed.

    Raises:
      ValueError: a model the runtime cannot run, one larger than MAX_PARAMETERS, or a target folder that
        holds other files. Nothing is left behind on an error or an interrupt: the files are written into a
        temporary folder beside `path`, renamed into place at the end.
    """
    from safetensors.numpy import save_file

    from moejax.args import read_model_config

    path = Path(path)
    cfg = read_model_config(model)
    cfg.check_runtime_support()
    _check_target(path)
    params = _parameters(cfg)
    if params > MAX_PARAMETERS:
        raise ValueError(f"model {cfg.name} has {params / 1e6:,.0f}M parameters; a demo checkpoint holds at most "
                         f"{MAX_PARAMETERS / 1e6:.0f}M (tiny-moe, qwen3-30b-a3b-tiny and bench-moe-100m fit)")
    tokenizer = train_tokenizer(cfg.vocab_size)
    demo_cfg = cfg.replace(vocab_size=tokenizer.get_vocab_size())
    config = hf_config(demo_cfg)
    summary = {"path": str(path), "model": cfg.name, "family": cfg.family, "parameters": _parameters(demo_cfg),
               "vocab_size": demo_cfg.vocab_size, "config_vocab_size": cfg.vocab_size, "seed": seed}
    config[_MARK] = {k: summary[k] for k in ("model", "seed")} | {"corpus": f"moejax/{CORPUS}"}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    try:
        tmp.mkdir()
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(hf_tensors(demo_cfg, seed), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
            "unk_token": "<unk>", "model_max_length": cfg.max_position_embeddings}, indent=2) + "\n")
        if path.exists():
            path.rename(old)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return summary


# ---- command line --------------------------------------------------------------------------------


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `demo-checkpoint` subcommand to an argparse subparsers object."""
    from moejax.args import int_in

    p = subparsers.add_parser(
        "demo-checkpoint", help="write a tiny HF checkpoint with a tokenizer (offline) for text prompts",
        description="Write a tiny Hugging Face checkpoint (config.json, model.safetensors with random weights, "
                    "tokenizer.json: a BPE tokenizer trained on English text shipped with moejax) into DIR, "
                    "offline. Then: moejax generate --model DIR --prompt TEXT.")
    p.add_argument("dir", metavar="DIR", help="a new or empty folder (or an earlier demo checkpoint, replaced)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"built-in config name in configs/models or a YAML path (default {DEFAULT_MODEL})")
    p.add_argument("--seed", type=int_in(0), default=0,
                   help="random-weight seed; the weights equal `generate --model NAME --seed SEED`'s (default 0)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """`moejax demo-checkpoint`: write the checkpoint, print what was written and how to use it."""
    s = write_demo_checkpoint(args.dir, args.model, args.seed)
    vocab = (f"vocabulary {s['vocab_size']}" if s["vocab_size"] == s["config_vocab_size"] else
             f"vocabulary {s['vocab_size']} (the tokenizer's; {s['model']} has {s['config_vocab_size']}, more "
             f"tokens than the shipped text yields)")
    print(f"wrote {s['path']}: {s['model']} ({s['family']}, {s['parameters'] / 1e6:.1f}M parameters, random "
          f"weights, seed {s['seed']}), {vocab}, tokenizer.json trained on moejax/{CORPUS}")
    print(f"try: moejax generate --model {s['path']} --prompt \"The river\" --max-new-tokens 16")
    return 0
