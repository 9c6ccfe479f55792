"""Offline tasks and rewards, array_record storage, the JSONL importer and the grain pipelines."""

import collections
import dataclasses
import functools
import json
import re

import grain
import numpy as np
import pytest

from llada_jax import data
from llada_jax.data import tasks
from llada_jax.data.tokenizer import build_task_tokenizer

BLOCK = 8


@pytest.fixture(scope="module")
def tok():
    return build_task_tokenizer()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("data"))
    for task in tasks.TASKS:
        data.prepare_task(task, d, num_train=120, num_test=40, seed=3)
    return d


def _examples(task, num, split="train", seed=0):
    t = tasks.get_task(task)
    return t.examples(num, split, seed, t.config_cls())


# -------------------------------------------------------------------------------- sudoku
def test_sudoku_has_exactly_288_valid_distinct_grids():
    grids = tasks.sudoku_grids().reshape(-1, 4, 4)
    assert len({g.tobytes() for g in grids}) == 288
    boxes = grids.reshape(-1, 2, 2, 2, 2).transpose(0, 1, 3, 2, 4).reshape(-1, 4, 4)
    for units in (grids, grids.transpose(0, 2, 1), boxes):
        assert (np.sort(units, axis=-1) == np.arange(1, 5)).all()


def test_sudoku_puzzles_are_unique_and_splits_do_not_share_solutions():
    train, test = _examples("sudoku4x4", 150, "train"), _examples("sudoku4x4", 60, "test")
    for ex in train + test:
        puzzle = np.array([int(c) for c in ex["meta"]["puzzle"]], np.int8)
        assert tasks.sudoku_num_solutions(puzzle) == 1
        assert 10 <= (puzzle == 0).sum() <= 12
        assert all(p in ("0", s) for p, s in zip(ex["meta"]["puzzle"], ex["meta"]["solution"]))
    solutions = lambda exs: {ex["meta"]["solution"] for ex in exs}  # noqa: E731
    assert not solutions(train) & solutions(test)
    # Every one of the 288 grids belongs to exactly one split.
    n_test = sum(tasks.split_of("sudoku:" + "".join(map(str, g)), 0.15) == "test" for g in tasks.sudoku_grids())
    assert 0 < n_test < 288


def test_sudoku_reward_is_the_fraction_of_blanks_filled_correctly():
    meta = {"task": "sudoku4x4", "puzzle": "1234341200000000", "solution": "1234341221434321"}
    assert tasks.reward("1234\n3412\n2143\n4321<|role_end|>", meta) == 1.0
    assert tasks.reward("1234\n3412\n2143\n1111", meta) == 5 / 8  # 8 blanks, 3 wrong in the last row
    assert tasks.reward("1234341221", meta) == 0.25  # truncated: missing cells are wrong
    assert tasks.reward("no idea", meta) == 0.0


# ------------------------------------------------------------------------------ countdown
def test_countdown_examples_are_solved_by_their_response():
    for ex in _examples("countdown", 60):
        meta = ex["meta"]
        assert len(meta["numbers"]) == 3 and all(1 <= n <= 100 for n in meta["numbers"])
        assert 1 <= meta["target"] <= 100
        assert tasks.reward(ex["response"], meta) == 1.0
        assert tasks.solve_countdown(tuple(meta["numbers"]), meta["target"]) is not None


def test_countdown_solver():
    expr = tasks.solve_countdown((3, 5, 7), 22)
    value, used = tasks.parse_expression(expr)
    assert value == 22 and sorted(used) == [3, 5, 7]
    assert tasks.solve_countdown((1, 1, 1), 50) is None
    assert tasks.solve_countdown((4, 6, 3), 8) is not None  # 4*6/3 needs division


