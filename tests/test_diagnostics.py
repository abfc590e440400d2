"""Diagnostics equal brute-force computations on the same data."""

import math

import pytest
import torch
import torch.nn.functional as F

import gradproj
from gradproj.integrations.torch.logprobs import token_logprobs
from helpers import grpo_coefficients, grpo_loss, linear_only, sequence_gradients, tiny_hf, trainable, with_lora
from test_transforms import grouped_step


def brute_group_cos(S, c, gids):
    """|cos| of all pairs of non-zero prompt-group gradients of one microbatch (explicit vectors)."""
    groups = list(dict.fromkeys(gids.tolist()))
    h = [sum(c[i] * S[i] for i in range(len(c)) if int(gids[i]) == g) for g in groups]
    h = [v for v in h if float(v.norm()) > 0]
    return [abs(float(h[a] @ h[b] / (h[a].norm() * h[b].norm()))) for a in range(len(h)) for b in range(a + 1, len(h))]


@pytest.mark.parametrize("params,strategy", [("linear", "proma"), ("lora", "none"), ("lora", "intra_proma")])
def test_gradient_diagnostics_match_brute_force(params, strategy):
    model = tiny_hf("qwen2", seed=2)
    model = with_lora(model) if params == "lora" else linear_only(model)
    microbatches, group_ids, rewards = grouped_step(prompts=4, per_mb=8, seed=3)
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.0), model, strategy, diagnostics=True)
    opt.set_groups(group_ids, rewards)
    cosines = {n: [] for n, _ in trainable(model)}
    norms = {n: [] for n, _ in trainable(model)}
    scale = 1.0 / len(microbatches)
    for ids, attn, mask, centred, _n, gids in microbatches:
        with opt.paused():
            S = sequence_gradients(model, token_logprobs(model, ids, attn), mask)
        c = grpo_coefficients(centred, mask, scale)
        for n in cosines:
            cosines[n] += brute_group_cos(S[n], c, gids)
            norms[n] += S[n].norm(dim=1).tolist()
        logp = token_logprobs(model, ids, attn)
        with opt.microbatch(logp, mask, group_ids=gids):
            grpo_loss(logp, mask, centred, scale).backward()
    opt.step()
    m = opt.metrics()
    means, fractions = [], []
    for n in cosines:
        assert cosines[n], n  # pairs exist
        mean = sum(cosines[n]) / len(cosines[n])
        fraction = sum(v < 0.15 for v in cosines[n]) / len(cosines[n])
        assert abs(m[f"gradproj/diagnostics/layer/{n}/group_cos_abs_mean"] - mean) <= 1e-10 * max(mean, 1.0)
        assert m[f"gradproj/diagnostics/layer/{n}/group_cos_below_0.15"] == pytest.approx(fraction, abs=1e-12)
        norm_mean = sum(norms[n]) / len(norms[n])
        assert m[f"gradproj/diagnostics/layer/{n}/seq_grad_norm_mean"] == pytest.approx(norm_mean, rel=1e-10)
        means.append(mean)
        fractions.append(fraction)
    assert m["gradproj/diagnostics/group_cos_abs_mean"] == pytest.approx(sum(means) / len(means), rel=1e-10)
    assert m["gradproj/diagnostics/group_cos_below_0.15"] == pytest.approx(sum(fractions) / len(fractions), abs=1e-12)
    stds = [float(rewards[group_ids == g].std()) for g in range(4)]
    assert m["gradproj/diagnostics/reward_std_mean"] == pytest.approx(sum(stds) / 4, rel=1e-12)
    assert m["gradproj/diagnostics/zero_std_group_fraction"] == pytest.approx(sum(s == 0 for s in stds) / 4)


