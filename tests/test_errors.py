"""Bad input -> GradProjError naming the problem; the running gradient is untouched and the
microbatch can be retried."""

import pytest
import torch

import gradproj
from helpers import TinyLM, grpo_loss, make_microbatches, run_microbatches, token_logprobs, trainable


@pytest.fixture
def setup():
    model = TinyLM(seed=2)
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma")
    batches = make_microbatches(count=3, k=4, seed=3)
    run_microbatches(model, opt, batches[:1])  # a running gradient exists
    snapshot = {n: p.grad.clone() for n, p in trainable(model)}
    return model, opt, batches, snapshot


def unchanged(model, snapshot):
    return all(torch.equal(p.grad, snapshot[n]) for n, p in trainable(model))


def retry_is_exact(model, opt, batches):
    """After an error, the remaining microbatches still give the brute-force result."""
    model.zero_grad()
    errors = run_microbatches(model, opt, batches, ref={})
    return max(errors.values()) <= 1e-10


def test_mask_shape(setup):
    model, opt, batches, snap = setup
    ids, attn, mask, adv = batches[1]
    logp = token_logprobs(model, ids, attn)
    with pytest.raises(gradproj.InputError, match="mask has shape"):
        opt.microbatch(logp, mask[:, :-1]).__enter__()
    assert unchanged(model, snap) and opt.engine.current is None


def test_mask_values(setup):
    model, opt, batches, _ = setup
    ids, attn, mask, adv = batches[1]
    logp = token_logprobs(model, ids, attn)
    with pytest.raises(gradproj.InputError, match="other than 0 and 1"):
        opt.microbatch(logp, mask.double() * 0.5).__enter__()
    with pytest.raises(gradproj.InputError, match="bool or 0/1"):
        opt.microbatch(logp, mask.to(torch.complex64)).__enter__()


def test_logp_without_grad(setup):
    model, opt, batches, _ = setup
    ids, attn, mask, adv = batches[1]
    with torch.no_grad():
        logp = token_logprobs(model, ids, attn)
    with pytest.raises(gradproj.InputError, match="does not require grad"):
        opt.microbatch(logp, mask).__enter__()
    with pytest.raises(gradproj.InputError, match="shape \\(sequences, tokens\\)"):
        opt.microbatch(token_logprobs(model, ids, attn)[0], mask[0]).__enter__()


def test_per_token_weights_not_constant(setup):
    model, opt, batches, snap = setup
    ids, attn, mask, adv = batches[1]
    logp = token_logprobs(model, ids, attn)
    ratio = torch.exp(logp - logp.detach() + 0.3 * torch.rand_like(logp))  # off-policy ratio != 1
    clipped = torch.clamp(ratio, 0.8, 1.2)
    with pytest.raises(gradproj.CoefficientError, match=r"row \d+.*PPO clipping"):
        with opt.microbatch(logp, mask):
            (-(torch.minimum(ratio * adv[:, None], clipped * adv[:, None]) * mask).sum()).backward()
    assert unchanged(model, snap)
    assert retry_is_exact(model, opt, batches)


def test_weight_on_masked_tokens(setup):
    model, opt, batches, snap = setup
    ids, attn, mask, adv = batches[1]
    logp = token_logprobs(model, ids, attn)
    with pytest.raises(gradproj.CoefficientError, match="masked-out tokens"):
        with opt.microbatch(logp, mask):
            (-(adv[:, None] * logp).sum()).backward()
    assert unchanged(model, snap)


def test_uncovered_trainable_parameter_at_wrap():
    model = TinyLM()
    model.temperature = torch.nn.Parameter(torch.ones((), dtype=torch.float64))  # no handler covers it
    with pytest.raises(gradproj.CoverageError, match=r"temperature.*exclude"):
        gradproj.wrap(torch.optim.SGD(model.parameters(), lr=0.1), model, "proma")
    assert "forward" not in model.fc1.__dict__  # nothing installed on failure
    opt = gradproj.wrap(torch.optim.SGD(model.parameters(), lr=0.1), model, "proma", exclude=["temp*"])
    assert not model.temperature.requires_grad
    opt.detach()
    assert model.temperature.requires_grad


def test_parameter_unfrozen_after_wrap(setup):
    model, opt, batches, snap = setup
    model.emb.weight.requires_grad_(True)
    ids, attn, mask, adv = batches[1]
    logp = token_logprobs(model, ids, attn)
    with pytest.raises(gradproj.CoverageError, match="emb.weight"):
        opt.microbatch(logp, mask).__enter__()
    model.emb.weight.requires_grad_(False)


