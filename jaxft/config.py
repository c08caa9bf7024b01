"""Configs by name: `configs/<name>.py::get_config(arg)` plus `--config.a.b=v` overrides.

A config is an `ml_collections.ConfigDict`, locked before overrides so a typo in a
key fails. Sections that pick a member by name (`model`, `adapter`, `objective`,
`optimizer`) are completed with that member's defaults, so
`--config.adapter.name=lora --config.adapter.rank=16` works on any config, and a
field the chosen member does not have is an error that lists the ones it has.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import pkgutil
from typing import Any, Iterable, Mapping

import ml_collections

from jaxft import names

CONFIG_PACKAGE = "jaxft_configs"
# Config modules that are helpers, not experiments.
_NOT_CONFIGS = {"common"}


class ConfigError(ValueError):
  """A bad config name, key or value; the message says which and what is valid."""


def config_names() -> list[str]:
  """Names of the configs in the installed `configs/` folder (`jaxft_configs`)."""
  pkg = importlib.import_module(CONFIG_PACKAGE)
  found = [m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.ispkg]
  return sorted(n for n in found if n not in _NOT_CONFIGS and not n.startswith("_"))


def _load_module(name: str):
  if name.endswith(".py") or os.sep in name:
    if not os.path.exists(name):
      raise ConfigError(f"config file {name!r} does not exist")
    spec = importlib.util.spec_from_file_location("_jaxft_user_config", name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
  known = config_names()
  if name not in known:
    raise ConfigError(names.unknown_message("config", name, known))
  return importlib.import_module(f"{CONFIG_PACKAGE}.{name}")


def _section_defaults() -> dict[str, Mapping[str, Mapping[str, Any]]]:
  """{section: {member name: default fields}} for every section chosen by name."""
  from jaxft import adapters, models, objectives, optimizers  # pylint: disable=g-import-not-at-top
  return {
      "model": models.DEFAULTS,
      "adapter": adapters.DEFAULTS,
      "objective": objectives.DEFAULTS,
      "optimizer": optimizers.DEFAULTS,
  }


def _split(overrides: Iterable[str]) -> list[tuple[str, str]]:
  out = []
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optimizer.lr=1e-3)")
    key, value = item.split("=", 1)
    key = key.strip()
    if key.startswith("--"):
      key = key[2:]
    if key.startswith("config."):
      key = key[len("config."):]
    out.append((key, value))
  return out


def _parse_value(text: str, current: Any, key: str) -> Any:
  """Parses `text` into the type of the field's current value."""
  kind = type(current)
  if isinstance(current, bool):
    low = text.strip().lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ConfigError(f"config key {key!r} expects a bool (true/false), got {text!r}")
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  if current is None:
    return value
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)):
    return kind(value)
  if isinstance(current, (tuple, list)) and isinstance(value, str):
    return kind([value])
  if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
    raise ConfigError(
        f"config key {key!r} expects {kind.__name__} (now {current!r}), got {text!r}")
  return value


def _resolve(cfg: ml_collections.ConfigDict, key: str):
  """Returns (parent ConfigDict, leaf name) for dotted `key`, or raises ConfigError."""
  parts = key.split(".")
  node, walked = cfg, []
  for part in parts[:-1]:
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ConfigError(names.unknown_message(
          "config key", ".".join(walked + [part]), _prefixed(node, walked)))
    node, walked = node[part], walked + [part]
  if not isinstance(node, ml_collections.ConfigDict) or parts[-1] not in node:
    raise ConfigError(names.unknown_message("config key", key, _prefixed(node, walked)))
  return node, parts[-1]


def _prefixed(node, walked: list[str]) -> list[str]:
  if not isinstance(node, ml_collections.ConfigDict):
    return [".".join(walked)]
  return [".".join(walked + [k]) for k in node.keys()]


