"""A reference to compare the planner with: aiconfigurator 0.12.0 (NVIDIA), kernel timings measured on H100/H200.

aiconfigurator predicts TensorRT-LLM serving from a database of per-kernel timings collected on real GPUs
(GEMM, grouped-GEMM MoE, attention, NCCL/custom collectives) and an in-flight-batching step model. It is an
*optional* dependency (`pip install aiconfigurator==0.12.0`); its predictions are saved once in
`tests/planner/data/aiconfigurator_reference.csv` so the comparison and the tests need no aiconfigurator:

    python -m moejax.planner.reference generate tests/planner/data/aiconfigurator_reference.csv
    python -m moejax.planner.compare --reference tests/planner/data/aiconfigurator_reference.csv

Layout mapping. TensorRT-LLM splits attention over `tp` x `dp` (attention data parallelism) and the MoE over
`moe_tp` x `moe_ep` of the same tp x dp devices, with `pp` stages. The planner writes that
`TP{tp}MTP{moe_tp}EP{moe_ep}PP{pp}` (`moejax.planner.layout.PlanLayout`); when moe_tp == tp it is the
runtime's `TP{tp}EP{dp}PP{pp}` with `expert_mode='dp_attention'` (DEP8 = `EP8`). aiconfigurator's `bs` is per
attention-DP rank and per pipeline microbatch: the concurrency (the planner's `batch_size`) is bs x dp x pp.
Its `ctx_tokens` (prefill budget per step per rank) is the planner's `chunk_size`.
"""

from __future__ import annotations

import csv
import shutil
import sys
import tempfile
from pathlib import Path

# (moejax model, aiconfigurator model path by precision)
MODELS = {
    "qwen3-30b-a3b": {"bf16": "Qwen/Qwen3-30B-A3B", "fp8": "Qwen/Qwen3-30B-A3B-FP8"},
    "qwen3-235b-a22b": {"bf16": "Qwen/Qwen3-235B-A22B", "fp8": "Qwen/Qwen3-235B-A22B-FP8"},
    "deepseek-v3": {"fp8": "deepseek-ai/DeepSeek-V3"},
    "mixtral-8x7b": {"bf16": "mistralai/Mixtral-8x7B-v0.1", "fp8": "mistralai/Mixtral-8x7B-v0.1"},
    "mixtral-8x22b": {"bf16": "mistralai/Mixtral-8x22B-v0.1", "fp8": "mistralai/Mixtral-8x22B-v0.1"},
}
SYSTEMS = {"h100-sxm": "h100_sxm", "h200": "h200_sxm"}
FIELDS = ["set", "model", "hardware", "precision", "kv_precision", "layout", "tp", "dp", "pp", "moe_tp", "moe_ep",
          "bs", "batch_size", "chunk_size", "isl", "osl", "ttft_s", "tpot_s", "tokens_per_s_per_device",
          "tokens_per_s_per_user", "memory_gib", "aic_model", "aic_system", "aic_parallel"]


def plan_layout(tp: int, dp: int, pp: int, moe_tp: int, moe_ep: int) -> str:
    """The planner's layout string for TensorRT-LLM's (tp, dp, pp, moe_tp, moe_ep)."""
    if moe_tp == tp and moe_ep == dp:
        body = (f"TP{tp}" if tp > 1 else "") + (f"EP{dp}" if dp > 1 else "")
    else:
        body = f"TP{tp}MTP{moe_tp}" + (f"EP{moe_ep}" if moe_ep > 1 else "")
    return (body + (f"PP{pp}" if pp > 1 else "")) or "DP1"


