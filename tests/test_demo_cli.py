"""``gradproj demo``: a fast smoke run of the CLI on a tiny local model, and its one-line errors."""

import json
import subprocess
import sys

import pytest

from gradproj.demo.adder import build_tokenizer
from helpers import tiny_char_model


def demo(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "gradproj.demo.cli", "demo", "--no-progress", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-policy")
    tok = build_tokenizer()
    tiny_char_model(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_demo_smoke_writes_every_output(tiny_folder, tmp_path):
    out = tmp_path / "run"
    result = demo("--model", str(tiny_folder), "--steps", "2", "--eval-every", "1", "--prompts", "2", "--group-size", "2",
                  "--microbatches", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    for name in ("summary.json", "metrics.jsonl", "report.md", "accuracy.png", "step_kl.png", "entropy.png", "reward.png"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())["strategies"]
    assert list(summary) == ["grpo", "reinforce", "proma", "intra_proma"]
    for s in summary.values():
        for key in ("initial_accuracy", "final_accuracy", "best_accuracy", "mean_step_kl", "final_entropy", "seconds_per_step"):
            assert key in s
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["method"] for r in lines} == set(summary) and all("step_kl" in r for r in lines if r["step"] > 0)
    report = (out / "report.md").read_text()
    assert "REINFORCE" in report and "![per-step KL](step_kl.png)" in report
    assert "| proma |" in result.stdout


def test_demo_lora_smoke(tiny_folder, tmp_path):
    result = demo("--model", str(tiny_folder), "--lora", "--lora-rank", "2", "--steps", "1", "--prompts", "2",
                  "--group-size", "2", "--microbatches", "1", "--strategies", "reinforce", "proma", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr


def test_demo_runs_sgrpo_and_dmpo(tiny_folder, tmp_path):
    """S-GRPO and DMPO in the demo's --strategies list, alone and with PROMA (two updates per rollout:
    S-GRPO's importance ratio runs over the whole response; DMPO's weights are recomputed)."""
    out = tmp_path / "run"
    result = demo("--model", str(tiny_folder), "--steps", "1", "--prompts", "2", "--group-size", "2",
                  "--microbatches", "2", "--strategies", "sgrpo", "sgrpo_proma", "dmpo", "dmpo_proma", "--out", str(out))
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())["strategies"]
    assert list(summary) == ["sgrpo", "sgrpo_proma", "dmpo", "dmpo_proma"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--model", "/nonexistent/folder"], "is not a folder"),
        (["--strategies", "bogus"], "unknown strategy 'bogus'"),
        (["--task", "chess"], "unknown task"),
        (["--group-size", "1"], "--group-size must be at least 2"),
        (["--microbatches", "0"], "--microbatches must be at least 1"),
        (["--task", "gsm8k"], "needs a pretrained language model"),
        (["--model", "X", "--smollm2"], "either --model PATH or --smollm2"),
    ],
)
def test_demo_bad_input_is_one_line(args, needle, tmp_path):
    result = demo(*args, "--out", str(tmp_path))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradproj: error: ") and needle in lines[0], result.stderr


def test_demo_folder_without_tokenizer(tiny_folder, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        (bare / name).write_bytes((tiny_folder / name).read_bytes())
    result = demo("--model", str(bare), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "no usable tokenizer" in result.stderr and "Traceback" not in result.stderr
