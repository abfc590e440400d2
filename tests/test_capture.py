"""Capture engine behaviour: no_grad forwards, paused, reused modules, packed layout errors,
autocast, singular Gram matrices, metrics."""

import pytest
import torch

import gradproj
from helpers import (
    TinyLM, grpo_coefficients, grpo_loss, make_microbatches, reference_update, registered_strategy,
    run_microbatches, sequence_gradients, token_logprobs, trainable,
)


def wrap(model, strategy="proma", **kw):
    return gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, strategy, **kw)


def test_module_called_twice_per_forward_is_exact():
    model = TinyLM(reuse=True)
    opt = wrap(model)
    errors = run_microbatches(model, opt, make_microbatches(count=3, k=4, seed=5), ref={})
    assert max(errors.values()) <= 1e-10


def test_no_grad_forward_is_not_captured():
    model = TinyLM()
    opt = wrap(model)
    ids, attn, mask, adv = make_microbatches(count=1)[0]
    with torch.no_grad():
        token_logprobs(model, ids, attn)
    assert all(layer.pending == 0 for layer in opt.engine.layers)
    with torch.inference_mode():
        token_logprobs(model, ids, attn)
    assert all(layer.pending == 0 for layer in opt.engine.layers)
    token_logprobs(model, ids, attn)
    assert all(layer.pending == 1 for layer in opt.engine.layers)


def test_paused_gives_ordinary_gradients():
    model = TinyLM()
    opt = wrap(model)
    ids, attn, mask, adv = make_microbatches(count=1)[0]
    with opt.paused():
        grpo_loss(token_logprobs(model, ids, attn), mask, adv, 1.0).backward()
    paused = {n: p.grad.clone() for n, p in trainable(model)}
    model.zero_grad()
    logp = token_logprobs(model, ids, attn)
    with opt.microbatch(logp, mask):
        grpo_loss(logp, mask, adv, 1.0).backward()
    for n, p in trainable(model):
        torch.testing.assert_close(p.grad, paused[n], rtol=1e-12, atol=1e-14)
    # A backward through a captured graph while paused falls back to plain accumulation.
    model.zero_grad()
    logp = token_logprobs(model, ids, attn)
    with opt.paused():
        grpo_loss(logp, mask, adv, 1.0).backward()
    for n, p in trainable(model):
        torch.testing.assert_close(p.grad, paused[n], rtol=1e-12, atol=1e-14)


def test_packed_layout_is_a_clear_error():
    model = TinyLM()
    opt = wrap(model)
    ids, attn, mask, adv = make_microbatches(count=1, k=3)[0]
    run_microbatches(model, opt, [(ids, attn, mask, adv)])  # G != 0: sequence gradients needed next
    packed = ids[attn.bool()].unsqueeze(0)  # (1, total tokens)
    logp = token_logprobs(model, packed, None)
    logp = logp.expand(3, -1)  # pretend 3 sequences
    with pytest.raises(gradproj.InputError, match="packed"):
        with opt.microbatch(logp, torch.ones_like(logp, dtype=torch.bool)):
            (logp.sum() / 3).backward()


@pytest.mark.parametrize("projector", ["solve", "gram_schmidt"])
def test_duplicate_and_zero_sequences(projector):
    """Singular Gram (duplicated rows, an all-masked row) stays finite and exact."""
    model = TinyLM()
    opt = wrap(model, projector=projector, damping=0.0 if projector == "solve" else None)
    batches = make_microbatches(count=3, k=4, seed=8)
    fixed = []
    for ids, attn, mask, adv in batches:
        ids, attn, mask = ids.clone(), attn.clone(), mask.clone()
        ids[1], attn[1], mask[1] = ids[0], attn[0], mask[0]
        mask[2] = False
        fixed.append((ids, attn, mask, adv))
    ref = {"projector": projector, "damping": 0.0 if projector == "solve" else None}
    errors = run_microbatches(model, opt, fixed, ref=ref)
    assert max(errors.values()) <= 1e-9
    assert all(torch.isfinite(p.grad).all() for _, p in trainable(model))


