"""`moejax plan --disaggregated` (moejax.planner.disagg): KV transfer, rate matching, TTFT, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from moejax.config import load_model_config
from moejax.planner import cli
from moejax.planner.disagg import (
    PAGE_SIZE,
    Instance,
    instance_sizes,
    kv_transfer_bytes,
    kv_transfer_time,
    match_rates,
    plan_disaggregated,
)
from moejax.planner.hardware import load_hardware
from moejax.planner.workload import Workload


@pytest.fixture(scope="module")
def mixtral():
    return load_model_config("mixtral-8x7b")


@pytest.fixture(scope="module")
def h100():
    return load_hardware("h100-sxm")


def _inst(role, devices, rate, ttft=0.0, tpot=0.0, lanes=1, layout=None):
    return Instance(role, layout or f"{role}{devices}", devices, lanes, 8, 512 if role == "prefill" else 0, True,
                    "", 0.0, rate, ttft, tpot)


def test_kv_bytes_are_whole_pages_times_page_bytes(mixtral):
    page_bytes = PAGE_SIZE * mixtral.kv_bytes_per_token("bf16")
    assert kv_transfer_bytes(mixtral, Workload(isl=1024)) == (1024 // PAGE_SIZE) * page_bytes
    assert kv_transfer_bytes(mixtral, Workload(isl=1025)) == (1024 // PAGE_SIZE + 1) * page_bytes  # a partial page
    assert kv_transfer_bytes(mixtral, Workload(isl=1)) == page_bytes
    assert kv_transfer_bytes(mixtral, Workload(isl=100), page_size=64) == 2 * 64 * mixtral.kv_bytes_per_token("bf16")
    # Mixtral: 32 layers x 2 x 8 kv heads x 128 x 2 bytes per token
    assert mixtral.kv_bytes_per_token("bf16") == 32 * 2 * 8 * 128 * 2
    assert kv_transfer_bytes(mixtral, Workload(isl=1024, kv_precision="fp8")) < kv_transfer_bytes(
        mixtral, Workload(isl=1024))


def test_transfer_time_is_bytes_over_bandwidth():
    assert kv_transfer_time(1e9, 50e9) == pytest.approx(0.02)
    assert kv_transfer_time(1e9, 50e9, latency=1e-5, lanes=4) == pytest.approx(1e-5 + 0.005)


def test_link_is_nvlink_inside_a_domain_else_the_network(mixtral, h100):
    kv = kv_transfer_bytes(mixtral, Workload())
    pre, dec = _inst("prefill", 4, 10.0, ttft=0.1), _inst("decode", 4, 10.0, tpot=0.02)
    inside = match_rates(pre, dec, h100, 8, 256, kv)
    assert inside.link == "nvlink" and inside.devices == 8
    assert inside.transfer_s == pytest.approx(h100.nvlink_latency_s + kv / h100.nvlink_bandwidth)
    big_pre = _inst("prefill", 8, 10.0, ttft=0.1)
    across = match_rates(big_pre, dec, h100, 16, 256, kv)  # 8 + 4 devices > the 8-GPU NVLink domain
    assert across.link == "network" and across.devices > h100.nvlink_domain
    assert across.transfer_s == pytest.approx(h100.network_latency_s + kv / h100.network_bandwidth)


def test_ttft_includes_transfer_and_one_decode_step(mixtral, h100):
    kv = kv_transfer_bytes(mixtral, Workload())
    r = match_rates(_inst("prefill", 2, 10.0, ttft=0.25), _inst("decode", 2, 10.0, tpot=0.03), h100, 8, 256, kv)
    assert r.transfer_s > 0
    assert r.ttft_s == pytest.approx(0.25 + r.transfer_s + 0.03)
    assert r.tokens_per_s_per_user == pytest.approx(1 / 0.03)


def test_rate_matching_balances_prefill_and_decode(mixtral, h100):
    kv = kv_transfer_bytes(mixtral, Workload())
    dec = _inst("decode", 1, 10.0, tpot=0.02)
    even = match_rates(_inst("prefill", 1, 10.0, ttft=0.1), dec, h100, 8, 256, kv)
    assert even.prefill_instances == even.decode_instances  # equal rates: equal instances
    assert even.requests_per_s == pytest.approx(min(even.prefill_requests_per_s, even.decode_requests_per_s))
    assert even.tokens_per_s_per_device == pytest.approx(even.requests_per_s * 256 / even.devices)
    # Prefill twice as costly (half the rate): devices shift to prefill, two prefill per decode instance.
    slow = match_rates(_inst("prefill", 1, 5.0, ttft=0.2), dec, h100, 9, 256, kv)
    assert slow.prefill_instances == 2 * slow.decode_instances
    assert slow.prefill_devices > slow.decode_devices
    assert slow.prefill_requests_per_s == pytest.approx(slow.decode_requests_per_s)
    assert slow.tokens_per_s_per_device == pytest.approx(even.tokens_per_s_per_device / 1.5)


def test_no_system_fits_when_instances_exceed_the_devices(mixtral, h100):
    kv = kv_transfer_bytes(mixtral, Workload())
    assert match_rates(_inst("prefill", 4, 1.0), _inst("decode", 4, 1.0, tpot=0.01), h100, 6, 256, kv) is None


def test_instance_sizes_are_bounded():
    assert instance_sizes(8) == [1, 2, 4]
    assert instance_sizes(12) == [1, 2, 3, 4, 6, 8]
    assert len(instance_sizes(720720)) == 12 and max(instance_sizes(720720)) < 720720


def test_plan_on_a_small_model_beside_the_aggregated_one(mixtral, h100):
    w = Workload(isl=1024, osl=128, precision="fp8")
    r = plan_disaggregated(mixtral, h100, 4, w, batches=(8, 64), chunks=(1024,), target_tps_user=10)
    assert r.configs and r.pareto and r.aggregated.pareto
    for c in r.configs:
        assert c.devices <= 4 and c.prefill_devices + c.decode_devices == c.devices
        assert c.ttft_s > c.prefill_ttft_s
    users = [c.tokens_per_s_per_user for c in r.pareto]
    assert users == sorted(users)
    # Doubling prefill's cost (a prompt twice as long, same decode context) never buys prefill fewer devices.
    longer = plan_disaggregated(mixtral, h100, 4, dataclasses.replace(w, isl=2048), batches=(8, 64),
                                chunks=(1024,), target_tps_user=10)
    assert (longer.ranking[0].prefill_devices / longer.ranking[0].devices
            >= r.ranking[0].prefill_devices / r.ranking[0].devices)


def test_bad_input_is_one_line(capsys):
    base = ["--model", "tiny-moe", "--hardware", "cpu-host", "--disaggregated"]
    assert cli.main(base + ["--devices", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--devices >= 2" in err
    assert cli.main(base + ["--devices", "4", "--osl", "1"]) == 2
    assert "--osl >= 2" in capsys.readouterr().err


def test_cli_writes_the_table_plot_and_json(tmp_path, capsys):
    args = ["--model", "mixtral-8x7b", "--hardware", "h100-sxm", "--devices", "4", "--precision", "fp8",
            "--batch-sizes", "8,64", "--chunk-sizes", "1024", "--target-tps-user", "10", "--disaggregated"]
    assert cli.main(args + ["--out", str(tmp_path / "text")]) == 0
    text = capsys.readouterr().out
    assert "Best disaggregated systems" in text and "xfer ms" in text and "Aggregated" in text
    assert (tmp_path / "text" / "disagg.png").stat().st_size > 0
    assert (tmp_path / "text" / "disagg.csv").read_text().startswith("prefill_layout,decode_layout")
    assert cli.main(args + ["--out", str(tmp_path / "js"), "--json", "--no-plot", "--top", "3"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["mode"] == "disaggregated" and obj["devices"] == 4 and len(obj["ranking"]) <= 3
    row = obj["ranking"][0]
    for key in ("prefill_layout", "decode_layout", "prefill_instances", "decode_instances", "ttft_s", "transfer_s",
                "tokens_per_s_per_device", "tokens_per_s_per_user"):
        assert key in row
    assert obj["aggregated"]["pareto"] and set(obj["files"]) >= {"disagg_csv", "disagg_json"}
    full = json.loads((tmp_path / "js" / "disagg.json").read_text())
    assert len(full["configs"]) == obj["count"]["configs"] and math.isfinite(full["kv_bytes_per_request"])
