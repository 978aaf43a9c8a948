"""One process of a 2-process run for tests/test_multihost.py (4 CPU devices per process).

    python tests/multihost_worker.py CKPT OUT.npz LAYOUT[,LAYOUT...] --coordinator 127.0.0.1:PORT \\
        --num-processes 2 --process-id I

Joins the run through `moejax.distributed.start` (the path `moejax generate` takes: stdout of every
process but 0 goes to /dev/null), loads the moejax checkpoint CKPT under each layout, and computes the
logits of fixed ids and greedy tokens of fixed prompts (`Model.generate` and the serving engine).
Process 0 writes them to OUT.npz; every process prints to stderr one JSON line naming the layers it read
from the checkpoint.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

DEVICES_PER_PROCESS = 4
IDS = np.random.default_rng(3).integers(0, 128, (4, 12))
PROMPTS = [[5, 9, 11, 2], [7, 1]]
NEW_TOKENS = 4


class Recording:
    """A weight source that remembers which (tensor, layer) this process read."""

    def __init__(self, source):
        self.source, self.cfg, self.layers = source, source.cfg, set()

    def read(self, name, layer, index):
        if layer is not None:
            self.layers.add(layer)
        return self.source.read(name, layer, index)


def main():
    os.environ["JAX_PLATFORMS"] = "cpu"  # before JAX starts
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import jax

    import moejax
    from moejax import distributed
    from moejax.checkpoint.store import open_source

    parser = argparse.ArgumentParser()
    parser.add_argument("ckpt")
    parser.add_argument("out")
    parser.add_argument("layouts")
    distributed.add_flags(parser)
    args = parser.parse_args()
    distributed.start(distributed.cluster_from(args))
    print(f"stdout of process {jax.process_index()}", flush=True)  # only process 0's reaches the file
    results = {}
    for layout in args.layouts.split(","):
        source = Recording(open_source(args.ckpt))
        model = moejax.Model(source.cfg, source, layout=layout)
        results[f"{layout}/logits"] = model.forward(IDS)  # rows split over processes are gathered
        results[f"{layout}/tokens"] = np.array(model.generate(PROMPTS, max_new_tokens=NEW_TOKENS))
        # The serving engine too (pipelined on TP4PP2): every process runs the same schedule.
        config = moejax.ServeConfig(max_running=4, page_size=4, num_pages=16, chunk_size=4, max_model_len=16)
        engine = moejax.Engine(model, config)
        engine.warmup()
        greedy = moejax.SamplingParams(max_new_tokens=NEW_TOKENS)
        results[f"{layout}/engine"] = np.array(engine.generate(PROMPTS, greedy))
        devices = {str(d) for d in model.mesh.devices.flat if d.process_index == jax.process_index()}
        print(json.dumps({"process": jax.process_index(), "layout": layout, "layers_read": sorted(source.layers),
                          "local_devices": len(devices)}), file=sys.stderr, flush=True)
    if distributed.is_primary():
        np.savez(args.out, **results)


if __name__ == "__main__":
    main()
