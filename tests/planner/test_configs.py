"""Every planner model and hardware config loads through the shared loaders and matches its published size."""

import pytest

from moejax.config import load_model_config
from moejax.planner.hardware import list_hardware, load_hardware
from moejax.planner.memory import param_counts

# (total, active) parameters as published by each model's authors; GPT-MoE-1.8T is our assumed shape.
PUBLISHED = {
    "mixtral-8x7b": (46.7e9, 12.9e9),
    "mixtral-8x22b": (141e9, 39e9),
    "qwen3-30b-a3b": (30.5e9, 3.3e9),
    "qwen3-235b-a22b": (235e9, 22e9),
    "deepseek-v3": (671e9, 37e9),
    "gpt-moe-1800b": (1.8e12, None),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_model_sizes_match_published(name):
    counts = param_counts(load_model_config(name))
    total, active = PUBLISHED[name]
    assert counts.total == pytest.approx(total, rel=0.015)
    if active:
        assert counts.active == pytest.approx(active, rel=0.03)


def test_gpt_moe_1800b_shape():
    cfg = load_model_config("gpt-moe-1800b")
    assert (cfg.num_experts, cfg.num_experts_per_tok) == (16, 2)
    assert param_counts(cfg).total == 1_781_210_284_032


@pytest.mark.parametrize("name", ["h100-sxm", "h200", "b200", "gb200-nvl72", "cpu-host"])
def test_hardware_loads(name):
    hw = load_hardware(name)
    assert name in list_hardware()
    assert hw.memory_bytes > hw.reserved_memory_bytes > 0
    peaks = [hw.peak_flops[p] for p in ("bf16", "fp8", "fp4") if p in hw.peak_flops]
    assert peaks == sorted(peaks)  # narrower formats are never slower


def test_compute_precision_falls_back_to_wider_format():
    h100, b200, cpu = load_hardware("h100-sxm"), load_hardware("b200"), load_hardware("cpu-host")
    assert h100.compute_precision("fp4") == "fp8"  # Hopper has no fp4 tensor cores
    assert b200.compute_precision("fp4") == "fp4"
    assert cpu.compute_precision("fp8") == "bf16"
    assert b200.peak("fp4") == 2 * b200.peak("fp8") == 4 * b200.peak("bf16")


def test_nvlink_domain_decides_the_link():
    gb200, h100 = load_hardware("gb200-nvl72"), load_hardware("h100-sxm")
    assert gb200.link(64)[0] == gb200.nvlink_bandwidth
    assert h100.link(8)[0] == h100.nvlink_bandwidth
    assert h100.link(16)[0] == h100.network_bandwidth
