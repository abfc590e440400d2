"""``nonfinite="propagate"``: updates go straight into ``.grad`` (no staged copy of the gradient).

The gradients must equal the staged (``"drop"``) path's and the brute force; nothing may be staged;
a non-finite value that appears only in a lower layer -- after upper layers were already written --
must still leave every covered gradient NaN, so a GradScaler skips the step.
"""

import pytest
import torch

import gradproj
from helpers import (
    grpo_loss, linear_only, make_microbatches, poisoned_output_grads, run_microbatches, tiny_hf, token_logprobs,
    trainable, with_lora,
)


def _model(params: str):
    model = tiny_hf("qwen2", seed=3)
    return with_lora(model) if params == "lora" else linear_only(model)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in trainable(model) if p.grad is not None}


@pytest.mark.parametrize("params", ["lora", "linear"])
@pytest.mark.parametrize("strategy", ["proma", "intra_proma", "isopo", "none"])
def test_direct_writes_equal_staged_updates(params, strategy):
    batches = make_microbatches(count=3, k=4, seed=21)
    grads = {}
    for mode in ("drop", "propagate"):
        model = _model(params)
        opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, strategy, nonfinite=mode)
        run_microbatches(model, opt, batches)
        grads[mode] = _grads(model)
    assert grads["drop"].keys() == grads["propagate"].keys() and grads["drop"]
    for name, staged in grads["drop"].items():
        torch.testing.assert_close(grads["propagate"][name], staged, rtol=1e-12, atol=1e-15, msg=name)


@pytest.mark.parametrize("params", ["lora", "linear"])
def test_direct_writes_equal_the_brute_force(params):
    model = _model(params)
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma", nonfinite="propagate")
    errors = run_microbatches(model, opt, make_microbatches(count=3, k=4, seed=5), ref={})
    assert max(errors.values()) <= 1e-10, errors


@pytest.mark.parametrize("strategy", ["proma", "intra_proma"])
def test_nothing_is_staged_when_writing_directly(monkeypatch, strategy):
    model = _model("linear")
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, strategy, nonfinite="propagate")
    engine, staged = opt.engine, []
    finish = engine._finish_microbatch
    monkeypatch.setattr(engine, "_finish_microbatch", lambda mb: (staged.append(len(mb.staged)), finish(mb)))
    run_microbatches(model, opt, make_microbatches(count=3, k=4, seed=2))
    assert staged == [0, 0, 0] and not engine.sink._buffers


@pytest.mark.parametrize("strategy", ["proma", "intra_proma"])
@pytest.mark.parametrize("mode", ["drop", "propagate"])
def test_nonfinite_in_a_lower_layer(monkeypatch, mode, strategy):
    """NaN enters the output gradient of layer 0's o_proj: the layers above it were processed
    (and, writing directly, already added to ``.grad``) before it appeared. intra_proma defers its
    projections; a zero budget makes the engine write each deferred update as soon as it is finished."""
    import gradproj.capture.layer_updates as updates_module

    monkeypatch.setattr(updates_module, "DEFERRED_WRITES_MAX_BYTES", 0)
    model = _model("linear")
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, strategy, nonfinite=mode)
    first, second = make_microbatches(count=2, k=4, seed=8)
    run_microbatches(model, opt, [first], scale=0.5)
    before = _grads(model)
    ids, attn, mask, adv = second
    with poisoned_output_grads(model.model.layers[0].self_attn.o_proj, lambda g: g * float("nan")):
        logp = token_logprobs(model, ids, attn)
        with opt.microbatch(logp, mask):
            grpo_loss(logp, mask, adv, 0.5).backward()
    after = _grads(model)
    assert opt.engine.running_metrics()["gradproj/dropped_microbatches"] == 1.0
    upper = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(before[upper], torch.zeros_like(before[upper]))
    if mode == "drop":
        assert all(torch.equal(after[n], before[n]) for n in before)
    else:
        assert all(torch.isnan(g).all() for g in after.values())
