"""Workloads: seeded lengths and arrivals, lengths files, bad input refused with the value named."""

import json

import numpy as np
import pytest

from moejax.bench.workload import Lengths, Workload, read_lengths


def test_lengths_parse_and_sample():
    assert Lengths.parse("32") == Lengths(32, 32) and str(Lengths.parse("32")) == "32"
    assert Lengths.parse("16:64") == Lengths(16, 64) and str(Lengths(16, 64)) == "16:64"
    rng = np.random.default_rng(0)
    draws = {Lengths(3, 5).sample(rng) for _ in range(200)}
    assert draws == {3, 4, 5}  # both ends included
    for bad in ("0", "5:4", "a", "1:2:3", "", "-3"):
        with pytest.raises(ValueError):
            Lengths.parse(bad)


def test_requests_are_seeded_and_follow_the_lengths():
    w = Workload(input_len=Lengths(4, 9), output_len=Lengths(2, 3), num_requests=50, seed=7)
    a, b = w.requests(100), w.requests(100)
    assert a == b
    assert {len(r.prompt) for r in a} <= set(range(4, 10)) and {r.max_new_tokens for r in a} == {2, 3}
    assert all(0 <= t < 100 for r in a for t in r.prompt)
    assert all(r.arrival_s == 0.0 for r in a)  # closed loop
    warm = w.requests(100, warmup=5)
    assert len(warm) == 5 and warm != a[:5]  # another stream
    assert Workload(seed=8, num_requests=50, input_len=Lengths(4, 9)).requests(100) != a
    assert w.max_total_len == 12 and w.min_output_len == 2
    assert w.workload_id == Workload(input_len=Lengths(4, 9), output_len=Lengths(2, 3), num_requests=50,
                                     seed=7).workload_id != Workload(seed=7).workload_id


def test_poisson_arrivals_have_the_rate():
    w = Workload(input_len=Lengths(4), output_len=Lengths(4), num_requests=4000, request_rate=20.0, seed=1)
    times = np.array([r.arrival_s for r in w.requests(50)])
    assert times[0] == 0.0 and np.all(np.diff(times) >= 0)
    gaps = np.diff(times)
    assert abs(gaps.mean() - 1 / 20) < 0.005  # 4000 exponential gaps: mean within ~3 standard errors
    assert w.in_flight(8) is None and Workload(request_rate=2.0, concurrency=3).in_flight(8) == 3
    assert Workload().in_flight(8) == 8 and Workload().warmup_count(8) == 8


def test_lengths_files(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"input_len": 5, "output_len": 3}, [7, 2]]))
    (tmp_path / "b.csv").write_text("input_len,output_len,note\n5,3,x\n7,2,y\n")
    assert read_lengths(tmp_path / "a.json") == read_lengths(tmp_path / "b.csv") == ((5, 3), (7, 2))
    w = Workload(pairs=read_lengths(tmp_path / "b.csv"), pairs_source="b.csv", num_requests=5)
    assert [(len(r.prompt), r.max_new_tokens) for r in w.requests(10)] == [(5, 3), (7, 2)] * 2 + [(5, 3)]
    assert w.max_total_len == 9 and w.mean_lengths(10) == (6, 3)
    bad = {"c.json": "[[1, 0]]", "d.json": "{\"a\": 1}", "e.json": "[1,", "f.csv": "in,out\n1,2\n",
           "g.csv": "input_len,output_len\n1,x\n", "h.json": "[]", "i.json": "[{\"input_len\": 2}]"}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=name):
            read_lengths(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="not found"):
        read_lengths(tmp_path / "missing.json")


@pytest.mark.parametrize("kwargs, match", [
    ({"num_requests": 0}, "num_requests"), ({"concurrency": 0}, "concurrency"),
    ({"warmup_requests": -1}, "warmup_requests"), ({"request_rate": 0.0}, "request_rate"),
    ({"request_rate": float("inf")}, "request_rate"), ({"seed": -1}, "seed"), ({"num_requests": True}, "num_requests"),
])
def test_bad_workloads(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Workload(**kwargs)


def test_check_against_the_model_context():
    Workload(input_len=Lengths(10), output_len=Lengths(6)).check(vocab_size=50, max_len=16)
    with pytest.raises(ValueError, match="17 tokens"):
        Workload(input_len=Lengths(10, 11), output_len=Lengths(6)).check(vocab_size=50, max_len=16)


def test_shared_prefixes_are_exact_seeded_and_round_robin():
    w = Workload(input_len=Lengths(3, 6), output_len=Lengths(2), num_requests=7, seed=5, shared_prefix_len=20,
                 num_prefixes=3)
    prefixes = w.prefixes(100)
    assert len(prefixes) == 3 and {len(p) for p in prefixes} == {20} and len(set(prefixes)) == 3
    reqs = w.requests(100)
    assert reqs == w.requests(100) and prefixes == w.prefixes(100)  # seeded
    for i, r in enumerate(reqs):
        assert r.prompt[:20] == prefixes[i % 3] and 3 <= len(r.prompt) - 20 <= 6  # prefix, then its own suffix
    assert all(r.prompt[:20] == prefixes[i % 3] for i, r in enumerate(w.requests(100, warmup=4)))  # the same ones
    plain = Workload(input_len=Lengths(3, 6), output_len=Lengths(2), num_requests=7, seed=5)
    assert [r.prompt[20:] for r in reqs] == [r.prompt for r in plain.requests(100)]  # suffixes as without a prefix
    assert w.max_total_len == 28 and w.workload_id != plain.workload_id
    assert "shared_prefix_len" not in plain.describe()  # a workload without one keeps its id
    assert Workload(seed=6, shared_prefix_len=20, num_prefixes=3).prefixes(100) != prefixes
    with pytest.raises(ValueError, match="shared prefix 20 \\+ prompt \\+ output = 28 tokens"):
        w.check(vocab_size=100, max_len=27)


@pytest.mark.parametrize("kwargs, match", [
    ({"shared_prefix_len": -1}, "shared_prefix_len must be an integer in \\[0, "),
    ({"num_prefixes": 0}, "num_prefixes must be an integer in \\[1, "),
    ({"num_prefixes": 2}, "num_prefixes 2 needs a shared_prefix_len > 0"),
])
def test_bad_shared_prefixes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Workload(**kwargs)
