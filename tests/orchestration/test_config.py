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


def test_the_quickstart_is_the_defaults():
    quick = load_config(Path(__file__).parents[2] / "configs" / "quickstart.yaml").flat()
    default = Config().flat()
    assert {k for k in default if quick[k] != default[k]} == set()


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"quickstart.yaml", "cifar100.yaml"} <= names


def test_dotted_overrides_are_typed():
    config = load_config(None, ["generalist.epochs=3", "generalist.optimizer.lr=0.05", "run.device=cpu",
                                "data.options.num_classes=40", "run.dir=/tmp/x"])
    assert config.generalist.epochs == 3 and config.generalist.optimizer.lr == 0.05
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
    with pytest.raises(ConfigError, match="generalist.optimizer.lr"):
        load_config(None, ["generalist.optimizer.lr=-1"])
    with pytest.raises(ConfigError, match="generalist.optimizer.name"):
        load_config(None, ["generalist.optimizer.name=lbfgs"])


def test_a_config_in_the_old_flat_shape_names_where_each_key_moved(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("generalist:\n  optimizer: sgd\n  lr: 0.1\nspecialists:\n  ray_address: auto\n"
                    "ensemble:\n  cache: false\n  cache_top_k: 8\ndistill:\n  data_free_lr: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    for line in ("generalist.lr -> generalist.optimizer.lr", "specialists.ray_address -> ray.address",
                 "ensemble.cache_top_k -> ensemble.cache.top_k",
                 "distill.data_free_lr -> distill.data_free.lr",
                 "generalist.optimizer: 'sgd' -> generalist.optimizer.name: 'sgd'",
                 "ensemble.cache: False -> ensemble.cache.enabled: False"):
        assert line in message
    with pytest.raises(ConfigError, match="generalist.warmup_epochs -> generalist.optimizer.warmup_epochs"):
        load_config(None, ["generalist.warmup_epochs=0"])


def test_a_partial_sub_section_keeps_the_sections_defaults():
    config = load_config(None, ["distill.optimizer.lr=0.01", "specialists.optimizer.name=sgd"])
    assert config.distill.optimizer.lr == 0.01 and config.distill.optimizer.warmup_epochs == 0.5
    assert config.specialists.optimizer.name == "sgd" and config.specialists.optimizer.lr == 0.001


def test_booleans_are_not_numbers():
    with pytest.raises(ConfigError, match=r"generalist.epochs: .*not a boolean"):
        load_config(None, ["generalist.epochs=true"])
    with pytest.raises(ConfigError, match=r"distill.optimizer.lr: .*not a boolean"):
        load_config(None, ["distill.optimizer.lr=false"])
    assert load_config(None, ["generalist.amp=false"]).generalist.amp is False


def test_every_section_and_field_is_documented():
    from pydantic import BaseModel

    def sections(model):
        yield model
        for field in model.model_fields.values():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                yield from sections(field.annotation)

    for section in sections(Config):
        assert section.__doc__ and section.__doc__.strip(), section.__name__
        if section is not Config:
            undocumented = [n for n, f in section.model_fields.items() if not f.description]
            assert not undocumented, (section.__name__, undocumented)


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
