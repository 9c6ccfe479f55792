"""TFDS builders that write the offline tasks and imported JSONL files as array_record, and the reader.

TensorFlow is not needed: `tensorflow-datasets` writes array_record and reads it back through
`tfds.data_source` with numpy only. A prepared dataset lives at
`<data_dir>/<name>/<config>/<version>/` (`<name>-<split>.array_record-*` files plus
`dataset_info.json`, `features.json` and `metadata.json`, the last holding the generation
settings); its records are those of `llada_jax.data.records`.

Builders: `Addition`, `Countdown`, `Sudoku4x4` (one per task of `llada_jax.data.tasks`, sizes
and task settings in a `TaskBuilderConfig`) and `ChatJsonl` (user files, per split, in a
`JsonlConfig`). `prepare_task` / `import_jsonl` run them; `open_split` reads one split back
as a grain `MapDataset` of `{"messages", "meta"}` examples.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import sys
from typing import Any, ClassVar, Mapping, Sequence

import grain
import tensorflow_datasets as tfds
from absl import logging

from llada_jax.data import tasks
from llada_jax.data.jsonl import read_jsonl
from llada_jax.data.records import DataError, decode_record, encode_record, prompt_response_messages

FILE_FORMAT = "array_record"
_MAKE_DATA = "python launch/make_data.py --data_dir="


def _features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({"messages": tfds.features.Text(), "meta": tfds.features.Text()})


@dataclasses.dataclass(eq=False)
class TaskBuilderConfig(tfds.core.BuilderConfig):
    """How much of a task to generate: split sizes, the seed and the task's own settings
    (an `AdditionConfig`, `CountdownConfig` or `SudokuConfig`; None means its defaults)."""

    num_train: int = 20_000
    num_test: int = 500
    seed: int = 0
    task_config: Any = None
    num_validation: int = 200


class _TaskBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Generates the train and test splits of `TASK` from `llada_jax.data.tasks`.

    Constructed with `config=TaskBuilderConfig(name=..., ...)`; there are no predefined
    configs because the config name is the user's label for a set of generation settings
    (`prepare_task` refuses to reuse a directory generated with other settings).
    """

    TASK: ClassVar[str]
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.",
                     "1.1.0": "A validation split; held-out splits hold distinct problems."}

    def generation_settings(self) -> dict[str, Any]:
        """Everything that determines the records; stored as metadata.json and checked on reuse."""
        c = self.builder_config
        if c is None:
            raise DataError(f"{type(self).__name__}: pass config=TaskBuilderConfig(name=..., ...)")
        task_config = c.task_config or tasks.get_task(self.TASK).config_cls()
        return {"task": self.TASK, "num_train": c.num_train, "num_test": c.num_test,
                "num_validation": c.num_validation, "seed": c.seed,
                "task_config": dataclasses.asdict(task_config)}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, features=_features(), metadata=tfds.core.MetadataDict(self.generation_settings()),
            description=f"Offline task {self.TASK!r}, generated locally (llada_jax.data.tasks).")

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded
        c = self.builder_config
        return {"train": self._generate_examples("train", c.num_train),
                "validation": self._generate_examples("validation", c.num_validation),
                "test": self._generate_examples("test", c.num_test)}

    def _generate_examples(self, split: str, num: int):
        c, task = self.builder_config, tasks.get_task(self.TASK)
        for i, ex in enumerate(tasks.examples(self.TASK, num, split, c.seed, c.task_config or task.config_cls())):
            yield i, encode_record(prompt_response_messages(ex["prompt"], ex["response"]), ex["meta"])


class Addition(_TaskBuilder):
    TASK = "addition"


class Countdown(_TaskBuilder):
    TASK = "countdown"


class Sudoku4x4(_TaskBuilder):
    TASK = "sudoku4x4"


TASK_BUILDERS: dict[str, type[_TaskBuilder]] = {b.TASK: b for b in (Addition, Countdown, Sudoku4x4)}


@dataclasses.dataclass(eq=False)
class JsonlConfig(tfds.core.BuilderConfig):
    """The JSONL files of each split, e.g. `{"train": ("a.jsonl", "b.jsonl"), "test": ("c.jsonl",)}`."""

    files: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)


