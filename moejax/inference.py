"""The user-facing model handle: `moejax.load(...)` -> `Model` with `forward` and greedy `generate`.

`generate` is a thin call into the serving engine (`moejax.engine`): all prompts prefill together, then decode
with the engine's compiled step, greedy. `forward` runs the whole sequence without a cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from moejax import native, quant
from moejax import steps as steps_lib
from moejax.config import SERVING_DTYPES, ModelConfig, ceil_div, resolve_dtype, round_up
from moejax.distributed import fetch
from moejax.engine.engine import Engine, ServeConfig
from moejax.engine.sampling import SamplingParams, check_context, check_int, check_prompt
from moejax.fit import check_weights_fit
from moejax.kv_cache import check_kv_cache_dtype
from moejax.mesh import Layout, make_mesh
from moejax.sharding import EXPERT_MODES, Parallelism, expert_mode_of
from moejax.weights import RandomSource, WeightSource, abstract_model, place

DTYPES = dict(zip(SERVING_DTYPES, (jnp.float32, jnp.bfloat16, jnp.float16), strict=True))


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
      dtype: serving dtype: "auto" (the default: the checkpoint's own, `cfg.dtype`, from its config.json
        torch_dtype; float32 when it declares none; bfloat16 for an FP8 / INT8 one: `ModelConfig.serving_dtype`),
        or one of "float32", "bfloat16", "float16". Resolved once, before any device work; `dtype_name` holds the
        resolved name, `dtype` the jax dtype. moe_strategy: MoE dispatch strategy (`moejax.sharding.MOE_STRATEGIES`).
      devices: devices for the mesh (default: the first `layout.size` of `jax.devices()`).
      expert_mode: what the expert axis does outside the MoE blocks: "dp_attention" (attention data-parallel
        over the expert group, tokens exchanged all-to-all with the experts; the default) or
        "replicated_attention" (`moejax.sharding`). ep_attention: its deprecated name (values "data",
        "replicated"), accepted for one release.
      exchange: the dp_attention mode's token exchange (`moejax.sharding.EXCHANGES`).
      quantization: quantize the weights at load, weight-only ("int8", "fp8", "int4": `moejax.quant`), or None: the
        checkpoint's own (a quantized checkpoint's values and scales as stored: `moejax.checkpoint.quantized`), else
        float. A name given for a quantized checkpoint quantizes its dequantized weights again.
      kv_cache_dtype: the KV cache's format in this model's engines (`generate`, and an `Engine` whose
        `ServeConfig.kv_cache_dtype` is None): "fp8" / "int8" (1 byte per value and a scale, `moejax.kv_cache`),
        or None (the serving dtype).

    Every parallel choice is one `Parallelism` (`self.par`), checked before any device work.
    """

    tokenizer = None  # a `tokenizers.Tokenizer` when `load` found the checkpoint's tokenizer.json (moejax.tokenizer)

    def __init__(self, cfg: ModelConfig, source: WeightSource, layout: Layout | str = "DP1",
                 dtype: str = "auto", moe_strategy: str = "auto", devices=None, expert_mode: str = "dp_attention",
                 exchange: str = "auto", ep_attention: str | None = None, quantization: str | None = None,
                 kv_cache_dtype: str | None = None):
        self.dtype_name = resolve_dtype(dtype, cfg)  # "auto": the checkpoint's own; ValueError for a bad name
        quant.scheme(quantization)  # an unknown name is refused before any device work
        self.kv_cache_dtype = check_kv_cache_dtype(kv_cache_dtype)
        self.cfg = cfg
        layout = Layout.parse(layout).validate(cfg)
        if ep_attention is not None and expert_mode == EXPERT_MODES[0]:
            expert_mode = None  # the deprecated keyword given alone
        par = Parallelism(layout, expert_mode_of(expert_mode, ep_attention), moe_strategy, exchange)
        self.mesh = make_mesh(layout, devices)
        self.par = par.checked(native.mesh_platform(self.mesh))  # before any device work
        self.dtype = DTYPES[self.dtype_name]
        if quantization is None:  # a quantized checkpoint's own scheme: values and scales loaded as stored
            quantization = getattr(source, "quantization", None)
        self.quantization = quantization
        with jax.set_mesh(self.mesh):
            abstract = abstract_model(cfg, par, self.dtype, quantization)
            check_weights_fit(abstract, self.mesh)  # before any placement: refuse with the numbers
            self.steps = steps_lib.Steps(place(abstract, source, self.mesh), self.mesh)
        self.last_stats = GenerateStats()

    @property
    def layout(self) -> Layout:
        return self.par.layout

    @property
    def expert_mode(self) -> str:
        return self.par.expert_mode

    @property
    def geometry(self):
        """Stored sizes and layers per stage (`moejax.model.transformer.Geometry`)."""
        return self.steps.geometry

    @property
    def batch_shards(self) -> int:
        """Groups the requests are split into: `data`, times `expert` in the dp_attention expert mode."""
        return self.steps.batch_shards

    @classmethod
    def random(cls, cfg: ModelConfig, seed: int = 0, **kwargs) -> Model:
        """Random weights for `cfg` (`moejax.weights.RandomSource`); `dtype="auto"` (the default) is `cfg.dtype`
        (a built-in config that declares none: float32)."""
        return cls(cfg, RandomSource(cfg, seed), **kwargs)

    @property
    def params(self):
        """The placed weights, a nested dict of global arrays (`Steps.params`: the one handle on them)."""
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
            logits = self.steps.forward(self.params, self.steps.put(tokens), self.steps.put(pos))
        return fetch(logits).astype(np.float32)[:B]  # every process gets every row (multi-host)

    # ---- greedy generation ----------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], max_new_tokens: int = 32, stop_token_ids=(),
                 page_size: int = 16) -> list[list[int]]:
        """Greedy continuation of each prompt: a thin call into the serving engine, every prompt prefilled in
        one step (one chunk each), then one decode step per token.

        Returns the new token ids per prompt (up to max_new_tokens; shorter if a stop id is made,
        which is included). Timing of the last call is in `self.last_stats`. Prompts, `max_new_tokens` and
        `stop_token_ids` are checked as `Engine.add_request` checks them (same messages); ValueError before any
        device work.
        """
        prompts, stops = self._check_generate(prompts, max_new_tokens, stop_token_ids, page_size)
        longest = max(len(p) for p in prompts)
        slots = ceil_div(len(prompts), self.batch_shards)  # per data group: every prompt runs at once
        max_len = longest + max_new_tokens
        engine = Engine(self, ServeConfig(
            max_running=slots * self.batch_shards, page_size=page_size, num_pages=slots * ceil_div(max_len, page_size),
            chunk_size=bucket(longest), max_prefill_seqs=slots, max_model_len=max_len, decode_buckets=(slots,),
            microbatches=1, max_finished_retained=len(prompts)))
        params = SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=stops)
        ids = [engine.add_request(p, params) for p in prompts]
        stats = GenerateStats()
        start = time.perf_counter()
        while engine.has_unfinished():
            if engine.step():
                stats.token_times_s.append(time.perf_counter() - start)
        times = stats.token_times_s
        stats.ttft_s = times[0]
        stats.tpot_s = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0
        self.last_stats = stats
        return [engine.requests[i].output_ids for i in ids]

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


