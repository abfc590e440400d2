"""verl's actor update on 2 gloo processes (FSDP2 shards every parameter over both ranks): each rank
accumulates its own micro-batches with PROMA, the running gradients are averaged once, before
verl clips them -- against the float64 brute force of each rank, averaged (SPEC 2.2 data-parallel
semantics)."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from helpers import rel_err
from test_actor_update import SMOKE, Recorder, brute_force, cpu_overrides, float64_engine

from gradproj.testing.verl_cpu import free_port, smoke

WORLD = 2
SIZES = ["actor_rollout_ref.rollout.n=4", "actor_rollout_ref.actor.ppo_mini_batch_size=2",
         "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2", "actor_rollout_ref.actor.optim.clip_grad=1e9"]


def rank_main(rank, port, folder, outdir, extra):
    from gradproj.testing.verl_cpu import start

    start(rank=rank, world_size=WORLD, port=port)
    import gradproj.integrations.verl  # noqa: F401

    torch.set_num_threads(1)
    with float64_engine():
        config = smoke.compose(SMOKE + cpu_overrides(True) + SIZES + [f"actor_rollout_ref.model.path={folder}"] + extra)
        worker = smoke.actor_worker(config)
        recorder = Recorder(worker, pytest.MonkeyPatch())
        sharded = all(p.to_local().numel() < p.numel() for p in worker.actor.engine.module.parameters() if p.numel() >= WORLD)
        # this rank's shard of the global batch: one prompt group of 4 (global mini-batch 2 x n=4 = 8)
        batch = smoke.rollout_batch(worker.actor.engine.module.config.vocab_size, groups=1, n=4, seed=10 + rank)
        metrics = smoke.update_actor(worker, batch, config)
    torch.save({"grads": recorder.state["grads"], "params": recorder.state["params"], "micro_batches": recorder.calls[-1],
                "metrics": metrics, "sharded": sharded}, os.path.join(outdir, f"rank{rank}.pt"))


@pytest.mark.parametrize("extra", [[], ["actor_rollout_ref.model.use_remove_padding=False"]], ids=["packed", "padded"])
def test_two_ranks_equal_averaged_brute_force(extra, tmp_path):
    folder = smoke.tiny_model(tmp_path / "model", dtype=torch.float64)
    mp.spawn(rank_main, args=(free_port(), str(folder), str(tmp_path), extra), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert all(r["sharded"] for r in ranks), "FSDP2 must shard the parameters over the 2 ranks"
    for key in ranks[0]["grads"]:  # the averaged gradient is the same on both ranks
        assert torch.equal(ranks[0]["grads"][key], ranks[1]["grads"][key])
    tokens = sum(resp for r in ranks for mb in r["micro_batches"] for _, resp, _ in mb)

    class Seen:  # what brute_force reads from a Recorder
        state = {"params": ranks[0]["params"], "grads": ranks[0]["grads"]}

    with float64_engine():
        per_rank = [brute_force(folder, Seen, False, micro_batches=r["micro_batches"], tokens=tokens, dp_size=WORLD)
                    for r in ranks]
    expected = {n: (per_rank[0][n] + per_rank[1][n]) / WORLD for n in per_rank[0]}
    worst = max((rel_err(ranks[0]["grads"][n].reshape(-1).double(), expected[n]), n) for n in expected)
    assert worst[0] <= 1e-10, worst
    # not the same as projecting the pooled micro-batches: each rank projected only its own
    assert all(len(r["micro_batches"]) == 2 for r in ranks)
    assert ranks[0]["metrics"]["gradproj/sequences"] == [4.0, 4.0]  # per rank, gathered by verl