def test_diagnostics_do_not_change_the_gradient():
    microbatches, group_ids, rewards = grouped_step(prompts=2, per_mb=4, seed=4)
    grads = []
    for diagnostics in (False, True):
        model = linear_only(tiny_hf("llama", seed=5))
        opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.0), model, "proma", diagnostics=diagnostics)
        for ids, attn, mask, centred, _n, gids in microbatches:
            logp = token_logprobs(model, ids, attn)
            with opt.microbatch(logp, mask, group_ids=gids):
                grpo_loss(logp, mask, centred, 0.5).backward()
        grads.append([p.grad.clone() for _, p in trainable(model)])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-15)


def test_policy_kl_estimators():
    g = torch.Generator().manual_seed(0)
    logits_before = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    logits_after = logits_before + 0.1 * torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    lp_b, lp_a = F.log_softmax(logits_before, -1), F.log_softmax(logits_after, -1)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3:] = False
    exact = F.kl_div(lp_a, lp_b, log_target=True, reduction="none").sum(-1)  # KL(before || after)
    assert gradproj.policy_kl(lp_b, lp_a, mask) == pytest.approx(float(exact[mask].mean()), rel=1e-12)
    tokens = torch.randint(0, 7, (3, 5, 1), generator=g)
    sb, sa = lp_b.gather(-1, tokens)[..., 0], lp_a.gather(-1, tokens)[..., 0]
    r = sa - sb
    assert gradproj.policy_kl(sb, sa, mask, "k1") == pytest.approx(float((sb - sa)[mask].mean()), rel=1e-12)
    assert gradproj.policy_kl(sb, sa, mask, "k3") == pytest.approx(float((r.exp() - 1 - r)[mask].mean()), rel=1e-12)
    assert gradproj.policy_kl(sb, sb) == 0.0
    with pytest.raises(gradproj.InputError, match="same"):
        gradproj.policy_kl(sb, sa[:, :2])
    with pytest.raises(gradproj.InputError, match="estimator"):
        gradproj.policy_kl(sb, sa, estimator="k2")


def test_lora_bound_matches_formula():
    model = with_lora(tiny_hf("qwen2", seed=6))
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.5), model, "proma", lora_bound=True)
    snapshot = {n: p.detach().clone() for n, p in trainable(model)}
    microbatches, _, _ = grouped_step(prompts=2, per_mb=4, seed=7)
    for ids, attn, mask, centred, _n, _g in microbatches:
        logp = token_logprobs(model, ids, attn)
        with opt.microbatch(logp, mask):
            grpo_loss(logp, mask, centred, 0.5).backward()
    opt.step()
    m = opt.metrics()
    params = dict(trainable(model))
    mus = []
    for name in params:
        if ".lora_A." not in name:
            continue
        b_name = name.replace(".lora_A.", ".lora_B.")
        A0, B0 = snapshot[name], snapshot[b_name]
        dA, dB = params[name].detach() - A0, params[b_name].detach() - B0
        r, k = A0.shape
        spec = lambda x: float(torch.linalg.svdvals(x)[0])  # noqa: E731
        mu = math.sqrt(r * k) * (spec(B0) * spec(dA) + spec(A0) * spec(dB))
        key = name.split(".lora_A.")[0] + "." + name.split(".lora_A.")[1].split(".")[0]
        assert m[f"gradproj/lora_bound/mu/{key}"] == pytest.approx(mu, rel=1e-10)
        mus.append(mu)
    assert m["gradproj/lora_bound/mu_max"] == pytest.approx(max(mus), rel=1e-12)
    assert m["gradproj/lora_bound/mu_max"] > 0
    assert m["gradproj/lora_bound/kl_bound_max"] == pytest.approx(max(mus) * math.exp(max(mus)), rel=1e-12)
    plain = linear_only(tiny_hf())
    with pytest.raises(gradproj.ConfigError, match="LoRA"):
        gradproj.wrap(torch.optim.SGD([p for _, p in trainable(plain)], lr=0.1), plain, lora_bound=True)
    assert not hasattr(plain, "_gradproj_engine")