def test_all_zero_advantages():
    model = TinyLM()
    opt = wrap(model)
    batches = [(i, a, m, adv * 0) for i, a, m, adv in make_microbatches(count=2)]
    errors = run_microbatches(model, opt, batches, ref={})
    assert all(torch.count_nonzero(p.grad) == 0 for _, p in trainable(model))
    assert opt.metrics()["gradproj/microbatches"] == 2


def test_projected_fraction_metric_matches_brute_force():
    model = TinyLM(seed=4)
    opt = wrap(model)
    batches = make_microbatches(count=3, k=4, seed=4)
    G = {n: None for n, _ in trainable(model)}
    proj_sq = run_sq = 0.0
    for ids, attn, mask, adv in batches:
        with opt.paused():
            S = sequence_gradients(model, token_logprobs(model, ids, attn), mask)
        c = grpo_coefficients(adv, mask, 1 / 3)
        for n in G:
            if G[n] is not None:
                new = reference_update(G[n], S[n], c)
                proj = G[n] + c @ S[n] - new
                proj_sq += float(proj @ proj)
                run_sq += float(G[n] @ G[n])
            G[n] = reference_update(G[n], S[n], c)
    run_microbatches(model, opt, batches)
    opt.step()
    m = opt.metrics()
    assert m["gradproj/proma/projected_fraction"] == pytest.approx((proj_sq / run_sq) ** 0.5, rel=1e-6)
    assert m["gradproj/sequences"] == 12 and m["gradproj/microbatches"] == 3
    assert m["gradproj/capture_seconds"] >= 0 and m["gradproj/projection_seconds"] > 0


# rank 2 of TinyLM's 12-24 wide layers: the default 8 removes nearly all of g_m, and the small
# remainder is dominated by how the subspace rotates under bf16 rounding
INTRA_OPTIONS = {"intra_proma": {"rank": 2}}


@pytest.mark.parametrize("strategy", ["proma", "intra_proma"])
def test_bf16_autocast_close_to_fp32(strategy):
    """bf16 autocast activations; Gram/coefficients in fp32: close to the fp32 result."""
    results = []
    for autocast in (False, True):
        model = TinyLM(seed=6, dtype=torch.float32)
        opt = wrap(model, strategy, **INTRA_OPTIONS.get(strategy, {}))
        for ids, attn, mask, adv in make_microbatches(count=3, k=4, seed=6):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logp = token_logprobs(model, ids, attn)
            with opt.microbatch(logp, mask):
                grpo_loss(logp.float(), mask, adv.float(), 1 / 3).backward()
        results.append(torch.cat([p.grad.flatten() for _, p in trainable(model)]))
        assert all(p.grad.dtype == torch.float32 for _, p in trainable(model))
    rel = float((results[0] - results[1]).norm() / results[0].norm())
    assert rel < 5e-2, rel


def test_peft_lora_is_covered_without_special_casing():
    from helpers import tiny_hf, with_lora

    model = with_lora(tiny_hf("llama"))
    opt = wrap(model)
    names = {layer.name.rsplit(".", 2)[-2] for layer in opt.engine.layers}
    assert names == {"lora_A", "lora_B"}


