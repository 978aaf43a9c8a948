"""The user-facing model handle: `moejax.load(...)` -> `Model` with `forward` and greedy `generate`.

`generate` is the simple batch path (all prompts start together, contiguous pages per sequence);
the serving engine (`moejax.engine`) drives the same compiled step with in-flight batching.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from moejax import sharding
from moejax import steps as steps_lib
from moejax.config import ModelConfig, ceil_div, round_up
from moejax.distributed import fetch
from moejax.engine.sampling import SamplingParams, check_context, check_int, check_prompt
from moejax.fit import check_weights_fit
from moejax.mesh import Layout, make_mesh
from moejax.model.moe import Strategy
from moejax.weights import RandomSource, WeightSource, abstract_model, place

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def bucket(n: int, minimum: int = 8) -> int:
    """Smallest power of two >= n (and >= minimum): the static shapes steps compile for."""
    size = minimum
    while size < n:
        size *= 2
    return size


@dataclass
class GenerateStats:
    ttft_s: float = 0.0  # prefill through the first token
    tpot_s: float = 0.0  # mean time per output token after the first
    token_times_s: list[float] = field(default_factory=list)


class Model:
    """A model placed on a mesh for one layout, with compiled forward and step functions.

    Args:
      cfg: the model. source: a weight source (`moejax.weights`). layout: e.g. "DP2TP2EP2".
      dtype: serving dtype. moe_strategy: MoE dispatch strategy (`moejax.model.moe.STRATEGIES`).
      devices: devices for the mesh (default: the first `layout.size` of `jax.devices()`).
      ep_attention: the expert axis's mode: "data" (attention data-parallel over the expert group,
        tokens exchanged all-to-all with the experts; the default) or "replicated" (`moejax.sharding`).
      exchange: the "data" mode's token exchange (`moejax.model.moe.EXCHANGES`).
    """

    tokenizer = None  # a `tokenizers.Tokenizer` when `load` found the checkpoint's tokenizer.json (moejax.tokenizer)

    def __init__(self, cfg: ModelConfig, source: WeightSource, layout: Layout | str = "DP1",
                 dtype: str = "float32", moe_strategy: str = "auto", devices=None, ep_attention: str = "data",
                 exchange: str = "auto"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.cfg = cfg
        self.ep_attention = sharding.check_mode(ep_attention)
        self.layout = Layout.parse(layout).validate(cfg)
        self.mesh = make_mesh(self.layout, devices)
        Strategy(moe_strategy, exchange).checked(self.mesh.devices.flat[0].platform)  # before any device work
        self.dtype = DTYPES[dtype]
        with jax.set_mesh(self.mesh), sharding.use(ep_attention):
            abstract = abstract_model(cfg, self.layout, self.dtype)
            check_weights_fit(abstract, self.mesh)  # before any placement: refuse with the numbers
            self.module = place(abstract, source, self.mesh)
        self.steps = steps_lib.Steps(self.module, self.mesh, moe_strategy, ep_attention, exchange)
        self.last_stats = GenerateStats()

    @property
    def batch_shards(self) -> int:
        """Groups the requests are split into: `data`, times `expert` in the "data" expert mode."""
        return self.steps.batch_shards

    @classmethod
    def random(cls, cfg: ModelConfig, seed: int = 0, **kwargs) -> Model:
        return cls(cfg, RandomSource(cfg, seed), **kwargs)

    @property
    def params(self):
        return self.steps.params

    # ---- full forward ---------------------------------------------------------------------------

    def forward(self, token_ids) -> np.ndarray:
        """Logits [B, T, V] (float32 numpy) for a full sequence per row, no cache.

        `token_ids` is int [B, T] (rows of equal length), checked on the host as `Engine.add_request` checks a
        prompt (`moejax.engine.sampling.check_prompt`): ValueError before any device work.
        """
        tokens_BT = self._check_rows(token_ids)
        B, T = tokens_BT.shape
        Bp = round_up(B, self.batch_shards)
        tokens = np.zeros((Bp, T), np.int32)
        tokens[:B] = tokens_BT
        pos = np.where(np.arange(Bp)[:, None] < B, np.arange(T, dtype=np.int32)[None], -1)
        with jax.set_mesh(self.mesh):
            logits = self.steps.forward(self.params, self._put(tokens), self._put(pos))
        return fetch(logits).astype(np.float32)[:B]  # every process gets every row (multi-host)

    # ---- greedy generation ----------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], max_new_tokens: int = 32, stop_token_ids=(),
                 page_size: int = 16) -> list[list[int]]:
        """Greedy continuation of each prompt: prefill all prompts in one step, then decode steps.

        Returns the new token ids per prompt (up to max_new_tokens; shorter if a stop id is made,
        which is included). Timing of the last call is in `self.last_stats`. Prompts, `max_new_tokens` and
        `stop_token_ids` are checked as `Engine.add_request` checks them (same messages); ValueError before any
        device work.
        """
        prompts, stop_token_ids = self._check_generate(prompts, max_new_tokens, stop_token_ids, page_size)
        B = len(prompts)
        Bp = round_up(B, self.batch_shards)
        lens = np.array([len(p) for p in prompts] + [0] * (Bp - B), np.int32)
        pages_per_seq = ceil_div(int(lens.max()) + max_new_tokens, page_size)
        per_group = Bp // self.batch_shards
        table = (np.arange(Bp)[:, None] % per_group) * pages_per_seq + np.arange(pages_per_seq)[None]
        cache = self.steps.new_cache(per_group * pages_per_seq * self.batch_shards, page_size, self.dtype)
        T = bucket(int(lens.max()))
        tokens = np.zeros((Bp, T), np.int32)
        for b, p in enumerate(prompts):
            tokens[b, : len(p)] = p
        pos = np.where(np.arange(T)[None] < lens[:, None], np.arange(T, dtype=np.int32)[None], -1)
        stops = set(map(int, stop_token_ids))
        out: list[list[int]] = [[] for _ in range(B)]
        live = np.arange(Bp) < B
        stats = GenerateStats()
        start = time.perf_counter()
        with jax.set_mesh(self.mesh):
            table_d = self._put(table.astype(np.int32))
            index = np.maximum(lens - 1, 0)
            for i in range(max_new_tokens):
                _, next_B, cache = self.steps.step(self.params, cache, self._put(tokens), self._put(pos),
                                                   table_d, self._put(index, steps_lib.TOKENS))
                next_B = fetch(next_B)
                stats.token_times_s.append(time.perf_counter() - start)
                for b in np.flatnonzero(live):
                    out[b].append(int(next_B[b]))
                    if next_B[b] in stops:
                        live[b] = False
                if not live.any():
                    break
                tokens = next_B[:, None].astype(np.int32)
                pos = np.where(live, lens + i, -1)[:, None].astype(np.int32)
                index = np.zeros(Bp, np.int32)
        times = stats.token_times_s
        stats.ttft_s = times[0]
        stats.tpot_s = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0
        self.last_stats = stats
        return out

    # ---- checks and helpers ---------------------------------------------------------------------

    def _check_rows(self, token_ids) -> np.ndarray:
        """int32 [B, T] from rows of token ids, each checked as a prompt (`check_prompt`)."""
        if isinstance(token_ids, (str, bytes)) or not hasattr(token_ids, "__len__") or len(token_ids) == 0:
            raise ValueError(f"token_ids must be a non-empty 2-D [batch, tokens] sequence of token ids, got "
                             f"{token_ids!r:.80}")
        rows = [check_prompt(row, self.cfg.vocab_size, f"token_ids row {b}") for b, row in enumerate(token_ids)]
        lengths = sorted({len(r) for r in rows})
        if len(lengths) > 1:
            raise ValueError(f"token_ids rows must all have the same length (a [batch, tokens] array), got lengths "
                             f"{lengths}; run rows of different lengths in separate calls")
        limit = self.cfg.max_position_embeddings
        if lengths[0] > limit:
            raise ValueError(f"token_ids rows have {lengths[0]} tokens, over the context limit "
                             f"max_position_embeddings={limit}")
        return np.asarray(rows, np.int32)

    def _check_generate(self, prompts, max_new_tokens, stop_token_ids, page_size) -> tuple[list[list[int]], tuple]:
        if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__") or len(prompts) == 0:
            raise ValueError(f"prompts must be a non-empty list of prompts (lists of token ids), got {prompts!r:.80}")
        vocab = self.cfg.vocab_size
        checked = [check_prompt(p, vocab, f"prompt {i}") for i, p in enumerate(prompts)]
        stops = tuple(stop_token_ids) if isinstance(stop_token_ids, (tuple, list)) else stop_token_ids
        SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=stops).check(vocab)
        check_int("page_size", page_size, 1, note="; tokens per KV page")
        for i, p in enumerate(checked):
            check_context(len(p), max_new_tokens, self.cfg.max_position_embeddings, f"prompt {i}")
        return checked, stops

    def _put(self, array: np.ndarray, axes=steps_lib.BATCH):
        return self.steps.put(array, axes)


def load(path: str | Path, layout: Layout | str = "DP1", dtype: str = "float32", allow_nonfinite: bool = False,
         **kwargs) -> Model:
    """Load a checkpoint directory onto a mesh for `layout`: Hugging Face (config.json + safetensors) or
    moejax (orbax, written by `moejax convert`); the kind is detected (`moejax.checkpoint.store.open_source`).

    Each weight goes straight into its sharding (a device reads only its shard, whatever the layout the
    checkpoint was written from). A malformed checkpoint is a `CheckpointError` naming the file or tensor;
    NaN/inf weights of a Hugging Face checkpoint are one too unless `allow_nonfinite`. The model's `tokenizer`
    is the directory's tokenizer.json (`moejax.tokenizer`), or None when it has none.
    """
    from moejax.checkpoint.store import open_source
    from moejax.tokenizer import load_tokenizer

    source = open_source(path, allow_nonfinite=allow_nonfinite)
    tokenizer = load_tokenizer(path)  # a bad file is refused before any weight is placed
    model = Model(source.cfg, source, layout=layout, dtype=dtype, **kwargs)
    model.tokenizer = tokenizer
    return model