def _comparison_cases() -> list[tuple]:
    """(model, hardware, precision, (tp, dp, pp, moe_tp, moe_ep), bs, isl, osl, ctx_tokens or None)."""
    tp = lambda n: (n, 1, 1, n, 1)  # noqa: E731
    dep = lambda n: (1, n, 1, 1, n)  # noqa: E731
    cases = []
    add = lambda m, hw, p, lay, bss, isl=1024, osl=256, ctx=None: cases.extend(  # noqa: E731
        (m, hw, p, lay, b, isl, osl, ctx) for b in bss)
    add("qwen3-30b-a3b", "h200", "bf16", tp(1), (1, 16, 64, 256))
    add("qwen3-30b-a3b", "h200", "bf16", tp(2), (8, 64))
    add("qwen3-30b-a3b", "h200", "bf16", dep(2), (32,))
    add("qwen3-30b-a3b", "h200", "bf16", (1, 1, 2, 1, 1), (16,))
    add("qwen3-30b-a3b", "h100-sxm", "fp8", tp(1), (1, 32, 128), isl=4096, osl=512)
    add("qwen3-30b-a3b", "h100-sxm", "fp8", dep(4), (64,))
    add("qwen3-30b-a3b", "h100-sxm", "fp8", (2, 1, 2, 2, 1), (32,))
    add("qwen3-235b-a22b", "h200", "fp8", (8, 1, 1, 1, 8), (1, 16, 256))  # fp8 blocks forbid moe_tp 8
    add("qwen3-235b-a22b", "h200", "fp8", dep(8), (16, 64, 256))
    add("qwen3-235b-a22b", "h200", "fp8", (4, 1, 2, 4, 1), (32,))
    add("qwen3-235b-a22b", "h200", "fp8", (8, 1, 1, 1, 8), (64,))
    add("qwen3-235b-a22b", "h200", "bf16", tp(8), (32,), isl=2048, osl=128)
    add("deepseek-v3", "h200", "fp8", tp(8), (1, 32, 128))
    add("deepseek-v3", "h200", "fp8", dep(8), (32, 128, 256))
    add("deepseek-v3", "h200", "fp8", (8, 1, 1, 1, 8), (64,))
    add("deepseek-v3", "h200", "fp8", (4, 1, 2, 4, 1), (32,))
    add("mixtral-8x7b", "h100-sxm", "bf16", tp(2), (1, 32, 128))
    add("mixtral-8x7b", "h100-sxm", "bf16", tp(4), (64,))
    add("mixtral-8x7b", "h100-sxm", "fp8", tp(1), (64,))
    add("mixtral-8x7b", "h100-sxm", "fp8", (2, 1, 2, 2, 1), (32,))
    add("mixtral-8x7b", "h100-sxm", "fp8", tp(2), (256,), isl=2048, osl=128, ctx=8192)
    add("mixtral-8x22b", "h100-sxm", "fp8", tp(4), (1, 32, 128))
    add("mixtral-8x22b", "h100-sxm", "fp8", tp(8), (64,))
    add("mixtral-8x22b", "h100-sxm", "fp8", (4, 1, 2, 4, 1), (32,))
    add("mixtral-8x22b", "h200", "bf16", tp(4), (32,), isl=4096, osl=512)
    add("mixtral-8x22b", "h200", "bf16", dep(8), (64,))
    return cases


RANK_LAYOUTS = [  # (tp, dp, pp, moe_tp, moe_ep) of 8 GPUs: nine of the runtime's, then nine with the MoE split apart
    (4, 2, 1, 4, 2), (2, 4, 1, 2, 4), (1, 8, 1, 1, 8), (4, 1, 2, 4, 1), (2, 2, 2, 2, 2),
    (1, 4, 2, 1, 4), (2, 1, 4, 2, 1), (1, 2, 4, 1, 2), (1, 1, 8, 1, 1),
    (8, 1, 1, 1, 8), (8, 1, 1, 2, 4), (8, 1, 1, 4, 2), (4, 2, 1, 1, 8), (2, 4, 1, 1, 8), (4, 1, 2, 1, 4),
    (4, 1, 2, 2, 2), (2, 2, 2, 1, 4), (1, 8, 1, 2, 4),
]  # TP8 with moe_tp 8 is missing: 1536 / 8 is not a multiple of the 128-wide fp8 weight blocks
RANK_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _rank_cases() -> list[tuple]:
    """Qwen3-235B-A22B FP8 on 8 x H200, 18 layouts x batch: the layout-ranking study."""
    return [("qwen3-235b-a22b", "h200", "fp8", lay, b, 1024, 256, None) for lay in RANK_LAYOUTS for b in RANK_BATCHES]


