"""`moejax demo-checkpoint`: an offline checkpoint with a tokenizer, and `generate --prompt` on it."""

import json

import numpy as np
import pytest

import moejax
from moejax import cli, demo
from moejax.config import ModelConfig
from moejax.tokenizer import decode, load_tokenizer

PROMPT = "The river ran high in spring"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "ckpt"
    assert cli.main(["demo-checkpoint", str(path), "--seed", "3"]) == 0
    return path


def test_demo_checkpoint_is_the_random_model_with_a_trained_tokenizer(checkpoint):
    """Its weights are Model.random's (same seed), under Hugging Face's names; its tokenizer covers the vocabulary."""
    cfg = moejax.load_model_config("tiny-moe")
    loaded = moejax.load(checkpoint, layout="DP1")
    ids = [[1, 40, 300, 7, 511, 2]]
    want = moejax.Model.random(cfg, seed=3, layout="DP1").forward(ids)
    np.testing.assert_array_equal(np.asarray(loaded.forward(ids)), np.asarray(want))
    tok = loaded.tokenizer
    assert tok.get_vocab_size() == cfg.vocab_size == loaded.cfg.vocab_size
    encoded = tok.encode(PROMPT)
    assert encoded.ids[0] == 1 and "<unk>" not in encoded.tokens  # "<s>" first; every word piece is known
    assert decode(tok, encoded.ids) == PROMPT
    assert json.loads((checkpoint / "config.json").read_text())["model_type"] == "mixtral"


def test_transformers_reads_the_demo_checkpoint(checkpoint):
    """A real HF checkpoint: transformers loads it (names, shapes, config) and gives moejax's logits."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager")
    ids = np.array([[1, 40, 300, 7, 511, 2, 9]])
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits.numpy()
    got = np.asarray(moejax.load(checkpoint, layout="DP1").forward(ids.tolist()))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_generate_streams_the_text_once(checkpoint, capsys):
    """One text prompt: the header, the prompt with its continuation streamed on one line, the timing: the text
    appears once (it used to stream a line per token and then print everything again)."""
    args = ["generate", "--model", str(checkpoint), "--layout", "DP2", "--prompt", PROMPT, "--max-new-tokens", "8",
            "--chunk-size", "8", "--quiet"]
    assert cli.main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    tok = load_tokenizer(checkpoint)
    continuation = decode(tok, result["prompt_ids"] + result["tokens"])[len(PROMPT):]
    assert len(result["tokens"]) == 8 and continuation.strip()
    assert cli.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].startswith("model ckpt on 2 cpu devices, layout DP2")
    assert lines[1] == f"  prompt {PROMPT!r} -> {continuation.removeprefix(' ')} (length)"
    assert lines[2].startswith("  time to first token")


def test_generate_prints_each_prompt_once(checkpoint, capsys):
    """Several prompts: a line each when it finishes, nothing per token; ids without text stream on one line."""
    base = ["generate", "--model", str(checkpoint), "--layout", "DP2", "--max-new-tokens", "5", "--quiet"]
    assert cli.main([*base, "--prompt", "A clock", "--prompt", PROMPT, "--json"]) == 0
    texts = json.loads(capsys.readouterr().out)["text"]
    assert cli.main([*base, "--prompt", "A clock", "--prompt", PROMPT]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4  # header, two prompts, timing
    assert sorted(lines[1:3]) == [f"  [0] prompt 'A clock' -> {texts[0]!r} (length)",
                                  f"  [1] prompt {PROMPT!r} -> {texts[1]!r} (length)"]
    assert cli.main([*base[:-1], "--model", "tiny-moe", "--prompt-ids", "1,5,9", "--json", "--quiet"]) == 0
    tokens = json.loads(capsys.readouterr().out)["tokens"]
    assert cli.main([*base[:-1], "--model", "tiny-moe", "--prompt-ids", "1,5,9", "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == f"  prompt [1, 5, 9] -> {' '.join(map(str, tokens))} (length)" and len(lines) == 3


def test_a_second_run_replaces_it_and_other_folders_are_refused(checkpoint, tmp_path, capsys):
    target = tmp_path / "demo"
    assert cli.main(["demo-checkpoint", str(target)]) == 0
    first = (target / "tokenizer.json").read_bytes()
    assert cli.main(["demo-checkpoint", str(target), "--seed", "1"]) == 0  # the README's command, run twice
    assert (target / "tokenizer.json").read_bytes() == first  # the tokenizer is trained deterministically
    assert json.loads((target / "config.json").read_text())["moejax_demo"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temporary folder left
    capsys.readouterr()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    for argv, message in (
            ([str(tmp_path / "mine")], "exists and holds other files"),
            ([str(tmp_path / "mine" / "notes.txt")], "exists and is not a folder"),
            ([str(tmp_path / "x"), "--model", "mixtral-8x7b"], "demo checkpoint holds at most 200M"),
            ([str(tmp_path / "x"), "--model", "gpt-moe-1800b"], "cannot run in moejax yet"),
            ([str(tmp_path / "x"), "--model", "no-such-model"], "no model config 'no-such-model'"),
            ([str(tmp_path / "x"), "--seed", "-1"], "argument --seed")):
        assert cli.main(["demo-checkpoint", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("moejax: error: ") and message in err and err.count("\n") == 1, err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep" and not (tmp_path / "x").exists()


def test_an_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.numpy.save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo.write_demo_checkpoint(tmp_path / "demo")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("family, extra, inexpressible, named", [
    ("mixtral", {}, {"norm_topk_prob": False}, "norm_topk_prob=False"),  # Mixtral always renormalises its top-k
    ("qwen3_moe", {"qk_norm": True}, {"qkv_bias": True}, "o_bias=False"),  # one attention_bias flag for q/k/v and o
    ("qwen2_moe", {"qkv_bias": True, "shared_expert_intermediate_size": 40, "shared_expert_gate": True},
     {"o_bias": True}, "o_bias=True")])
def test_hf_config_reads_back_as_the_config_or_is_refused(family, extra, inexpressible, named):
    cfg = ModelConfig(family=family, vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, name="t",
                      sliding_window=7, **extra)
    assert ModelConfig.from_hf(demo.hf_config(cfg), name="t") == cfg
    with pytest.raises(ValueError, match=f"cannot express {named} "):
        demo.hf_config(cfg.replace(**inexpressible))
