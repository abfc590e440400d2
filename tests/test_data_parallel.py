"""DDP with 2 gloo processes on CPU: each rank accumulates its own microbatches with the strategy,
then the gradients are averaged (SPEC 2.2 data-parallel semantics), against a float64 brute force."""

import gc
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gradproj
from gradproj.integrations.torch.logprobs import token_logprobs
from helpers import TinyLM, grpo_coefficients, grpo_loss, make_microbatches, reference_update, rel_err, sequence_gradients, trainable

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_microbatches(rank):
    return make_microbatches(count=2, k=3, seed=10 + rank)


def _join(rank, port):
    """This process as rank ``rank`` of the gloo group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


def worker(rank, port, outdir, strategy):
    _join(rank, port)
    try:
        model = TinyLM(seed=1)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        options = {"rank": 2} if strategy == "intra_proma" else {}  # rank 2: well below the layers' widths
        opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.0), ddp, strategy, **options)
        taken_over = not ddp.require_backward_grad_sync
        for ids, attn, mask, adv in rank_microbatches(rank):
            logp = token_logprobs(ddp, ids, attn)
            with opt.microbatch(logp, mask):
                grpo_loss(logp, mask, adv, 0.5).backward()
        local = {n: p.grad.detach().clone() for n, p in trainable(model)}
        opt.sync_gradients()
        synced = {n: p.grad.detach().clone() for n, p in trainable(model)}
        refused = False
        if taken_over:
            ids, attn, mask, adv = rank_microbatches(rank)[0]
            logp = token_logprobs(ddp, ids, attn)
            try:
                opt.microbatch(logp, mask).__enter__()
            except gradproj.ProtocolError:
                refused = True
        opt.step()  # must not average a second time
        after_step = {n: p.grad.detach().clone() for n, p in trainable(model)}
        opt.detach()
        torch.save(
            {"local": local, "synced": synced, "after_step": after_step, "taken_over": taken_over, "refused": refused,
             "restored": ddp.require_backward_grad_sync},
            os.path.join(outdir, f"rank{rank}.pt"),
        )
        del opt, ddp, model
        dist.barrier()  # both ranks done before either tears gloo down (a rank leaving early aborted the other once)
    finally:
        gc.collect()
        dist.destroy_process_group()


def brute_local(rank, strategy):
    """The rank's own accumulation, from one backward per sequence (float64)."""
    model = TinyLM(seed=1)
    G = {n: None for n, _ in trainable(model)}
    for ids, attn, mask, adv in rank_microbatches(rank):
        c = grpo_coefficients(adv, mask, 0.5)
        if strategy == "intra_proma":
            from test_intra_proma import brute_intra

            for n, gm in brute_intra(model, ids, attn, mask, c, rank=2).items():
                G[n] = gm.reshape(-1).double() if G[n] is None else G[n] + gm.reshape(-1).double()
            continue
        S = sequence_gradients(model, token_logprobs(model, ids, attn), mask)
        for n in G:
            G[n] = reference_update(G[n], S[n], c, strategy=strategy)
    return {n: g.detach() for n, g in G.items()}


@pytest.mark.parametrize("strategy", ["none", "proma", "intra_proma"])
def test_ddp_two_processes(strategy, tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path), strategy), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    expected_local = [brute_local(r, strategy) for r in range(WORLD)]
    for r, res in enumerate(results):
        assert res["taken_over"] == (strategy != "none")  # "none" installs nothing: DDP syncs as usual
        assert res["restored"] is True
        assert res["refused"] == (strategy != "none")
        for n, want in expected_local[r].items():
            if strategy != "none":  # with plain DDP the gradient is already averaged after backward
                assert rel_err(res["local"][n].reshape(-1).double(), want) <= 1e-10, (r, n)
    for n in expected_local[0]:
        mean = (expected_local[0][n] + expected_local[1][n]) / WORLD
        for res in results:
            assert rel_err(res["synced"][n].reshape(-1).double(), mean) <= 1e-10, n
            assert torch.equal(res["after_step"][n], res["synced"][n])


def inner_step_worker(rank, port, outdir):
    """A kept reference to the inner optimizer stepped directly: gradproj still averages first."""
    _join(rank, port)
    try:
        model = TinyLM(seed=1)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        inner = torch.optim.SGD([p for _, p in trainable(model)], lr=1.0)
        opt = gradproj.wrap(inner, ddp, "proma")
        before = {n: p.detach().clone() for n, p in trainable(model)}
        for ids, attn, mask, adv in rank_microbatches(rank):
            logp = token_logprobs(ddp, ids, attn)
            with opt.microbatch(logp, mask):
                grpo_loss(logp, mask, adv, 0.5).backward()
        inner.step()  # not opt.step()
        moved = {n: before[n] - p.detach() for n, p in trainable(model)}
        steps = opt.engine.steps
        opt.detach()
        torch.save({"moved": moved, "steps": steps}, os.path.join(outdir, f"inner{rank}.pt"))
        del opt, ddp, model
        dist.barrier()
    finally:
        gc.collect()
        dist.destroy_process_group()


def test_ddp_inner_optimizer_step_averages_first(tmp_path):
    mp.spawn(inner_step_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"inner{r}.pt", weights_only=True) for r in range(WORLD)]
    expected = [brute_local(r, "proma") for r in range(WORLD)]
    for n in expected[0]:
        mean = (expected[0][n] + expected[1][n]) / WORLD  # SGD with lr 1: the step is the gradient
        for res in results:
            assert rel_err(res["moved"][n].reshape(-1).double(), mean) <= 1e-10, n
            assert res["steps"] == 1