def test_nested_microbatch_and_step_inside(setup):
    model, opt, batches, snap = setup
    ids, attn, mask, adv = batches[1]
    logp = token_logprobs(model, ids, attn)
    with pytest.raises(gradproj.ProtocolError, match="nested"):
        with opt.microbatch(logp, mask):
            with opt.microbatch(logp, mask):
                pass
    with pytest.raises(gradproj.ProtocolError, match="step"):
        with opt.microbatch(logp, mask):
            opt.step()
    assert unchanged(model, snap)
    assert retry_is_exact(model, opt, batches)


def test_backward_outside_block_and_block_without_backward(setup):
    model, opt, batches, snap = setup
    ids, attn, mask, adv = batches[1]
    logp = token_logprobs(model, ids, attn)
    with pytest.raises(gradproj.ProtocolError, match="outside an opt.microbatch"):
        grpo_loss(logp, mask, adv, 1.0).backward()
    logp = token_logprobs(model, ids, attn)
    with pytest.raises(gradproj.ProtocolError, match="never reached logp"):
        with opt.microbatch(logp, mask):
            pass
    assert unchanged(model, snap)


def test_non_finite_microbatch_is_dropped(setup):
    model, opt, batches, snap = setup
    ids, attn, mask, adv = batches[1]
    logp = token_logprobs(model, ids, attn)
    with opt.microbatch(logp, mask):
        grpo_loss(logp, mask, adv * float("nan"), 1.0).backward()
    assert unchanged(model, snap)
    logp = token_logprobs(model, ids, attn)
    with opt.microbatch(logp, mask):
        (grpo_loss(logp, mask, adv, 1.0) + 0.0 * logp.sum() * float("inf")).backward()  # inf * 0 = nan
    assert unchanged(model, snap)
    assert opt.metrics()["gradproj/dropped_microbatches"] == 2
    opt.step()
    assert all(torch.isfinite(p).all() for _, p in trainable(model))


def test_config_errors_list_valid_names():
    model = TinyLM()
    sgd = torch.optim.SGD([p for _, p in trainable(model)], lr=0.1)
    with pytest.raises(gradproj.ConfigError, match="valid strategies are: .*proma"):
        gradproj.wrap(sgd, model, "promo")
    with pytest.raises(gradproj.ConfigError, match="valid options are: .*damping"):
        gradproj.wrap(sgd, model, "proma", dampening=1.0)
    with pytest.raises(gradproj.ConfigError, match="damping"):
        gradproj.wrap(sgd, model, "proma", damping=-1.0)
    with pytest.raises(gradproj.ConfigError, match="cannot be stacked"):
        gradproj.wrap(sgd, model, ["none", "proma"])
    assert "forward" not in model.fc1.__dict__


def test_optimizer_and_model_must_match():
    model = TinyLM()
    other = TinyLM()
    with pytest.raises(gradproj.ConfigError, match="not part of the model"):
        gradproj.wrap(torch.optim.SGD([p for _, p in trainable(other)], lr=0.1), model, "proma")
    with pytest.raises(gradproj.ConfigError, match="not in the optimizer"):
        gradproj.wrap(torch.optim.SGD([model.fc1.weight], lr=0.1), model, "proma")
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma")
    with pytest.raises(gradproj.ProtocolError, match="already wrapped"):
        gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma")
    opt.detach()


def test_errors_are_builtin_subclasses():
    assert issubclass(gradproj.InputError, ValueError)
    assert issubclass(gradproj.ProtocolError, RuntimeError)
    assert issubclass(gradproj.CoefficientError, gradproj.GradProjError)


def test_non_finite_first_microbatch_leaves_nan_markers():
    """In the first microbatch of a step (all grads None) layers return ordinary gradients; a NaN
    there is dropped. With every microbatch so far dropped, .grad holds NaN (as plain autograd
    would: a GradScaler skips the step); the next microbatch starts from empty gradients again."""
    model = TinyLM(seed=5)
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma")
    ids, attn, mask, adv = make_microbatches(count=1, k=3, seed=1)[0]
    logp = token_logprobs(model, ids, attn)
    with opt.microbatch(logp, mask):
        (grpo_loss(logp, mask, adv, 1.0) + 0.0 * logp.sum() * float("inf")).backward()
    assert all(p.grad is not None and bool(p.grad.isnan().all()) for _, p in trainable(model))
    assert opt.engine.running_metrics()["gradproj/dropped_microbatches"] == 1
    assert retry_is_exact(model, opt, make_microbatches(count=2, k=3, seed=2))
