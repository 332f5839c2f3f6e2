"""Config: YAML plus dotted overrides, validation that names the key, a lossless round trip."""

import pytest
from conftest import ROOT

from rl.config import Config, ConfigError, load_config, save_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_file_then_overrides(tmp_path):
    path = write(tmp_path, "train:\n  steps: 7\nrollout:\n  group_size: 4\n")
    config = load_config(path, ["train.steps=9", "model.lora.enabled=true", "rewards.1.weight=0.5"])
    assert config.train.steps == 9  # the override wins over the file
    assert config.rollout.group_size == 4  # the file wins over the default
    assert config.rollout.max_tokens == Config().rollout.max_tokens  # untouched default
    assert config.model.lora.enabled is True
    assert config.rewards[1].weight == 0.5


def test_override_replaces_reward_list(tmp_path):
    config = load_config(None, ["rewards=[{name: format, weight: 2}]"])
    assert [(r.name, r.weight) for r in config.rewards] == [("format", 2.0)]


def test_int_is_accepted_for_float():
    assert load_config(None, ["train.learning_rate=1"]).train.learning_rate == 1.0


def test_exponent_without_a_dot_is_a_number(tmp_path):
    # YAML 1.1 (PyYAML) reads 3e-5 as the string "3e-5"; users write it that way all the time.
    assert load_config(None, ["train.learning_rate=3e-5"]).train.learning_rate == 3e-5
    config = load_config(write(tmp_path, "train:\n  learning_rate: 1e-6\n"), [])
    assert config.train.learning_rate == 1e-6


@pytest.mark.parametrize(
    ("yaml_text", "overrides", "message"),
    [
        ("trian:\n  steps: 3\n", [], "unknown key 'trian'"),
        ("train:\n  stepz: 3\n", [], "unknown key 'train.stepz'"),
        ("", ["train.stepz=3"], "unknown key 'train.stepz'"),
        ("", ["model.lora.rank=8"], "unknown key 'model.lora.rank'"),
        ("rewards:\n  - name: math\n    wieght: 1\n", [], "unknown key 'rewards.0.wieght'"),
        ("", ["train.steps=many"], "train.steps: expected an integer"),
        ("", ["train.learning_rate=fast"], "train.learning_rate: expected a number"),
        ("", ["data.eval_samples=0"], "data.eval_samples: must be at least 1"),
        ("", ["rollout.engine=sglang"], "rollout.engine: 'sglang' is not allowed"),
        ("", ["model.lora.enabled=maybe"], "model.lora.enabled: expected true or false"),
        ("", ["rollout.group_size=1"], "rollout.group_size"),
        ("", ["algorithm.advantage=ppo"], "algorithm.advantage: unknown 'ppo'; known:"),
        ("", ["rewards.0.name=no_such_reward"], "rewards.0.name: unknown reward 'no_such_reward'"),
        ("", ["rewards.5.weight=1"], "rewards.5.weight"),
        ("- a\n- b\n", [], "expected a mapping"),
        ("", ["steps"], "is not key.path=value"),
    ],
)
def test_bad_config_names_the_key(tmp_path, yaml_text, overrides, message):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, yaml_text), overrides)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)  # one line


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("no/such/file.yaml")


def test_saved_config_loads_back_to_the_same_object(tmp_path):
    config = load_config(
        None, ["train.steps=3", "model.lora.enabled=true", "data.task_options={levels: [1, 2]}"]
    )
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    load_config(path)


def test_base_file_is_loaded_first_and_the_preset_wins(tmp_path):
    (tmp_path / "recipe.yaml").write_text("train:\n  steps: 7\n  learning_rate: 0.5\n")
    (tmp_path / "preset.yaml").write_text("base: recipe.yaml\ntrain:\n  steps: 3\n")
    config = load_config(tmp_path / "preset.yaml", ["train.micro_batch_size=2"])
    assert (config.train.steps, config.train.learning_rate) == (3, 0.5)
    assert config.train.micro_batch_size == 2


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"a.yaml": "base: missing.yaml\n"}, "missing.yaml does not exist"),
        (
            {"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"},
            "base: files include each other",
        ),
        ({"a.yaml": "base: b.yaml\n", "b.yaml": "trian: {}\n"}, "unknown key 'trian'"),
    ],
)
def test_bad_base_file_is_one_line(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "a.yaml")


def test_presets_are_the_default_recipe_with_their_knobs():
    default = load_config(ROOT / "configs" / "default.yaml")
    dapo = load_config(ROOT / "configs" / "dapo.yaml")
    assert dapo.data == default.data and dapo.model == default.model
    assert dapo.algorithm.loss_aggregation == "token_mean" and dapo.algorithm.dynamic_sampling


def test_device_dependent_defaults_are_resolved_when_the_config_loads(monkeypatch, tmp_path):
    """null means "depends on the machine": bf16 autocast, a bfloat16 vLLM and CUDA graphs on a
    GPU; float32 and eager on a CPU. The saved config names the resolved values, so a resume on
    another machine runs as the run started."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = load_config(None)
    assert (cpu.train.bf16_autocast, cpu.rollout.dtype, cpu.rollout.enforce_eager) == (
        False,
        "float32",
        True,
    )
    # on a CPU the engine follows the trainer's dtype
    assert load_config(None, ["model.dtype=bfloat16"]).rollout.dtype == "bfloat16"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = load_config(None)
    assert (gpu.train.bf16_autocast, gpu.rollout.dtype, gpu.rollout.enforce_eager) == (
        True,
        "bfloat16",
        False,
    )
    assert gpu.model.dtype == "float32"  # master weights and optimizer stay float32
    chosen = load_config(
        None, ["train.bf16_autocast=false", "rollout.dtype=float32", "rollout.enforce_eager=true"]
    )
    assert (chosen.train.bf16_autocast, chosen.rollout.dtype, chosen.rollout.enforce_eager) == (
        False,
        "float32",
        True,
    )

    save_config(gpu, tmp_path / "config.yaml")
    saved = (tmp_path / "config.yaml").read_text()
    assert "dtype: bfloat16" in saved and "enforce_eager: false" in saved
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load_config(tmp_path / "config.yaml") == gpu


def test_an_unknown_rollout_dtype_names_the_key():
    with pytest.raises(
        ConfigError,
        match="rollout.dtype: expected one of 'float32', 'bfloat16', 'float16' or null, got 'fp8'",
    ):
        load_config(None, ["rollout.dtype=fp8"])


@pytest.mark.parametrize("spelling", ["off", "r3"])
def test_a_bare_off_is_the_word_not_a_bool(tmp_path, spelling):
    # YAML 1.1 reads `off` as False, in a file and on the command line alike
    path = tmp_path / "c.yaml"
    path.write_text(f"rollout:\n  routing_replay: {spelling}\n")
    assert load_config(path).rollout.routing_replay == spelling
    assert (
        load_config(None, [f"rollout.routing_replay={spelling}"]).rollout.routing_replay == spelling
    )
