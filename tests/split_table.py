"""The split-layout table of docs/benchmarks.md: every family x split layout against transformers.

    python -m tests.split_table [LAYOUT,...]   (8 simulated CPU devices; builds the tiny checkpoints offline)

Every case of tests/test_split_layouts.py (default and slow), printed as a markdown table: max logit difference,
16 greedy tokens equal, and the mesh axes of the group (tensor, tensor_expert, data_tensor, expert).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(layouts: list[str] | None = None) -> int:
    import jax
    import numpy as np

    import moejax
    from tests import hf_models
    from tests import test_split_layouts as t

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in hf_models.FAMILIES:
            ref = hf_models.build(family, Path(tmp) / family)
            want_logits = hf_models.hf_logits(ref, t.IDS)
            want = [hf_models.hf_greedy(ref, p, t.NEW_TOKENS) for p in t.PROMPTS]
            for layout in layouts or t.LAYOUTS:
                model = moejax.load(Path(tmp) / family, layout=layout)
                diff = float(np.abs(model.forward(t.IDS) - want_logits).max())
                equal = model.generate(t.PROMPTS, max_new_tokens=t.NEW_TOKENS) == want
                rows.append((family, layout, model.layout.split_factors, diff, equal))
                del model
                jax.clear_caches()  # 56 models' programs in one process exhaust the JIT's code memory
                print(rows[-1], file=sys.stderr, flush=True)
    print("| family | layout | group axes (tensor, tensor_expert, data_tensor, expert) | max logit diff | "
          "16 greedy tokens equal |")
    print("|---|---|---|---:|---|")
    for family, layout, factors, diff, equal in rows:
        print(f"| {family} | {layout} | {factors} | {diff:.1e} | {'yes' if equal else 'NO'} |")
    return 0 if all(r[4] and r[3] <= 1e-4 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1].split(",") if len(sys.argv) > 1 else None))