def generate(path: str | Path, sets: tuple[str, ...] = ("compare", "rank")) -> Path:
    """Run aiconfigurator on every case and write the CSV (needs `pip install aiconfigurator==0.12.0`)."""
    import logging

    from aiconfigurator.cli.api import cli_estimate

    logging.disable(logging.WARNING)
    cases = {"compare": _comparison_cases, "rank": _rank_cases}
    tmp = Path(tempfile.mkdtemp(prefix="aic-models-"))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        f.write("# aiconfigurator 0.12.0 (trtllm backend, SILICON database) predictions; regenerate with\n"
                "# python -m moejax.planner.reference generate tests/planner/data/aiconfigurator_reference.csv\n")
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        for name in sets:
            for model, hw, precision, (tp, dp, pp, mtp, mep), bs, isl, osl, ctx in cases[name]():
                quant = {"gemm_quant_mode": "fp8", "moe_quant_mode": "fp8"} if (
                    precision == "fp8" and model.startswith("mixtral")) else {}
                try:
                    r = cli_estimate(_aic_model(MODELS[model][precision], tmp), SYSTEMS[hw], batch_size=bs,
                                     isl=isl, osl=osl, ctx_tokens=ctx, tp_size=tp, pp_size=pp, attention_dp_size=dp,
                                     moe_tp_size=mtp, moe_ep_size=mep, **quant).raw
                except Exception as err:  # an unsupported case is skipped, with the reason on stderr
                    print(f"skip {model} {hw} {precision} tp{tp}dp{dp}pp{pp}etp{mtp}ep{mep} bs{bs}: {err}",
                          file=sys.stderr)
                    continue
                writer.writerow({
                    "set": name, "model": model, "hardware": hw, "precision": precision,
                    "kv_precision": "fp8" if r["kvcache"] == "fp8" else "bf16",
                    "layout": plan_layout(tp, dp, pp, mtp, mep), "tp": tp, "dp": dp, "pp": pp, "moe_tp": mtp,
                    "moe_ep": mep, "bs": bs, "batch_size": int(r["concurrency"]), "chunk_size": int(r["ctx_tokens"]),
                    "isl": isl, "osl": osl, "ttft_s": float(r["ttft"]) / 1e3, "tpot_s": float(r["tpot"]) / 1e3,
                    "tokens_per_s_per_device": float(r["tokens/s/gpu"]),
                    "tokens_per_s_per_user": float(r["tokens/s/user"]), "memory_gib": float(r["memory"]),
                    "aic_model": r["model"], "aic_system": r["system"], "aic_parallel": r["parallel"],
                })
                f.flush()
    return path


def _aic_model(hf_id: str, tmp: Path) -> str:
    """aiconfigurator reads uncached models from the Hub; a local folder with its packaged config.json avoids that."""
    from aiconfigurator_core.sdk.utils import DefaultHFModels, _get_model_config_path

    if hf_id in DefaultHFModels:
        return hf_id
    folder = tmp / hf_id.replace("/", "--")
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(_get_model_config_path()) / f"{hf_id.replace('/', '--')}_config.json", folder / "config.json")
    return str(folder)


def read_reference(path: str | Path) -> list[dict]:
    """The reference rows, numbers parsed."""
    with Path(path).open() as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    ints = ("tp", "dp", "pp", "moe_tp", "moe_ep", "bs", "batch_size", "chunk_size", "isl", "osl")
    floats = ("ttft_s", "tpot_s", "tokens_per_s_per_device", "tokens_per_s_per_user", "memory_gib")
    for r in rows:
        r.update({k: int(r[k]) for k in ints} | {k: float(r[k]) for k in floats})
    return rows


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "generate":
        generate(sys.argv[2], tuple(sys.argv[3:]) or ("compare", "rank"))
    else:
        sys.exit("usage: python -m moejax.planner.reference generate FILE.csv")