@pytest.mark.parametrize("completion, expected", [
    ("(3*5)+7", 1.0),
    (" 7 + 3 * 5 <|role_end|><|endoftext|>", 1.0),
    ("3*5+7+0", 0.1),  # right value, but uses a number that was not given
    ("3*5*7", 0.1),  # well-formed, wrong value
    ("3*5", 0.1),  # a number missing
    ("7/(5-5)+3", 0.1),  # division by zero: well-formed, wrong
    ("(3*5+7", 0.0),
    ("__import__('os')", 0.0),
    ("3*5+7=22", 0.0),
    ("", 0.0),
    ("(" * 300 + "1" + ")" * 300, 0.0),
])
def test_countdown_reward(completion, expected):
    assert tasks.reward(completion, {"task": "countdown", "numbers": [3, 5, 7], "target": 22}) == expected


# ------------------------------------------------------------------------------- addition
def test_addition_reward_and_examples():
    meta = {"task": "addition", "a": 123, "b": 989}
    assert tasks.reward("1112", meta) == 1.0
    assert tasks.reward(" 1112<|role_end|>", meta) == 1.0
    assert tasks.reward("1113", meta) == 0.0
    assert tasks.reward("1112.0", meta) == 0.0
    for ex in _examples("addition", 30):
        assert tasks.reward(ex["response"], ex["meta"]) == 1.0


def test_addition_fixed_width_and_noisy_teacher():
    cfg = tasks.AdditionConfig(max_digits=2, zero_pad=True)
    for ex in tasks.addition_examples(50, "train", cfg=cfg):
        assert re.fullmatch(r"\d\d\+\d\d=", ex["prompt"]) and re.fullmatch(r"\d{3}", ex["response"])
        assert tasks.reward(ex["response"], ex["meta"]) == 1.0
    assert tasks.sum_without_carries(67, 34) == 91 and tasks.sum_without_carries(95, 7) == 92
    noisy = dataclasses.replace(cfg, carry_error_rate=0.6)
    train = tasks.addition_examples(2000, "train", cfg=noisy)
    carries = [ex for ex in train if tasks.sum_without_carries(ex["meta"]["a"], ex["meta"]["b"])
               != ex["meta"]["a"] + ex["meta"]["b"]]
    wrong = [ex for ex in train if tasks.reward(ex["response"], ex["meta"]) == 0.0]
    assert all(int(ex["response"]) == tasks.sum_without_carries(ex["meta"]["a"], ex["meta"]["b"]) for ex in wrong)
    assert 0.55 < len(wrong) / len(carries) < 0.65  # only sums with a carry are ever wrong
    assert all(tasks.reward(ex["response"], ex["meta"]) == 1.0 for ex in tasks.addition_examples(300, "test", cfg=noisy))
    with pytest.raises(ValueError, match="carry_error_rate: expected a probability in \\[0, 1\\], found 1.5"):
        tasks.addition_examples(1, "train", cfg=dataclasses.replace(cfg, carry_error_rate=1.5))


def test_multi_pair_addition_spans_blocks_with_partial_credit():
    """Four sums per prompt (the quickstart's task) at a fixed stride of 5 characters, per-pair
    noisy teacher, reward = exact answers / 4."""
    cfg = tasks.AdditionConfig(max_digits=2, zero_pad=True, num_pairs=4, carry_error_rate=0.6)
    for ex in tasks.addition_examples(50, "train", cfg=cfg):
        assert re.fullmatch(r"(\d\d\+\d\d){4}", ex["prompt"])
        assert re.fullmatch(r"(=\d{3},){3}=\d{3}", ex["response"]) and len(ex["meta"]["pairs"]) == 4
    meta = {"task": "addition", "pairs": [[7, 35], [12, 49], [55, 66], [80, 9]]}
    assert tasks.reward("=042,=061,=121,=089", meta) == 1.0
    assert tasks.reward("=042,=051,=121,=089<|endoftext|>", meta) == 0.75
    assert tasks.reward("=042,=061,=121", meta) == 0.75  # a missing answer
    assert tasks.reward("=042,=061,=121,=089,=000", meta) == 0.75  # an extra one: never full credit
    assert tasks.reward("042,061,121,089", meta) == 0.0 and tasks.reward("", meta) == 0.0
    test = tasks.addition_examples(200, "test", cfg=cfg)
    assert all(tasks.reward(ex["response"], ex["meta"]) == 1.0 for ex in test)  # held-out answers exact
    keys = lambda exs: {f"{min(a, b)}+{max(a, b)}" for ex in exs for a, b in ex["meta"]["pairs"]}
    assert not keys(test) & keys(tasks.addition_examples(500, "train", cfg=cfg))  # pairs never shared


