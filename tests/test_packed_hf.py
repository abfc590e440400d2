"""Packed (remove-padding) batches through real HF architectures: sequences concatenated into one
row (1, total), position ids restarting per sequence and a block-diagonal causal 4-D mask -- what
flash-attention varlen does on GPU. Full fine-tuning with tied embeddings equals the brute force."""

import pytest
import torch

import gradproj
from helpers import (
    float64_exact_norms, grpo_coefficients, grpo_loss, make_microbatches, tiny_full, trainable,
)
from test_full_finetuning import tiny_gpt2
from test_intra_proma import BruteStep
from test_packed_layout import pack, packed_rows


def packed_inputs(cu):
    total = int(cu[-1])
    seg = torch.repeat_interleave(torch.arange(len(cu) - 1), cu[1:] - cu[:-1])
    position_ids = torch.cat([torch.arange(int(e - s)) for s, e in zip(cu[:-1], cu[1:])])[None]
    allowed = (seg[:, None] == seg[None, :]) & (torch.arange(total)[:, None] >= torch.arange(total)[None, :])
    mask = torch.zeros(1, 1, total, total, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float64).min)
    return position_ids, mask


def packed_logprobs(model, packed, cu):
    """(k, T-1) rows: row i scores sequence i's tokens 1.. (right-padded with zeros)."""
    position_ids, mask = packed_inputs(cu)
    logits = model(input_ids=packed, attention_mask=mask, position_ids=position_ids).logits[0]
    return packed_rows(torch.log_softmax(logits, -1), packed, cu)


@pytest.mark.parametrize("strategy", ["none", "proma", "intra_proma"])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "qwen3", "gemma3"])
def test_packed_full_finetuning_tied(arch, strategy):
    with float64_exact_norms():
        model = tiny_gpt2(seed=5, tie=True) if arch == "gpt2" else tiny_full(arch, seed=5, train_embeddings=True, tie=True)
        options = {"rank": 3} if strategy == "intra_proma" else {}
        opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, strategy, **options)
        brute = BruteStep(model, strategy, rank=3)
        for ids, attn, mask, adv in make_microbatches(count=2, k=3, seed=6):
            packed, cu, resp = pack(ids, attn, mask)
            c = grpo_coefficients(adv, resp, 0.5)
            with opt.paused():
                brute.add(packed, None, resp, c, logp_fn=lambda m, packed=packed, cu=cu: packed_logprobs(m, packed, cu))
            logp = packed_logprobs(model, packed, cu)
            with opt.microbatch(logp, resp, cu_seqlens=cu):
                grpo_loss(logp, resp, adv, 0.5).backward()
        brute.check()
        opt.detach()
