"""``gradproj demo``: a fast smoke run of the CLI on a tiny local model, and its one-line errors."""

import json
import subprocess
import sys
import time

import pytest
from helpers import tiny_char_model

from gradproj.demo.adder import build_tokenizer


def demo(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "gradproj.demo.cli", "demo", "--no-progress", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def adder_folder(tmp_path_factory):
    """A small adder policy (1-digit sums, trained here in seconds): on the demo's 1-3 digit problems
    it earns a reward on some samples, so the runs really update the policy."""
    from gradproj.demo.adder import AdderPolicyConfig, adder_policy

    config = AdderPolicyConfig(hidden=32, layers=2, heads=2, max_digits=1, batch=64, lr=3e-3, target_accuracy=0.6,
                               eval_every=25, eval_problems=50, max_steps=600)
    return adder_policy(config, progress=False, cache=tmp_path_factory.mktemp("adder-cache"))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-policy")
    tok = build_tokenizer()
    tiny_char_model(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


SMALL = ["--steps", "2", "--eval-every", "1", "--prompts", "2", "--group-size", "2", "--microbatches", "2"]
OUTPUTS = ("summary.json", "metrics.jsonl", "report.md", "timing.json", "settings.json", "accuracy.png",
           "sampled_accuracy.png", "step_kl.png", "initial_kl.png", "entropy.png", "reward.png", "projected_fraction.png")


def test_demo_smoke_writes_every_output(tiny_folder, tmp_path):
    out = tmp_path / "run"
    result = demo("--model", str(tiny_folder), *SMALL, "--seeds", "0", "1", "--eval-samples", "2", "--workers", "1",
                  "--out", str(out))
    assert result.returncode == 0, result.stderr
    for name in OUTPUTS:
        assert (out / name).exists(), name
    for method in ("grpo", "reinforce", "proma", "intra_proma"):
        for seed in (0, 1):
            kept = json.loads((out / "runs" / method / f"seed{seed}.json").read_text())
            assert kept["seed"] == seed and len(kept["records"]) == 3 and kept["threads"] == 1
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {f"{m} seed {s}" for m in ("grpo", "reinforce", "proma", "intra_proma") for s in (0, 1)}
    assert summary["settings"]["seeds"] == [0, 1] and summary["missing_runs"] == []
    for s in summary["methods"].values():
        for key in ("accuracy_initial", "accuracy_final", "sampled_accuracy_final", "mean_step_kl", "initial_kl_final",
                    "entropy_last_quarter"):
            assert key in s
    claims = {c["claim"] for c in summary["claims"]}
    assert "`proma`: per-step KL below REINFORCE's" in claims and "`grpo` raises held-out accuracy (sampled)" in claims
    assert all(c["verdict"] in ("held", "contradicted", "not shown at this scale") and c["seeds"] == 2 for c in summary["claims"])
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {(r["method"], r["seed"]) for r in lines} == {(m, s) for m in ("grpo", "reinforce", "proma", "intra_proma") for s in (0, 1)}
    assert all("step_kl" in r for r in lines if r["step"] > 0)
    assert all("initial_kl" in r for r in lines if r["step"] in (1, 2))  # every eval_every (1) steps, and at the end
    report = (out / "report.md").read_text()
    assert "## Verdicts" in report and "[95% bootstrap interval]" in report and "![per-step KL(policy before ‖ after the step), per token](step_kl.png)" in report
    assert "| proma | 2 |" in report
    assert "proma: per-step KL below REINFORCE's" in result.stdout


def _numbers(out):
    """What must repeat exactly: the report, the summary and every step record but its wall time
    (wall times vary; they are kept apart, in timing.json and the records' "seconds")."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        record.pop("seconds", None)
    return (out / "report.md").read_bytes(), (out / "summary.json").read_bytes(), records


def test_demo_is_deterministic_resumes_after_a_kill_and_workers_do_not_change_numbers(adder_folder, tmp_path):
    """The acceptance: the same command gives identical numbers; a demo killed after its first run
    resumes (keeping that run) and ends with the same report; two workers give the numbers of one."""
    args = ["--model", str(adder_folder), "--task", "addition", "--steps", "3", "--eval-every", "1", "--prompts", "4",
            "--group-size", "4", "--microbatches", "2", "--lr", "1e-3", "--strategies", "reinforce", "proma",
            "--seeds", "0", "1", "--eval-samples", "2"]
    first = tmp_path / "first"
    assert demo(*args, "--workers", "1", "--out", str(first)).returncode == 0
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "gradproj.demo.cli", "demo", "--no-progress", *args, "--workers", "1",
                                "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((killed / "runs").glob("*/seed*.json")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.kill()
    process.wait()
    kept = sorted((killed / "runs").glob("*/seed*.json"))
    assert 1 <= len(kept) < 4, "the kill should land between the first and the last run"
    kept_bytes = {path: path.read_bytes() for path in kept}
    resumed = demo(*args, "--workers", "2", "--out", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {len(kept)} of 4 runs already done" in resumed.stderr + resumed.stdout
    assert all(path.read_bytes() == data for path, data in kept_bytes.items())  # kept runs were not re-run
    assert _numbers(killed) == _numbers(first)
    records = _numbers(first)[2]
    assert any(r.get("reward", 0) > 0 for r in records) and any(r.get("step_kl", 0) > 0 for r in records), \
        "the runs must move the policy, or identical numbers prove nothing"
    # --report-only rebuilds the same report from the kept runs
    (first / "report.md").unlink()
    assert demo(*args, "--report-only", "--out", str(first)).returncode == 0
    assert _numbers(first) == _numbers(killed)


def test_demo_changed_settings_rerun_and_report_only_says_what_is_missing(tiny_folder, tmp_path):
    args = ["--model", str(tiny_folder), *SMALL, "--strategies", "reinforce", "--eval-samples", "0", "--workers", "1"]
    out = tmp_path / "run"
    assert demo(*args, "--seeds", "0", "--out", str(out)).returncode == 0
    before = (out / "runs" / "reinforce" / "seed0.json").read_text()
    again = demo(*args, "--seeds", "0", "--lr", "1e-4", "--out", str(out))  # another learning rate: another run
    assert again.returncode == 0 and "resuming" not in again.stderr + again.stdout
    assert json.loads(before)["fingerprint"] != json.loads((out / "runs" / "reinforce" / "seed0.json").read_text())["fingerprint"]
    partial = demo(*args, "--seeds", "0", "1", "--lr", "1e-4", "--report-only", "--out", str(out))
    assert partial.returncode == 0, partial.stderr
    assert "**Incomplete**: 1 run(s) not finished yet (reinforce seed 1)" in (out / "report.md").read_text()
    other = demo(*args, "--seeds", "0", "--lr", "3e-4", "--report-only", "--out", str(out))  # settings no run used
    assert other.returncode == 2 and "no finished runs" in other.stderr
    empty = demo(*args, "--report-only", "--out", str(tmp_path / "nothing"))
    assert empty.returncode == 2 and "run the demo first" in empty.stderr and "Traceback" not in empty.stderr


def test_demo_lora_smoke(tiny_folder, tmp_path):
    result = demo("--model", str(tiny_folder), "--lora", "--lora-rank", "2", "--steps", "1", "--prompts", "2",
                  "--group-size", "2", "--microbatches", "1", "--strategies", "reinforce", "proma", "--seeds", "0",
                  "--workers", "1", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr


def test_demo_runs_sgrpo_dmpo_and_tspmo(tiny_folder, tmp_path):
    """S-GRPO and DMPO in the demo's --strategies list, alone and with PROMA (two updates per rollout:
    S-GRPO's importance ratio runs over the whole response; DMPO's weights are recomputed), and T-SPMO
    (plain accumulation; clipped per token on the second update)."""
    out = tmp_path / "run"
    result = demo("--model", str(tiny_folder), "--steps", "1", "--prompts", "2", "--group-size", "2",
                  "--microbatches", "2", "--strategies", "sgrpo", "sgrpo_proma", "dmpo", "dmpo_proma", "tspmo", "--seeds", "0", "--workers", "1",
                  "--out", str(out))
    assert result.returncode == 0, result.stderr
    methods = json.loads((out / "summary.json").read_text())["methods"]
    assert list(methods) == [f"{m} seed 0" for m in ("sgrpo", "sgrpo_proma", "dmpo", "dmpo_proma", "tspmo")]


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
        (["--seeds", "0", "0"], "each once"),
        (["--threads", "0"], "--threads and --workers must be at least 1"),
        (["--strategies", "proma", "proma"], "names a method twice"),
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