def test_addition_free_spellings_are_read_as_the_usual_ones():
    """spelling_choice: each "=" and separating "," is written ":" / ";" with its probability,
    independently, in every split; the reward and the answer kinds read either spelling, and
    with the choice off the problems and responses are those of the default config."""
    cfg = tasks.AdditionConfig(max_digits=2, zero_pad=True, num_pairs=4, carry_error_rate=0.6)
    free = dataclasses.replace(cfg, spelling_choice=0.4)
    meta = {"task": "addition", "pairs": [[7, 35], [12, 49], [55, 66], [80, 9]]}
    assert tasks.reward(":042;=061,:121;:089", meta) == 1.0
    assert tasks.reward(":042;=051", meta) == 0.25
    assert [k for k, _ in tasks.addition_answer_kinds(":042;:051,=011;=089", meta)] == [
        "right", "carryless", "carryless", "right"]
    for split in ("train", "test"):
        exs = tasks.addition_examples(400, split, cfg=free)
        text = "".join(ex["response"] for ex in exs)
        assert all(re.fullmatch(r"[=:]\d{3}([,;][=:]\d{3}){3}", ex["response"]) for ex in exs)
        assert 0.35 < text.count(":") / (4 * len(exs)) < 0.45 and 0.35 < text.count(";") / (3 * len(exs)) < 0.45
        if split == "test":
            assert all(tasks.reward(ex["response"], ex["meta"]) == 1.0 for ex in exs)
    assert tasks.addition_examples(50, "train", cfg=dataclasses.replace(free, spelling_choice=0.0)) == \
        tasks.addition_examples(50, "train", cfg=cfg)
    with pytest.raises(ValueError, match=r"spelling_choice: expected a probability in \[0, 0.5\), found 0.6"):
        tasks.addition_examples(1, "train", cfg=dataclasses.replace(free, spelling_choice=0.6))
    with pytest.raises(ValueError, match="spelling_choice: expected 0 with num_pairs 1"):
        tasks.addition_examples(1, "train", cfg=dataclasses.replace(free, num_pairs=1))


def test_addition_answer_kinds_tell_the_teachers_error_from_others():
    """bench/sums.py's classes: the right sum, the noisy teacher's carry-less one, anything else;
    every noisy demonstration is right or carry-less, and only sums that need a carry are ever
    carry-less."""
    meta = {"task": "addition", "pairs": [[7, 35], [12, 49], [55, 66], [80, 9]]}  # carries: 1st, 2nd, 3rd
    assert tasks.addition_answer_kinds("=042,=051,=011,=089", meta) == [
        ("right", True), ("carryless", True), ("carryless", True), ("right", False)]
    assert tasks.addition_answer_kinds("=043,=061", meta) == [
        ("other", True), ("right", True), ("other", True), ("other", False)]  # missing answers: other
    assert [k for k, _ in tasks.addition_answer_kinds("=042,=061,=121,=079", meta)][3] == "other"
    cfg = tasks.AdditionConfig(max_digits=2, zero_pad=True, num_pairs=4, carry_error_rate=0.6)
    kinds = [k for ex in tasks.addition_examples(300, "train", cfg=cfg)
             for k in tasks.addition_answer_kinds(ex["response"], ex["meta"])]
    assert {k for k, _ in kinds} == {"right", "carryless"}
    assert all(needs for k, needs in kinds if k == "carryless")
    with pytest.raises(ValueError, match="meta: expected a several-pair addition record with 'pairs'"):
        tasks.addition_answer_kinds("=1", {"task": "addition", "a": 0, "b": 1})


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_held_out_splits_hold_distinct_problems(task):
    """Validation and test are drawn without replacement and never share a problem with train or
    each other; asking for more problems than a split has is an error naming the count."""
    held = {split: tasks.examples(task, 60, split, seed=1) for split in ("validation", "test")}
    for split, exs in held.items():
        assert len({ex["prompt"] for ex in exs}) == 60, split
    train = {ex["prompt"] for ex in tasks.examples(task, 200, "train")}
    assert not train & {ex["prompt"] for ex in held["test"]}
    assert not train & {ex["prompt"] for ex in held["validation"]}
    assert not {ex["prompt"] for ex in held["test"]} & {ex["prompt"] for ex in held["validation"]}


