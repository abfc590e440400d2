"""FSDP2 (``fully_shard``, CPU, gloo, world 1 and 2): the strategies read and write the sharded
gradients correctly -- each rank accumulates its microbatches, then the average over the ranks is
sharded into ``param.grad`` -- against the same float64 brute force as DDP."""

import contextlib
import gc
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gradproj
from gradproj.integrations.torch.logprobs import token_logprobs
from helpers import TinyLM, grpo_loss, rel_err, trainable
from test_data_parallel import brute_local, free_port, rank_microbatches


@contextlib.contextmanager
def gloo_process(rank, world, port):
    """This spawned process in a gloo group of ``world`` (torn down after a barrier)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
        dist.barrier()  # every rank done before gloo is torn down
    finally:
        gc.collect()
        dist.destroy_process_group()


def sharded_tiny_model():
    """TinyLM(seed=1) with every trainable module and the whole model under ``fully_shard``."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    model = TinyLM(seed=1)
    for module in (model.fc1, model.fc2, model.head):
        fully_shard(module)
    fully_shard(model)
    assert isinstance(model.fc1.weight, DTensor)
    return model


def worker(rank, world, port, outdir, strategy):
    with gloo_process(rank, world, port):
        model = sharded_tiny_model()
        options = {"rank": 2} if strategy == "intra_proma" else {}
        opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, strategy, **options)
        for ids, attn, mask, adv in rank_microbatches(rank):
            logp = token_logprobs(model, ids, attn)
            with opt.microbatch(logp, mask):
                grpo_loss(logp, mask, adv, 0.5).backward()
        opt.sync_gradients()
        grads = {n: p.grad.full_tensor().detach().clone() for n, p in trainable(model)}
        local_shapes = {n: (tuple(p.grad.to_local().shape), tuple(p.to_local().shape)) for n, p in trainable(model)}
        before = {n: p.full_tensor().detach().clone() for n, p in trainable(model)}
        opt.step()
        after = {n: p.full_tensor().detach().clone() for n, p in trainable(model)}
        opt.detach()
        torch.save({"grads": grads, "shapes": local_shapes, "before": before, "after": after},
                   os.path.join(outdir, f"rank{rank}.pt"))
        del opt, model


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("strategy", ["none", "proma", "intra_proma"])
def test_fsdp2_sharded_gradients(strategy, world, tmp_path):
    mp.spawn(worker, args=(world, free_port(), str(tmp_path), strategy), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    expected = [brute_local(r, strategy) for r in range(world)]
    for n in expected[0]:
        mean = sum(e[n] for e in expected) / world
        for res in results:
            assert rel_err(res["grads"][n].reshape(-1).double(), mean) <= 1e-10, n
            grad_shape, param_shape = res["shapes"][n]
            assert grad_shape == param_shape  # each rank holds its shard, laid out like the parameter
            # SGD applied the averaged gradient to the sharded parameters
            step = (res["before"][n] - res["after"][n]).reshape(-1).double() / 0.1
            assert rel_err(step, mean) <= 1e-10, n


def kl_worker(rank, world, port, outdir):
    """Two steps with kl_estimate=True on FSDP2 shards: the second step's estimate, the update."""
    with gloo_process(rank, world, port):
        model = sharded_tiny_model()
        opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma", kl_estimate=True)
        snapshots = []
        for _ in range(2):
            snapshots.append({n: p.full_tensor().detach().clone() for n, p in trainable(model)})
            for ids, attn, mask, adv in rank_microbatches(rank):
                logp = token_logprobs(model, ids, attn)
                with opt.microbatch(logp, mask):
                    grpo_loss(logp, mask, adv, 0.5).backward()
            opt.step()
            opt.zero_grad()
        metrics = opt.metrics()
        opt.detach()
        torch.save({"metrics": metrics, "before": snapshots[0], "after": snapshots[1]}, os.path.join(outdir, f"rank{rank}.pt"))
        del opt, model


def test_fsdp2_kl_estimate(tmp_path):
    """Each rank's estimate of the first update's KL, on its own sequences, equals the formula with
    the gathered update and brute-force sequence gradients at the updated parameters."""
    from test_update_monitor import expected_kl

    world = 2
    mp.spawn(kl_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    for rank in range(world):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        model = TinyLM(seed=1)
        params = dict(trainable(model))
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(result["after"][n])
        delta = {n: result["after"][n] - result["before"][n] for n in params}
        per_token, per_sequence = expected_kl(model, rank_microbatches(rank), delta)
        metrics = result["metrics"]
        assert rel_err(torch.tensor(metrics["gradproj/kl_estimate/per_token"]), torch.tensor(per_token)) <= 1e-10
        assert rel_err(torch.tensor(metrics["gradproj/kl_estimate/per_sequence"]), torch.tensor(per_sequence)) <= 1e-10
        assert per_token > 0
