"""Builds the offline task datasets, imports JSONL files and writes the task tokenizer into a data dir.

    python launch/make_data.py --data_dir=/tmp/llada_data
    python launch/make_data.py --data_dir=/tmp/llada_data --tasks=countdown --name=small \\
        --num_train=5000 --task_set=countdown.high=30
    python launch/make_data.py --data_dir=/tmp/llada_data --tasks= \\
        --jsonl_name=my_sft --jsonl_train=a.jsonl,b.jsonl --jsonl_validation=v.jsonl --jsonl_test=c.jsonl

Results: `<data_dir>/<task>/<name>/1.0.0/` and `<data_dir>/chat_jsonl/<jsonl_name>/1.0.0/`
(array_record, read with `llada_jax.data.open_split`), and `<data_dir>/tokenizer.json`.

On several hosts (the same command on every one, e.g. before launch/train.py in a TPU pod's
`--worker=all` command; the hosts flags elsewhere, see README "Many hosts") process 0 alone
writes into --data_dir, which every host must see, and the others wait until it has finished.
"""

import dataclasses
import os

from absl import app, flags, logging

from llada_jax import data
from llada_jax.parallel import hosts
from llada_jax.data import tasks
from llada_jax.data.tokenizer import build_task_tokenizer

_DATA_DIR = flags.DEFINE_string("data_dir", None, "Directory that receives the datasets.", required=True)
_TASKS = flags.DEFINE_list("tasks", list(tasks.TASKS), f"Offline tasks to generate, of {list(tasks.TASKS)}.")
_NAME = flags.DEFINE_string("name", "default", "Config name of the generated task datasets.")
_NUM_TRAIN = flags.DEFINE_integer("num_train", 20_000, "Training examples per task.")
_NUM_TEST = flags.DEFINE_integer("num_test", 500, "Test examples per task.")
_SEED = flags.DEFINE_integer("seed", 0, "Generation seed (the train/test split does not depend on it).")
_TASK_SET = flags.DEFINE_list("task_set", [], "Task settings as task.field=value, e.g. countdown.high=30.")
_JSONL_NAME = flags.DEFINE_string("jsonl_name", None, "Name of the imported JSONL dataset.")
_JSONL_TRAIN = flags.DEFINE_list("jsonl_train", [], "JSONL files of the train split.")
_JSONL_VALIDATION = flags.DEFINE_list("jsonl_validation", [], "JSONL files of the validation split (the "
                                      "trainer's validation loss, --config.eval_every).")
_JSONL_TEST = flags.DEFINE_list("jsonl_test", [], "JSONL files of the test split.")
_TOKENIZER = flags.DEFINE_bool("tokenizer", True, "Write the task tokenizer to <data_dir>/tokenizer.json.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Regenerate datasets that already exist.")
hosts.define_flags()  # --coordinator_address, --num_processes, --process_id


def task_configs(settings: list[str]) -> dict[str, object]:
    """Task config dataclasses from `task.field=value` strings, values typed like the defaults."""
    overrides: dict[str, dict[str, str]] = {}
    for item in settings:
        key, sep, value = item.partition("=")
        task, dot, field = key.partition(".")
        if not sep or not dot:
            raise app.UsageError(f"--task_set: expected task.field=value, found {item!r}")
        overrides.setdefault(task, {})[field] = value
    configs = {}
    for task, fields in overrides.items():
        default = tasks.get_task(task).config_cls()
        known = {f.name: type(getattr(default, f.name)) for f in dataclasses.fields(default)}
        for field in fields:
            if field not in known:
                raise app.UsageError(f"--task_set: {task} has no setting {field!r}; it has {sorted(known)}")
        configs[task] = dataclasses.replace(default, **{f: known[f](v) for f, v in fields.items()})
    return configs


def main(argv):
    del argv
    hosts.initialize_from_flags()  # before anything touches a device (here: to know who writes)
    configs = task_configs(_TASK_SET.value)
    if hosts.is_primary():
        write(configs)
    hosts.barrier("make_data")  # the others return once the data is there


def write(configs):
    for task in _TASKS.value:
        path = data.prepare_task(task, _DATA_DIR.value, name=_NAME.value, num_train=_NUM_TRAIN.value,
                                 num_test=_NUM_TEST.value, seed=_SEED.value, task_config=configs.get(task),
                                 overwrite=_OVERWRITE.value)
        logging.info("%s: %s", task, path)
    if _JSONL_NAME.value:
        splits = (("train", _JSONL_TRAIN.value), ("validation", _JSONL_VALIDATION.value), ("test", _JSONL_TEST.value))
        files = {split: paths for split, paths in splits if paths}
        path = data.import_jsonl(_JSONL_NAME.value, files, _DATA_DIR.value, overwrite=_OVERWRITE.value)
        logging.info("jsonl %s: %s", _JSONL_NAME.value, path)
    if _TOKENIZER.value:
        path = os.path.join(_DATA_DIR.value, "tokenizer.json")
        build_task_tokenizer().save(path)
        logging.info("tokenizer: %s", path)


if __name__ == "__main__":
    app.run(main)
