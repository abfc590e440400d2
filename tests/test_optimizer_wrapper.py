"""GradProjOptimizer delegates like a real torch optimizer: every optimizer, schedulers,
clipping, zero_grad semantics, state_dict round trips and exact resume."""

import io

import pytest
import torch
import torch_optimizer

import gradproj
from helpers import TinyLM, grpo_loss, linear_only, make_microbatches, run_microbatches, tiny_hf, token_logprobs, trainable

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01),
    "adafactor": lambda ps: torch.optim.Adafactor(ps, lr=1e-2),
    "lamb": lambda ps: torch_optimizer.Lamb(ps, lr=1e-2),
    "lookahead": lambda ps: torch_optimizer.Lookahead(torch.optim.AdamW(ps, lr=1e-2), k=2, alpha=0.5),
}


def plain_step(model, opt, microbatches):
    scale = 1.0 / len(microbatches)
    for ids, attn, mask, adv in microbatches:
        logp = token_logprobs(model, ids, attn)
        grpo_loss(logp, mask, adv, scale).backward()
    opt.step()
    opt.zero_grad()


def params_of(model):
    return [p.detach().clone() for _, p in trainable(model)]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_none_equals_unwrapped_optimizer(name):
    """strategy='none' gives bit-identical parameters to the unwrapped optimizer."""
    runs = []
    for wrapped in (False, True):
        model = TinyLM(seed=3, dtype=torch.float32)
        inner = OPTIMIZERS[name]([p for _, p in trainable(model)])
        opt = gradproj.wrap(inner, model, "none") if wrapped else inner
        for step in range(3):
            batches = make_microbatches(count=2, k=3, seed=step)
            if wrapped:
                run_microbatches(model, opt, batches)
                opt.step()
                opt.zero_grad()
            else:
                plain_step(model, opt, batches)
        runs.append(params_of(model))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_proma_with_every_optimizer_matches_manual_step(name):
    """The inner optimizer steps on exactly the PROMA gradient (checked against a twin model whose
    .grad is set from the brute-force reference)."""
    model = TinyLM(seed=5)
    twin = TinyLM(seed=5)
    opt = gradproj.wrap(OPTIMIZERS[name]([p for _, p in trainable(model)]), model, "proma")
    twin_opt = OPTIMIZERS[name]([p for _, p in trainable(twin)])
    for step in range(2):
        batches = make_microbatches(count=3, k=4, seed=10 + step)
        errors = run_microbatches(model, opt, batches, ref={})
        assert max(errors.values()) <= 1e-10
        for (_, p), (_, q) in zip(trainable(model), trainable(twin)):
            q.grad = p.grad.clone()
        opt.step()
        twin_opt.step()
        opt.zero_grad()
        twin_opt.zero_grad()
        for (_, p), (_, q) in zip(trainable(model), trainable(twin)):
            assert torch.equal(p, q)


def test_lr_scheduler_reaches_inner_optimizer():
    model = TinyLM()
    inner = torch.optim.AdamW([p for _, p in trainable(model)], lr=1.0)
    opt = gradproj.wrap(inner, model, "proma")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    for step in range(3):
        run_microbatches(model, opt, make_microbatches(count=2, k=3, seed=step))
        opt.step()
        sched.step()
        opt.zero_grad()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.125)
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state and opt.defaults is inner.defaults


def test_model_zero_grad_starts_a_new_step_and_clipping_sees_running_gradient():
    model = TinyLM()
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma")
    batches = make_microbatches(count=2, k=3, seed=1)
    run_microbatches(model, opt, batches)
    norm = torch.nn.utils.clip_grad_norm_([p for _, p in trainable(model)], max_norm=1e9)
    expected = torch.sqrt(sum(p.grad.pow(2).sum() for _, p in trainable(model)))
    assert float(norm) == pytest.approx(float(expected), rel=1e-12)
    model.zero_grad()
    assert all(p.grad is None for _, p in trainable(model))
    # After model.zero_grad(), the next step starts from G = 0: equals a fresh brute force.
    errors = run_microbatches(model, opt, batches, ref={})
    assert max(errors.values()) <= 1e-10


def _state_bytes(opt):
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return buf


