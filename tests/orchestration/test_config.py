from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from orchestration.config import Config, ConfigError, load_config

CONFIGS = sorted(p for p in (Path(__file__).parents[2] / "configs").rglob("*.yaml")
                 if p.name != "ray-cluster.yaml")  # that one is for `ray up`, not the pipeline


def test_defaults_round_trip_through_yaml(tmp_path):
    config = Config()
    path = tmp_path / "c.yaml"
    path.write_text(config.to_yaml())
    assert load_config(path) == config


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert load_config(None, [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}"
                              for k, v in config.flat().items()]) == config


def test_quickstart_differs_from_the_defaults_only_where_it_says_why():
    quick = load_config(Path(__file__).parents[2] / "configs" / "quickstart.yaml").flat()
    default = Config().flat()
    assert {k for k in default if quick[k] != default[k]} == {"clustering.n_groups", "clustering.method"}


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"quickstart.yaml", "cifar100.yaml"} <= names


def test_dotted_overrides_are_typed():
    config = load_config(None, ["generalist.epochs=3", "generalist.lr=0.05", "run.device=cpu",
                                "data.options.num_classes=40", "run.dir=/tmp/x"])
    assert config.generalist.epochs == 3 and config.generalist.lr == 0.05
    assert config.data.options == {"num_classes": 40} | {
        k: v for k, v in config.data.options.items() if k != "num_classes"
    }
    assert config.run.path == Path("/tmp/x")


def test_unknown_key_names_key_and_closest_valid_one():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["generalist.epoch=3"])
    message = str(info.value)
    assert "generalist.epoch" in message and "did you mean 'generalist.epochs'" in message


def test_unknown_top_level_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("generalst:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match="unknown key 'generalst'.*'generalist'"):
        load_config(path)


def test_wrong_type_names_the_key_and_value():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["generalist.epochs=many"])
    assert "generalist.epochs" in str(info.value) and "'many'" in str(info.value)


def test_out_of_range_and_bad_choice():
    with pytest.raises(ConfigError, match="generalist.lr"):
        load_config(None, ["generalist.lr=-1"])
    with pytest.raises(ConfigError, match="generalist.optimizer"):
        load_config(None, ["generalist.optimizer=lbfgs"])


def test_config_is_frozen():
    with pytest.raises(ValidationError, match="frozen"):
        Config().generalist.epochs = 2  # type: ignore[misc]


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["generalist.epochs"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_section_hash_tracks_only_named_keys():
    base = Config()
    other = load_config(None, ["tracking.experiment=other", "run.name=x"])
    changed = load_config(None, ["generalist.epochs=2"])
    keys = ("data", "generalist", "run.seed")
    assert base.section_hash(keys) == other.section_hash(keys)
    assert base.section_hash(keys) != changed.section_hash(keys)
