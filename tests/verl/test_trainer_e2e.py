"""verl's own trainer loop end to end on the CPU, with gradproj enabled by configuration only.

``python -m verl.trainer.main_ppo`` runs as a user runs it (a subprocess: Hydra, Ray, the v1 trainer,
TransferQueue, the agent loop, the rule-based reward loop, the FSDP2 actor update with gradproj's
optimizer and policy loss, the weight sync, the file tracker) for two GRPO steps. The one part
replaced is the rollout engine (vLLM needs a GPU): ``hf_cpu`` from `gradproj.testing.verl_cpu.rollout`.
"""

import json
import math

import pytest

from gradproj.testing.verl_cpu.trainer import run

pytestmark = pytest.mark.slow

KL = "+actor_rollout_ref.actor.optim.override_optimizer_config.gradproj.kl_estimate=True"


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    out = tmp_path_factory.mktemp("verl-e2e")
    records = run([KL], steps=2, out=out)
    syncs = [json.loads(line) for line in (out / "weight_syncs.jsonl").read_text().splitlines()]
    return records, syncs


def test_two_steps_are_tracked_with_gradproj_metrics(e2e):
    records, _ = e2e
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        data = record["data"]
        # 2 prompts x 4 samples, micro-batches of 2 sequences: every sequence went through gradproj's capture
        assert data["actor/gradproj/sequences"] == 8
        assert data["actor/gradproj/microbatches"] == 4
        assert data["actor/gradproj/dropped_microbatches"] == 0
        assert data["actor/gradproj/step_skipped"] == 0
        assert 0 < data["actor/gradproj/proma/projected_fraction"] < 1
        # token entropy from the log-probs the loss computed: the trainer's own entropy is of the
        # same policy (before the update vs. during it), a random policy over ~20 characters
        assert 1.0 < data["actor/gradproj/entropy"] < math.log(64)
        assert data["actor/gradproj/entropy"] == pytest.approx(data["actor/entropy"], rel=0.05)
        assert data["actor/grad_norm"] > 0
    # the KL estimate is of the previous update: from the second step on
    assert "actor/gradproj/kl_estimate/per_token" not in records[0]["data"]
    assert records[1]["data"]["actor/gradproj/kl_estimate/per_token"] > 0


def test_rollout_samples_from_the_trained_weights(e2e):
    records, syncs = e2e
    # verl's checkpoint manager syncs all the actor's weights at start-up and after each update
    assert [s["global_steps"] for s in syncs] == [0, 1, 2]
    assert len({s["tensors"] for s in syncs}) == 1
    # each update changed the weights the rollout server holds
    sums = [s["abs_sum"] for s in syncs]
    assert all(a != b for a, b in zip(sums, sums[1:]))
    # step 2's responses were sampled from the weights step 1 trained: the rollout's log-probs equal
    # the actor's recomputation. An unsynced rollout would be off by step 1's update, whose per-token
    # KL step 2 estimates at ~5e-3 (log-prob differences of order 0.1, not 1e-5).
    assert records[1]["data"]["training/rollout_probs_diff_max"] < 1e-5


def test_reward_and_advantages_come_from_the_reward_loop(e2e):
    records, _ = e2e
    for record in records:
        data = record["data"]
        assert 0 < data["critic/score/mean"] <= 1
        assert data["critic/advantages/max"] > 0 > data["critic/advantages/min"]


def test_only_verls_port_race_is_run_again(tmp_path, monkeypatch):
    """run_main_ppo repeats a run once when verl's process group lost its port (EADDRINUSE in
    init_process_group), and raises on any other failure, or on the race a second time."""
    import subprocess

    from gradproj.testing.verl_cpu import trainer

    race = "in init_process_group\ntorch.distributed.DistNetworkError: ... EADDRINUSE, message: address already in use\n"
    outcomes = []

    def fake_run(cmd, env, stdout, **kwargs):
        text, code = outcomes.pop(0)
        stdout.write(text)
        if code == 0:
            (tmp_path / "metrics.jsonl").write_text('{"step": 1, "data": {}}\n')
        return subprocess.CompletedProcess(cmd, code)

    monkeypatch.setattr(trainer.subprocess, "run", fake_run)
    assert trainer.lost_port_race(race) and not trainer.lost_port_race("ValueError: Total available GPUs 0")
    outcomes[:] = [(race, 1), ("ok", 0)]
    assert trainer.run_main_ppo([], tmp_path) == [{"step": 1, "data": {}}]
    assert "EADDRINUSE" in (tmp_path / "main_ppo.failed.log").read_text()
    outcomes[:] = [(race, 1), (race, 1)]
    with pytest.raises(RuntimeError, match="EADDRINUSE"):
        trainer.run_main_ppo([], tmp_path)
    outcomes[:] = [("ValueError: something else", 1)]
    with pytest.raises(RuntimeError, match="something else"):
        trainer.run_main_ppo([], tmp_path)
    assert outcomes == []