def test_too_many_held_out_problems_is_an_error():
    one_digit = tasks.AdditionConfig(max_digits=1)  # ~10 test problems exist
    with pytest.raises(ValueError, match=r"num \(test\): expected at most the distinct problems.*found 500"):
        tasks.examples("addition", 500, "test", cfg=one_digit)


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_generation_is_deterministic_and_splits_are_disjoint(task):
    assert _examples(task, 20, seed=5) == _examples(task, 20, seed=5)
    assert _examples(task, 20, seed=5) != _examples(task, 20, seed=6)
    train = {ex["prompt"] for ex in _examples(task, 200, "train")}
    test = {ex["prompt"] for ex in _examples(task, 50, "test", seed=1)}
    assert not train & test


# -------------------------------------------------------------------------------- storage
def test_prepared_splits_round_trip(data_dir):
    train = data.open_split(data_dir, "countdown", "train")
    assert len(train) == 120 and len(data.open_split(data_dir, "countdown/default", "test")) == 40
    stored = sorted(json.dumps(train[i], sort_keys=True) for i in range(len(train)))
    expected = sorted(json.dumps({"messages": [{"role": "user", "content": ex["prompt"]},
                                               {"role": "assistant", "content": ex["response"]}],
                                  "meta": ex["meta"]}, sort_keys=True)
                      for ex in _examples("countdown", 120, seed=3))
    assert stored == expected


def test_preparing_data_leaves_stdout_to_the_program(tmp_path, capfd):
    """What a first run's data build says (ours and TFDS' banners) goes to stderr: a benchmark's
    stdout is its one JSON object even when it builds its data."""
    data.prepare_task("addition", str(tmp_path), num_train=20, num_test=5)
    out, err = capfd.readouterr()
    assert out == "" and "generating addition/" in err and "Downloading and preparing" in err, (out, err)


def test_reusing_a_config_name_with_other_settings_fails(data_dir):
    data.prepare_task("addition", data_dir, num_train=120, num_test=40, seed=3)  # identical: reused
    with pytest.raises(data.DataError, match="generated with"):
        data.prepare_task("addition", data_dir, num_train=120, num_test=40, seed=4)


def test_missing_data_errors(tmp_path, data_dir):
    with pytest.raises(data.DataError, match="data directory not found"):
        data.open_split(str(tmp_path / "nope"), "countdown", "train")
    with pytest.raises(data.DataError, match="not found in"):
        data.open_split(data_dir, "gsm8k", "train")
    with pytest.raises(data.DataError, match="split 'valid'"):
        data.open_split(data_dir, "countdown", "valid")


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_jsonl_import(tmp_path):
    chat = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                         {"role": "assistant", "content": "a"}], "id": 7}
    single = {"prompt": "p", "response": "r", "meta": {"answer": 3}}
    path = _write_lines(tmp_path / "a.jsonl", [json.dumps(chat), "", json.dumps(single)])
    data.import_jsonl("mine", {"train": [path]}, str(tmp_path / "d"))
    got = sorted((data.open_split(str(tmp_path / "d"), "chat_jsonl/mine", "train")), key=lambda e: len(e["messages"]))
    assert got[0] == {"messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}],
                      "meta": {"answer": 3}}
    assert got[1] == {"messages": chat["messages"], "meta": {"id": 7}}


