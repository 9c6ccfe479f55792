"""Packed chat SFT rows, loss on every assistant turn, unknown record keys, weighted mixtures."""

import collections
import json
import logging

import grain
import numpy as np
import pytest

from llada_jax import data
from llada_jax.data.pipeline import tokenize_sft
from llada_jax.data.tokenizer import build_task_tokenizer

BLOCK = 8


@pytest.fixture(scope="module")
def tok():
    return build_task_tokenizer()


def conversation(i: int, turns: int, system: bool = False):
    """A conversation of `turns` user / assistant exchanges whose texts say where they come from."""
    head = [{"role": "system", "content": f"sys{i}"}] if system else []
    body = []
    for t in range(turns):
        body += [{"role": "user", "content": f"{i}+{t}" * (1 + (i + t) % 4)},
                 {"role": "assistant", "content": f"={i * 10 + t}" * (1 + (i * t) % 3)}]
    return {"messages": head + body, "meta": {"i": i}}


CONVERSATIONS = [conversation(i, 1 + i % 3, system=i % 2 == 0) for i in range(40)]


def runs(mask):
    """[start, end) of each run of True."""
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def test_loss_falls_on_every_assistant_turn_and_nothing_else(tok):
    """Against the rendered chat format: the trained runs decode to the assistant answers, each
    with its <|role_end|>, in order; everything else (system, user, role tags) is untrained."""
    for ex in CONVERSATIONS[:6]:
        row = tokenize_sft(ex, tok)
        ids, trained = row["tokens"], row["loss_mask"]
        assert ids.tolist() == tok.encode_chat(ex["messages"])
        answers = [m["content"] + "<|role_end|>" for m in ex["messages"] if m["role"] == "assistant"]
        assert [tok.decode(ids[a:b]) for a, b in runs(trained)] == answers
        rest = tok.decode(ids[~trained])
        for m in ex["messages"]:
            if m["role"] != "assistant":
                assert m["content"] in rest
        assert rest.count("<role>ASSISTANT</role>") == len(answers)  # the tags are given, not trained
    single = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    prompt, response = tok.encode_sft(single["messages"])  # one turn: as before, the final answer
    np.testing.assert_array_equal(tokenize_sft(single, tok)["loss_mask"],
                                  np.arange(len(prompt) + len(response)) >= len(prompt))


def _rows(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def test_packed_rows_hold_whole_conversations_on_block_boundaries(tok):
    ds = data.packed_sft_dataset(grain.MapDataset.source(CONVERSATIONS), tok, batch_size=2, seq_len=128,
                                 block_size=BLOCK, shuffle=False, num_epochs=1, drop_remainder=False, packing_bins=4)
    seen = []
    for batch in ds:
        assert set(batch) == {"tokens", "loss_mask", "doc_ids"}
        for tokens, loss_mask, doc_ids in zip(batch["tokens"], batch["loss_mask"], batch["doc_ids"]):
            pad = doc_ids == 0
            assert (tokens[pad] == tok.pad_id).all() and not loss_mask[pad].any()  # padding: no weight
            for d in np.unique(doc_ids[~pad]):
                (a, b), = runs(doc_ids == d)  # one contiguous span per conversation
                assert a % BLOCK == 0  # starts on a block boundary
                seen.append((tokens[a:b].tolist(), loss_mask[a:b].tolist()))
    want = [(r["tokens"].tolist(), r["loss_mask"].tolist()) for r in (tokenize_sft(ex, tok) for ex in CONVERSATIONS)]
    assert sorted(seen) == sorted(want)  # every conversation exactly once, its weights intact
    assert len(seen) > len(list(ds)) * 2  # rows hold several conversations


def test_packing_fills_rows(tok):
    """More bins pack tighter; the real tokens are most of each row."""
    def fraction(bins):
        rows = _rows(data.packed_sft_dataset(grain.MapDataset.source(CONVERSATIONS), tok, batch_size=4, seq_len=128,
                                             block_size=BLOCK, packing_bins=bins, seed=2), 8)
        return np.mean([np.mean(b["doc_ids"] > 0) for b in rows])

    padded = _rows(data.sft_dataset(grain.MapDataset.source(CONVERSATIONS), tok, batch_size=4, seq_len=128,
                                    block_size=BLOCK, seed=2), 8)
    assert fraction(16) > 0.8 > np.mean([np.mean(b["real"]) for b in padded])


def test_packed_iterator_state_restores_the_same_batches(tok):
    make = lambda: data.packed_sft_dataset(grain.MapDataset.source(CONVERSATIONS), tok, batch_size=2, seq_len=64,
                                           block_size=BLOCK, seed=5, packing_bins=3)
    it = iter(make())
    for _ in range(15):  # past the first epoch
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # the state survives serialisation
    expected = [next(it) for _ in range(5)]
    resumed = iter(make())
    resumed.set_state(state)
    for want, got in zip(expected, [next(resumed) for _ in range(5)]):
        for k in want:
            np.testing.assert_array_equal(want[k], got[k])


def test_unknown_record_keys_are_counted_not_rejected(tmp_path, caplog):
    lines = [
        {"messages": [{"role": "user", "content": "q", "name": "bob"},
                      {"role": "assistant", "content": "a", "tool_calls": [], "name": "x"}], "id": 1, "source": "s"},
        {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}], "id": 2},
        {"prompt": "p", "response": "r", "lang": "en"},
    ]
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    counts = collections.Counter()
    got = [ex for _, ex in data.read_jsonl(path, counts)]
    assert counts == {"messages[].name": 2, "messages[].tool_calls": 1, "id": 2, "source": 1, "lang": 1}
    assert got[0]["messages"] == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert got[0]["meta"] == {"id": 1, "source": "s"}
    with caplog.at_level(logging.WARNING):
        data.import_jsonl("extra", {"train": [str(path)]}, str(tmp_path / "d"))
    assert "messages[].name x 2" in caplog.text and "id x 2" in caplog.text
    assert len(data.open_split(str(tmp_path / "d"), "chat_jsonl/extra", "train")) == 3


