"""One configuration path: hparams defaults < the algorithm's section < --config < --set, and the CLI's mapping.

The values are read from the shipped SmolLM2 hparams file (``editing/hparams/smollm2-135m.yaml``), so
the test states which of them each place overrides.
"""

from __future__ import annotations

import yaml

from editing.config import HPARAMS_DIR, load_edit_config
from flows.cli import build_parser
from flows.collapse import DEFAULT_RULES, CollapseRule
from flows.commands.run import settings_from_args
from flows.settings import RunSettings

HPARAMS = yaml.safe_load((HPARAMS_DIR / "smollm2-135m.yaml").read_text())


def _settings(tmp_path, *argv: str, config: dict | None = None) -> RunSettings:
    if config is not None:
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(config))
        argv = ("--config", str(path), *argv)
    args = build_parser().parse_args(["run", *argv])
    return RunSettings.from_dict(settings_from_args(args))


def test_each_place_overrides_the_one_before(tmp_path):
    defaults, rome = HPARAMS["defaults"]["values"], HPARAMS["rome"]["values"]
    plain = _settings(tmp_path, "--algo", "rome", "--batch-size", "1").edit_config().values
    assert plain.norm_anchor == rome["norm_anchor"] != "residual"           # the section over the defaults
    assert (plain.steps, plain.lr) == (defaults["steps"], defaults["lr"])   # the defaults where it is silent

    config = {"algorithm": "rome", "batch_size": 1,
              "edit_overrides": {"values": {"steps": 7, "lr": 0.2, "norm_anchor": "residual"}}}
    from_file = _settings(tmp_path, config=config).edit_config().values
    assert (from_file.steps, from_file.lr, from_file.norm_anchor) == (7, 0.2, "residual")  # the file over the section
    assert from_file.clamp_norm_factor == defaults["clamp_norm_factor"]

    both = _settings(tmp_path, "--set", "values.steps=3", config=config).edit_config().values
    assert (both.steps, both.lr) == (3, 0.2)                                 # --set over the file, key by key
    dotted = {**config, "edit_overrides": {"values.steps": 9}}
    assert _settings(tmp_path, "--set", "values.steps=4", config=dotted).edit_config().values.steps == 4


def test_the_resolved_configuration_is_what_load_edit_config_gives_for_the_merged_overrides(tmp_path):
    settings = _settings(tmp_path, "--algo", "memit", "--set", "objective.mom2_update_weight=500",
                         config={"edit_overrides": {"objective": {"update_norm_lambda": 3}}})
    assert settings.edit_overrides == {"objective.update_norm_lambda": 3, "objective.mom2_update_weight": 500}
    expected = load_edit_config("smollm2-135m", "memit", {"objective.mom2_update_weight": 500,
                                                          "objective.update_norm_lambda": 3})
    assert settings.edit_config() == expected


def test_one_layer_means_single_layer_unless_a_distribution_is_named(tmp_path):
    one = _settings(tmp_path, "--layers", "5").edit_config()
    assert (one.layers, one.distribution) == ((5,), "single_layer")
    spread = _settings(tmp_path, "--layers", "5", "--distribution", "memit_spread").edit_config()
    assert (spread.layers, spread.distribution) == ((5,), "memit_spread")
    several = _settings(tmp_path, "--layers", "3,4").edit_config()
    assert (several.layers, several.distribution) == ((3, 4), HPARAMS["emmet"]["distribution"])


def test_collapse_rules_on_the_command_line_replace_the_defaults_and_the_file(tmp_path):
    assert _settings(tmp_path).collapse.rules == DEFAULT_RULES
    config = {"collapse": {"action": "stop", "rules": ["acc.*:drop:0.3"]}}
    from_file = _settings(tmp_path, config=config).collapse
    assert (from_file.action, from_file.rules) == ("stop", (CollapseRule("acc.*", "drop", 0.3),))
    replaced = _settings(tmp_path, "--collapse-rule", "ppl.*:ratio:3", "--collapse-rule", "ge:drop:1",
                         "--collapse-policy", "rollback", config=config).collapse
    assert replaced.rules == (CollapseRule("ppl.*", "ratio", 3.0), CollapseRule("ge", "drop", 1.0))
    assert replaced.action == "rollback"


def test_command_line_options_win_over_the_file_field_by_field(tmp_path):
    config = {"batch_size": 4, "eval_every": 3, "name": "from-file", "runtime": {"threads": 1},
              "evaluation_overrides": {"n_downstream": 10, "n_texts": 5}}
    settings = _settings(tmp_path, "--batch-size", "8", "--eval-set", "n_texts=7", "--threads", "2", config=config)
    assert (settings.batch_size, settings.eval_every, settings.name) == (8, 3, "from-file")
    assert settings.evaluation_overrides == {"n_downstream": 10, "n_texts": 7}
    assert settings.runtime.threads == 2
