"""RunConfig: validation on construction, YAML round trip, overrides, presets."""

from __future__ import annotations

import pytest
import yaml

from mistral_fast.config import LoraConfig, RunConfig, TrainConfig, list_presets, load_config
from mistral_fast.errors import ConfigError


def test_defaults_are_the_classic_qlora_recipe() -> None:
    cfg = RunConfig()
    assert cfg.model.load_in_4bit and cfg.model.quant_type == "nf4" and cfg.model.double_quant
    assert cfg.train.learning_rate == 2e-4 and cfg.train.epochs == 3
    assert (cfg.train.per_device_batch_size, cfg.train.gradient_accumulation_steps) == (4, 4)
    assert cfg.train.load_best_model_at_end and cfg.train.assistant_only_loss
    assert not cfg.model.trust_remote_code


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        ("attention", ["q_proj", "k_proj", "v_proj", "o_proj"]),
        ("all-linear", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        (["q_proj", "v_proj"], ["q_proj", "v_proj"]),
    ],
)
def test_target_sets(targets, expected) -> None:
    assert LoraConfig(targets=targets).target_modules == expected


@pytest.mark.parametrize(
    ("build", "field_name"),
    [
        (lambda: LoraConfig(rank=0), "lora.rank"),
        (lambda: LoraConfig(rank=-8), "lora.rank"),
        (lambda: LoraConfig(alpha=0), "lora.alpha"),
        (lambda: LoraConfig(dropout=1.5), "lora.dropout"),
        (lambda: LoraConfig(targets="everything"), "lora.targets"),
        (lambda: LoraConfig(targets=[]), "lora.targets"),
        (lambda: TrainConfig(learning_rate=-1e-4), "train.learning_rate"),
        (lambda: TrainConfig(per_device_batch_size=0), "train.per_device_batch_size"),
        (lambda: TrainConfig(max_steps=0), "train.max_steps"),
    ],
)
def test_invalid_values_fail_on_construction_naming_the_field(build, field_name) -> None:
    with pytest.raises(ConfigError, match=field_name.replace(".", r"\.")):
        build()


def test_yaml_round_trip(tmp_path) -> None:
    cfg = RunConfig().with_overrides(["lora.rank=32", "lora.targets=attention", "train.learning_rate=1e-4"])
    path = cfg.save(tmp_path / "run_config.yaml")
    assert load_config(path) == cfg
    assert yaml.safe_load(path.read_text())["lora"]["rank"] == 32
    assert [p.name for p in tmp_path.iterdir()] == ["run_config.yaml"], "atomic save leaves no temp file"


def test_overrides_parse_yaml_scalars_and_lists() -> None:
    cfg = load_config(None, ["lora.targets=[q_proj, v_proj]", "train.packing=true", "train.epochs=2"])
    assert cfg.lora.targets == ["q_proj", "v_proj"]
    assert cfg.train.packing is True and cfg.train.epochs == 2.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lora.rnak=3"], "unknown field"),
        (["loar.rank=3"], "section.field"),
        (["rank"], "key=value"),
        (["train.epochs=abc"], "train.epochs"),
        (["model.backend=tpu"], "one of"),
        (["train.packing=maybe"], "expected bool"),
        (["lora.rank=true"], "lora.rank"),
    ],
)
def test_bad_overrides_are_refused(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_unknown_yaml_keys_are_refused(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  rank: 8\n  alpah: 16\n")
    with pytest.raises(ConfigError, match=r"unknown key.*alpah"):
        load_config(path)


def test_bad_yaml_names_file_and_line(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  rank: 8\n alpha: [16\n")
    with pytest.raises(ConfigError, match=rf"{path.name}:\d+: not valid YAML"):
        load_config(path)


def test_missing_config_lists_presets() -> None:
    with pytest.raises(ConfigError, match="smoke"):
        load_config("no-such-config")


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_loads(name) -> None:
    cfg = load_config(name)
    assert isinstance(cfg, RunConfig)


def test_lora_presets_follow_the_guidance() -> None:
    simple, instruct, domain = (load_config(f"lora-{n}").lora for n in ("simple", "instruct", "domain"))
    assert 4 <= simple.rank <= 8 and 16 <= instruct.rank <= 32 and domain.rank >= 64
    for lora in (simple, instruct, domain):
        assert lora.alpha in (2 * lora.rank, lora.rank, lora.rank / 2)
    assert simple.targets == "attention" and instruct.targets == domain.targets == "all-linear"
