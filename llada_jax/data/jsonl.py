"""Reading user JSONL files into chat examples, with errors that point at the bad line.

Each non-blank line is a JSON object in one of two forms:
- chat: `{"messages": [{"role": ..., "content": ...}, ...]}`, the last message from the assistant;
- single turn: `{"prompt": str, "response": str}`, optionally with `"system": str`.
An optional `"meta"` object and any other top-level keys are kept in the example's `meta` (e.g.
a reference answer for a reward, an id) and play no part in training; keys of a message other
than role and content are dropped. Both are counted (`read_jsonl(..., unknown_keys=Counter())`,
logged by the importer), never rejected. Errors are `DataError("<path>:<line>: <what is wrong>")`.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any, Iterator, Optional

from llada_jax.data.records import DataError, check_messages, prompt_response_messages

_SINGLE_TURN_KEYS = ("prompt", "response", "system")


def _parse(obj: Any, unknown_keys: Optional[collections.Counter] = None) -> dict[str, Any]:
    """One parsed JSON line to `{"messages", "meta"}`; raises DataError saying what is wrong."""
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, found {type(obj).__name__}")
    obj = dict(obj)
    meta = obj.pop("meta", {})
    if not isinstance(meta, dict):
        raise DataError(f"'meta': expected an object, found {type(meta).__name__}")
    if "messages" in obj:
        clash = [k for k in _SINGLE_TURN_KEYS if k in obj]
        if clash:
            raise DataError(f"a line holds either 'messages' or 'prompt'/'response', found both ({clash})")
        messages = check_messages(obj.pop("messages"), unknown_keys)
    elif "prompt" in obj or "response" in obj:
        for key in ("prompt", "response"):
            if not isinstance(obj.get(key), str):
                raise DataError(f"'{key}': expected a string, found {obj.get(key)!r:.80}")
        system = obj.pop("system", None)
        if system is not None and not isinstance(system, str):
            raise DataError(f"'system': expected a string, found {type(system).__name__}")
        messages = prompt_response_messages(obj.pop("prompt"), obj.pop("response"), system)
    else:
        raise DataError(f"expected the key 'messages' or the keys 'prompt' and 'response', found {sorted(obj)}")
    if unknown_keys is not None:
        unknown_keys.update(list(obj))  # the top-level keys left: kept in meta, not trained on
    return {"messages": messages, "meta": {**obj, **meta}}


def read_jsonl(path: str | os.PathLike, unknown_keys: Optional[collections.Counter] = None
               ) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields (line number, example) for every non-blank line of `path`.

    Streams the file; raises DataError with the path and line number on the first bad line.
    `unknown_keys` (a Counter) counts the keys set aside: top-level ones by name (kept in
    `meta`), those of messages as `"messages[].<key>"` (dropped).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                example = _parse(json.loads(line), unknown_keys)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} at column {e.colno}") from None
            except DataError as e:
                raise DataError(f"{path}:{lineno}: {e}") from None
            yield lineno, example
