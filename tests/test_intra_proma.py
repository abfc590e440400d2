"""intra_proma against an independent float64 brute force (explicit SVDs and d x d projectors)."""

import pytest
import torch
from torch import nn

import gradproj
from gradproj.integrations.torch.logprobs import token_logprobs
from gradproj.linalg.subspace import top_subspace
from helpers import (
    float64_exact_norms,
    grpo_coefficients,
    grpo_loss,
    linear_only,
    make_microbatches,
    rel_err,
    sequence_gradients,
    tiny_full,
    tiny_hf,
    trainable,
    with_lora,
)


def svd_basis(x: torch.Tensor, rank: int, energy=None) -> torch.Tensor:
    """Top right singular vectors of x (N x d) by a full SVD, with the documented rank rule."""
    if x.shape[0] == 0:
        return x.new_zeros(x.shape[1], 0)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    keep = int((s > 1e-6 * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    r = min(rank, keep)
    if energy is not None:
        frac = torch.cumsum(s**2, 0) / (s**2).sum()
        r = min(r, int((frac < energy - 1e-15).sum()) + 1)
    return vh[:r].T


def token_data(model, ids, attn, mask):
    """Per covered module: inputs, outputs and unweighted output gradients (one plain backward)."""
    inputs, outputs = {}, {}
    hooks = []
    for name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            def hook(mod, args, out, name=name):
                inputs[name] = args[0]
                outputs[name] = out
            hooks.append(module.register_forward_hook(hook))
    logp = token_logprobs(model, ids, attn)
    for h in hooks:
        h.remove()
    names = list(outputs)
    grads = torch.autograd.grad((logp * mask).sum(), [outputs[n] for n in names], retain_graph=True)
    return logp, inputs, outputs, dict(zip(names, grads))


def brute_intra(model, ids, attn, mask, c, *, rank=8, energy=None, projector="complement", layer_c=None):
    """{param name: g_m'} for one microbatch, from explicit token matrices and projectors.

    ``layer_c(S_name, c)``: per-layer coefficient transform (stacked isopo), applied to ``c``.
    """
    logp, inputs, outputs, deltas = token_data(model, ids, attn, mask)
    S = sequence_gradients(model, logp, mask)
    out = {}
    c_all = c
    for name, param in trainable(model):
        c = c_all if layer_c is None else layer_c(S[name], c_all)
        mod_name, attr = name.rsplit(".", 1)
        module = model.get_submodule(mod_name)
        delta = deltas[mod_name].reshape(-1, deltas[mod_name].shape[-1])
        keep = delta.abs().amax(1) > 0
        g = (c @ S[name]).reshape(param.shape)
        if isinstance(module, nn.Linear) and attr == "weight":
            a = inputs[mod_name].reshape(-1, param.shape[1])[keep]
            d = delta[keep]
            ud, ua = svd_basis(d, rank, energy), svd_basis(a, rank, energy)
            pd, pa = ud @ ud.T, ua @ ua.T
            if projector == "complement":
                out[name] = g - pd @ g @ pa
            else:
                out[name] = (torch.eye(pd.shape[0], dtype=g.dtype) - pd) @ g @ (torch.eye(pa.shape[0], dtype=g.dtype) - pa)
            continue
        # vector parameters: per-token gradient rows, one autograd.grad per token
        y = outputs[mod_name]
        dy = deltas[mod_name]
        rows = []
        k, t = dy.shape[:2]
        for i in range(k):
            for u in range(t):
                (row,) = torch.autograd.grad((y[i, u] * dy[i, u]).sum(), param, retain_graph=True)
                rows.append(row.reshape(-1))
        rows = torch.stack(rows)[keep]
        u_basis = svd_basis(rows, rank, energy)
        out[name] = (g.reshape(-1) - u_basis @ (u_basis.T @ g.reshape(-1))).reshape(param.shape)
    return out


def run(model, opt, microbatches, **brute):
    scale = 1.0 / len(microbatches)
    expected = {n: torch.zeros_like(p) for n, p in trainable(model)}
    plain = {n: torch.zeros_like(p) for n, p in trainable(model)}
    for ids, attn, mask, adv in microbatches:
        c = grpo_coefficients(adv, mask, scale)
        with opt.paused():
            for n, gm in brute_intra(model, ids, attn, mask, c, **brute).items():
                expected[n] += gm
            S = sequence_gradients(model, token_logprobs(model, ids, attn), mask)
            for n in plain:
                plain[n] += (c @ S[n]).reshape(plain[n].shape)
        logp = token_logprobs(model, ids, attn)
        with opt.microbatch(logp, mask):
            grpo_loss(logp, mask, adv, scale).backward()
    errors, changed = {}, {}
    for n, p in trainable(model):
        got, want, unprojected = (t.detach().double().reshape(-1) for t in (p.grad, expected[n], plain[n]))
        # relative to the larger of the result and the unprojected gradient: kron on a LoRA factor
        # whose subspace is the whole space projects to exactly 0 (then only round-off is left)
        errors[n] = float((got - want).norm()) / max(float(want.norm()), float(unprojected.norm()), 1e-300)
        changed[n] = rel_err(got, unprojected)
    return errors, changed


def wrapped(model, **options):
    return gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "intra_proma", **options)


@pytest.mark.parametrize("projector", ["complement", "kron"])
@pytest.mark.parametrize("params", ["linear", "lora"])
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_intra_proma_matches_brute_force(arch, params, projector):
    model = tiny_hf(arch, seed=1)
    model = with_lora(model) if params == "lora" else linear_only(model)
    rank = 2 if params == "lora" else 4  # below the LoRA rank (4), so kron keeps something
    opt = wrapped(model, projector=projector, rank=rank)
    errors, changed = run(model, opt, make_microbatches(count=3, k=4, seed=5), rank=rank, projector=projector)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-10, (worst, errors[worst])
    assert max(changed.values()) > 1e-3  # the projection did something
    opt.step()
    metrics = opt.metrics()
    assert 0.0 < metrics["gradproj/intra_proma/projected_fraction"] < 1.0
    assert 0.0 < metrics["gradproj/intra_proma/mean_rank"] <= rank


def test_intra_proma_energy_rank():
    model = linear_only(tiny_hf("qwen2", seed=2))
    opt = wrapped(model, energy=0.8, rank=16)
    errors, _ = run(model, opt, make_microbatches(count=2, k=4, seed=6), rank=16, energy=0.8)
    assert max(errors.values()) <= 1e-10


def test_intra_proma_full_finetuning_with_norms():
    """Linear weights and biases plus RMSNorm weights (vector parameters: per-token rows)."""
    with float64_exact_norms():
        model = tiny_full("qwen2", seed=3)
        opt = wrapped(model, rank=3)
        errors, _ = run(model, opt, make_microbatches(count=2, k=3, seed=7), rank=3)
        worst = max(errors, key=errors.get)
        assert errors[worst] <= 1e-10, (worst, errors[worst])
        opt.detach()


def test_intra_proma_refuses_what_it_cannot_project():
    model = tiny_full("qwen2", seed=0, train_embeddings=True)
    with pytest.raises(gradproj.CoverageError, match="embed_tokens"):
        wrapped(model)
    assert all(p.requires_grad for _, p in model.named_parameters())  # nothing frozen or installed
    opt = wrapped(model, exclude=["model.embed_tokens.*"])
    assert not model.model.embed_tokens.weight.requires_grad
    opt.detach()
    tied = tiny_full("qwen2", seed=0, train_embeddings=True, tie=True)
    with pytest.raises(gradproj.CoverageError, match="embed_tokens"):
        wrapped(tied)


def test_randomized_subspace_close_to_exact():
    g = torch.Generator().manual_seed(0)
    n, d, r = 600, 300, 8
    low = torch.randn(n, r, generator=g, dtype=torch.float64) @ torch.diag(torch.linspace(10, 3, r, dtype=torch.float64))
    x = low @ torch.randn(r, d, generator=g, dtype=torch.float64) + 1e-3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    exact, _ = top_subspace(x, r, solver="exact")
    approx, keep = top_subspace(x, r, solver="randomized", niter=2)
    assert bool(keep.all())
    assert exact.shape == approx.shape == (d, r)
    assert torch.allclose(approx.T @ approx, torch.eye(r, dtype=x.dtype), atol=1e-10)
    assert float((exact @ exact.T - approx @ approx.T).norm()) < 1e-6
    # the default RNG stream is untouched
    state = torch.get_rng_state()
    top_subspace(x, r, solver="randomized")
    assert torch.equal(state, torch.get_rng_state())
    # fp32 inputs give a basis in fp32
    approx32, _ = top_subspace(x.float(), r, solver="randomized")
    assert approx32.dtype == torch.float32
    assert float((exact @ exact.T - approx32.double() @ approx32.double().T).norm()) < 1e-3
    # rows outside `keep` do not count: a huge padding row does not enter the subspace
    padded = torch.cat([x, 1e3 * torch.randn(5, d, generator=g, dtype=torch.float64)])
    mask = torch.cat([torch.ones(n, 1, dtype=torch.bool), torch.zeros(5, 1, dtype=torch.bool)])
    for solver in ("exact", "randomized"):
        basis, _ = top_subspace(padded, r, solver=solver, niter=2, keep=mask)
        assert float((exact @ exact.T - basis @ basis.T).norm()) < 1e-6, solver


def test_stacked_variance_scaling_isopo_intra_proma():
    """["variance_scaling", "isopo", "intra_proma"]: rows of 4 groups spread over 2 microbatches."""
    from test_transforms import isopo_reference

    model = linear_only(tiny_hf("qwen2", seed=4))
    microbatches = make_microbatches(count=2, k=4, seed=9)
    group_ids = torch.arange(4).repeat(2)  # row j of each microbatch belongs to group j
    rewards = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    means = torch.stack([rewards[group_ids == g].mean() for g in range(4)])
    stds = torch.stack([rewards[group_ids == g].std() for g in range(4)])
    opt = gradproj.wrap(
        torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, ["variance_scaling", "isopo", "intra_proma"], rank=3
    )
    opt.set_groups(group_ids, rewards)
    expected = {n: torch.zeros_like(p) for n, p in trainable(model)}
    for m, (ids, attn, mask, _adv) in enumerate(microbatches):
        rows = slice(4 * m, 4 * m + 4)
        centred = rewards[rows] - means[group_ids[rows]]
        normalised = centred / (stds[group_ids[rows]] + 1e-6)
        with opt.paused():
            c = grpo_coefficients(normalised, mask, 0.5)
            for n, gm in brute_intra(model, ids, attn, mask, c, rank=3, layer_c=isopo_reference).items():
                expected[n] += gm
        logp = token_logprobs(model, ids, attn)
        with opt.microbatch(logp, mask, group_ids=group_ids[rows]):
            grpo_loss(logp, mask, centred, 0.5).backward()
    for n, p in trainable(model):
        assert rel_err(p.grad.detach().reshape(-1), expected[n].detach().reshape(-1)) <= 1e-10, n
