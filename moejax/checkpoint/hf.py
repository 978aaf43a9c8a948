"""Hugging Face safetensors import for Mixtral, Qwen2-MoE and Qwen3-MoE checkpoints.

Reads config.json and model.safetensors (or sharded files listed by model.safetensors.index.json).
Experts may be stored per expert (`experts.{e}.w1/w2/w3`, `experts.{e}.gate_proj/up_proj/down_proj`)
or fused (`experts.gate_up_proj` [E, 2F, D] with gate rows first, `experts.down_proj` [E, D, F]).
The whole checkpoint is checked against the config before any tensor is read: a missing,
unexpected or mis-shaped tensor is an error naming it with the expected and found shapes.
Malformed files (JSON, safetensors headers, paths) are refused by `safetensors_files`, and every
block read is checked for NaN/inf unless `allow_nonfinite=True`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from moejax.checkpoint.safetensors_files import DTYPES as _DTYPES
from moejax.checkpoint.safetensors_files import CheckpointError, TensorEntry, open_tensor, read_json, tensor_files
from moejax.config import ModelConfig

__all__ = ["CheckpointError", "HFSource"]


class HFSource:
    """Serves canonical moejax tensors (see `moejax.weights.canonical_shapes`) from a HF checkpoint."""

    def __init__(self, path: str | Path, cfg: ModelConfig | None = None, allow_nonfinite: bool = False):
        self.path = Path(path)
        if not os.path.lexists(self.path / "config.json"):
            raise FileNotFoundError(f"{self.path} is not a Hugging Face checkpoint: no config.json")
        self.cfg = cfg or _load_config(self.path / "config.json")
        self.allow_nonfinite = allow_nonfinite
        self._last_tensor = ""  # the stored tensor `read` served last, named if its block is not finite
        self.files = _tensor_files(self.path)
        self.shapes = {name: info[1] for name, info in self.files.items()}
        self.moe_prefix = self._moe_prefix()
        self.fused = f"model.layers.0.{self.moe_prefix}.experts.gate_up_proj" in self.shapes
        self._check()

    # ---- validation --------------------------------------------------------------------------

    def expected(self) -> dict[str, tuple[int, ...]]:
        """Hugging Face tensor name -> shape this config requires."""
        c = self.cfg
        D, N, K, H, E, F = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.num_experts,
                            c.moe_intermediate_size)
        out = {"model.embed_tokens.weight": (c.vocab_size, D), "model.norm.weight": (D,)}
        if not c.tie_word_embeddings:
            out["lm_head.weight"] = (c.vocab_size, D)
        for layer in range(c.num_layers):
            p, m = f"model.layers.{layer}", f"model.layers.{layer}.{self.moe_prefix}"
            out |= {f"{p}.input_layernorm.weight": (D,), f"{p}.post_attention_layernorm.weight": (D,),
                    f"{p}.self_attn.q_proj.weight": (N * H, D), f"{p}.self_attn.k_proj.weight": (K * H, D),
                    f"{p}.self_attn.v_proj.weight": (K * H, D), f"{p}.self_attn.o_proj.weight": (D, N * H),
                    f"{m}.gate.weight": (E, D)}
            if c.qkv_bias:
                out |= {f"{p}.self_attn.q_proj.bias": (N * H,), f"{p}.self_attn.k_proj.bias": (K * H,),
                        f"{p}.self_attn.v_proj.bias": (K * H,)}
            if c.o_bias:
                out[f"{p}.self_attn.o_proj.bias"] = (D,)
            if c.qk_norm:
                out |= {f"{p}.self_attn.q_norm.weight": (H,), f"{p}.self_attn.k_norm.weight": (H,)}
            if self.fused:
                out |= {f"{m}.experts.gate_up_proj": (E, 2 * F, D), f"{m}.experts.down_proj": (E, D, F)}
            else:
                for e in range(E):
                    gate, up, down = self._expert_names(layer, e)
                    out |= {gate: (F, D), up: (F, D), down: (D, F)}
            if c.shared_expert_intermediate_size:
                Fs, s = c.shared_expert_intermediate_size, f"{p}.mlp.shared_expert"
                out |= {f"{s}.gate_proj.weight": (Fs, D), f"{s}.up_proj.weight": (Fs, D),
                        f"{s}.down_proj.weight": (D, Fs)}
            if c.shared_expert_gate:
                out[f"{p}.mlp.shared_expert_gate.weight"] = (1, D)
        return out

    def _check(self) -> None:
        expected = self.expected()
        found = dict(self.shapes)
        if self.cfg.tie_word_embeddings:
            found.pop("lm_head.weight", None)  # some exporters save the tied head anyway
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        wrong = [f"{n}: expected shape {expected[n]}, found {found[n]}" for n in sorted(set(expected) & set(found))
                 if tuple(found[n]) != expected[n]]
        bad_dtype = [f"{n}: dtype {self.files[n][2]} is not a floating type" for n in sorted(found)
                     if self.files[n][2] not in _DTYPES]
        problems = ([f"missing tensor {n} (expected shape {expected[n]})" for n in missing[:20]]
                    + [f"unexpected tensor {n} with shape {found[n]}" for n in unexpected[:20]] + wrong + bad_dtype)
        if problems:
            more = max(0, len(missing) - 20) + max(0, len(unexpected) - 20)
            raise CheckpointError(f"checkpoint {self.path} does not match its config ({self.cfg.family}): "
                                  + "; ".join(problems) + (f"; and {more} more" if more else ""))

    def _moe_prefix(self) -> str:
        if self.cfg.family == "mixtral" and "model.layers.0.block_sparse_moe.gate.weight" in self.shapes:
            return "block_sparse_moe"
        return "mlp"

    def _expert_names(self, layer: int, e: int) -> tuple[str, str, str]:
        m = f"model.layers.{layer}.{self.moe_prefix}.experts.{e}"
        if self.moe_prefix == "block_sparse_moe":
            return f"{m}.w1.weight", f"{m}.w3.weight", f"{m}.w2.weight"
        return f"{m}.gate_proj.weight", f"{m}.up_proj.weight", f"{m}.down_proj.weight"

    # ---- reading -------------------------------------------------------------------------------

    def tensor(self, name: str) -> np.ndarray:
        """A memory-mapped view of one stored tensor (bytes are read only when sliced)."""
        self._last_tensor = name
        return open_tensor(name, self.files[name])

    def read(self, name: str, layer: int | None, index: tuple[slice, ...]) -> np.ndarray:
        c = self.cfg
        p = f"model.layers.{layer}"
        if name in ("moe.wg", "moe.wu", "moe.wd"):
            return self._experts(name, layer, index)
        N, K, H = c.num_heads, c.num_kv_heads, c.head_dim
        attn = f"{p}.self_attn"
        getters = {
            "embed": lambda: self.tensor("model.embed_tokens.weight"),
            "unembed": lambda: self.tensor("lm_head.weight").T,
            "final_norm": lambda: self.tensor("model.norm.weight"),
            "attn_norm": lambda: self.tensor(f"{p}.input_layernorm.weight"),
            "mlp_norm": lambda: self.tensor(f"{p}.post_attention_layernorm.weight"),
            "attn.wq": lambda: self.tensor(f"{attn}.q_proj.weight").reshape(N, H, -1).transpose(2, 0, 1),
            "attn.wk": lambda: self.tensor(f"{attn}.k_proj.weight").reshape(K, H, -1).transpose(2, 0, 1),
            "attn.wv": lambda: self.tensor(f"{attn}.v_proj.weight").reshape(K, H, -1).transpose(2, 0, 1),
            "attn.wo": lambda: self.tensor(f"{attn}.o_proj.weight").T.reshape(N, H, -1),
            "attn.bq": lambda: self.tensor(f"{attn}.q_proj.bias").reshape(N, H),
            "attn.bk": lambda: self.tensor(f"{attn}.k_proj.bias").reshape(K, H),
            "attn.bv": lambda: self.tensor(f"{attn}.v_proj.bias").reshape(K, H),
            "attn.bo": lambda: self.tensor(f"{attn}.o_proj.bias"),
            "attn.q_norm": lambda: self.tensor(f"{attn}.q_norm.weight"),
            "attn.k_norm": lambda: self.tensor(f"{attn}.k_norm.weight"),
            "moe.router": lambda: self.tensor(f"{p}.{self.moe_prefix}.gate.weight").T,
            "moe.shared_wg": lambda: self.tensor(f"{p}.mlp.shared_expert.gate_proj.weight").T,
            "moe.shared_wu": lambda: self.tensor(f"{p}.mlp.shared_expert.up_proj.weight").T,
            "moe.shared_wd": lambda: self.tensor(f"{p}.mlp.shared_expert.down_proj.weight").T,
            "moe.shared_gate": lambda: self.tensor(f"{p}.mlp.shared_expert_gate.weight")[0],
        }
        block = np.asarray(getters[name]())[index]
        return self._checked(block, f"{self._last_tensor} ({name}, layer {layer})" if layer is not None
                             else f"{self._last_tensor} ({name})")

    def _experts(self, name: str, layer: int, index: tuple[slice, ...]) -> np.ndarray:
        """[E, D, F] (gate, up) or [E, F, D] (down) slice, reading only the experts in the slice."""
        F = self.cfg.moe_intermediate_size
        experts = range(*index[0].indices(self.cfg.num_experts))
        m = f"model.layers.{layer}.{self.moe_prefix}.experts"
        out = []
        for e in experts:
            if self.fused:
                if name == "moe.wd":
                    w = self.tensor(f"{m}.down_proj")[e].T
                else:
                    w = self.tensor(f"{m}.gate_up_proj")[e, (slice(0, F) if name == "moe.wg" else slice(F, 2 * F))].T
            else:
                gate, up, down = self._expert_names(layer, e)
                w = self.tensor({"moe.wg": gate, "moe.wu": up, "moe.wd": down}[name]).T
            out.append(self._checked(w[index[1:]], f"{self._last_tensor} (expert {e})" if self.fused
                                     else self._last_tensor))
        return np.stack(out)

    def _checked(self, block: np.ndarray, what: str) -> np.ndarray:
        """`block` unchanged, or an error naming the tensor if it holds NaN/inf (unless allowed)."""
        if self.allow_nonfinite:
            return block
        finite = np.isfinite(block)
        if not finite.all():
            bad = finite.size - int(np.count_nonzero(finite))
            raise CheckpointError(f"checkpoint {self.path}: tensor {what} has {bad} non-finite value(s) (NaN or inf) "
                                  f"in the block read; pass allow_nonfinite=True to load it anyway")
        return block


def _tensor_files(path: Path) -> dict[str, TensorEntry]:
    """name -> (file, shape, dtype, byte offset) over the checkpoint's safetensors files (headers only)."""
    return tensor_files(path)


def _load_config(file: Path) -> ModelConfig:
    """The ModelConfig of a config.json; a malformed file is a CheckpointError naming it."""
    data = read_json(file, "config")
    try:
        return ModelConfig.from_hf(data, name=file.parent.name)
    except KeyError as e:
        raise CheckpointError(f"config {file} has no {e.args[0]!r} entry") from None
    except (TypeError, ValueError, ArithmeticError) as e:
        raise CheckpointError(f"config {file}: {e}") from None
