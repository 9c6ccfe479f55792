"""The stored form of a chat example, shared by the task builders, the JSONL importer and the pipelines.

A stored record has two text features, both JSON:
- `messages`: the conversation, `[{"role": "system"|"user"|"assistant", "content": str}, ...]`,
  ending with the assistant turn that is the training target (the response);
- `meta`: a JSON object with whatever else the example carries (a task's reward inputs, the
  extra fields of an imported JSONL line).

One schema for task data and user data keeps a single tokenisation path in the pipelines;
JSON keeps task-specific metadata free-form without a feature spec per task.
"""

from __future__ import annotations

import collections
import json
from typing import Any, Mapping, Optional

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Input data is missing or malformed; the message says where and what."""


def check_messages(messages: Any, unknown_keys: Optional[collections.Counter] = None) -> list[dict[str, str]]:
    """Validates a conversation for SFT and returns it as plain `{"role", "content"}` dicts.

    Raises DataError naming the offending message unless: a non-empty list of objects with a
    `role` and a string `content`, a system message only first, at least one user message, and
    the last message from the assistant. Any other key of a message (`name`, `tool_calls`,
    `weight`, ...) is dropped, counted in `unknown_keys` as `"messages[].<key>"` when given.
    """
    if not isinstance(messages, list) or not messages:
        raise DataError(f"'messages': expected a non-empty list, found {messages!r:.80}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not {"role", "content"} <= set(m):
            raise DataError(f"messages[{i}]: expected an object with the keys 'role' and 'content', "
                            f"found {m!r:.80}")
        if unknown_keys is not None:
            unknown_keys.update(f"messages[].{k}" for k in m if k not in ("role", "content"))
        if m["role"] not in ROLES:
            raise DataError(f"messages[{i}].role: expected one of {list(ROLES)}, found {m['role']!r}")
        if not isinstance(m["content"], str):
            raise DataError(f"messages[{i}].content: expected a string, found {type(m['content']).__name__}")
        if m["role"] == "system" and i != 0:
            raise DataError(f"messages[{i}]: a system message may only come first")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "assistant":
        raise DataError(f"messages[{len(out) - 1}]: the last message must be the assistant's response, "
                        f"found role {out[-1]['role']!r}")
    if not any(m["role"] == "user" for m in out):
        raise DataError("'messages': expected at least one user message")
    return out


def prompt_response_messages(prompt: str, response: str, system: str | None = None) -> list[dict[str, str]]:
    """The conversation of a single-turn example."""
    head = [{"role": "system", "content": system}] if system is not None else []
    return head + [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def encode_record(messages: list[dict[str, str]], meta: Mapping[str, Any]) -> dict[str, str]:
    """The stored features of an example."""
    return {"messages": json.dumps(messages, ensure_ascii=False), "meta": json.dumps(dict(meta), ensure_ascii=False)}


def decode_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A stored record (text features as `bytes` or `str`) back to `{"messages": [...], "meta": {...}}`."""
    return {k: json.loads(record[k]) for k in ("messages", "meta")}
