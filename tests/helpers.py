"""Helpers shared by the test files (pytest's default import mode puts tests/ on sys.path)."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg=None, **overrides):
    """`configs/<name>`'s `get_config(arg)`, loaded by path as the launchers do, with dotted
    overrides applied in order: `load_config("rl.py", **{"rl.group_size": 4})`."""
    spec = importlib.util.spec_from_file_location(f"config_{os.path.splitext(name)[0]}",
                                                  os.path.join(ROOT, "configs", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(arg)
    for key, value in overrides.items():
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return cfg
