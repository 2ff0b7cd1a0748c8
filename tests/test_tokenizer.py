"""Tokenizer and chat-template tests: CPU, no network, the bundled default tokenizer plus tiny ones built here."""

from __future__ import annotations

import json

import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from dgemma.tokenizer import DEFAULT_DIR, Tokenizer

SKY = [{"role": "user", "content": "Why is the sky blue?"}]
SKY_RENDERED = "<bos><|turn>user\nWhy is the sky blue?<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
GEMMA_IDS = {
    "<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "<|tool_response>": 50, "<|think|>": 98,
    "<|channel>": 100, "<channel|>": 101, "<|turn>": 105, "<turn|>": 106,
}
BOS, THINK, CHANNEL, CHANNEL_END, TURN, TURN_END = 2, 98, 100, 101, 105, 106


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(DEFAULT_DIR)


def test_default_layout(tok: Tokenizer):
    assert tok.vocab_size == 2048
    assert (tok.bos_id, tok.pad_id, tok.eos_id) == (2, 0, 1)
    for s, i in GEMMA_IDS.items():
        assert tok.token_to_id(s) == i
    assert tok.token_to_id("<unused7>") == 7 and tok.token_to_id("<unused109>") == 109
    assert tok.token_to_id("not a token") is None
    assert (DEFAULT_DIR / "tokenizer.json").stat().st_size < 500_000


def test_sky_rendered_exactly(tok: Tokenizer):
    assert tok.apply_chat_template(SKY) == SKY_RENDERED


def test_encode_chat_single_bos_and_markers(tok: Tokenizer):
    ids = tok.encode_chat(SKY)
    assert ids[0] == BOS and ids.count(BOS) == 1
    assert ids[1] == TURN and ids.count(TURN) == 2 and ids.count(TURN_END) == 1
    assert ids[-1] == CHANNEL_END and CHANNEL in ids
    assert ids.index(TURN_END) < ids.index(TURN, 2) < ids.index(CHANNEL)  # user turn closed, then model prompt
    assert tok.decode(ids, skip_special_tokens=False) == SKY_RENDERED
    assert tok.encode(SKY_RENDERED, add_bos=True) == ids  # text already starts with <bos>: no second one


def test_thinking_mode(tok: Tokenizer):
    text = tok.apply_chat_template(SKY, enable_thinking=True)
    assert text == "<bos><|turn>system\n<|think|><turn|>\n<|turn>user\nWhy is the sky blue?<turn|>\n<|turn>model\n"
    ids = tok.encode_chat(SKY, enable_thinking=True)
    assert ids[:2] == [BOS, TURN] and THINK in ids and CHANNEL not in ids and CHANNEL_END not in ids
    msgs = [{"role": "system", "content": "Be brief."}, *SKY]
    text = tok.apply_chat_template(msgs, enable_thinking=True)
    assert text.startswith("<bos><|turn>system\n<|think|>Be brief.<turn|>\n<|turn>user\n")


def test_system_developer_and_assistant(tok: Tokenizer):
    msgs = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == (
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\nHello.<turn|>\n"
        "<|turn>user\nBye<turn|>\n"
    )
    with pytest.raises(ValueError, match="first message"):
        tok.apply_chat_template([*SKY, {"role": "system", "content": "late"}])


@pytest.mark.parametrize("s", ["Why is the sky blue?", "  tabs\tand\nnewlines  ", "héllo wörld — 日本語 🙂", ""])
def test_round_trip(tok: Tokenizer, s: str):
    ids = tok.encode(s)
    assert all(i >= 110 for i in ids)  # plain text never produces special ids
    assert tok.decode(ids) == s
    assert tok.encode(s, add_bos=True) == [BOS, *ids]


def test_token_pieces(tok: Tokenizer):
    ids = tok.encode_chat(SKY)
    pieces = tok.decode_token_pieces(ids)
    assert len(pieces) == len(ids) and pieces[0] == "" and pieces[-1] == ""
    assert "".join(pieces) == tok.decode(ids)


@pytest.mark.parametrize(
    "source",
    ["{{ ''.__class__.__mro__ }}", "{{ cycler.__init__.__globals__ }}", "{{ messages.__class__.__base__ }}"],
)
def test_sandbox_refuses_malicious_template(tok: Tokenizer, source: str):
    evil = Tokenizer.from_dir(DEFAULT_DIR, chat_template=source)
    with pytest.raises(ValueError, match="unsafe"):
        evil.apply_chat_template(SKY)


def test_template_raise_exception_and_syntax_error(tok: Tokenizer):
    with pytest.raises(ValueError, match="boom"):
        Tokenizer.from_dir(DEFAULT_DIR, chat_template="{{ raise_exception('boom') }}").apply_chat_template(SKY)
    with pytest.raises(ValueError, match="invalid chat template"):
        Tokenizer.from_dir(DEFAULT_DIR, chat_template="{% for %}")


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("hi", "list"),
        (["hi"], "must be a dict"),
        ([{"role": "robot", "content": "x"}], "robot"),
        ([{"content": "x"}], "role None"),
        ([{"role": "user", "content": None}], "string 'content'"),
        ([{"role": "user"}], "string 'content'"),
    ],
)
def test_bad_messages(tok: Tokenizer, messages, match: str):
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        Tokenizer.from_dir(tmp_path)


def _copy_tokenizer_json(dst) -> None:
    (dst / "tokenizer.json").write_bytes((DEFAULT_DIR / "tokenizer.json").read_bytes())


def test_config_chat_template_fallback(tmp_path):
    _copy_tokenizer_json(tmp_path)
    template = "{{ bos_token }}|{{ eos_token }}"
    config = {"bos_token": {"content": "<bos>"}, "eos_token": "<eos>", "chat_template": template}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_dir(tmp_path).apply_chat_template(SKY) == "<bos>|<eos>"
    config["chat_template"] = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "chat"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_dir(tmp_path).apply_chat_template(SKY) == "chat"
    (tmp_path / "chat_template.jinja").write_text("from jinja file")  # the .jinja file takes precedence
    assert Tokenizer.from_dir(tmp_path).apply_chat_template(SKY) == "from jinja file"


def test_no_template(tmp_path):
    _copy_tokenizer_json(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.encode("<bos>hi")[0] == BOS
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(SKY)


def test_gemma_layout_built_offline(tmp_path):
    """A tokenizer trained here with the Gemma low-id layout maps the chat markers to Gemma's ids."""
    by_id = {i: s for s, i in GEMMA_IDS.items()}
    specials = [AddedToken(by_id.get(i, f"<unused{i}>"), special=True, normalized=False) for i in range(110)]
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(["Why is the sky blue? Because of Rayleigh scattering."] * 4, trainer=trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "chat_template.jinja").write_text((DEFAULT_DIR / "chat_template.jinja").read_text())
    tok = Tokenizer.from_dir(tmp_path)
    for s, i in GEMMA_IDS.items():
        assert tok.token_to_id(s) == i
    ids = tok.encode_chat(SKY)
    assert [i for i in ids if i < 110] == [BOS, TURN, TURN_END, TURN, CHANNEL, CHANNEL_END]
    assert tok.decode(ids, skip_special_tokens=False) == SKY_RENDERED
