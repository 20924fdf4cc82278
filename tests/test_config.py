import pytest
import yaml

from esrdistill.config import Config, ConfigError, load_config, make_config, parse_overrides, save_config


def test_defaults_follow_the_paper():
    cfg = Config()
    assert (cfg.rollout_tokens, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (100, 32, 64, 0.05)
    assert (cfg.lr, cfg.temperature, cfg.top_p, cfg.max_grad_norm, cfg.warmup_ratio) == (5e-5, 0.7, 0.95, 1.0, 0.1)
    assert (cfg.batch_size, cfg.steps, cfg.loss, cfg.loss_norm) == (16, 200, "reverse_kl", "trajectory")


def test_config_is_frozen():
    with pytest.raises(Exception):
        Config().lr = 1.0


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1.0e-4\nrollout_tokens: 50\nsteps: 7\n")
    cfg = load_config(path, ["rollout_tokens=null", "lr=2e-4", "resume=true", "dataset_options={max_digits: 1}"])
    assert cfg.rollout_tokens is None and cfg.lr == 2e-4 and cfg.steps == 7 and cfg.resume is True
    assert cfg.dataset_options == {"max_digits": 1}


def test_unknown_key_names_it_and_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'rollout_token'.*did you mean 'rollout_tokens'"):
        load_config(None, ["rollout_token=5"])
    with pytest.raises(ConfigError, match="'lerning_rate'"):
        make_config({"lerning_rate": 1})


@pytest.mark.parametrize(
    "override, message",
    [
        ("rollout_tokens=0", "rollout_tokens must be > 0"),
        ("rollout_tokens=-3", "rollout_tokens must be > 0"),
        ("lr=-1e-5", "lr must be >= 0"),
        ("student=", "student is missing"),
        ("loss=kl", "loss must be one of reverse_kl, forward_kl, jsd, sampled"),
        ("jsd_beta=1.0", "jsd_beta must be strictly between 0 and 1"),
        ("steps=abc", "steps='abc' is not a valid int"),
        ("batch_size=2.5", "is not a valid int"),
        ("resume=maybe", "is not a valid bool"),
        ("dtype=fp8", "dtype must be one of"),
        ("prompt_template=no placeholder", "must contain {prompt}"),
        ("steps=null", "steps cannot be null"),
        ("eval_samples=4", "eval_samples > 1 needs eval_temperature > 0"),
        ("grader=fancy", "grader must be one of auto, reasoning_gym, math, exact or module:function"),
        ("answer_extract=first", "answer_extract must be one of"),
        ("lr=inf", "lr='inf' is not a finite number"),
        ("temperature=inf", "temperature='inf' is not a finite number"),
        ("top_p=nan", "top_p='nan' is not a finite number"),
        ("teacher_micro_batch=8", "teacher_micro_batch=8 is larger than micro_batch_size=4"),
        ("max_skipped_steps=0", "max_skipped_steps must be >= 1"),
    ],
)
def test_bad_values_say_what_is_allowed(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("{", r"\{").replace("}", r"\}")):
        load_config(None, [override])


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="is not key=value"):
        load_config(None, ["lr"])


def test_saved_config_loads_back_identical(tmp_path):
    cfg = load_config(None, ["rollout_tokens=null", "system_prompt=Be brief: {x}", "dataset_options={a: 1}"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["rollout_tokens"] is None


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/c.yaml")


def test_float16_full_finetuning_is_refused_with_the_alternatives():
    with pytest.raises(ConfigError, match="dtype=float16 with full fine-tuning.*use dtype=bfloat16"):
        load_config(None, ["dtype=float16", "lora_r=0"])
    assert load_config(None, ["dtype=float16", "lora_r=8"]).dtype == "float16"


def test_config_lists_the_selection_rules_that_exist():
    from esrdistill import config_window, selection

    assert config_window.SELECT_RULES == selection.RULES


def test_rollout_tokens_takes_auto_and_the_schedule_is_checked():
    assert load_config(None, ["rollout_tokens=auto"]).rollout_tokens == "auto"
    with pytest.raises(ConfigError, match="rollout_tokens_start=50 is larger than rollout_tokens=20"):
        load_config(None, ["rollout_tokens=20", "rollout_tokens_schedule=progressive", "rollout_tokens_start=50"])
    with pytest.raises(ConfigError, match="progressive needs rollout_tokens"):
        load_config(None, ["rollout_tokens=null", "rollout_tokens_schedule=progressive"])


def test_answer_extract_none_is_a_choice_not_a_null():
    assert load_config(None, {"answer_extract": "none"}).answer_extract == "none"
    assert load_config(None, parse_overrides(["answer_extract=none"])).answer_extract == "none"
    with pytest.raises(ConfigError, match="loss must be one of"):
        load_config(None, {"loss": "none"})


def test_a_yaml_syntax_error_is_one_line_naming_the_file_or_override_line_and_column(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1.0e-4\nsteps: [1, 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"config file {path} is not valid YAML: line 3, column 1: expected ',' or ']', but got "
                              "'<stream end>' (while parsing a flow sequence begun at line 2, column 8)")
    with pytest.raises(ConfigError) as err:
        load_config(None, ["dataset_options={min_terms: 2"])
    assert str(err.value) == ("dataset_options={min_terms: 2 is not valid YAML: line 1, column 14: expected ',' or '}', "
                              "but got '<stream end>' (while parsing a flow mapping begun at line 1, column 1)")
    with pytest.raises(ConfigError, match=r"^teachers=\{a: \[\} is not valid YAML: line 1, column 6: expected the node "
                                          r"content, but found '\}'$"):
        load_config(None, ["teachers={a: [}"])
