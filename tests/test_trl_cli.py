"""``gradproj trl grpo --config recipe.yaml``: TRL's own recipe format plus a gradproj: section,
run as a command at a tiny size; settings TRL cannot honour refused before the model loads."""

import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
trl = pytest.importorskip("trl")
yaml = pytest.importorskip("yaml")

import gradproj  # noqa: E402
from gradproj.demo.adder import addition_problems, build_tokenizer  # noqa: E402
from gradproj.integrations.trl import cli  # noqa: E402
from test_trl import tiny_model  # noqa: E402

REWARD = '''
def dense(completions, answer, **kwargs):
    """Exact answer 1, else closeness of the length: non-zero advantages for a random model."""
    return [1.0 if c.strip() == a else -abs(len(c) - 2) / 4.0 for c, a in zip(completions, answer)]
'''


@pytest.fixture
def workspace(tmp_path):
    """A local model folder (tiny random Qwen2 + the demo's tokenizer), a JSONL data set, a reward module."""
    tok = build_tokenizer()
    model = tiny_model(tok, dtype=torch.float32)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    import json

    with open(tmp_path / "train.jsonl", "w") as fh:
        for prompt, answer in addition_problems(16, seed=3, max_digits=1):
            fh.write(json.dumps({"prompt": prompt, "answer": answer}) + "\n")
    (tmp_path / "recipe_rewards.py").write_text(REWARD)
    return tmp_path


def recipe(workspace, gradproj_section, **overrides) -> str:
    settings = {
        "model_name_or_path": str(workspace / "model"),
        "datasets": [{"path": "json", "data_files": str(workspace / "train.jsonl"), "split": "train"}],
        "reward_funcs": ["recipe_rewards.dense"],
        "output_dir": str(workspace / "out"),
        "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "num_generations": 4,
        "max_completion_length": 4, "max_steps": 2, "learning_rate": 0.05, "beta": 0.0,
        "use_cpu": True, "bf16": False, "logging_steps": 1, "report_to": "none", "save_strategy": "no",
        "seed": 0, "dataloader_num_workers": 0, "disable_tqdm": True,
        "use_peft": True, "lora_r": 4, "lora_alpha": 8,
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    }
    settings.update(overrides)
    if gradproj_section is not None:
        settings["gradproj"] = gradproj_section
    path = workspace / "recipe.yaml"
    path.write_text(yaml.safe_dump(settings))
    return str(path)


