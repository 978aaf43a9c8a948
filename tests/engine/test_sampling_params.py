"""SamplingParams.check on the host: every bad field is refused with its name, value and range before packing."""

import numpy as np
import pytest

from moejax.engine.sampling import SamplingParams

VOCAB = 100

BAD = [
    # booleans are not numbers
    ({"max_new_tokens": True}, r"max_new_tokens must be an integer \(booleans are not numbers\), got True"),
    ({"top_k": False}, r"top_k must be an integer \(booleans are not numbers\), got False"),
    ({"seed": True}, r"seed must be an integer \(booleans are not numbers\), got True"),
    ({"seed": np.bool_(True)}, r"seed must be an integer \(booleans are not numbers\)"),
    ({"temperature": True}, r"temperature must be a finite number >= 0 \(booleans are not numbers\), got True"),
    ({"top_p": True}, r"top_p must lie in \(0, 1\] \(booleans are not numbers\), got True"),
    # wrong types
    ({"max_new_tokens": 4.0}, r"max_new_tokens must be an integer, got 4.0"),
    ({"max_new_tokens": "4"}, r"max_new_tokens must be an integer, got '4'"),
    ({"top_k": np.float32(3)}, r"top_k must be an integer, got np.float32\(3.0\)"),
    ({"temperature": "0.5"}, r"temperature must be a finite number >= 0, got '0.5'"),
    ({"top_p": None}, r"top_p must lie in \(0, 1\], got None"),
    ({"seed": 1.5}, r"seed must be an integer, got 1.5"),
    # integer ranges (packed into int32; the seed as uint32 bits)
    ({"max_new_tokens": 0}, r"max_new_tokens must be at least 1, got 0; allowed: integers in \[1, 2147483647\]"),
    ({"max_new_tokens": -3}, r"max_new_tokens must be at least 1, got -3"),
    ({"max_new_tokens": 2**31}, r"max_new_tokens must be at most 2147483647, got 2147483648"),
    ({"max_new_tokens": np.int64(2**40)}, r"max_new_tokens must be at most 2147483647"),
    ({"top_k": -1}, r"top_k must be at least 0, got -1; allowed: integers in \[0, 2147483647\]; 0: off"),
    ({"top_k": 2**31}, r"top_k must be at most 2147483647, got 2147483648"),
    ({"top_k": np.uint64(2**63)}, r"top_k must be at most 2147483647"),
    ({"seed": -1}, r"seed must be at least 0, got -1; allowed: integers in \[0, 4294967295\]"),
    ({"seed": 2**32}, r"seed must be at most 4294967295, got 4294967296"),
    # float ranges (packed as float32)
    ({"temperature": -0.5}, r"temperature must be a finite number >= 0, got -0.5; allowed: \[0, 3.4028235e\+38\]"),
    ({"temperature": float("nan")}, r"temperature must be a finite number >= 0, got nan"),
    ({"temperature": float("inf")}, r"temperature must be a finite number >= 0, got inf"),
    ({"temperature": 1e39}, r"got 1e\+39; allowed: \[0, 3.4028235e\+38\] \(float32 overflows above\)"),
    ({"temperature": np.float64(-1e-300)}, r"temperature must be a finite number >= 0"),
    ({"top_p": 0.0}, r"top_p must lie in \(0, 1\], got 0.0; allowed: \[1.1754944e-38, 1\]"),
    ({"top_p": 1e-50}, r"top_p must lie in \(0, 1\], got 1e-50; allowed: \[1.1754944e-38, 1\] \(smaller values "
                       r"underflow float32 to 0"),
    ({"top_p": 1e-40}, r"got 1e-40; allowed: \[1.1754944e-38, 1\]"),
    ({"top_p": -0.1}, r"top_p must lie in \(0, 1\], got -0.1"),
    ({"top_p": 1.5}, r"top_p must lie in \(0, 1\], got 1.5"),
    ({"top_p": float("nan")}, r"top_p must lie in \(0, 1\], got nan"),
    ({"top_p": np.float32("nan")}, r"top_p must lie in \(0, 1\], got np.float32\(nan\)"),
    # stop tokens: a tuple or list of in-vocabulary ints
    ({"stop_token_ids": 5}, r"stop_token_ids must be a tuple or list of token ids, got int 5"),
    ({"stop_token_ids": "12"}, r"stop_token_ids must be a tuple or list of token ids, got str '12'"),
    ({"stop_token_ids": {3}}, r"stop_token_ids must be a tuple or list of token ids, got set"),
    ({"stop_token_ids": (3, True)}, r"stop token id True in stop_token_ids is not an integer"),
    ({"stop_token_ids": [3, 2.0]}, r"stop token id 2.0 in stop_token_ids is not an integer"),
    ({"stop_token_ids": (100,)}, r"stop token id 100 is out of vocabulary \(vocab_size=100\); allowed: \[0, 99\]"),
    ({"stop_token_ids": (-1,)}, r"stop token id -1 is out of vocabulary"),
    ({"stop_token_ids": (np.int64(2**40),)}, r"stop token id np.int64\(1099511627776\) is out of vocabulary"),
]


@pytest.mark.parametrize("kwargs, message", BAD, ids=[f"{k}={v!r}" for k, v in (next(iter(b[0].items())) for b in BAD)])
def test_bad_field_is_refused_with_name_value_and_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs).check(VOCAB)


GOOD = [
    {},
    {"max_new_tokens": np.int64(7), "top_k": np.int32(5), "seed": np.uint32(2**32 - 1)},
    {"temperature": np.float32(0.7), "top_p": np.float16(0.5)},
    {"temperature": np.int64(2), "top_p": np.int8(1)},
    {"temperature": 1, "top_p": 1},
    {"max_new_tokens": 2**31 - 1, "top_k": 2**31 - 1, "seed": 0},
    {"temperature": 3.4e38, "top_p": float(np.finfo(np.float32).tiny)},
    {"stop_token_ids": [np.int16(0), 99]},
    {"stop_token_ids": (np.uint8(42),)},
]


@pytest.mark.parametrize("kwargs", GOOD, ids=[str(i) for i in range(len(GOOD))])
def test_python_and_numpy_numbers_pass_and_pack_exactly(kwargs):
    params = SamplingParams(**kwargs)
    params.check(VOCAB)
    # What the engine packs into its int32 call batch: the ints as int32, the floats as float32 bits.
    assert np.array([params.max_new_tokens, params.top_k], np.int64).astype(np.int32).tolist() == \
        [params.max_new_tokens, params.top_k]
    temperature, top_p = np.float32(params.temperature), np.float32(params.top_p)
    assert np.isfinite(temperature) and temperature >= 0
    assert top_p >= np.finfo(np.float32).tiny and top_p <= 1
