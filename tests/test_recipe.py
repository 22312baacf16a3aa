"""Recipe schema, merge order, validation messages, and static import checks (no processes started)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from launcher import imports, recipe
from launcher.errors import RecipeError, UsageError
from launcher.recipe import schema

BASE = """\
seed: 1
model:
  _target_: launcher.zoo.models.MLP
  hidden: 8
data:
  train:
    _target_: launcher.zoo.datasets.SyntheticClassification
  batch_size: 16
trainer:
  max_steps: 10
"""


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> str:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def problems(path: str | None, overrides=(), **kw) -> list[str]:
    with pytest.raises(RecipeError) as e:
        recipe.load(path, list(overrides), **kw)
    assert e.value.exit_code == 2
    return e.value.problems


def test_merge_order_schema_recipe_overrides(tmp_path):
    r = recipe.load(write(tmp_path, BASE), ["data.batch_size=64", "trainer.max_epochs=2", "model.hidden=32"])
    cfg = r.cfg
    assert cfg.seed == 1  # recipe over schema
    assert cfg.data.batch_size == 64 and cfg.trainer.max_epochs == 2  # overrides over recipe
    assert cfg.model.hidden == 32 and cfg.model._target_ == "launcher.zoo.models.MLP"
    assert cfg.data.num_workers == 2  # schema default
    assert cfg.optimizer._target_ == "torch.optim.AdamW"  # default component
    assert cfg.run.name == "r"  # the recipe file's stem


def test_component_given_whole_replaces_default(tmp_path):
    text = BASE + "optimizer:\n  _target_: torch.optim.SGD\n  momentum: 0.9\n"
    cfg = recipe.load(write(tmp_path, text)).cfg
    assert dict(cfg.optimizer) == {"_target_": "torch.optim.SGD", "momentum": 0.9}  # no AdamW lr leaked in
    cfg = recipe.load(write(tmp_path, text), ["optimizer.lr=0.5"]).cfg
    assert cfg.optimizer.lr == 0.5 and cfg.optimizer.momentum == 0.9


def test_yaml_exponent_floats_and_interpolation(tmp_path):
    text = BASE + "lr_scheduler:\n  _target_: torch.optim.lr_scheduler.CosineAnnealingLR\n  T_max: ${trainer.max_steps}\n"
    cfg = recipe.load(write(tmp_path, text), ["optimizer.lr=1e-4"]).cfg
    assert cfg.optimizer.lr == pytest.approx(1e-4) and isinstance(cfg.optimizer.lr, float)
    assert cfg.lr_scheduler.T_max == 10


def test_unknown_key_lists_valid_keys_and_suggests(tmp_path):
    path = write(tmp_path, BASE.replace("batch_size: 16", "batch_sise: 16"))
    (p,) = problems(path)
    assert f"{path}:8" in p and "unknown key 'data.batch_sise'" in p
    assert "did you mean 'data.batch_size'" in p and "num_workers" in p


def test_misplaced_key_suggests_its_section(tmp_path):
    (p,) = problems(write(tmp_path, BASE + "max_steps: 5\n"))
    assert "unknown key 'max_steps'" in p and "did you mean 'trainer.max_steps'" in p


def test_wrong_type_names_key_path_file_and_line(tmp_path):
    path = write(tmp_path, BASE.replace("batch_size: 16", "batch_size: lots"))
    (p,) = problems(path)
    assert p.startswith(f"{path}:8: data.batch_size: expected an integer, got 'lots'")


def test_all_problems_reported_together(tmp_path):
    text = BASE.replace("batch_size: 16", "batch_size: lots").replace("seed: 1", "seeed: 1")
    found = problems(write(tmp_path, text), ["trainer.max_stepz=3", "nonsense"])
    joined = "\n".join(found)
    assert len(found) == 4, joined
    assert "seeed" in joined and "data.batch_size" in joined and "trainer.max_stepz" in joined
    assert "'nonsense' is not key=value" in joined


def test_missing_file():
    with pytest.raises(UsageError, match="recipe file not found: no/such.yaml"):
        recipe.load("no/such.yaml")


def test_bad_targets_name_module_and_name(tmp_path):
    text = BASE.replace("launcher.zoo.models.MLP", "launcher.zoo.models.NoSuchModel") \
               .replace("launcher.zoo.datasets.SyntheticClassification", "nosuchpkg.data.Thing")
    found = "\n".join(problems(write(tmp_path, text)))
    assert "model._target_: module 'launcher.zoo.models' has no name 'NoSuchModel'" in found
    assert "data.train._target_: no module named 'nosuchpkg'" in found


def test_component_without_target(tmp_path):
    found = problems(write(tmp_path, BASE), ["lr_scheduler.step_size=5"])
    assert any("lr_scheduler has no _target_" in p for p in found)


@pytest.mark.parametrize("override, expected", [
    ("=3", "is not a dotted key path"),
    ("trainer..max_steps=3", "is not a dotted key path"),
    ("trainer.max_steps", "is not key=value"),
    ("trainer.max_steps=[1,", "not valid YAML"),
    ("trainer.max_steps.x=1", "'trainer.max_steps' is a int or null, it has no key 'x'"),
    ("trainer.device=gpu", "trainer.device must be auto, cuda or cpu, got 'gpu'"),
    ("data.prefetch_factor=2", ""),
])
def test_malformed_overrides(tmp_path, override, expected):
    path = write(tmp_path, BASE)
    if override == "data.prefetch_factor=2":
        found = problems(path, [override, "data.num_workers=0"])
        assert any("data.prefetch_factor needs data.num_workers > 0" in p for p in found)
        return
    found = problems(path, [override])
    assert any(expected in p for p in found), found


def test_semantic_limits(tmp_path):
    text = BASE.replace("max_steps: 10", "max_steps: 0")
    found = "\n".join(problems(write(tmp_path, text), ["data.batch_size=0"]))
    assert "trainer.max_steps must be >= 1, got 0" in found and "data.batch_size must be >= 1" in found
    found = "\n".join(problems(write(tmp_path, "seed: 0\n")))
    assert "model is missing" in found and "data.train is missing" in found and "set trainer.max_steps" in found


def test_script_mode_needs_no_model(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    loaded = recipe.load(None, ["launch.gpus_per_node=2"], defaults={"script": {"path": str(script)}})
    assert loaded.is_script and loaded.cfg.launch.gpus_per_node == 2
    found = problems(None, defaults={"script": {"path": str(tmp_path / "missing.py")}})
    assert any("script.path: no such file" in p for p in found)


def test_resolved_config_round_trips(tmp_path):
    cfg = recipe.load(write(tmp_path, BASE + "optimizer:\n  _target_: torch.optim.SGD\n  lr: 0.1\n")).cfg
    out = tmp_path / "config.yaml"
    recipe.save(cfg, str(out), extra={"launcher_version": "x"})
    back = recipe.load_resolved(str(out))
    assert back == cfg


def test_every_key_has_a_doc():
    rows = recipe.explain()
    assert {k for k, _, _ in rows} >= {"seed", "trainer.max_steps", "trainer.max_epochs", "data.batch_size",
                                         "data.num_workers"}
    assert all(doc for _, _, doc in rows), [k for k, _, d in rows if not d]


# Fields with a closed set of values (typed Annotated[str, Literal[...]] in the schema), listed so that one that stops
# being recognised as such is noticed; the tests below run over every such field the schema has, new ones included.
CHOICE_KEYS = {"trainer.device", "trainer.precision", "trainer.monitor", "trainer.monitor_mode",
               "checkpoint.on_save_error", "logging.wandb_mode", "logging.progress", "backend"}
CHOICES = schema.choice_fields()


def with_value(key: str, value) -> str:
    """BASE with `key` (dotted) set to `value` in the YAML itself."""
    data = yaml.safe_load(BASE)
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return yaml.safe_dump(data, sort_keys=False)


def test_choice_fields_come_from_the_schema_literals():
    assert {key for key, _ in CHOICES} >= CHOICE_KEYS
    assert schema.choices(schema.TrainerSection, "precision") == ("fp32", "bf16", "fp16")
    assert recipe.choices(schema.LoggingSection, "wandb_mode") == ("online", "offline", "disabled")
    assert schema.choices(schema.TrainerSection, "max_steps") is None
    # OmegaConf sees a plain string (2.3 accepts no Literal, 2.4 would check it without file and line): the
    # allowed values are checked by the recipe's own validation, which names where the value came from
    bad = {"trainer": {"precision": "fp8"}, "backend": "lsf"}
    assert OmegaConf.merge(OmegaConf.structured(recipe.Recipe), bad).trainer.precision == "fp8"


@pytest.mark.parametrize("key, values", CHOICES)
def test_a_choice_field_refuses_what_its_literal_does_not_list(tmp_path, key, values):
    allowed = f"{', '.join(values[:-1])} or {values[-1]}"
    path = write(tmp_path, BASE)
    assert problems(path, [f"{key}=bogus"]) == [f"{path}: {key} must be {allowed}, got 'bogus'"]
    path = write(tmp_path, with_value(key, "bogus"), "in_file.yaml")
    line = recipe.read_yaml(path)[1][key]
    assert problems(path) == [f"{path}:{line}: {key} must be {allowed}, got 'bogus'"]


def test_a_bad_precision_names_file_line_key_allowed_values_and_what_was_given(tmp_path):
    path = write(tmp_path, BASE.replace("max_steps: 10", "max_steps: 10\n  precision: fp8"))
    assert problems(path) == [f"{path}:11: trainer.precision must be fp32, bf16 or fp16, got 'fp8'"]


@pytest.mark.parametrize("key, values", CHOICES)
def test_every_value_a_choice_field_lists_loads(tmp_path, key, values):
    path = write(tmp_path, BASE)
    default = OmegaConf.select(recipe.load(path).cfg, key)
    assert any(v != default for v in values)
    for value in values:
        assert OmegaConf.select(recipe.load(path, [f"{key}={value}"]).cfg, key) == value
        assert OmegaConf.select(recipe.load(write(tmp_path, with_value(key, value), "v.yaml")).cfg, key) == value


def test_explain_lists_the_allowed_values_of_each_choice_field():
    types = {key: tp for key, tp, _ in recipe.explain()}
    for key, values in CHOICES:
        assert types[key].removesuffix(" or null").split("|") == list(values), key
    assert types["trainer.precision"] == "fp32|bf16|fp16"
    assert types["logging.wandb_mode"] == "online|offline|disabled or null"
    assert types["resume"] == "str"  # open: auto, never or a path


@pytest.mark.parametrize("path", ["torch.nn.CrossEntropyLoss", "torch.optim.AdamW", "launcher.zoo.models.MLP",
                                  "torch.optim.lr_scheduler.CosineAnnealingLR", "collections.OrderedDict",
                                  "torch.utils.data.default_collate"])
def test_static_import_check_accepts_real_names(path):
    assert imports.check(path) is None


@pytest.mark.parametrize("path, expected", [
    ("torch.nn.CrossEntropyLos", "module 'torch.nn' has no name 'CrossEntropyLos'"),
    ("launcher.zoo.modelz.MLP", "module 'launcher.zoo' has no name 'modelz'"),
    ("nosuch.Thing", "no module named 'nosuch'"),
    ("launcher.zoo", "names a module"),
    ("", "is not an import path"),
])
def test_static_import_check_rejects(path, expected):
    assert expected in (imports.check(path) or "")


def test_static_import_check_reports_syntax_errors(tmp_path, monkeypatch):
    (tmp_path / "brokenmod.py").write_text("def f(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "syntax error" in (imports.check("brokenmod.Model") or "")


def test_instantiate_builds_nested_components():
    obj = recipe.instantiate({"_target_": "collections.OrderedDict",
                              "inner": {"_target_": "collections.Counter", "a": 2}}, key="x")
    assert obj["inner"]["a"] == 2
    with pytest.raises(TypeError, match="x: calling launcher.zoo.models.MLP"):
        recipe.instantiate({"_target_": "launcher.zoo.models.MLP", "bogus": 1}, key="x")


def test_environment_references_stay_references_in_what_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("RECIPE_TEST_TOKEN", "first-value")
    text = BASE + "run:\n  name: ${oc.env:RECIPE_TEST_TOKEN}-run\nlr_scheduler:\n  _target_: torch.optim.lr_scheduler.StepLR\n" \
                  "  step_size: ${trainer.max_steps}\n  note: ${run.name}\n"
    cfg = recipe.load(write(tmp_path, text)).cfg
    assert cfg.run.name == "first-value-run" and cfg.lr_scheduler.note == "first-value-run"  # resolved on use
    shown = recipe.to_yaml(cfg)
    assert "first-value" not in shown and "name: ${oc.env:RECIPE_TEST_TOKEN}-run" in shown
    assert "note: ${run.name}" in shown and "step_size: 10" in shown  # other interpolations are resolved
    out = tmp_path / "config.yaml"
    recipe.save(cfg, str(out))
    assert "first-value" not in out.read_text()
    monkeypatch.setenv("RECIPE_TEST_TOKEN", "rank-value")  # a rank resolves it in its own environment
    back = recipe.load_resolved(str(out))
    assert back.run.name == "rank-value-run" and back.lr_scheduler.note == "rank-value-run"


@pytest.mark.parametrize("text, shown", [
    ("s3://key:secret@bucket/x", "s3://key:***@bucket/x"),
    ("see postgresql://u:p%40ss@db:5432/sweeps and http://h/x", "see postgresql://u:***@db:5432/sweeps and http://h/x"),
    ("https://user@host/x", "https://user@host/x"),
    ("a:b@c", "a:b@c"),
])
def test_passwords_in_urls_are_redacted(text, shown):
    assert recipe.redact(text) == shown
