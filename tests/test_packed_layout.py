"""Packed / remove-padding batches: activations (1, total, d) with sequences given by cu_seqlens or
position_ids; every handler (Embedding, Linear, LayerNorm) equals the brute force."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import gradproj
from helpers import VOCAB, grpo_coefficients, grpo_loss, make_microbatches, reference_update, sequence_gradients, trainable


class PackedLM(nn.Module):
    """Embedding -> per-sequence causal mean -> Linear -> LayerNorm -> tanh -> head, on packed input."""

    def __init__(self, d: int = 12, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, d)
        self.fc = nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)
        with torch.no_grad():
            self.ln.weight.add_(0.1 * torch.randn(d))
        self.head = nn.Linear(d, VOCAB)
        self.double()

    def forward(self, input_ids, cu_seqlens):
        x = self.emb(input_ids)  # (1, total, d)
        parts = []
        for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
            seg = x[:, s:e]
            parts.append(torch.cumsum(seg, 1) / torch.arange(1, e - s + 1, dtype=x.dtype)[None, :, None])
        h = torch.tanh(self.ln(self.fc(torch.cat(parts, dim=1))))
        return SimpleNamespace(logits=self.head(h))


def pack(ids, attn, mask):
    """Padded rows -> packed ids (1, total), cu_seqlens, and the per-row response mask re-aligned so that
    column t of row i scores packed token cu[i] + t + 1."""
    rows = [ids[i][attn[i].bool()] for i in range(ids.shape[0])]
    lengths = torch.tensor([len(r) for r in rows])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    T = int(lengths.max())
    resp = torch.zeros(len(rows), T - 1, dtype=torch.bool)
    for i in range(len(rows)):
        start = int(attn[i].nonzero()[0])  # padded column start+j scores the row's real token j+1
        resp[i, : len(rows[i]) - 1] = mask[i, start : start + len(rows[i]) - 1]
    return torch.cat(rows).unsqueeze(0), cu, resp


def packed_logprobs(model, packed, cu):
    return packed_rows(torch.log_softmax(model(packed, cu).logits[0], -1), packed, cu)


def packed_rows(logp_all, packed, cu):
    """(k, T-1) log-probs of each packed sequence's tokens 1.. from (total, V) log-distributions."""
    T = int((cu[1:] - cu[:-1]).max())
    rows = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        lp = logp_all[s : e - 1].gather(-1, packed[0, s + 1 : e, None]).squeeze(-1)
        rows.append(torch.nn.functional.pad(lp, (0, T - 1 - lp.numel())))
    return torch.stack(rows)


@pytest.mark.parametrize("boundaries", ["cu_seqlens", "position_ids"])
def test_packed_batches_exact(boundaries):
    model = PackedLM()
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma")
    G = {n: None for n, _ in trainable(model)}
    for ids, attn, mask, adv in make_microbatches(count=3, k=4, seed=4):
        packed, cu, resp = pack(ids, attn, mask)
        with opt.paused():
            S = sequence_gradients(model, packed_logprobs(model, packed, cu), resp)
        c = grpo_coefficients(adv, resp, 1 / 3)
        for n in G:
            G[n] = reference_update(G[n], S[n], c)
        logp = packed_logprobs(model, packed, cu)
        if boundaries == "cu_seqlens":
            kw = {"cu_seqlens": cu}
        else:
            kw = {"position_ids": torch.cat([torch.arange(int(e - s)) for s, e in zip(cu[:-1], cu[1:])])[None]}
        with opt.microbatch(logp, resp, **kw):
            grpo_loss(logp, resp, adv, 1 / 3).backward()
    for n, p in trainable(model):
        torch.testing.assert_close(p.grad.reshape(-1).double(), G[n], rtol=1e-10, atol=1e-14)


def test_packed_errors():
    model = PackedLM()
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma")
    ids, attn, mask, adv = make_microbatches(count=1, k=3, seed=1)[0]
    packed, cu, resp = pack(ids, attn, mask)
    logp = packed_logprobs(model, packed, cu)
    with pytest.raises(gradproj.InputError, match="3 rows"):
        opt.microbatch(logp, resp, cu_seqlens=cu[:-1]).__enter__()
    with pytest.raises(gradproj.InputError, match="non-decreasing"):
        opt.microbatch(logp, resp, cu_seqlens=cu.flip(0)).__enter__()
    with pytest.raises(gradproj.InputError, match="not both"):
        opt.microbatch(logp, resp, cu_seqlens=cu, position_ids=cu).__enter__()
    # a packed batch without boundaries: clear error once sequence gradients are needed
    with opt.microbatch(logp, resp, cu_seqlens=cu):
        grpo_loss(logp, resp, adv, 1.0).backward()
    logp = packed_logprobs(model, packed, cu)
    with pytest.raises(gradproj.InputError, match="cu_seqlens"):
        with opt.microbatch(logp, resp):
            grpo_loss(logp, resp, adv, 1.0).backward()
