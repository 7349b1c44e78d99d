"""The typed configuration schema: the single source of keys, types, ranges and defaults."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from specabund.config import (
    PLAIN_SECTIONS,
    SECTIONS,
    AnalysisSection,
    TuningSection,
    default_config,
    load_config,
    load_settings,
    parse_settings,
    section_defaults,
    section_fields,
)
from specabund.errors import ConfigError
from specabund.workspace import (
    DEFAULT_PATHS,
    Workspace,
    batch_results_dir,
    find_batch_results,
    result_folder,
)

ROOT = Path(__file__).resolve().parents[1]


def test_default_toml_agrees_with_the_classes() -> None:
    text = (ROOT / "configs" / "default.toml").read_text(encoding="utf-8")
    file_cfg = tomllib.loads(text)
    assert file_cfg == default_config()  # the packaged copy is the same file
    assert list(file_cfg) == list(SECTIONS)
    for section, values in file_cfg.items():
        if section == "tuning_space":
            continue
        defaults = section_defaults(section)
        unknown = sorted(set(values) - set(section_fields(section)))
        assert not unknown, f"[{section}] keys without a class field: {unknown}"
        for key, value in values.items():
            assert defaults[key] == value, f"{section}.{key}: file {value!r}, classes {defaults[key]!r}"
        if section in PLAIN_SECTIONS:  # sections the classes describe entirely list every key
            assert set(values) == set(defaults), section
    # the file's [tuning_space] parses, and every object the commands build from it is valid
    settings = load_settings()
    from specabund.tuning import SearchSpace

    space = SearchSpace.from_config(settings.raw["tuning_space"], settings.tuning.group_ratios)
    space.check(settings.model_config(), settings.train_config("cpu"))


def test_leaf_objects_take_their_defaults_from_the_schema() -> None:
    from specabund.analysis.importance import ImportanceSettings
    from specabund.baselines.runner import CannonSettings
    from specabund.tuning import TuneOptions

    settings = parse_settings({})
    assert settings.cannon_settings() == CannonSettings()
    tune = TuneOptions()
    for f in dataclasses.fields(TuningSection):
        if f.name not in ("group_ratios", "timeout"):
            assert getattr(tune, f.name) == getattr(TuningSection(), f.name), f.name
    assert TuneOptions.from_config({}) == TuneOptions()
    importance = ImportanceSettings()
    for f in dataclasses.fields(ImportanceSettings):
        assert getattr(importance, f.name) == getattr(AnalysisSection(), f.name), f.name
    from specabund.training import TrainConfig

    assert settings.train_config("cpu") == TrainConfig(device="cpu")


@pytest.mark.parametrize("section", [s for s in SECTIONS if s != "tuning_space"])
def test_unknown_key_in_every_section_is_named(section: str, tmp_path: Path) -> None:
    user = tmp_path / "user.toml"
    user.write_text(f"[{section}]\nno_such_key = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"user.toml: unknown key {section}\.no_such_key; allowed keys"):
        load_config(user)
    with pytest.raises(ConfigError, match=rf"unknown key {section}\.no_such_key"):
        parse_settings({section: {"no_such_key": 1}})


def test_wrong_types_and_ranges_name_section_and_key() -> None:
    with pytest.raises(ConfigError, match=r"training.epochs = 'many' has type str, expected int"):
        load_config(overrides={"training.epochs": "many"})
    with pytest.raises(ConfigError, match=r"training.augment.noise_prob = 'x' has type str"):
        parse_settings({"training": {"augment": {"noise_prob": "x"}}})
    with pytest.raises(ConfigError, match=r"unknown key training.augment.nois_prob"):
        parse_settings({"training": {"augment": {"nois_prob": 0.1}}})
    with pytest.raises(ConfigError, match=r"training.ensemble = 0; must be > 0"):
        load_config(overrides={"training.ensemble": 0})
    with pytest.raises(ConfigError, match=r"\[model\].*kernel_size must be odd"):
        load_config(overrides={"model.kernel_size": 4})
    with pytest.raises(ConfigError, match=r"baseline.cannon_order = 7; must be <= 4"):
        load_config(overrides={"baseline.cannon_order": 7})
    with pytest.raises(ConfigError, match=r"tuning.pruner = 'never'; allowed values"):
        load_config(overrides={"tuning.pruner": "never"})
    with pytest.raises(ConfigError, match=r"preprocess.min_snr = 'high' has type str, expected float"):
        load_config(overrides={"preprocess.min_snr": "high"})
    with pytest.raises(ConfigError, match=r"tuning_space.dropout: unknown keys \['hihg'\]"):
        parse_settings({"tuning_space": {"dropout": {"low": 0.0, "hihg": 0.3}}})
    assert load_config(overrides={"training.learning_rate": 1})["training"]["learning_rate"] == 1.0


def test_tune_validates_like_train() -> None:
    """The places that turn configuration into objects reject what ``train`` rejects."""
    from specabund.tuning import TuneOptions, model_config_from_sections, train_config_from_sections
    from specabund.workflows import build_configs

    bad = {"training": {"lerning_rate": 0.01}}
    for build in (
        lambda: train_config_from_sections(bad),
        lambda: build_configs({**default_config(), **bad}, "cpu"),
    ):
        with pytest.raises(ConfigError, match=r"unknown key training.lerning_rate"):
            build()
    with pytest.raises(ConfigError, match=r"unknown key model.kernel"):
        model_config_from_sections({"model": {"kernel": 5}})
    with pytest.raises(ConfigError, match=r"unknown key tuning.n_trails"):
        TuneOptions.from_config({"n_trails": 5})
    with pytest.raises(ConfigError, match=r"tuning.n_trials = 0; must be > 0"):
        TuneOptions.from_config({"n_trials": 0})
    opts = TuneOptions.from_config({**default_config()["tuning"], "n_trials": 7}, worker_id=3)
    assert opts.n_trials == 7 and opts.worker_id == 3


def test_workspace_builds_every_folder_name(tmp_path: Path) -> None:
    ws = Workspace.from_config(tmp_path, {"models_dir": "runs", "results_dir": str(tmp_path / "out")})
    assert ws.models() == tmp_path / "runs" and ws.results() == tmp_path / "out"
    assert ws.processed_dir == DEFAULT_PATHS["processed_dir"]
    assert ws.run_dir("r1") == tmp_path / "runs" / "r1"
    assert ws.dataset_path("test") == tmp_path / "processed_data" / "test_dataset.npz"
    assert ws.result_dir("prediction") == tmp_path / "out" / "predictions"
    assert ws.tuned_params() == tmp_path / "out" / "hyperopt" / "best_params.toml"
    assert ws.batch_results("training", "C_FE") == tmp_path / "out" / "training_C_FE_batch_results"
    assert batch_results_dir(tmp_path, None, "MG_FE") == tmp_path / "MG_FE_batch_results"
    assert result_folder(tmp_path, "tuning") == tmp_path / "hyperopt"
    ws.batch_results("evaluation", "MG_FE")
    ws.batch_results("baseline", "MG_FE_xgboost")
    assert find_batch_results(ws.results(), "evaluation") == [
        ("MG_FE", tmp_path / "out" / "evaluation_MG_FE_batch_results")
    ]
    assert [n for n, _ in find_batch_results(ws.results(), "baseline")] == ["MG_FE_xgboost"]
    assert ws.log_file("train").parent == tmp_path / "logs" / "train"
