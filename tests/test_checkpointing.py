"""Gradient checkpointing (HF ``gradient_checkpointing_enable``): forwards that run again during
the backward are counted, and the result equals the brute force of a non-checkpointed twin."""

import pytest
import torch

import gradproj
from helpers import (
    grpo_coefficients, grpo_loss, linear_only, make_microbatches, reference_update, sequence_gradients,
    tiny_hf, token_logprobs, trainable, with_lora,
)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("params", ["linear", "lora"])
def test_checkpointing_exact(reentrant, params):
    _checkpointed_equals_brute_force(reentrant, params)


def test_checkpointing_exact_without_the_recomputation_probe(monkeypatch):
    """A torch without the saved-tensor hook stack: recomputed forwards are counted, the layers
    finish when the microbatch closes, and the result is still exact."""
    from gradproj.capture import layer as layer_module

    monkeypatch.setattr(layer_module, "_top_saved_tensors_hooks", None)
    _checkpointed_equals_brute_force(False, "linear")


def _checkpointed_equals_brute_force(reentrant, params):
    def build():
        model = tiny_hf("qwen2", seed=4)
        return with_lora(model) if params == "lora" else linear_only(model)

    model, twin = build(), build()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma")
    batches = make_microbatches(count=3, k=4, seed=7)
    G = {n: None for n, _ in trainable(twin)}
    for ids, attn, mask, adv in batches:
        S = sequence_gradients(twin, token_logprobs(twin, ids, attn), mask)
        c = grpo_coefficients(adv, mask, 1 / 3)
        for n in G:
            G[n] = reference_update(G[n], S[n], c)
        logp = token_logprobs(model, ids, attn)
        with opt.microbatch(logp, mask):
            grpo_loss(logp, mask, adv, 1 / 3).backward()
    for n, p in trainable(model):
        torch.testing.assert_close(p.grad.reshape(-1).double(), G[n], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("strategy", ["none", "proma"])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "qwen3", "gemma3"])
def test_checkpointing_full_finetuning_tied(arch, strategy):
    """Every parameter trained (tied embeddings, norms) with non-reentrant checkpointing."""
    from helpers import float64_exact_norms, tiny_full
    from test_full_finetuning import tiny_gpt2

    def build():
        return tiny_gpt2(seed=6, tie=True) if arch == "gpt2" else tiny_full(arch, seed=6, train_embeddings=True, tie=True)

    with float64_exact_norms():
        model, twin = build(), build()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, strategy)
        G = {n: None for n, _ in trainable(twin)}
        for ids, attn, mask, adv in make_microbatches(count=3, k=3, seed=9):
            S = sequence_gradients(twin, token_logprobs(twin, ids, attn), mask)
            c = grpo_coefficients(adv, mask, 1 / 3)
            for n in G:
                G[n] = reference_update(G[n], S[n], c, strategy=strategy)
            logp = token_logprobs(model, ids, attn)
            with opt.microbatch(logp, mask):
                grpo_loss(logp, mask, adv, 1 / 3).backward()
        for n, p in trainable(model):
            torch.testing.assert_close(p.grad.reshape(-1).double(), G[n], rtol=1e-10, atol=1e-14)
        opt.detach()


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_layers_finish_during_the_backward(reentrant, monkeypatch):
    """Only the forward whose backward reaches a layer is counted: non-reentrant checkpointing's
    recomputation is not (else every layer's factors would wait for the microbatch to close,
    holding the activations checkpointing frees), reentrant checkpointing's is (its original
    forward ran under no_grad)."""
    model = linear_only(tiny_hf("qwen2", seed=4))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma")
    left_open, finish = [], opt.engine._finish_microbatch
    monkeypatch.setattr(opt.engine, "_finish_microbatch", lambda mb: (left_open.append(len(mb.uses)), finish(mb)))
    for ids, attn, mask, adv in make_microbatches(count=2, k=3, seed=1):
        logp = token_logprobs(model, ids, attn)
        counted = {layer.pending for layer in opt.engine.layers if layer.name.startswith("model.layers")}
        assert counted == ({1} if not reentrant else {0})
        with opt.microbatch(logp, mask):
            grpo_loss(logp, mask, adv, 0.5).backward()
    assert left_open == [0, 0]