def test_the_command_trains_with_proma_and_lora_and_logs_gradproj_metrics(workspace):
    path = recipe(workspace, {"strategy": "proma", "relative_bound": 0.5})
    command = [sys.executable, "-m", "gradproj.demo.cli", "trl", "grpo", "--config", path, "--max_steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(workspace)}
    result = subprocess.run(command, capture_output=True, text=True, cwd=workspace, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "gradproj/proma/projected_fraction" in result.stdout
    assert "gradproj/proma/bound_hit_fraction" in result.stdout  # the section's option reached the strategy
    assert (workspace / "out" / "adapter_model.safetensors").exists()  # TRL's script saved the LoRA adapter


def test_under_accelerate_launch(workspace):
    """What several GPUs run, with one CPU process: accelerate launch -m gradproj.integrations.trl.cli."""
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    path = recipe(workspace, "proma", use_peft=False)
    command = [launcher, "launch", "--num_processes", "1", "--cpu", "-m", "gradproj.integrations.trl.cli", "grpo", "--config", path]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(workspace)}
    result = subprocess.run(command, capture_output=True, text=True, cwd=workspace, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "gradproj/proma/projected_fraction" in result.stdout


def test_the_gradproj_section_forms(workspace):
    for section, strategies in (("proma", ["proma"]), (["proma"], ["proma"]),
                                ({"strategy": "intra_proma", "rank": 4}, ["intra_proma"])):
        *_, config = cli.parse(["--config", recipe(workspace, section)])
        assert config.strategies == strategies
    *_, config = cli.parse(["--config", recipe(workspace, None)])
    assert config is None  # plain trl grpo
    with pytest.raises(gradproj.ConfigError, match="needs a strategy"):
        cli.parse(["--config", recipe(workspace, {"rank": 4})])
    with pytest.raises(gradproj.ConfigError, match="unknown option"):
        cli.parse(["--config", recipe(workspace, {"strategy": "proma", "rank": 4})])


def test_settings_trl_cannot_honour_are_refused_before_the_model_loads(workspace, capsys):
    """num_iterations=2 with proma: the Python API's message, with no model folder at all."""
    from gradproj.integrations.trl import check_grpo_config

    path = recipe(workspace, "proma", num_iterations=2, model_name_or_path=str(workspace / "no-such-model"))
    with pytest.raises(gradproj.ConfigError) as refused:
        cli.parse(["--config", path])
    args = trl.GRPOConfig(output_dir=str(workspace / "o"), num_iterations=2, beta=0.0, use_cpu=True,
                          per_device_train_batch_size=4, gradient_accumulation_steps=2, num_generations=4, bf16=False)
    with pytest.raises(gradproj.ConfigError) as python_api:
        check_grpo_config(args, gradproj.GradProjConfig(strategy="proma"))
    assert str(refused.value) == str(python_api.value)
    from gradproj.demo.cli import main

    assert main(["trl", "grpo", "--config", path]) == 2
    assert "num_iterations" in capsys.readouterr().err


EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "trl")


@pytest.mark.parametrize("name", ["proma_lora_smollm2_gsm8k.yaml", "kl_free_lora_grpo_smollm2_gsm8k.yaml",
                                  "gpu/proma_lora_qwen2.5-1.5b.yaml"])
def test_example_recipes_parse_and_pass_the_checks(name, tmp_path, monkeypatch):
    """Every field of the examples is one TRL knows, and the gradproj settings pass the GRPO checks;
    the offline sources resolve to local paths (the model folder stubbed: the wheel is optional)."""
    import gradproj.demo.policies as policies

    monkeypatch.setenv("GRADPROJ_CACHE", str(tmp_path))
    overrides = ["--bf16", "false", "--use_cpu", "true"] if name.startswith("gpu/") else []
    script_args, training_args, model_args, dataset_args, config = cli.parse(["--config", os.path.join(EXAMPLES, name), *overrides])
    assert training_args.beta == 0.0 and config is not None
    if model_args.model_name_or_path.startswith("gradproj:"):
        monkeypatch.setattr(policies, "smollm2_folder", lambda progress: tmp_path / "smollm2")
        cli._resolved_args(script_args, model_args, dataset_args, name)
        assert model_args.model_name_or_path == str(tmp_path / "smollm2")
        assert script_args.dataset_name is None
        (entry,) = dataset_args.datasets
        assert entry.path == "json" and os.path.exists(entry.data_files)
        import json

        with open(entry.data_files) as fh:
            row = json.loads(fh.readline())
        assert set(row) == {"prompt", "answer"} and row["answer"].lstrip("-").isdigit()


def test_final_number_match():
    from gradproj.integrations.trl.rewards import final_number_match

    assert final_number_match(["so it is 42.", "12 then 7", [{"role": "assistant", "content": "#### 1,000"}], "none"],
                              ["#### 42", "12", "1000", "3"]) == [1.0, 0.0, 1.0, 0.0]


def test_the_kl_free_lora_preset_as_configuration(workspace, monkeypatch):
    """gradproj: {preset: kl_free_lora_grpo} fills TRL's fields the recipe leaves out, like the Python preset."""
    import torch as _torch

    monkeypatch.setattr(_torch.cuda, "is_available", lambda: False)
    bare = {"use_peft": None, "lora_r": None, "lora_alpha": None, "lora_target_modules": None, "use_cpu": None, "bf16": None}
    path = recipe(workspace, {"preset": "kl_free_lora_grpo", "rank": 8, "proma": True,
                              "strategy_options": {"relative_bound": 0.5}}, loss_type="grpo")
    settings = yaml.safe_load(open(path))
    for key in bare:
        settings.pop(key, None)
    with open(path, "w") as fh:
        yaml.safe_dump(settings, fh)
    script_args, training_args, model_args, _, config = cli.parse(["--config", path])
    assert training_args.beta == 0.0 and training_args.num_iterations == 1 and training_args.scale_rewards == "group"
    assert training_args.loss_type == "grpo"  # the recipe's own choice is kept
    assert training_args.use_cpu is True and training_args.bf16 is False
    assert model_args.use_peft and model_args.lora_r == 8 and model_args.lora_alpha == 16
    assert model_args.lora_target_modules == "all-linear"
    assert config.strategies == ["proma"] and config.options == {"relative_bound": 0.5}
    *_, plain = cli.parse(["--config", recipe(workspace, {"preset": "kl_free_lora_grpo"})])
    assert plain is None  # no strategy on top: TRL with the preset's fields
    with pytest.raises(gradproj.ConfigError, match="beta=0"):
        cli.parse(["--config", recipe(workspace, {"preset": "kl_free_lora_grpo"}, beta=0.04)])
    with pytest.raises(gradproj.ConfigError, match="unknown field"):
        cli.parse(["--config", recipe(workspace, {"preset": "kl_free_lora_grpo", "rnak": 8})])
