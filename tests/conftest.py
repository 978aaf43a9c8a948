"""Test setup: 8 simulated CPU devices, set before JAX initialises its backends."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)

import pytest  # noqa: E402

from tests import hf_models  # noqa: E402


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """family -> (checkpoint dir, torch reference model), built once per session."""
    root = tmp_path_factory.mktemp("hf")
    return {family: (root / family, hf_models.build(family, root / family)) for family in hf_models.FAMILIES}


@pytest.fixture(scope="session")
def tokenizer_checkpoint(tmp_path_factory):
    """A tiny random Mixtral checkpoint with a word-level tokenizer.json beside its weights."""
    path = tmp_path_factory.mktemp("tok") / "ckpt"
    hf_models.build("mixtral", path)
    hf_models.save_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def models_1dev(hf_checkpoints):
    """family -> moejax Model on one device (the baseline every layout is compared with)."""
    import moejax

    return {family: moejax.load(path, layout="DP1") for family, (path, _) in hf_checkpoints.items()}


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    """Drop JAX's compiled programs after each test module. The default suite compiles thousands of programs
    in one process; kept alive, their code and buffers only grow (two full runs aborted inside an XLA compile
    near the end, with no message, while every file passed alone)."""
    yield
    jax.clear_caches()