def set_value(cfg: ml_collections.ConfigDict, key: str, text: str) -> None:
  parent, leaf = _resolve(cfg, key)
  current = parent[leaf]
  if isinstance(current, ml_collections.ConfigDict):
    raise ConfigError(f"config key {key!r} is a section; set one of its fields: "
                      f"{', '.join(sorted(current.keys()))}")
  value = _parse_value(text, current, key)
  try:
    parent[leaf] = value
  except TypeError as e:
    raise ConfigError(f"config key {key!r}: {e}") from None


def complete_sections(cfg: ml_collections.ConfigDict, switched: Iterable[str] = ()) -> None:
  """Fills each named section with its member's defaults; rejects foreign fields.

  Sections in `switched` had their member renamed on the command line (e.g.
  `--config.adapter.name=dora` on a LoRA config): the config file's fields the new
  member does not have are dropped rather than rejected (fields it shares, such as
  `rank` or `targets`, are kept).
  """
  for section, table in _section_defaults().items():
    if section not in cfg:
      continue
    sub = cfg[section]
    member = sub.get("name")
    defaults = names.lookup(table, member, f"{section}.name")
    if section in switched:
      with sub.unlocked():
        for field in [f for f in sub.keys() if f != "name" and f not in defaults]:
          del sub[field]
    for field in sub.keys():
      if field != "name" and field not in defaults:
        raise ConfigError(names.unknown_message(
            f"field of {section} {member!r}", f"{section}.{field}",
            [f"{section}.{k}" for k in defaults]))
    with sub.unlocked():
      for field, value in defaults.items():
        if field not in sub:
          sub[field] = value


def load(name_arg: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """Loads config `NAME[:ARG]`, completes its sections, applies `key=value` overrides.

  Example: `load("tiny", ["optimizer.lr=1e-3", "adapter.name=lora"])`.
  """
  name, _, arg = name_arg.partition(":")
  module = _load_module(name)
  cfg = module.get_config(arg) if arg else module.get_config()
  cfg = ml_collections.ConfigDict(cfg)
  pairs = _split(overrides)
  # Member names first: they decide which fields the section has.
  first = [(k, v) for k, v in pairs if k.endswith(".name") and k.count(".") == 1]
  rest = [(k, v) for k, v in pairs if (k, v) not in first]
  cfg.lock()
  switched = set()
  for key, value in first:
    section = key.split(".")[0]
    before = cfg[section].get("name") if section in cfg else None
    set_value(cfg, key, value)
    if section in cfg and cfg[section].get("name") != before:
      switched.add(section)
  try:
    complete_sections(cfg, switched)
  except names.UnknownNameError as e:
    raise ConfigError(str(e)) from None
  for key, value in rest:
    set_value(cfg, key, value)
  validate(cfg)
  return cfg


REQUIRED = ("seed", "steps", "batch_size", "seq_len", "log_every", "eval_every",
            "checkpoint_every", "model", "adapter", "objective", "optimizer", "mesh", "data")


def validate(cfg: ml_collections.ConfigDict) -> None:
  missing = [k for k in REQUIRED if k not in cfg]
  if missing:
    raise ConfigError(f"config lacks required fields: {', '.join(missing)}")
  for key in ("steps", "batch_size", "seq_len", "grad_accum"):
    if key in cfg and cfg[key] < 1:
      raise ConfigError(f"config key {key!r} must be >= 1, got {cfg[key]}")
  if cfg.get("grad_accum", 1) > 1 and cfg.batch_size % cfg.grad_accum:
    raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by grad_accum={cfg.grad_accum}")
  for key in ("compute_dtype", "param_dtype"):
    if key in cfg and cfg[key] not in ("float32", "bfloat16"):
      raise ConfigError(f"config key {key!r} must be 'float32' or 'bfloat16', got {cfg[key]!r}")
  if cfg.get("frozen_dtype", "") not in ("", "float32", "bfloat16"):
    raise ConfigError("config key 'frozen_dtype' must be '' (= param_dtype), 'float32' or "
                      f"'bfloat16', got {cfg.frozen_dtype!r}")