def test_state_dict_is_weights_only_and_resume_is_exact():
    def make():
        model = linear_only(tiny_hf("qwen2", seed=9))
        inner = torch.optim.AdamW([p for _, p in trainable(model)], lr=1e-2)
        return model, gradproj.wrap(inner, model, "proma", relative_bound=0.5)

    def train(model, opt, steps):
        for step in steps:
            run_microbatches(model, opt, make_microbatches(count=2, k=3, seed=step))
            opt.step()
            opt.zero_grad()

    model_a, opt_a = make()
    train(model_a, opt_a, range(4))

    model_b, opt_b = make()
    train(model_b, opt_b, range(2))
    state = torch.load(_state_bytes(opt_b), weights_only=True)
    assert state["gradproj"]["version"] == 2 and state["gradproj"]["steps"] == 2
    assert state["gradproj"]["config"]["relative_bound"] == 0.5  # options are saved
    weights = {k: v.clone() for k, v in model_b.state_dict().items()}
    opt_b.detach()

    model_c, opt_c = make()
    model_c.load_state_dict(weights)
    opt_c.load_state_dict(state)
    assert opt_c.engine.steps == 2
    train(model_c, opt_c, range(2, 4))
    for (_, p), (_, q) in zip(trainable(model_a), trainable(model_c)):
        assert torch.equal(p, q)


def test_load_state_dict_refuses_other_strategy():
    model = TinyLM()
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma")
    state = opt.state_dict()
    opt.detach()
    other = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "none")
    with pytest.raises(gradproj.CheckpointError, match="proma"):
        other.load_state_dict(state)


def test_step_hooks_and_isinstance():
    model = TinyLM()
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma")
    assert isinstance(opt, torch.optim.Optimizer)
    calls = []
    opt.register_step_post_hook(lambda o, a, k: calls.append(1))
    run_microbatches(model, opt, make_microbatches(count=1, k=2))
    opt.step()
    assert calls == [1]
    assert "proma" in repr(opt)


def test_detach_restores_plain_modules():
    model = TinyLM()
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma")
    assert "forward" in model.fc1.__dict__
    inner = opt.detach()
    assert "forward" not in model.fc1.__dict__ and isinstance(inner, torch.optim.SGD)
    gradproj.wrap(inner, model, "proma").detach()  # can wrap again after detach


def test_grad_scaler_matches_unscaled_run():
    """torch.amp.GradScaler: scaled losses give scaled coefficients; after unscale_ the PROMA
    gradient equals the unscaled run's (PROMA is equivariant to a common scale)."""
    batches = make_microbatches(count=3, k=4, seed=12)
    grads = []
    for use_scaler in (False, True):
        model = TinyLM(seed=8, dtype=torch.float32)
        opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma", relative_bound=0.5)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=use_scaler)
        for ids, attn, mask, adv in batches:
            logp = token_logprobs(model, ids, attn)
            with opt.microbatch(logp, mask):
                scaler.scale(grpo_loss(logp, mask, adv.float(), 1 / 3)).backward()
        scaler.unscale_(opt)
        grads.append(torch.cat([p.grad.flatten() for _, p in trainable(model)]))
        scaler.step(opt)
        scaler.update()
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("nonfinite", ["drop", "propagate"])
def test_grad_scaler_sees_overflow_only_when_propagated(nonfinite):
    """fp16-style loss scaling: an overflowing microbatch is dropped (the step goes on with the
    others, the scale stays) or propagated (NaN gradients: GradScaler skips the step, halves the scale)."""
    batches = make_microbatches(count=3, k=4, seed=13)
    model = TinyLM(seed=9, dtype=torch.float32)
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma", nonfinite=nonfinite)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = [p.detach().clone() for _, p in trainable(model)]
    for index, (ids, attn, mask, adv) in enumerate(batches):
        logp = token_logprobs(model, ids, attn)
        if index == 1:
            adv = adv * 1e38  # the scaled loss overflows float32 in this microbatch only
        with opt.microbatch(logp, mask):
            scaler.scale(grpo_loss(logp, mask, adv.float(), 1 / 3)).backward()
    # propagated, the NaN running gradient makes the next microbatch non-finite too
    dropped = opt.engine.running_metrics()["gradproj/dropped_microbatches"]
    assert dropped == (1.0 if nonfinite == "drop" else 2.0)
    scaler.step(opt)
    scaler.update()
    moved = any(not torch.equal(a, p) for a, (_, p) in zip(before, trainable(model)))
    if nonfinite == "drop":
        assert moved and scaler.get_scale() == 2.0**10
    else:
        assert not moved and scaler.get_scale() == 2.0**9