def load(path: str | Path, layout: Layout | str = "DP1", dtype: str = "auto", allow_nonfinite: bool = False,
         **kwargs) -> Model:
    """Load a checkpoint directory onto a mesh for `layout`: Hugging Face (config.json + safetensors) or
    moejax (orbax, written by `moejax convert`); the kind is detected (`moejax.checkpoint.store.open_source`).

    Each weight goes straight into its sharding (a device reads only its shard, whatever the layout the
    checkpoint was written from). A malformed checkpoint is a `CheckpointError` naming the file or tensor;
    NaN/inf weights (either kind of checkpoint) are one too unless `allow_nonfinite`. The model's `tokenizer`
    is the directory's tokenizer.json (`moejax.tokenizer`), or None when it has none.

    `dtype` "auto" (the default, as vLLM's and transformers') serves in the checkpoint's own dtype: config.json's
    torch_dtype (float32 when it declares none, bfloat16 for an FP8 / INT8 checkpoint), a moejax checkpoint's
    stored dtype; or name one of "float32", "bfloat16", "float16" (`Model`).
    """
    from moejax.checkpoint.store import open_source
    from moejax.tokenizer import load_tokenizer

    source = open_source(path, allow_nonfinite=allow_nonfinite)
    tokenizer = load_tokenizer(path)  # a bad file is refused before any weight is placed
    model = Model(source.cfg, source, layout=layout, dtype=dtype, **kwargs)
    model.tokenizer = tokenizer
    return model