class BranchyLM(TinyLM):
    """TinyLM plus a same-shaped Linear used only when ``use_extra`` is set (partial batches)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.extra = torch.nn.Linear(self.fc2.in_features, self.fc2.out_features).to(self.fc2.weight.dtype)
        self.use_extra = False

    def hidden(self, x):
        h = super().hidden(x)
        return torch.tanh(self.extra(h)) if self.use_extra else h


@pytest.mark.parametrize("projector", ["solve", "gram_schmidt"])
def test_small_parameters_batched_with_partial_groups(projector):
    """fc2 and extra share a batching group; extra is reached only in the middle microbatch."""
    from helpers import grpo_coefficients, reference_update, sequence_gradients

    model = BranchyLM(seed=3)
    opt = wrap(model, projector=projector)
    groups = {g.numel: len(g.members) for g in opt.engine._groups}
    assert groups[model.extra.weight.numel()] == 2  # fc2.weight and extra.weight
    batches = make_microbatches(count=3, k=4, seed=9)
    G = {n: None for n, _ in trainable(model)}
    for m, (ids, attn, mask, adv) in enumerate(batches):
        model.use_extra = m == 1
        with opt.paused():
            S = sequence_gradients(model, token_logprobs(model, ids, attn), mask)
        c = grpo_coefficients(adv, mask, 1 / 3)
        for n in G:
            G[n] = reference_update(G[n], S[n], c, projector=projector)
        logp = token_logprobs(model, ids, attn)
        with opt.microbatch(logp, mask):
            grpo_loss(logp, mask, adv, 1 / 3).backward()
    for n, p in trainable(model):
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad.reshape(-1).double(), G[n], rtol=1e-10, atol=1e-14)


def test_large_parameters_take_the_per_layer_path(monkeypatch):
    """Parameters above the batching threshold are not grouped (and still exact)."""
    import gradproj.capture.plan as plan_mod

    model = TinyLM(d=12)
    monkeypatch.setattr(plan_mod, "BATCH_MAX_NUMEL", 100)
    opt = wrap(model)
    assert opt.engine._groups and any(p.numel() > 100 for p in model.parameters())
    assert all(p.numel() <= 100 for g in opt.engine._groups for p, _ in g.members)
    errors = run_microbatches(model, opt, make_microbatches(count=3, k=4, seed=1), ref={})
    assert max(errors.values()) <= 1e-10


def test_unused_grad_forward_defers_but_stays_exact():
    """A forward with grad enabled that is never backpropagated (e.g. old log-probs computed without
    no_grad) stays pending until the optimizer step; finalisation waits for the block's end."""
    from helpers import grpo_coefficients, reference_update, sequence_gradients

    model = TinyLM(seed=2)
    opt = wrap(model)
    G = {n: None for n, _ in trainable(model)}
    for m, (ids, attn, mask, adv) in enumerate(make_microbatches(count=2, k=3, seed=6)):
        with opt.paused():
            S = sequence_gradients(model, token_logprobs(model, ids, attn), mask)
        c = grpo_coefficients(adv, mask, 0.5)
        for n in G:
            G[n] = reference_update(G[n], S[n], c)
        token_logprobs(model, ids, attn)  # discarded grad-enabled forward
        logp = token_logprobs(model, ids, attn)
        assert all(layer.pending == 2 + m for layer in opt.engine.layers)
        with opt.microbatch(logp, mask):
            grpo_loss(logp, mask, adv, 0.5).backward()
        assert all(layer.pending == 1 + m for layer in opt.engine.layers)
    for n, p in trainable(model):
        torch.testing.assert_close(p.grad.reshape(-1).double(), G[n], rtol=1e-10, atol=1e-14)
    opt.step()
    assert all(layer.pending == 0 for layer in opt.engine.layers)


@pytest.mark.parametrize("strategy", ["proma", "none", "intra_proma"])
def test_bf16_parameters_close_to_fp32(strategy):
    """bf16 parameters: grads stay bf16, the algebra runs in fp32; the result is within bf16
    accuracy of the fp32 run (plain accumulation itself differs by ~0.6% here; tolerance 3e-2)."""
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        model = TinyLM(seed=6, dtype=dtype)
        opt = wrap(model, strategy, **INTRA_OPTIONS.get(strategy, {}))
        for ids, attn, mask, adv in make_microbatches(count=3, k=4, seed=6):
            logp = token_logprobs(model, ids, attn)
            with opt.microbatch(logp, mask):
                grpo_loss(logp.float(), mask, adv.float(), 1 / 3).backward()
        assert all(p.grad.dtype == dtype for _, p in trainable(model))
        results.append(torch.cat([p.grad.float().flatten() for _, p in trainable(model)]))
    rel = float((results[0] - results[1]).norm() / results[0].norm())
    assert rel < 3e-2, rel