@pytest.mark.parametrize("bad, what", [
    ('{"prompt": "p", "response": ', "invalid JSON"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "last message must be the assistant"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}', "messages[1].role"),
    ('{"prompt": "p"}', "'response': expected a string"),
    ('{"text": "hello"}', "expected the key 'messages'"),
    ('[1, 2]', "expected a JSON object"),
])
def test_jsonl_bad_line_names_file_and_line(tmp_path, bad, what):
    good = json.dumps({"prompt": "p", "response": "r"})
    path = _write_lines(tmp_path / "user.jsonl", [good, good, bad])
    out = tmp_path / "out"
    with pytest.raises(data.DataError) as e:
        data.import_jsonl("x", {"train": [path]}, str(out))
    assert f"{path}:3: " in str(e.value) and what in str(e.value)
    assert not out.exists()  # validated before anything was written


# ------------------------------------------------------------------------------- pipelines
def _in_memory(task="addition", num=64):
    return grain.MapDataset.source([
        {"messages": [{"role": "user", "content": ex["prompt"]}, {"role": "assistant", "content": ex["response"]}],
         "meta": ex["meta"]} for ex in _examples(task, num)])


def test_sft_batches_shapes_and_masks(tok, data_dir):
    examples = data.open_split(data_dir, "sudoku4x4", "train")
    batch = next(iter(data.sft_dataset(examples, tok, batch_size=4, seq_len=96, block_size=BLOCK, seed=1)))
    assert batch["tokens"].shape == batch["loss_mask"].shape == batch["doc_ids"].shape == (4, 96)
    assert batch["tokens"].dtype == np.int32 and batch["loss_mask"].dtype == bool
    for tokens, loss_mask in zip(batch["tokens"], batch["loss_mask"]):
        prompt_len = int(np.argmax(loss_mask))
        assert not loss_mask[:prompt_len].any() and loss_mask[prompt_len:].all()  # response + EOS padding
        assert tok.decode(tokens[:prompt_len]).endswith("<|role_end|><role>ASSISTANT</role>")
        assert re.fullmatch(r"[1-4]{4}(\n[1-4]{4}){3}<\|role_end\|>(<\|endoftext\|>)*", tok.decode(tokens[prompt_len:]))
    assert (batch["doc_ids"] == 1).all()


def test_sft_plain_template_rows_are_prompt_answer_padding(tok):
    batch = next(iter(data.sft_dataset(_in_memory(), tok, batch_size=4, seq_len=16, block_size=BLOCK,
                                       template="plain", shuffle=False)))
    for tokens, loss_mask, ex in zip(batch["tokens"], batch["loss_mask"], _in_memory()[:4]):
        prompt_len = int(np.argmax(loss_mask))
        assert tok.decode(tokens[:prompt_len]) == ex["messages"][0]["content"]
        assert tok.decode(tokens[prompt_len:]) == ex["messages"][1]["content"] + "<|endoftext|>" * (16 - prompt_len - len(
            tok.encode(ex["messages"][1]["content"])))
    with pytest.raises(data.DataError, match="template: expected one of"):
        data.sft_dataset(_in_memory(), tok, batch_size=4, block_size=BLOCK, template="Plain")


