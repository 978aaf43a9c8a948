"""Text in and out: a checkpoint's tokenizer.json, `Model.tokenizer`, and `moejax generate --prompt`."""

import json

import pytest

import moejax
from moejax import cli
from moejax.tokenizer import TextStream, decode, load_tokenizer

PROMPT = "hello world the quick fox"


@pytest.fixture(scope="module")
def checkpoint(tokenizer_checkpoint):
    return tokenizer_checkpoint


def test_load_tokenizer_reads_the_file_or_says_none(tmp_path):
    assert load_tokenizer(tmp_path) is None
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer.json: not a readable tokenizer file"):
        load_tokenizer(tmp_path)


def test_text_stream_waits_for_whole_characters(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())  # byte-level: "é" is two byte tokens when no merge joins them
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(["plain ascii words"], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    ids = tok.encode("café au lait").ids
    stream = TextStream(tok)
    pieces = [stream.push([i]) for i in ids]
    assert "".join(pieces) == "café au lait" and "\ufffd" not in "".join(pieces)
    assert "" in pieces  # the first byte of "é" alone was held back


def test_model_exposes_the_checkpoint_tokenizer(checkpoint):
    model = moejax.load(checkpoint, layout="DP1")
    assert model.tokenizer.encode(PROMPT).ids[0] == 1  # "<s>" first, as the file's post-processor says
    assert moejax.Model.random(moejax.load_model_config("tiny-moe")).tokenizer is None


def test_generate_text_prompt_json_then_repeat_with_its_seed_streaming(checkpoint, capsys):
    """Unseeded sampling reports its seed; the same seed gives the same text, streamed, and --quiet is silent."""
    args = ["generate", "--model", str(checkpoint), "--layout", "DP2", "--prompt", PROMPT, "--max-new-tokens", "5",
            "--temperature", "0.9", "--chunk-size", "8"]
    assert cli.main([*args, "--json"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    tok = load_tokenizer(checkpoint)
    assert result["prompt_ids"] == tok.encode(PROMPT).ids
    assert len(result["tokens"]) == 5 and result["text"] == decode(tok, result["tokens"])
    for phase in ("reading weights from", "compiling the steps: prefill (1 x 8 tokens), decode (batch 1) ...",
                  "generating (up to 5 tokens for 1 prompt) ..."):
        assert f"moejax: {phase}" in err, err

    assert cli.main([*args, "--sample-seed", str(result["sample_seed"]), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    streamed = out.splitlines()[1]  # the header, the prompt and its text as it came (once), the timing
    assert len(result["text"].split()) == sum(t > 1 for t in result["tokens"])  # a word per non-special id
    assert streamed == f"  prompt {PROMPT!r} -> {result['text']} (length)" and out.count(result["text"]) == 1


def test_unseeded_runs_draw_fresh_seeds():
    parser = cli.build_parser()
    runs = [cli._check_generate(parser.parse_args(["generate", "--temperature", "1"])) for _ in range(3)]
    assert len({r.seed for r in runs}) == 3 and all(r.seed_drawn for r in runs)
    assert [p.seed for p in runs[0].params] == [runs[0].seed, runs[0].seed + 1]  # prompt i: seed + i
    given = cli._check_generate(parser.parse_args(["generate", "--sample-seed", "7"]))
    assert given.seed == 7 and not given.seed_drawn
