"""KV cache bytes per token: the runtime's pools, the planner's figure, and a GQA cache of the same widths.

    moejax bench kv --model deepseek-v3 --layouts DP1,EP8,DP2TP2EP2
    moejax bench kv --model gpt-oss-20b --layouts DP1,TP4 --dtype float32
    moejax bench kv --model mixtral-8x7b --layouts DP1,TP8 --kv-cache-dtype fp8

For each layout the pools `Steps.new_cache` allocates are traced (`jax.eval_shape`: real model sizes, nothing
allocated; `--allocate` allocates them, for models that fit), and their bytes on one device are divided by the
token slots it holds and by its cache layers: bytes per token per layer per device. Beside it, the planner's
`kv_bytes_per_token_layer` for the same layout and precision (`--kv-cache-dtype` fp8 / int8: the quantized pools,
1 byte per value and a float32 scale per (token, kv head), MLA per token, against the planner's same name), and
what a GQA cache with the same query widths would hold (MLA: every head keeping its own key (qk_nope + qk_rope)
and value (v_head_dim), as an MHA model of these widths would; GQA models: their own figure). All layers' figure:
x the model's layers.
"""

from __future__ import annotations

import sys

from moejax.args import Parser, read_model_config, run_main
from moejax.config import KV_CACHE_DTYPES


def gqa_equivalent_bytes(cfg, dtype_bytes: int) -> int:
    """Bytes per token per layer of a cache keeping per-head keys and values of `cfg`'s query widths."""
    if cfg.attention == "mla":
        return cfg.num_heads * (cfg.qk_head_dim + cfg.value_head_dim) * dtype_bytes
    return 2 * cfg.num_kv_heads * cfg.head_dim * dtype_bytes


def measure(cfg, layout: str, dtype: str = "bfloat16", expert_mode: str = "dp_attention", pages: int = 64,
            page_size: int = 16, allocate: bool = False, kv_cache_dtype: str | None = None) -> dict:
    """Bytes per token per layer on one device of the runtime's pools, the planner's, and the GQA equivalent.

    kv_cache_dtype: None (pools in `dtype`) or a quantized KV cache ("fp8", "int8"; scales counted)."""
    import jax
    import numpy as np

    from moejax.fit import kv_cache_bytes
    from moejax.gpu_target import abstract_steps
    from moejax.mesh import Layout, make_mesh
    from moejax.planner.memory import kv_bytes_per_token_layer
    from moejax.planner.workload import Workload

    lay = Layout.parse(layout).validate(cfg)
    steps, _ = abstract_steps(cfg, lay, make_mesh(lay), dtype, expert_mode=expert_mode)
    pages *= steps.batch_shards
    pool_dtype = kv_cache_dtype or dtype
    if allocate:
        pools = steps.new_cache(pages, page_size, pool_dtype)
        device = jax.devices()[0]
        pool_bytes = sum(s.data.nbytes for buffer in jax.tree.leaves(pools) for s in buffer.addressable_shards
                         if s.device == device)
    else:
        pool_bytes = kv_cache_bytes(steps, pages, page_size, pool_dtype)
    slots = pages // steps.batch_shards * page_size  # a device holds its batch shard's pages
    runtime = pool_bytes / slots / steps.geometry.cache_layers_per_stage
    itemsize = np.dtype(dtype).itemsize
    precision = kv_cache_dtype or {2: "bf16", 4: "fp32"}[itemsize]  # the planner's names (float16: bf16's 2 bytes)
    planner = kv_bytes_per_token_layer(cfg, lay, Workload(kv_precision=precision, precision=precision))
    return {"model": cfg.name, "layout": str(lay), "attention": cfg.attention, "dtype": dtype,
            "kv_cache_dtype": kv_cache_dtype,
            "runtime_bytes": runtime, "planner_bytes": planner, "gqa_equivalent_bytes": gqa_equivalent_bytes(
                cfg, itemsize), "layers": cfg.num_layers, "allocated": allocate}


def main(argv=None, prog: str = "moejax bench kv") -> int:
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deepseek-v3", help="built-in config name, YAML, config.json or checkpoint")
    p.add_argument("--layouts", default="DP1,EP8,DP2TP2EP2", help="comma-separated layouts")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--kv-cache-dtype", default=None, choices=list(KV_CACHE_DTYPES),
                   help="quantized KV pools (1 byte per value + a float32 scale per token and kv head); "
                        "default: --dtype")
    p.add_argument("--allocate", action="store_true", help="allocate the pools (models that fit) and measure them")
    args = p.parse_args(argv)
    cfg = read_model_config(args.model)
    layouts = [s for s in args.layouts.split(",") if s]
    from moejax.devices import cpu_devices

    cpu_devices(max(_size(p, s) for s in layouts))
    print(f"{'layout':<12} {'attention':<9} {'runtime B/token/layer':>22} {'planner':>9} {'GQA same widths':>16} "
          f"{'all layers (KiB)':>17}")
    for layout in layouts:
        row = measure(cfg, layout, args.dtype, allocate=args.allocate, kv_cache_dtype=args.kv_cache_dtype)
        print(f"{row['layout']:<12} {row['attention']:<9} {row['runtime_bytes']:>22.0f} {row['planner_bytes']:>9.0f} "
              f"{row['gqa_equivalent_bytes']:>16.0f} {row['runtime_bytes'] * cfg.num_layers / 1024:>17.1f}")
    return 0


def _size(p, text: str) -> int:
    from moejax.mesh import Layout

    try:
        return Layout.parse(text).size
    except ValueError as err:
        p.error(f"--layouts: {err}")


if __name__ == "__main__":
    sys.exit(run_main(main))