class ChatJsonl(tfds.core.GeneratorBasedBuilder):
    """User conversations from JSONL files (formats in `llada_jax.data.jsonl`)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.",
                     "1.1.0": "A validation split; held-out splits hold distinct problems."}

    def generation_settings(self) -> dict[str, Any]:
        return {"files": {split: [os.path.abspath(p) for p in paths]
                          for split, paths in self.builder_config.files.items()}}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=_features(),
                                     metadata=tfds.core.MetadataDict(self.generation_settings()),
                                     description="Conversations imported from JSONL files.")

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(paths) for split, paths in self.builder_config.files.items()}

    def _generate_examples(self, paths: Sequence[str]):
        for file_index, path in enumerate(paths):
            for lineno, ex in read_jsonl(path):
                yield f"{file_index}:{lineno}", encode_record(ex["messages"], ex["meta"])


def _prepare(builder: tfds.core.GeneratorBasedBuilder, overwrite: bool) -> str:
    """Runs `builder` unless an identical dataset is already there; returns its directory.

    TFDS alone would silently reuse a prepared directory of the same config name even if it
    was generated with other settings, so the stored settings are compared first.
    """
    if builder.is_prepared() and not overwrite:
        with open(os.path.join(builder.data_dir, "metadata.json")) as f:
            stored = json.load(f)
        wanted = json.loads(json.dumps(builder.generation_settings()))
        if stored != wanted:
            raise DataError(f"{builder.data_dir} holds a dataset generated with {stored}, not {wanted}; "
                            "overwrite it or choose another config name")
        return str(builder.data_dir)
    modes = tfds.download.GenerateMode
    mode = modes.FORCE_REDOWNLOAD if overwrite else modes.REUSE_DATASET_IF_EXISTS
    # On stderr, with TFDS' own banners ("Downloading and preparing ..."): a program's stdout stays
    # its output (the benchmarks print one JSON object there, also on a first run that builds data).
    print(f"generating {builder.name}/{builder.builder_config.name} in {builder.data_dir} ...", file=sys.stderr,
          flush=True)
    # TFDS' own progress bars and "Downloading ..." banner describe downloads we never make.
    tfds.disable_progress_bar()
    with contextlib.redirect_stdout(sys.stderr):
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
    return str(builder.data_dir)


def prepare_task(task: str, data_dir: str, *, name: str = "default", num_train: int = 20_000,
                 num_test: int = 500, seed: int = 0, task_config: Any = None, overwrite: bool = False,
                 num_validation: int = 200) -> str:
    """Generates `<data_dir>/<task>/<name>/1.1.0` (train, validation and test splits; the held-out
    two hold distinct problems); returns its directory."""
    if task not in TASK_BUILDERS:
        raise DataError(f"task: expected one of {sorted(TASK_BUILDERS)}, found {task!r}")
    config = TaskBuilderConfig(name=name, num_train=num_train, num_test=num_test, seed=seed,
                               task_config=task_config, num_validation=num_validation)
    return _prepare(TASK_BUILDERS[task](config=config, data_dir=data_dir, file_format=FILE_FORMAT), overwrite)


def import_jsonl(name: str, files: Mapping[str, Sequence[str]], data_dir: str, *, overwrite: bool = False) -> str:
    """Imports JSONL files as `<data_dir>/chat_jsonl/<name>/1.0.0`, one split per key of `files`.

    Every file is validated before anything is written, so a bad line (reported as
    `DataError("<path>:<line>: <what>")`) leaves the data directory untouched.
    """
    if not files or not all(files.values()):
        raise DataError(f"files: expected at least one JSONL file per split, found {dict(files)}")
    unknown_keys = collections.Counter()
    for paths in files.values():
        for path in paths:
            for _ in read_jsonl(path, unknown_keys):
                pass
    if unknown_keys:  # set aside, not rejected: say how often, so a misspelt key is noticed
        logging.warning("import_jsonl %s: ignored record keys (kept in meta at the top level, dropped in "
                        "messages): %s", name, ", ".join(f"{k} x {n}" for k, n in sorted(unknown_keys.items())))
    config = JsonlConfig(name=name, files={split: tuple(paths) for split, paths in files.items()})
    return _prepare(ChatJsonl(config=config, data_dir=data_dir, file_format=FILE_FORMAT), overwrite)


def dataset_dir(data_dir: str, dataset: str) -> str:
    """The directory of a prepared dataset: `dataset` is `<name>` or `<name>/<config>` (e.g.
    "countdown", "chat_jsonl/my_sft"); the config defaults to "default" or the only one there,
    the version to the newest."""
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory not found: {data_dir} (build it with `{_MAKE_DATA}{data_dir}`)")
    name, _, config = dataset.partition("/")
    root = os.path.join(data_dir, name)
    if not os.path.isdir(root):
        found = sorted(d for d in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, d)) and d != "downloads")
        raise DataError(f"dataset {name!r} not found in {data_dir}; it holds {found}")
    configs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not config:
        if "default" not in configs and len(configs) != 1:
            raise DataError(f"dataset {name!r} in {data_dir} has configs {configs}; name one as '{name}/<config>'")
        config = "default" if "default" in configs else configs[0]
    config_dir = os.path.join(root, config)
    versions = sorted((tfds.core.Version(v) for v in (os.listdir(config_dir) if os.path.isdir(config_dir) else ())
                       if tfds.core.Version.is_valid(v)
                       and os.path.isfile(os.path.join(config_dir, v, "dataset_info.json"))), reverse=True)
    if not versions:
        raise DataError(f"no prepared version of {name}/{config} in {data_dir} (configs there: {configs})")
    return os.path.join(config_dir, str(versions[0]))


def open_split(data_dir: str, dataset: str, split: str) -> grain.MapDataset:
    """One split of a prepared dataset as a random-access grain `MapDataset` of
    `{"messages": [...], "meta": {...}}` examples, decoded lazily."""
    builder = tfds.builder_from_directory(dataset_dir(data_dir, dataset))
    if split not in builder.info.splits:
        raise DataError(f"split {split!r} not in {dataset} (it has {sorted(builder.info.splits)})")
    return grain.MapDataset.source(builder.as_data_source(split=split)).map(decode_record)