class SharedLinearLM(TinyLM):
    """Two different Linear modules share one weight (and bias): cross terms by densification."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.fc3 = torch.nn.Linear(self.fc2.in_features, self.fc2.out_features).to(self.fc2.weight.dtype)
        self.fc3.weight = self.fc2.weight

    def hidden(self, x):
        return torch.tanh(self.fc3(super().hidden(x)))


@pytest.mark.parametrize("projector", ["solve", "gram_schmidt"])
def test_weight_shared_by_two_linears_exact(projector):
    model = SharedLinearLM(seed=7)
    opt = wrap(model, projector=projector)
    assert len(opt.engine._shared) == 1
    errors = run_microbatches(model, opt, make_microbatches(count=3, k=4, seed=4), ref={"projector": projector})
    assert max(errors.values()) <= 1e-10


def test_detach_releases_the_batching_buffers_and_keeps_gradients():
    """detach() frees the shared buffers of batched small parameters (and forgets the plan that
    holds them); the gradients already accumulated stay, and wrapping again works."""
    model = TinyLM()
    opt = wrap(model)
    batches = make_microbatches(count=2, k=3, seed=4)
    run_microbatches(model, opt, batches)
    groups = list(opt.engine._groups)
    assert groups and all(g._rows is not None for g in groups)
    before = {n: p.grad.clone() for n, p in trainable(model)}
    opt.detach()
    assert all(g._rows is None for g in groups)
    assert not opt.engine.updates.plan.groups and not opt.engine.sink._batched and not opt.engine.layers
    assert all(torch.equal(p.grad, before[n]) for n, p in trainable(model))
    again = wrap(model)
    assert again.engine._groups


def test_coefficient_transforms_see_a_read_only_context_with_the_mask():
    """transform_microbatch gets the microbatch's k, group ids, step groups and mask, read-only."""
    import dataclasses

    seen = []

    class Peek(gradproj.CoefficientTransform):
        def transform_microbatch(self, coefficients, context):
            seen.append(context)
            with pytest.raises(dataclasses.FrozenInstanceError):
                context.k = 0
            return coefficients

    with registered_strategy("peek", Peek):
        model = TinyLM()
        opt = wrap(model, ["peek", "proma"])
        ids, attn, mask, adv = make_microbatches(count=1, k=3, seed=2)[0]
        logp = token_logprobs(model, ids, attn)
        with opt.microbatch(logp, mask, group_ids=[0, 0, 1]):
            grpo_loss(logp, mask, adv, 1.0).backward()
        (context,) = seen
        assert context.k == 3 and context.group_ids == [0, 0, 1] and context.index == 0
        assert torch.equal(context.mask, mask.bool())


def test_a_strategy_refusing_its_options_is_a_config_error_at_wrap():
    """Strategies are built once, by wrap(): a plugin whose constructor refuses its options raises a
    ConfigError there (building the config validates names and options only)."""

    class Picky(gradproj.Strategy):
        built = 0

        def __init__(self, options):
            Picky.built += 1
            raise ValueError("needs a GPU")

    with registered_strategy("picky", Picky):
        config = gradproj.GradProjConfig(strategy="picky")
        assert Picky.built == 0
        model = TinyLM()
        with pytest.raises(gradproj.ConfigError, match="picky.*needs a GPU"):
            wrap(model, config)
        assert all(p.grad is None for p in model.parameters()) and not any(
            type(m.forward).__name__ == "InstalledForward" for m in model.modules()
        )


@pytest.mark.parametrize("legacy", ["per_layer_transform", "needs_tokens_rule", "accumulate_batch_rule", "not_a_strategy"])
def test_a_strategy_written_for_the_earlier_contract_is_refused(legacy):
    """Flags and hooks of the earlier strategy contract would be ignored -- a per-layer transform
    would silently never run: such a class is a ConfigError naming the fix, before anything is
    installed."""

    class OldTransform(gradproj.CoefficientTransform):
        per_layer = True

        def transform_layer(self, batch):
            return batch.coefficients * 0.0

    class OldTokens(gradproj.Strategy):
        needs_tokens = True

    class OldBatched(gradproj.Strategy):
        def accumulate_batch(self, batch):
            return batch.combine(batch.coefficients)

    class NotAStrategy:
        role = "accumulate"

    classes = {"per_layer_transform": OldTransform, "needs_tokens_rule": OldTokens,
               "accumulate_batch_rule": OldBatched, "not_a_strategy": NotAStrategy}
    with registered_strategy("legacy", classes[legacy]):
        model = TinyLM()
        trained = [p.requires_grad for p in model.parameters()]
        strategy = ["legacy", "proma"] if legacy == "per_layer_transform" else "legacy"
        with pytest.raises(gradproj.ConfigError, match="does not follow gradproj's strategy contract"):
            wrap(model, strategy)
        assert not any("forward" in m.__dict__ for m in model.modules())
        assert [p.requires_grad for p in model.parameters()] == trained