# ------------------------------------------------------------------------------- mixtures
def _source(name, n):
    return grain.MapDataset.source([{"messages": [{"role": "user", "content": f"{name}{i}"},
                                                  {"role": "assistant", "content": name}], "meta": {"src": name}}
                                    for i in range(n)])


def test_mixture_proportions_match_the_weights():
    weights = {"aa": 5.0, "bb": 3.0, "cc": 2.0}
    # (grain's index shuffle is slow on tiny datasets, ~10 ms an element below a few dozen: sources of hundreds)
    mix = data.Mixture(tuple(_source(k, n) for k, n in zip(weights, (170, 300, 110))), tuple(weights.values()),
                       tuple(weights))
    n = 2000
    got = collections.Counter(ex["meta"]["src"] for ex in mix.ordered(seed=0, shuffle=True, num_epochs=None)[:n])
    total = sum(weights.values())
    for name, w in weights.items():
        p = w / total
        assert abs(got[name] - n * p) <= 3 * np.sqrt(n * p * (1 - p)), (name, got)


def test_mixture_through_the_packed_pipeline_and_resume(tok):
    weights = (3.0, 1.0)
    mix = data.Mixture((_source("aa", 130), _source("bb", 170)), weights, ("aa", "bb"))
    make = lambda: data.packed_sft_dataset(mix, tok, batch_size=2, seq_len=64, block_size=BLOCK, seed=1,
                                           packing_bins=2)
    it = iter(make())
    batches = [next(it) for _ in range(30)]
    answers = collections.Counter()
    for b in batches:
        for tokens, loss_mask in zip(b["tokens"], b["loss_mask"]):
            for a, e in runs(loss_mask):
                answers[tok.decode(tokens[a:e])] += 1
    n = sum(answers.values())
    assert set(answers) == {"aa<|role_end|>", "bb<|role_end|>"}
    assert abs(answers["aa<|role_end|>"] / n - 0.75) <= 3 * np.sqrt(0.75 * 0.25 / n), answers
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    resumed = iter(make())
    resumed.set_state(json.loads(json.dumps(state)))
    for want, got in zip(expected, [next(resumed) for _ in range(4)]):
        for k in want:
            np.testing.assert_array_equal(want[k], got[k])


@pytest.mark.parametrize("spec, out", [
    ("chat_jsonl/a:3,chat_jsonl/b:1", [("chat_jsonl/a", 3.0), ("chat_jsonl/b", 1.0)]),
    (["x:0.5", "y:2"], [("x", 0.5), ("y", 2.0)]),
    ([("x", 1), ("y", 2)], [("x", 1.0), ("y", 2.0)]),
])
def test_parse_mixture(spec, out):
    assert data.parse_mixture(spec) == out


@pytest.mark.parametrize("spec, what", [
    ("a", "expected 'name:weight' items, found 'a'"),
    ("a:x", "expected a number as the weight of 'a', found 'x'"),
    ("a:0", "expected a positive weight for 'a'"),
    ("a:1,a:2", "found 'a' twice"),
    ("", "expected 'name:weight"),
])
def test_parse_mixture_errors_name_the_field(spec, what):
    with pytest.raises(data.DataError, match="data.mixture") as e:
        data.parse_mixture(spec)
    assert what in str(e.value)