def test_sft_dynamic_length_pads_to_a_block_multiple(tok):
    ds = data.sft_dataset(_in_memory(), tok, batch_size=8, block_size=BLOCK, loss_on_padding=False, shuffle=False)
    batch = next(iter(ds))
    lengths = [len(sum(tok.encode_sft(ex["messages"]), [])) for ex in _in_memory()[:8]]
    assert batch["tokens"].shape[1] == -(-max(lengths) // BLOCK) * BLOCK
    for row, n in zip(batch["loss_mask"], lengths):
        assert not row[n:].any() and row[n - 1]


def test_sft_too_long_policies(tok):
    examples = _in_memory("countdown", 16)
    short = functools.partial(data.sft_dataset, examples, tok, seq_len=BLOCK, block_size=BLOCK)
    assert list(short(batch_size=1, num_epochs=1)) == []  # every example is longer than 8 tokens
    with pytest.raises(ValueError, match="skipped 100.00 %"):  # ... so repeating forever fails, not spins
        next(iter(short(batch_size=1)))
    assert next(iter(short(batch_size=2, too_long="truncate")))["tokens"].shape == (2, BLOCK)
    with pytest.raises(data.DataError, match="more than seq_len"):
        next(iter(short(batch_size=1, too_long="error")))
    with pytest.raises(data.DataError, match="multiple of block_size"):
        data.sft_dataset(examples, tok, batch_size=1, seq_len=30, block_size=BLOCK)


def test_cpt_packing(tok):
    examples = _in_memory("addition", 40)
    batches = list(data.cpt_dataset(examples, tok, batch_size=2, seq_len=64, block_size=BLOCK, shuffle=False,
                                    num_epochs=1, drop_remainder=False))
    rows = {k: np.concatenate([b[k] for b in batches]) for k in ("tokens", "loss_mask", "doc_ids")}
    assert rows["tokens"].shape[1] == 64
    assert (rows["loss_mask"] == (rows["doc_ids"] > 0)).all()
    assert (rows["tokens"][rows["doc_ids"] == 0] == tok.eos_id).all()
    stream = np.concatenate([r[m] for r, m in zip(rows["tokens"], rows["loss_mask"])]).tolist()
    docs = [tok.encode_chat(ex["messages"]) + [tok.eos_id] for ex in examples]
    assert stream == sum(docs, [])  # nothing lost, nothing reordered
    for doc_ids in rows["doc_ids"]:  # documents are numbered 1, 2, ... in order within a row
        real = doc_ids[doc_ids > 0]
        assert real[0] == 1 and (np.diff(real) >= 0).all() and (np.diff(real) <= 1).all()


@pytest.mark.parametrize("kind", ["sft", "cpt"])
def test_iterator_state_restores_the_same_batches(tok, kind):
    make = data.sft_dataset if kind == "sft" else data.cpt_dataset
    ds = make(_in_memory("countdown", 24), tok, batch_size=4, seq_len=64, block_size=BLOCK, seed=7)
    it = iter(ds)
    for _ in range(7):  # past the first epoch of 24 examples
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]
    resumed = iter(make(_in_memory("countdown", 24), tok, batch_size=4, seq_len=64, block_size=BLOCK, seed=7))
    resumed.set_state(json.loads(json.dumps(state)))  # the state survives serialisation
    for want, got in zip(expected, [next(resumed) for _ in range(4)]):
        for k in want:
            np.testing.assert_array_equal(want[k], got[k])


def test_process_shards_are_disjoint_and_cover_the_source(tok):
    examples = _in_memory("addition", 50)
    rows = collections.Counter()
    sizes = []
    for index in range(3):
        ds = data.sft_dataset(examples, tok, batch_size=1, seq_len=64, block_size=BLOCK, num_epochs=1,
                              drop_remainder=False, shard_index=index, shard_count=3, seed=0)
        shard = [tuple(t for t in b["tokens"][0].tolist() if t != tok.eos_id) for b in ds]
        sizes.append(len(shard))
        rows.update(shard)
    assert sizes == [17, 17, 16]
    assert rows == collections.Counter(tuple(tok.encode_chat(ex["messages"])) for ex in examples)
    with pytest.raises(data.DataError, match="shard_index"):
        data.shard_for_process(examples, 3, 3)
    with pytest.raises(data.DataError, match="shard_index"):
        data.rows_for_process(examples, 2, 3, 3)


def test_global_batches_do_not_depend_on_the_process_count(tok):
    """Two processes' rows, stacked, are the one-process batch of the same step (multi-host
    runs see the batches of a single host)."""
    examples = _in_memory("addition", 50)
    kw = dict(seq_len=64, block_size=BLOCK, seed=3, num_epochs=None)
    one = iter(data.sft_dataset(examples, tok, batch_size=8, **kw))
    halves = [iter(data.sft_dataset(examples, tok, batch_size=4, shard_index=i, shard_count=2, **kw)) for i in range(2)]
    for _ in range(15):  # past the first epoch (50 examples)
        want = next(one)
        parts = [next(h) for h in halves]
        for k in want:
            np.testing.assert_array_equal(want[k], np.concatenate([p[k] for p in parts]))
