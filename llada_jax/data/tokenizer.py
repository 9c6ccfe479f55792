"""Tokenizer and chat format of the LLaDA2 models (REFERENCE §1).

`Tokenizer` wraps a Hugging Face `tokenizer.json` loaded with the `tokenizers` library. The
special ids are looked up by their token strings in the loaded file rather than hard-coded,
so the real Ling-2.0 vocabulary (`<|endoftext|>` = 156892, `<|mask|>` = 156895) and the small
tokenizer that `build_task_tokenizer` trains for the offline tasks go through one code path.
Nothing is added to the ids implicitly: no BOS, no EOS.

Chat format (Ling-2.0 template, thinking off):

    <role>SYSTEM</role>[{system}\\n]detailed thinking off<|role_end|>
    <role>HUMAN</role>{user}<|role_end|>
    <role>ASSISTANT</role>{assistant}<|role_end|>
    ...
    <role>ASSISTANT</role>                      (generation prompt)

(written on several lines here, rendered without any newline between turns).

Plain format (`template="plain"`, for the offline toy tasks): the user's text, then the answer,
then EOS padding; no roles, no system turn. A toy prompt like `67+34=` is 6 tokens instead of 22,
so a tiny model spends its steps on the task rather than on the template.
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping, Sequence

import tokenizers
from etils import epath
from tokenizers import decoders, models, pre_tokenizers, trainers

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"  # also the padding token: the model fills the canvas after an answer with it
MASK = "<|mask|>"
ROLE_START = "<role>"
ROLE_CLOSE = "</role>"
ROLE_END = "<|role_end|>"

REQUIRED_SPECIAL_TOKENS = (BOS, EOS, MASK)
ROLE_TAGS = {"system": "SYSTEM", "user": "HUMAN", "assistant": "ASSISTANT"}
TEMPLATES = ("chat", "plain")

# Order of the special tokens that `build_task_tokenizer` appends after the learned vocabulary,
# so that EOS and MASK take the two last ids (510 and 511 for the `tiny` model preset).
_TASK_SPECIAL_TOKENS = (BOS, ROLE_START, ROLE_CLOSE, ROLE_END, EOS, MASK)


class TokenizerError(ValueError):
    """A tokenizer file is missing or lacks a required token, or chat messages are malformed."""


Message = Mapping[str, str]


def render_chat(messages: Sequence[Message], add_generation_prompt: bool = False,
                thinking: str = "off") -> str:
    """Renders chat messages in the LLaDA2 format.

    Args:
      messages: dicts with `role` in {"system", "user", "assistant"} and string `content`; a
        system message may only come first. The system turn is always emitted because the
        template carries the thinking switch in it.
      add_generation_prompt: append `<role>ASSISTANT</role>` so the model writes the answer.
      thinking: "off" (what the LLaDA2 model cards use) or "on".
    """
    if thinking not in ("on", "off"):
        raise TokenizerError(f"thinking: expected 'on' or 'off', found {thinking!r}")
    system = ""
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLE_TAGS:
            raise TokenizerError(f"messages[{i}].role: expected one of {sorted(ROLE_TAGS)}, found {role!r}")
        if not isinstance(content, str):
            raise TokenizerError(f"messages[{i}].content: expected a string, found {type(content).__name__}")
        if role == "system":
            if i != 0:
                raise TokenizerError(f"messages[{i}]: a system message may only come first")
            system = content + "\n"
    parts = [f"{ROLE_START}SYSTEM{ROLE_CLOSE}{system}detailed thinking {thinking}{ROLE_END}"]
    for message in messages:
        if message["role"] != "system":
            parts.append(f"{ROLE_START}{ROLE_TAGS[message['role']]}{ROLE_CLOSE}{message['content']}{ROLE_END}")
    if add_generation_prompt:
        parts.append(f"{ROLE_START}ASSISTANT{ROLE_CLOSE}")
    return "".join(parts)


class Tokenizer:
    """A Hugging Face `tokenizers.Tokenizer` with the LLaDA2 special ids and chat format."""

    def __init__(self, hf_tokenizer: tokenizers.Tokenizer):
        self.hf = hf_tokenizer
        ids = {}
        for token in REQUIRED_SPECIAL_TOKENS:
            ids[token] = hf_tokenizer.token_to_id(token)
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise TokenizerError(f"tokenizer lacks the special token(s) {missing}; LLaDA2 needs "
                                 f"{list(REQUIRED_SPECIAL_TOKENS)} (REFERENCE §1)")
        self.bos_id: int = ids[BOS]
        self.eos_id: int = ids[EOS]
        self.pad_id: int = ids[EOS]
        self.mask_id: int = ids[MASK]

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Loads `path`, a `tokenizer.json` file or a directory holding one (an HF model dir)."""
        path = epath.Path(path)  # a local path or a URL (gs://...)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise TokenizerError(f"tokenizer file not found: {file}")
        return cls(tokenizers.Tokenizer.from_str(file.read_text()))

    def save(self, path: str | os.PathLike) -> None:
        """Writes the `tokenizer.json` to `path` (a file path, local or a URL)."""
        epath.Path(path).write_text(self.hf.to_str(pretty=True))

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Ids of all special added tokens (BOS, EOS, MASK, role tags, reserved ...), sorted: what
        the T2T perturbation of REFERENCE §4 must never draw as a replacement token."""
        return tuple(sorted(i for i, t in self.hf.get_added_tokens_decoder().items() if t.special))

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the model's embedding needs at least this many rows)."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings in it map to their ids, nothing is added."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = False,
                    thinking: str = "off") -> list[int]:
        """Token ids of `render_chat(messages, ...)`."""
        return self.encode(render_chat(messages, add_generation_prompt, thinking))

    def encode_prompt(self, messages: Sequence[Message], template: str = "chat", thinking: str = "off") -> list[int]:
        """The ids the model is given to answer `messages` (everything before the answer).

        "chat": the chat format with its generation prompt. "plain": the content of the single
        user message as it is (a system message or several turns are an error: plain has no roles).
        """
        if template == "chat":
            return self.encode_chat(messages, add_generation_prompt=True, thinking=thinking)
        if template != "plain":
            raise TokenizerError(f"template: expected one of {TEMPLATES}, found {template!r}")
        roles = [m.get("role") for m in messages]
        if roles != ["user"]:
            raise TokenizerError(f"template='plain': expected exactly one user message, found roles {roles}")
        content = messages[0].get("content")
        if not isinstance(content, str):
            raise TokenizerError(f"messages[0].content: expected a string, found {type(content).__name__}")
        return self.encode(content)

    def encode_sft(self, messages: Sequence[Message], thinking: str = "off",
                   template: str = "chat") -> tuple[list[int], list[int]]:
        """Splits a conversation into (prompt ids, response ids) for supervised fine-tuning.

        The prompt is `encode_prompt(messages[:-1], template)`, exactly the ids the model sees at
        inference time. In the chat format the response is the final assistant turn,
        `{answer}<|role_end|>`, and the concatenation equals `encode_chat(messages)` because the
        split falls on the special token `</role>`, which the tokenizer never merges across. In
        the plain format the response is the answer alone; the EOS padding after it ends it.
        """
        if not messages or messages[-1].get("role") != "assistant":
            raise TokenizerError("encode_sft: the last message must be the assistant's response")
        prompt = self.encode_prompt(messages[:-1], template=template, thinking=thinking)
        answer = messages[-1]["content"]
        response = self.encode(answer + ROLE_END if template == "chat" else answer)
        return prompt, response


    def encode_sft_turns(self, messages: Sequence[Message], thinking: str = "off") -> tuple[list[int], list[bool]]:
        """A whole conversation in the chat format with a per-token "trained" flag: True on every
        assistant turn's `{answer}<|role_end|>`, False on the system and user turns and on the
        `<role>ASSISTANT</role>` tags (what the model is given at inference time).

        The ids equal `encode_chat(messages)`. Each assistant turn is split where `encode_sft`
        splits the last one (after the generation prompt of the turns before it), and the
        conversation is the concatenation of these pieces, because every split falls on a
        special token the tokenizer never merges across.
        """
        ids: list[int] = []
        trained: list[bool] = []
        answers = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        if not answers:
            raise TokenizerError("encode_sft_turns: expected at least one assistant message, found none")
        for i in answers:
            prompt = self.encode_prompt(messages[:i], template="chat", thinking=thinking)
            if prompt[:len(ids)] != ids:
                raise TokenizerError(f"encode_sft_turns: the ids before messages[{i}] do not extend the earlier "
                                     "turns' (the tokenizer merges across a special token)")
            trained += [False] * (len(prompt) - len(ids))
            ids = prompt + self.encode(messages[i]["content"] + ROLE_END)
            trained += [True] * (len(ids) - len(trained))
        rest = self.encode_chat(messages, thinking=thinking)
        if rest[:len(ids)] != ids:
            raise TokenizerError("encode_sft_turns: the conversation's ids do not extend its assistant turns'")
        trained += [False] * (len(rest) - len(ids))  # turns after the last answer (not trained)
        return rest, trained


def build_task_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 512) -> Tokenizer:
    """Trains a small byte-level BPE tokenizer for the offline tasks, locally and deterministically.

    A real `tokenizer.json` (the same kind as the Ling-2.0 one), so the toy tasks exercise the
    code path of the full vocabulary. Digits are split one per token, which keeps arithmetic
    learnable for a tiny model; the 256-byte alphabet means any text can still be encoded.
    The special tokens take the last ids, so with `vocab_size=512` `<|endoftext|>` = 510 and
    `<|mask|>` = 511, the ids of the `tiny` model preset; if the corpus yields fewer merges
    than the budget, `<|reserved_k|>` tokens fill the gap so those ids never move.

    Args:
      corpus: training texts; by default samples of every offline task
        (`llada_jax.data.tasks.sample_texts`). The chat template's words are always added.
      vocab_size: total number of ids, special tokens included.
    """
    if corpus is None:
        from llada_jax.data import tasks  # deferred: the data package imports this module
        corpus = tasks.sample_texts()
    n_learned = vocab_size - len(_TASK_SPECIAL_TOKENS)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if n_learned < len(alphabet):
        raise TokenizerError(f"vocab_size: expected at least {len(alphabet) + len(_TASK_SPECIAL_TOKENS)} "
                             f"(256 bytes + {len(_TASK_SPECIAL_TOKENS)} special tokens), found {vocab_size}")
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    hf.decoder = decoders.ByteLevel()
    template_words = [" ".join(ROLE_TAGS.values()), "detailed thinking off", "detailed thinking on"]
    trainer = trainers.BpeTrainer(vocab_size=n_learned, initial_alphabet=alphabet, show_progress=False)
    hf.train_from_iterator([*template_words, *corpus], trainer=trainer)
    reserved = [f"<|reserved_{k}|>" for k in range(n_learned - hf.get_vocab_size())]
    hf.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                           for t in (*reserved, *_TASK_SPECIAL_TOKENS)])
    assert hf.get_vocab_size() == vocab_size, (hf.get_vocab_size(), vocab_size)
    return Tokenizer(hf)
