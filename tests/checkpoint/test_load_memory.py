"""Host memory while loading: what the loader allocates beyond the weights it places, in units of the largest shard.

Measured with tracemalloc, which sees every numpy buffer (the loader's blocks and read pieces) and nothing
of other processes, so the figures do not depend on the machine's load. On CPU each placed block becomes
its devices' buffer (`device_put` aliases it), so the blocks are still traced after the load: the traced
peak minus what is still traced at the end is the loader's temporary memory. tensorstore's own buffers
(moejax checkpoints) are native and not traced; `python -m moejax.bench.load_memory` measures those with
the process's resident memory (docs/benchmarks.md).
"""

import tracemalloc

import jax
import pytest

import moejax
from moejax.checkpoint import store
from moejax.checkpoint.hf import HFSource
from tests import hf_models

TARGET = 1.3  # issue 14: host memory while loading <= ~1.3x the largest per-device shard


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A Mixtral-shaped HF checkpoint whose embeddings (8 MiB) dwarf the loader's read pieces, and its conversion."""
    root = tmp_path_factory.mktemp("load_memory")
    hf_models.build("mixtral", root / "hf", vocab_size=16384, hidden_size=128)
    source = HFSource(root / "hf")
    store.save(root / "moejax", source, source.cfg)
    return {"huggingface": root / "hf", "moejax": root / "moejax"}


@pytest.mark.parametrize("kind", ["huggingface", "moejax"])
@pytest.mark.parametrize("layout", ["DP1", "TP2EP2PP2", "DP2EP4"])
def test_load_allocates_at_most_the_target_beyond_the_placed_weights(kind, layout, checkpoints):
    tracemalloc.start()
    try:
        model = moejax.load(checkpoints[kind], layout=layout)
        jax.block_until_ready(model.params)
        end, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    shards = [s.data for a in jax.tree.leaves(model.params) for s in a.addressable_shards]
    largest = max(x.nbytes for x in shards)
    placed = sum(n for _, n in {(x.unsafe_buffer_pointer(), x.nbytes) for x in shards})
    assert end >= placed, "the placed blocks were copied, not aliased, by device_put"
    print(f"{kind} {layout}: {(peak - end) / largest:.2f}x of {largest / 2**20:.1f} MiB")
    assert peak - end <= TARGET * largest, f"{(peak - end) / largest:.2f}x the largest shard ({largest} bytes)"


def test_replicated_shards_share_one_host_buffer(checkpoints):
    """On CPU a block several devices hold (DP2: every weight twice) is one host buffer, not one per device."""
    model = moejax.load(checkpoints["huggingface"], layout="DP2EP4")
    for array in jax.tree.leaves(model.params):
        by_index = {}
        for shard in array.addressable_shards:
            key = tuple((s.start, s.stop) for s in shard.index)
            by_index.setdefault(key, set()).add(shard.data.unsafe_buffer_pointer())
        assert all(len(pointers) == 1 for pointers in by_index.values()) and len(by_index) < 8
