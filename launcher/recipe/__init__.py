"""The recipe: a typed schema, loading, merging and validation, and `_target_` instantiation.

Merge order, in one place (`load`): schema defaults <- recipe YAML <- command-line `key=value` overrides <- flags.
Every problem found is collected and raised together as one RecipeError naming the file, line and key path.
Nothing here imports torch: `launch --dry-run` and validation stay fast.

  schema.py         the dataclasses, each field with its doc; closed sets of values as Literals; `--explain`
  loading.py        YAML with line numbers, overrides, the merge, save/to_yaml, env references, redaction
  validation.py     types, unknown keys, value checks, values bound for sbatch scripts
  instantiation.py  building `{_target_: ...}` components (in the workers)
"""

from omegaconf import DictConfig

from ..errors import RecipeError, UsageError
from .instantiation import instantiate
from .loading import Loaded, load, load_resolved, parse_override, public, read_yaml, redact, save, to_yaml
from .schema import (COMPONENT_KEYS, Backend, CheckpointSection, Component, DataSection, Device, FinetuneSection,
                     LaunchSection, LoggingSection, Monitor, MonitorMode, OnSaveError, Precision, Progress, Recipe,
                     RunSection, ScriptSection, SlurmSection, TrainerSection, WandbMode, all_keys, choice_fields,
                     choices, doc, explain)
from .validation import script_value_problem

__all__ = [
    "COMPONENT_KEYS", "Backend", "CheckpointSection", "Component", "DataSection", "Device", "DictConfig",
    "FinetuneSection", "LaunchSection", "Loaded", "LoggingSection", "Monitor", "MonitorMode", "OnSaveError",
    "Precision", "Progress", "Recipe", "RecipeError", "RunSection", "ScriptSection", "SlurmSection",
    "TrainerSection", "UsageError", "WandbMode", "all_keys", "choice_fields", "choices", "doc", "explain",
    "instantiate", "load", "load_resolved", "parse_override", "public", "read_yaml", "redact", "save",
    "script_value_problem", "to_yaml",
]
