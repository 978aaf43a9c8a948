"""The family x layout table of docs/benchmarks.md: max logit difference against transformers and greedy equality.

    python -m tests.families_table          (8 simulated CPU devices; builds the tiny checkpoints offline)

Every case of tests/test_families.py (default and slow) plus DeepSeek-V2's, printed as a markdown table.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main() -> int:
    import numpy as np

    import moejax
    from tests import hf_models, test_deepseek_v2, test_families

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        refs = {}
        for name, layout, mode in test_families.CASES:
            if name not in refs:
                refs[name] = hf_models.build(name, Path(tmp) / name)
            ref = refs[name]
            model = moejax.load(Path(tmp) / name, layout=layout, expert_mode=mode)
            diff = float(np.abs(model.forward(test_families.IDS) - hf_models.hf_logits(ref, test_families.IDS)).max())
            got = model.generate(test_families.PROMPTS, max_new_tokens=test_families.NEW_TOKENS)
            want = [hf_models.hf_greedy(ref, p, test_families.NEW_TOKENS) for p in test_families.PROMPTS]
            rows.append((name, layout, mode if model.layout.expert > 1 else "-", diff, got == want))
            print(rows[-1], file=sys.stderr, flush=True)
        ids = np.random.default_rng(0).integers(0, 128, (2, 24))
        for i, case in enumerate(test_deepseek_v2.test_logits_and_greedy_tokens_match_transformers.pytestmark[0]
                                 .args[1]):
            overrides, layout = getattr(case, "values", case)
            path = Path(tmp) / f"v2_{i}"
            ref = test_deepseek_v2._build(path, **overrides)
            model = moejax.load(path, layout=layout)
            diff = float(np.abs(model.forward(ids) - hf_models.hf_logits(ref, ids)).max())
            prompts = [ids[0, :9].tolist(), ids[1, :3].tolist()]
            equal = model.generate(prompts, max_new_tokens=16) == [hf_models.hf_greedy(ref, p, 16) for p in prompts]
            name = f"deepseek_v2 ({overrides['topk_method']}{', no q lora' if 'q_lora_rank' in overrides else ''})"
            rows.append((name, layout, "dp_attention" if "EP" in layout else "-", diff, equal))
    print("| checkpoint | layout | expert mode | max logit diff | 16 greedy tokens equal |")
    print("|---|---|---|---:|---|")
    for name, layout, mode, diff, equal in rows:
        print(f"| {name} | {layout} | {mode} | {diff:.1e} | {'yes' if equal else 'NO'} |")
    return 0 if all(r[4] and r[3] <= 1e-4 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
