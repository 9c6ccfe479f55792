"""Tokenizer: special ids, round trips, the LLaDA2 chat format and the SFT prompt/response split."""

import json

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from llada_jax.model.config import get_config
from llada_jax.data.tokenizer import Tokenizer, TokenizerError, build_task_tokenizer, render_chat

QA = [{"role": "user", "content": "12+345="}, {"role": "assistant", "content": "357"}]


@pytest.fixture(scope="module")
def tok():
    return build_task_tokenizer()


def test_task_tokenizer_ids_match_tiny_preset(tok):
    tiny = get_config("tiny")
    assert tok.vocab_size == tiny.vocab_size == 512
    assert (tok.eos_id, tok.pad_id, tok.mask_id) == (tiny.eos_token_id, tiny.pad_token_id, tiny.mask_token_id)
    assert tok.hf.id_to_token(tok.bos_id) == "<|startoftext|>"
    for t in ("<role>", "</role>", "<|role_end|>"):
        assert tok.hf.token_to_id(t) in tok.special_ids
    assert tok.special_ids[-2:] == (510, 511) and tok.hf.token_to_id("1") not in tok.special_ids


def test_task_tokenizer_is_deterministic(tok):
    assert build_task_tokenizer().hf.to_str() == tok.hf.to_str()


@pytest.mark.parametrize("text", [
    "Using 89, 54, 57 once each with + - * /, make 22.",
    "Solve the 4x4 sudoku (0 = blank):\n4000\n0100\n0003\n0420",
    "  leading spaces, tabs\tand unicode: héllo ✓ 漢字",
    "<role>HUMAN</role>1+2=<|role_end|><|mask|><|endoftext|>",
])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_no_special_tokens_added_and_digits_split(tok):
    ids = tok.encode("1234+5")
    assert [tok.hf.id_to_token(i) for i in ids] == ["1", "2", "3", "4", "+", "5"]
    assert tok.encode("") == []


def test_special_strings_map_to_single_ids(tok):
    assert tok.encode("<|mask|><|endoftext|>") == [tok.mask_id, tok.eos_id]
    assert tok.decode([tok.mask_id, tok.eos_id], skip_special_tokens=True) == ""


def test_render_chat_exact_strings():
    assert render_chat(QA[:1], add_generation_prompt=True) == (
        "<role>SYSTEM</role>detailed thinking off<|role_end|><role>HUMAN</role>12+345=<|role_end|>"
        "<role>ASSISTANT</role>")
    multi = [{"role": "system", "content": "Be brief."}, *QA, {"role": "user", "content": "And 1+1?"}]
    assert render_chat(multi, add_generation_prompt=True) == (
        "<role>SYSTEM</role>Be brief.\ndetailed thinking off<|role_end|>"
        "<role>HUMAN</role>12+345=<|role_end|><role>ASSISTANT</role>357<|role_end|>"
        "<role>HUMAN</role>And 1+1?<|role_end|><role>ASSISTANT</role>")
    assert render_chat(QA) == ("<role>SYSTEM</role>detailed thinking off<|role_end|><role>HUMAN</role>12+345="
                               "<|role_end|><role>ASSISTANT</role>357<|role_end|>")


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "only come first"),
    ([{"role": "tool", "content": "a"}], "role"),
    ([{"role": "user", "content": 3}], "content"),
])
def test_render_chat_rejects_bad_messages(messages, match):
    with pytest.raises(TokenizerError, match=match):
        render_chat(messages)


def test_encode_sft_splits_at_the_response(tok):
    prompt, response = tok.encode_sft(QA)
    assert prompt + response == tok.encode_chat(QA)
    assert prompt == tok.encode_chat(QA[:1], add_generation_prompt=True)
    assert tok.decode(response) == "357<|role_end|>"
    with pytest.raises(TokenizerError, match="assistant"):
        tok.encode_sft(QA[:1])


def test_plain_template_is_the_prompt_text_then_the_answer(tok):
    prompt, response = tok.encode_sft(QA, template="plain")
    assert prompt == tok.encode(QA[0]["content"]) == tok.encode_prompt(QA[:1], template="plain")
    assert tok.decode(response) == "357"  # no end-of-turn: the EOS padding ends the answer
    assert tok.encode_prompt(QA[:1]) == tok.encode_chat(QA[:1], add_generation_prompt=True)  # default: chat
    with pytest.raises(TokenizerError, match=r"template: expected one of \('chat', 'plain'\), found 'raw'"):
        tok.encode_prompt(QA[:1], template="raw")
    with pytest.raises(TokenizerError, match=r"exactly one user message, found roles \['system', 'user'\]"):
        tok.encode_prompt([{"role": "system", "content": "be brief"}, QA[0]], template="plain")


def _word_level(vocab):
    hf = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    return hf


def test_special_ids_are_looked_up_by_string(tmp_path):
    vocab = {"[UNK]": 0, "<|mask|>": 1, "<|endoftext|>": 2, "<|startoftext|>": 3, "hi": 4}
    _word_level(vocab).save(str(tmp_path / "tokenizer.json"))
    for path in (tmp_path, tmp_path / "tokenizer.json"):  # a model directory or the file itself
        t = Tokenizer.from_file(path)
        assert (t.mask_id, t.eos_id, t.pad_id, t.bos_id) == (1, 2, 2, 3)


def test_missing_special_token_and_missing_file_errors(tmp_path):
    with pytest.raises(TokenizerError, match=r"<\|mask\|>"):
        Tokenizer(_word_level({"[UNK]": 0, "<|endoftext|>": 1, "<|startoftext|>": 2}))
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.from_file(tmp_path / "nope")


def test_saved_task_tokenizer_is_a_plain_tokenizer_json(tok, tmp_path):
    tok.save(tmp_path / "tokenizer.json")
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    assert Tokenizer.from_file(tmp_path).encode_chat(QA) == tok.encode_chat(QA)
