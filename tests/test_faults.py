"""Fault injection: every way a real pipeline can break the single-pass contract ends in the exact
gradient or a GradProjError -- and either way ``.grad`` and the optimizer state are exactly what
they should be afterwards (the state before a refused or failed microbatch; an unfaulted twin run's
state after retrying). The verl settings are in tests/verl/test_faults_verl.py.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

import gradproj
from gradproj.integrations.torch.grpo import policy_loss
from helpers import (
    linear_only,
    tiny_hf,
    TinyLM,
    float64_exact_norms,
    grpo_coefficients,
    grpo_loss,
    make_microbatches,
    reference_update,
    rel_err,
    sequence_gradients,
    tiny_full,
    token_logprobs,
    trainable,
)

# -- helpers -------------------------------------------------------------------------------------


def wrapped(strategy="proma", seed=2, reuse=False, **options):
    """TinyLM (float64) with AdamW wrapped by gradproj."""
    model = TinyLM(seed=seed, reuse=reuse)
    inner = torch.optim.AdamW([p for _, p in trainable(model)], lr=1e-2)
    return model, gradproj.wrap(inner, model, strategy, **options)


def grads(model):
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in trainable(model)}


def params(model):
    return {n: p.detach().clone() for n, p in trainable(model)}


def same(a: dict, b: dict) -> bool:
    """Exactly equal, ``None`` included."""
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if (x is None) != (y is None) or (x is not None and not torch.equal(x, y)):
            return False
    return True


def optimizer_state(opt):
    """A deep copy of the inner optimizer's state (tensors cloned)."""
    return copy.deepcopy(opt.optimizer.state_dict())


def same_optimizer_state(a, b) -> bool:
    if a["param_groups"] != b["param_groups"] or a["state"].keys() != b["state"].keys():
        return False
    for key, entry in a["state"].items():
        other = b["state"][key]
        if entry.keys() != other.keys():
            return False
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                if not torch.equal(value, other[name]):
                    return False
            elif value != other[name]:
                return False
    return True


def block(model, opt, batch, scale=0.5):
    """One ordinary microbatch."""
    ids, attn, mask, adv = batch
    logp = token_logprobs(model, ids, attn)
    with opt.microbatch(logp, mask):
        grpo_loss(logp, mask, adv, scale).backward()


def full_step(model, opt, batches):
    for batch in batches:
        block(model, opt, batch)
    opt.step()
    opt.zero_grad()


BATCHES = make_microbatches(count=4, k=4, seed=21)


@pytest.fixture
def trained():
    """A model and optimizer after one full step (the inner AdamW has state)."""
    model, opt = wrapped("proma")
    full_step(model, opt, BATCHES[:2])
    return model, opt


def twin(strategy, history, batches, **options):
    """An unfaulted run: ``history`` full steps, then ``batches`` as microbatches; (model, opt)."""
    model, opt = wrapped(strategy, **options)
    for step in history:
        full_step(model, opt, step)
    for batch in batches:
        block(model, opt, batch)
    return model, opt


# -- 1. interrupted microbatches: every failure, position, strategy and nonfinite mode ------------


class _Raise:
    """A hook raising ``error`` once the backward reaches a module's output (after the layers above it)."""

    def __init__(self, error):
        self.error = error

    def __call__(self, grad):
        raise self.error


def _mid_backward(model, error):
    def on_forward(_module, _inputs, out):
        if out.requires_grad:
            out.register_hook(_Raise(error))

    return model.fc1.register_forward_hook(on_forward)


def _after_backward(error):
    """A failure of the user's own code after ``backward()``, inside the block."""

    def fail(model, opt, batch):
        ids, attn, mask, adv = batch
        logp = token_logprobs(model, ids, attn)
        with opt.microbatch(logp, mask):
            grpo_loss(logp, mask, adv, 0.5).backward()
            raise error

    return fail


def _in_backward(error):
    """A failure raised by a hook in the middle of the backward (after the layers above fc1)."""

    def fail(model, opt, batch):
        ids, attn, mask, adv = batch
        handle = _mid_backward(model, error)
        try:
            logp = token_logprobs(model, ids, attn)
        finally:
            handle.remove()
        with opt.microbatch(logp, mask):
            grpo_loss(logp, mask, adv, 0.5).backward()

    return fail


def fail_second_backward(model, opt, batch):
    ids, attn, mask, adv = batch
    logp = token_logprobs(model, ids, attn)
    with opt.microbatch(logp, mask):
        loss = grpo_loss(logp, mask, adv, 0.5)
        loss.backward(retain_graph=True)
        loss.backward()


def fail_caught_then_closed(model, opt, batch):
    ids, attn, mask, adv = batch
    logp = token_logprobs(model, ids, attn)
    with opt.microbatch(logp, mask):
        loss = grpo_loss(logp, mask, adv, 0.5)
        loss.backward(retain_graph=True)
        try:
            loss.backward()
        except gradproj.ProtocolError:
            pass  # swallowed: the block must still not count a half-done microbatch


FAILURES = {
    "exception-after-backward": (_after_backward(RuntimeError("the user's own code failed after backward()")), RuntimeError),
    "interrupt-after-backward": (_after_backward(KeyboardInterrupt()), KeyboardInterrupt),
    "error-mid-backward": (_in_backward(RuntimeError("a hook failed in the middle of the backward")), RuntimeError),
    "interrupt-mid-backward": (_in_backward(KeyboardInterrupt()), KeyboardInterrupt),
    "second-backward": (fail_second_backward, gradproj.ProtocolError),
    "caught-then-closed": (fail_caught_then_closed, gradproj.ProtocolError),
}
STRATEGIES = {"none": ["none"], "proma": ["proma"], "intra_proma": ["intra_proma"], "isopo+proma": ["isopo", "proma"]}


@pytest.mark.parametrize("nonfinite", ["drop", "propagate"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("position", ["first", "later"])
@pytest.mark.parametrize("failure", list(FAILURES))
def test_failed_microbatch_leaves_state_as_before_or_refuses_the_step(failure, position, strategy, nonfinite):
    """After the failure, .grad and the optimizer state are as before the block -- or, where gradproj
    cannot undo what autograd or a direct write already added (strategy 'none', nonfinite='propagate',
    after earlier microbatches), the step is refused until zero_grad(). Either way, going on gives
    exactly the unfaulted run."""
    fail, expected = FAILURES[failure]
    rule = STRATEGIES[strategy]
    history = [BATCHES[:2]]
    done = [] if position == "first" else [BATCHES[2]]
    model, opt = twin(rule, history, done, nonfinite=nonfinite)
    before_grads, before_state = grads(model), optimizer_state(opt)
    with pytest.raises(expected):
        fail(model, opt, BATCHES[3])
    assert opt.engine.current is None
    assert same_optimizer_state(optimizer_state(opt), before_state)
    undoable = (rule != ["none"] and nonfinite == "drop") or position == "first"
    if undoable:
        assert same(grads(model), before_grads)
        block(model, opt, BATCHES[3])  # the retry
        expect_model, expect_opt = twin(rule, history, done + [BATCHES[3]], nonfinite=nonfinite)
    else:
        with pytest.raises(gradproj.ProtocolError, match="zero_grad"):
            block(model, opt, BATCHES[3])
        with pytest.raises(gradproj.ProtocolError, match="zero_grad"):
            opt.step()
        assert same_optimizer_state(optimizer_state(opt), before_state)
        opt.zero_grad()
        for batch in done + [BATCHES[3]]:
            block(model, opt, batch)
        expect_model, expect_opt = twin(rule, history, done + [BATCHES[3]], nonfinite=nonfinite)
    assert same(grads(model), grads(expect_model))
    opt.step()
    expect_opt.step()
    assert same(params(model), params(expect_model))


# -- 2. loss terms that reach the model without passing through logp ------------------------------


def _logits_and_logp(model, batch):
    ids, attn, mask, adv = batch
    logits = model(ids, attn).logits[:, :-1]
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return logits, logp


def term_entropy(model, batch):
    logits, logp = _logits_and_logp(model, batch)
    entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    return logp, -0.01 * (entropy * batch[2]).sum()


def term_z_loss(model, batch):
    logits, logp = _logits_and_logp(model, batch)
    return logp, 1e-4 * (torch.logsumexp(logits, -1) ** 2 * batch[2]).sum()


def term_zero_weighted_entropy(model, batch):
    logits, logp = _logits_and_logp(model, batch)
    entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    return logp, 0.0 * entropy.sum()  # still part of the graph: refused by structure


def term_hidden_penalty(model, batch):
    seen = []
    handle = model.fc2.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        _, logp = _logits_and_logp(model, batch)
    finally:
        handle.remove()
    return logp, 1e-3 * seen[0].pow(2).sum()


def term_weight_penalty(model, batch):
    _, logp = _logits_and_logp(model, batch)
    return logp, 1e-3 * model.head.weight.pow(2).sum()


def term_second_forward(model, batch):
    _, logp = _logits_and_logp(model, batch)
    _, other = _logits_and_logp(model, batch)  # the loss uses log-probs of another forward too
    return logp, 1e-2 * (other * batch[2]).sum()


TERMS = {
    "entropy-bonus": term_entropy,
    "z-loss": term_z_loss,
    "zero-weighted-entropy": term_zero_weighted_entropy,
    "hidden-state-penalty": term_hidden_penalty,
    "weight-penalty": term_weight_penalty,
    "second-forward": term_second_forward,
}


@pytest.mark.parametrize("strategy", ["proma", "intra_proma"])
@pytest.mark.parametrize("position", ["first", "later"])
@pytest.mark.parametrize("term", list(TERMS))
def test_loss_terms_outside_the_logprobs_are_refused_before_the_backward(term, position, strategy):
    model, opt = twin([strategy], [], [] if position == "first" else [BATCHES[0]])
    before = grads(model)
    batch = BATCHES[1]
    logp, extra = TERMS[term](model, batch)
    with pytest.raises(gradproj.LossTermError, match="without passing through the log-probs"):
        with opt.microbatch(logp, batch[2]):
            (grpo_loss(logp, batch[2], batch[3], 0.5) + extra).backward()
    assert same(grads(model), before)
    block(model, opt, batch)
    expect, _ = twin([strategy], [], ([] if position == "first" else [BATCHES[0]]) + [batch])
    assert same(grads(model), grads(expect))


def test_loss_terms_are_fine_with_plain_accumulation():
    """strategy='none' accumulates ordinary gradients: any loss is exact, no check."""
    model, opt = wrapped("none")
    plain = TinyLM(seed=2)
    for m, net in enumerate((model, plain)):
        logp, extra = term_entropy(net, BATCHES[0])
        loss = grpo_loss(logp, BATCHES[0][2], BATCHES[0][3], 0.5) + extra
        if m == 0:
            with opt.microbatch(logp, BATCHES[0][2]):
                loss.backward()
        else:
            loss.backward()
    assert same(grads(model), grads(plain))


def test_term_through_frozen_layers_only_is_not_an_error():
    """A term that reaches only frozen modules (the embedding) changes no covered gradient: accepted."""
    model, opt = wrapped("proma")
    ids, attn, mask, adv = BATCHES[0]
    logp = token_logprobs(model, ids, attn)
    frozen = model.emb(ids)  # frozen embedding
    with opt.microbatch(logp, mask):
        (grpo_loss(logp, mask, adv, 0.5) + 0.0 * frozen.sum()).backward()
    expect, _ = twin(["proma"], [], [BATCHES[0]])
    assert same(grads(model), grads(expect))


def test_autograd_grad_of_another_term_inside_the_block_is_refused():
    model, opt = twin(["proma"], [], [BATCHES[0]])
    before = grads(model)
    ids, attn, mask, adv = BATCHES[1]
    logits, logp = _logits_and_logp(model, BATCHES[1])
    with pytest.raises(gradproj.LossTermError):
        with opt.microbatch(logp, mask):
            torch.autograd.grad(logits.sum(), model.head.weight, retain_graph=True)
    assert same(grads(model), before)


def test_aux_term_with_its_own_backward_after_the_main_one_is_refused():
    model, opt = twin(["proma"], [], [BATCHES[0]])
    before = grads(model)
    batch = BATCHES[1]
    logp, extra = term_z_loss(model, batch)
    with pytest.raises(gradproj.GradProjError):
        with opt.microbatch(logp, batch[2]):
            grpo_loss(logp, batch[2], batch[3], 0.5).backward(retain_graph=True)
            extra.backward()
    assert same(grads(model), before)


# -- 3. forward all microbatches, then run their blocks -------------------------------------------


def _forward_all_then_blocks(model, opt, batches, scale):
    logps = [token_logprobs(model, ids, attn) for ids, attn, _, _ in batches]
    for logp, (_, _, mask, adv) in zip(logps, batches):
        with opt.microbatch(logp, mask):
            grpo_loss(logp, mask, adv, scale).backward()


def _brute_force(model, opt, batches, scale, **ref):
    G = {n: None for n, _ in trainable(model)}
    for ids, attn, mask, adv in batches:
        with opt.paused():
            S = sequence_gradients(model, token_logprobs(model, ids, attn), mask)
        c = grpo_coefficients(adv, mask, scale)
        for n in G:
            G[n] = reference_update(G[n], S[n], c, **ref)
    return G


@pytest.mark.parametrize(
    "setup",
    ["reused-module", "tied-qwen2", "tied-llama", "tied-checkpointing", "tied-reentrant-checkpointing"],
)
def test_forward_all_then_backward_is_exact(setup):
    """Log-probs of every microbatch first, then the blocks: with a module used twice per forward or a
    tied embedding <-> lm_head, each block still finishes each layer with all of its uses."""
    batches = make_microbatches(count=3, k=3, seed=31)
    with float64_exact_norms():
        if setup == "reused-module":
            model = TinyLM(seed=4, reuse=True)
        else:
            model = tiny_full("llama" if setup == "tied-llama" else "qwen2", seed=5, train_embeddings=True, tie=True)
        opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma")
        reference = _brute_force(model, opt, batches, 1 / 3)  # (autograd.grad: before reentrant checkpointing)
        if "checkpointing" in setup:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": "reentrant" in setup})
            model.train()
        _forward_all_then_blocks(model, opt, batches, 1 / 3)
        errors = [rel_err(p.grad.reshape(-1).double(), reference[n]) for n, p in trainable(model)]
    assert max(errors) <= 1e-10
    opt.step()
    assert all(layer.pending == 0 for layer in opt.engine.layers)


def test_forward_all_then_backward_intra_proma_equals_interleaved():
    batches = make_microbatches(count=3, k=3, seed=32)
    results = []
    for forward_all in (False, True):
        model, opt = wrapped("intra_proma", reuse=True)
        if forward_all:
            _forward_all_then_blocks(model, opt, batches, 0.5)
        else:
            for batch in batches:
                block(model, opt, batch)
        results.append(torch.cat([p.grad.flatten() for _, p in trainable(model)]))
    assert rel_err(results[1], results[0]) <= 1e-12


# -- 4. the model changed after wrap() ------------------------------------------------------------


def test_parameter_replaced_after_wrap_is_refused_at_the_forward(trained):
    model, opt = trained
    block(model, opt, BATCHES[0])
    before, state = grads(model), optimizer_state(opt)
    model.fc1.weight = nn.Parameter(model.fc1.weight.detach().clone())
    with pytest.raises(gradproj.CoverageError, match="fc1.weight was replaced after wrap"):
        token_logprobs(model, *BATCHES[1][:2])
    assert same({n: g for n, g in grads(model).items() if n != "fc1.weight"}, {n: g for n, g in before.items() if n != "fc1.weight"})
    assert same_optimizer_state(optimizer_state(opt), state)


def test_replaced_parameter_then_rewrap_is_exact():
    model, opt = wrapped("proma")
    model.fc2.weight = nn.Parameter(model.fc2.weight.detach().clone() * 1.01)
    opt.detach()
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma")
    reference = _brute_force(model, opt, BATCHES[:3], 0.5)
    for batch in BATCHES[:3]:
        block(model, opt, batch)
    assert max(rel_err(p.grad.reshape(-1).double(), reference[n]) for n, p in trainable(model)) <= 1e-10


def test_new_layer_given_to_the_inner_optimizer_is_refused(trained):
    model, opt = trained
    block(model, opt, BATCHES[0])
    before = grads(model)
    model.extra = nn.Linear(3, 3).double()
    opt.optimizer.add_param_group({"params": list(model.extra.parameters())})
    with pytest.raises(gradproj.CoverageError, match="does not cover"):
        block(model, opt, BATCHES[1])
    assert same(grads(model), {**before, "extra.weight": None, "extra.bias": None})


def test_parameter_swapped_into_a_param_group_is_refused(trained):
    model, opt = trained
    stranger = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt.param_groups[0]["params"].append(stranger)
    with pytest.raises(gradproj.CoverageError, match="does not cover"):
        block(model, opt, BATCHES[0])
    assert all(p.grad is None for _, p in trainable(model))


def test_wrapper_add_param_group_checks_coverage(trained):
    model, opt = trained
    with pytest.raises(gradproj.CoverageError, match="not covered"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, dtype=torch.float64))]})
    assert len(opt.param_groups) == 1


def test_excluded_parameter_unfrozen_after_wrap_is_refused():
    model = TinyLM(seed=3)
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma", exclude=["head.*"])
    model.head.weight.requires_grad_(True)
    with pytest.raises(gradproj.CoverageError, match="head.weight"):
        block(model, opt, BATCHES[0])
    assert all(p.grad is None for _, p in trainable(model))


def test_deepcopy_of_a_wrapped_model_uses_its_own_weights():
    model, opt = wrapped("proma")
    ids, attn = BATCHES[0][:2]
    original = model(ids, attn).logits.detach()
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(1.5)
    assert torch.equal(model(ids, attn).logits, original)
    moved = clone(ids, attn).logits
    plain = TinyLM(seed=2)
    plain.load_state_dict(clone.state_dict())
    assert torch.equal(moved, plain(ids, attn).logits)
    # a grad-enabled forward of the copy inside the original's block is not captured by it
    for batch in BATCHES[:2]:
        ids, attn, mask, adv = batch
        logp = token_logprobs(model, ids, attn)
        with opt.microbatch(logp, mask):
            clone(ids, attn).logits.sum().backward()  # the copy's own gradients, ordinary
            grpo_loss(logp, mask, adv, 0.5).backward()
    expect, _ = twin(["proma"], [], BATCHES[:2])
    assert same(grads(model), grads(expect))
    assert all(p.grad is not None for p in clone.parameters() if p.requires_grad)


def test_deepcopy_after_detach_and_wrapping_the_copy():
    model, opt = wrapped("proma")
    clone = copy.deepcopy(model)
    opt.detach()
    clone_opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(clone)], lr=0.1), clone, "proma")
    assert len(clone_opt.engine.layers) == 3
    reference = _brute_force(clone, clone_opt, BATCHES[:2], 0.5)
    for batch in BATCHES[:2]:
        block(clone, clone_opt, batch)
    assert max(rel_err(p.grad.reshape(-1).double(), reference[n]) for n, p in trainable(clone)) <= 1e-10
    assert all(p.grad is None for p in model.parameters())


def test_torch_save_of_a_wrapped_model_loads_as_a_plain_model():
    model, opt = wrapped("proma")
    ids, attn = BATCHES[0][:2]
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "backward hook ... will not be serialized"
        torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded(ids, attn).logits, model(ids, attn).logits)
    loaded_opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(loaded)], lr=0.1), loaded, "proma")
    assert len(loaded_opt.engine.layers) == 3
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(opt)


def test_wrapping_twice_is_refused_and_changes_nothing():
    model, opt = wrapped("proma")
    with pytest.raises(gradproj.ProtocolError, match="already wrapped"):
        gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma")
    full_step(model, opt, BATCHES[:2])


class _SequenceFirst(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.inner = module
        self.head = nn.Linear(8, 8)


@pytest.mark.parametrize(
    "module",
    [
        lambda: nn.TransformerEncoderLayer(8, 2, 16, batch_first=False),
        lambda: nn.MultiheadAttention(8, 2),
        lambda: nn.GRU(8, 8),
    ],
    ids=["transformer-layer", "multihead-attention", "gru"],
)
def test_sequence_first_modules_are_refused_at_wrap(module):
    model = _SequenceFirst(module())
    for p in model.inner.parameters():
        p.requires_grad_(False)
    with pytest.raises(gradproj.InputError, match="batch_first=True"):
        gradproj.wrap(torch.optim.SGD(model.head.parameters(), lr=0.1), model, "proma")
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(p.requires_grad for p in model.head.parameters())


class _Gathered(nn.Module):
    """A head applied to gathered tokens (an MoE expert's input): exactly k rows by accident."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(40, 8)
        self.emb.weight.requires_grad_(False)
        self.expert = nn.Linear(8, 8)
        self.head = nn.Linear(8, 40)

    def forward(self, ids):
        x = self.emb(ids)  # (k, T, d)
        flat = x.reshape(-1, x.shape[-1])
        picked = flat[: ids.shape[0]]  # k of the k*T tokens routed to this expert
        routed = flat.index_add(0, torch.arange(ids.shape[0]), self.expert(picked))
        return self.head(routed.view_as(x))


def test_gathered_tokens_with_k_rows_are_refused():
    model = _Gathered().double()
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma")
    ids, _, mask, adv = BATCHES[0]
    for _ in range(2):  # the second microbatch is the projected one
        logp = torch.log_softmax(model(ids)[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        before = grads(model)
        try:
            with opt.microbatch(logp, mask):
                grpo_loss(logp, mask, adv, 0.5).backward()
        except gradproj.InputError as err:
            assert "one row per token" in str(err)
            assert same(grads(model), before)
            return
    pytest.fail("gathered tokens were taken for sequences")


# -- 5. API misuse ---------------------------------------------------------------------------------


def _open_then(action):
    def run(model, opt, batch):
        ids, attn, mask, adv = batch
        logp = token_logprobs(model, ids, attn)
        with opt.microbatch(logp, mask):
            action(model, opt, batch, logp)

    return run


MISUSE = {
    "step-inside-block": (_open_then(lambda m, o, b, lp: o.step()), gradproj.ProtocolError),
    "zero-grad-inside-block": (_open_then(lambda m, o, b, lp: o.zero_grad()), gradproj.ProtocolError),
    "nested-block": (_open_then(lambda m, o, b, lp: o.microbatch(lp, b[2]).__enter__()), gradproj.ProtocolError),
    "paused-inside-block": (_open_then(lambda m, o, b, lp: o.paused().__enter__()), gradproj.ProtocolError),
    "detach-inside-block": (_open_then(lambda m, o, b, lp: o.detach()), gradproj.ProtocolError),
    "sync-inside-block": (_open_then(lambda m, o, b, lp: o.sync_gradients()), gradproj.ProtocolError),
    "set-groups-inside-block": (_open_then(lambda m, o, b, lp: o.set_groups([0] * 4, [0.0] * 4)), gradproj.ProtocolError),
    "block-without-backward": (_open_then(lambda m, o, b, lp: None), gradproj.ProtocolError),
    "loss-without-logp": (
        _open_then(lambda m, o, b, lp: token_logprobs(m, b[0], b[1]).sum().backward()), gradproj.GradProjError
    ),
    "non-constant-weights": (
        _open_then(lambda m, o, b, lp: (lp * torch.rand_like(lp) * b[2]).sum().backward()), gradproj.CoefficientError
    ),
    "weights-on-masked-tokens": (_open_then(lambda m, o, b, lp: lp.sum().backward()), gradproj.CoefficientError),
}


@pytest.mark.parametrize("misuse", list(MISUSE))
def test_api_misuse_is_refused_and_changes_nothing(misuse, trained):
    model, opt = trained
    block(model, opt, BATCHES[2])
    before, state = grads(model), optimizer_state(opt)
    run, error = MISUSE[misuse]
    with pytest.raises(error):
        run(model, opt, BATCHES[3])
    assert opt.engine.current is None and opt.engine.attached
    assert same(grads(model), before)
    assert same_optimizer_state(optimizer_state(opt), state)
    block(model, opt, BATCHES[3])
    expect, _ = twin(["proma"], [BATCHES[:2]], [BATCHES[2], BATCHES[3]])
    assert same(grads(model), grads(expect))


def test_backward_outside_any_block_while_capturing_is_refused(trained):
    model, opt = trained
    block(model, opt, BATCHES[2])
    before = grads(model)
    ids, attn, mask, adv = BATCHES[3]
    with pytest.raises(gradproj.ProtocolError, match="outside an opt.microbatch"):
        grpo_loss(token_logprobs(model, ids, attn), mask, adv, 0.5).backward()
    assert same(grads(model), before)


def test_microbatch_after_detach_is_refused():
    model, opt = wrapped("proma")
    opt.detach()
    ids, attn, mask, _ = BATCHES[0]
    with pytest.raises(gradproj.ProtocolError, match="detached"):
        opt.microbatch(token_logprobs(model, ids, attn), mask).__enter__()


# -- 6. bad tensors --------------------------------------------------------------------------------


def _bad_block(make_args):
    def run(model, opt, batch):
        ids, attn, mask, adv = batch
        logp = token_logprobs(model, ids, attn)
        args, kwargs = make_args(logp, mask)
        with opt.microbatch(*args, **kwargs):
            grpo_loss(logp, mask, adv, 0.5).backward()

    return run


BAD = {
    "mask-shape": (lambda lp, m: ((lp, m[:, :-1]), {}), "mask has shape"),
    "mask-values": (lambda lp, m: ((lp, m.double() * 0.5), {}), "other than 0 and 1"),
    "mask-complex": (lambda lp, m: ((lp, m.to(torch.complex64)), {}), "bool or 0/1"),
    "mask-not-tensor": (lambda lp, m: ((lp, m.tolist()), {}), "must be a torch.Tensor"),
    "logp-1d": (lambda lp, m: ((lp[0], m[0]), {}), "shape \\(sequences, tokens\\)"),
    "logp-detached": (lambda lp, m: ((lp.detach(), m), {}), "does not require grad"),
    "logp-integer": (lambda lp, m: ((lp.detach().long(), m), {}), "floating-point"),
    "cu-seqlens-count": (lambda lp, m: ((lp, m), {"cu_seqlens": torch.tensor([0, 3])}), "cu_seqlens has 1 sequences"),
    "cu-seqlens-float": (lambda lp, m: ((lp, m), {"cu_seqlens": torch.tensor([0.0, 1.0])}), "1-D integer"),
    "position-ids-float": (lambda lp, m: ((lp, m), {"position_ids": torch.zeros(4)}), "integer tensor"),
    "cu-and-position-ids": (
        lambda lp, m: ((lp, m), {"cu_seqlens": torch.tensor([0, 1, 2, 3, 4]), "position_ids": torch.zeros(4, dtype=torch.long)}),
        "not both",
    ),
    "group-ids-count": (lambda lp, m: ((lp, m), {"group_ids": [0, 1]}), "group ids for 4 rows"),
    "padded-but-packed-activations": (lambda lp, m: ((lp, m), {"cu_seqlens": torch.tensor([0, 1, 2, 3, 5])}), "packed batch"),
}


@pytest.mark.parametrize("bad", list(BAD))
def test_bad_tensors_are_refused_and_change_nothing(bad, trained):
    model, opt = trained
    block(model, opt, BATCHES[2])
    before, state = grads(model), optimizer_state(opt)
    make_args, needle = BAD[bad]
    with pytest.raises(gradproj.GradProjError, match=needle):
        _bad_block(make_args)(model, opt, BATCHES[3])
    assert same(grads(model), before)
    assert same_optimizer_state(optimizer_state(opt), state)
    block(model, opt, BATCHES[3])
    expect, _ = twin(["proma"], [BATCHES[:2]], [BATCHES[2], BATCHES[3]])
    assert same(grads(model), grads(expect))


@pytest.mark.parametrize(
    "change", ["zero-advantages", "empty-mask-row", "empty-mask", "duplicate-sequences"]
)
def test_degenerate_but_valid_microbatches_are_exact(change):
    ids, attn, mask, adv = (t.clone() for t in BATCHES[1])
    if change == "zero-advantages":
        adv.zero_()
    elif change == "empty-mask-row":
        mask[1] = False
    elif change == "empty-mask":
        mask[:] = False
    else:
        ids[1], attn[1], mask[1], adv[1] = ids[0], attn[0], mask[0], adv[0]
    model, opt = wrapped("proma")
    batches = [BATCHES[0], (ids, attn, mask, adv)]
    reference = _brute_force(model, opt, batches, 0.5)
    for batch in batches:
        block(model, opt, batch)
    assert max(rel_err(p.grad.reshape(-1).double(), reference[n]) for n, p in trainable(model)) <= 1e-10


# -- 7. non-finite microbatches and GradScaler --------------------------------------------------


def _overflowing(batch):
    ids, attn, mask, adv = batch
    return ids, attn, mask, adv * float("inf")


def test_every_microbatch_dropped_gradscaler_skips_the_step_and_lowers_its_scale():
    """nonfinite='drop' with fp16-style loss scaling: when every microbatch overflows, .grad holds NaN
    (as plain autograd would), so GradScaler skips the step and halves its scale -- no AssertionError."""
    model, opt = wrapped("proma")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before, state = params(model), optimizer_state(opt)
    for batch in BATCHES[:2]:
        ids, attn, mask, adv = _overflowing(batch)
        logp = token_logprobs(model, ids, attn)
        with opt.microbatch(logp, mask):
            scaler.scale(grpo_loss(logp, mask, adv, 0.5)).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**9
    assert same(params(model), before) and same_optimizer_state(optimizer_state(opt), state)
    opt.zero_grad()
    assert opt.metrics()["gradproj/step_skipped"] == 1.0
    full_step(model, opt, BATCHES[2:4])
    expect, expect_opt = wrapped("proma")
    full_step(expect, expect_opt, BATCHES[2:4])
    assert same(params(model), params(expect))


def test_every_microbatch_dropped_plain_step_applies_nothing():
    model, opt = wrapped("proma")
    before, state = params(model), optimizer_state(opt)
    for batch in BATCHES[:2]:
        block(model, opt, _overflowing(batch))
    opt.step()
    assert same(params(model), before) and same_optimizer_state(optimizer_state(opt), state)
    assert all(p.grad is None for _, p in trainable(model))
    assert opt.metrics()["gradproj/step_skipped"] == 1.0 and opt.metrics()["gradproj/dropped_microbatches"] == 2.0


@pytest.mark.parametrize("position", [0, 1, 2])
def test_one_dropped_microbatch_leaves_exactly_the_others(position):
    model, opt = wrapped("proma")
    batches = list(BATCHES[:3])
    for index, batch in enumerate(batches):
        block(model, opt, _overflowing(batch) if index == position else batch)
    kept = [b for i, b in enumerate(batches) if i != position]
    expect, _ = twin(["proma"], [], kept)
    assert same(grads(model), grads(expect))
    assert opt.engine.running_metrics()["gradproj/dropped_microbatches"] == 1.0


# -- 8. checkpoints --------------------------------------------------------------------------------


def _saved(opt):
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _corrupt(kind, state):
    ours = state["gradproj"]
    if kind == "not-a-dict":
        state["gradproj"] = "proma"
    elif kind == "no-version":
        del ours["version"]
    elif kind == "future-version":
        ours["version"] = 99
    elif kind == "negative-steps":
        ours["steps"] = -1
    elif kind == "text-steps":
        ours["steps"] = "2"
    elif kind == "no-strategies":
        del ours["strategies"]
    elif kind == "other-strategy":
        ours["strategies"] = ["intra_proma"]
    elif kind == "other-option":
        ours["config"]["relative_bound"] = 0.25
    elif kind == "other-exclude":
        ours["config"]["exclude"] = ["head.*"]
    elif kind == "no-config":
        del ours["config"]
    elif kind == "inner-malformed":
        del state["param_groups"]
    return state


@pytest.mark.parametrize(
    "kind",
    ["not-a-dict", "no-version", "future-version", "negative-steps", "text-steps", "no-strategies", "other-strategy",
     "other-option", "other-exclude", "no-config", "inner-malformed"],
)
def test_bad_checkpoints_are_refused_and_change_nothing(kind):
    model, opt = wrapped("proma", relative_bound=0.5)
    full_step(model, opt, BATCHES[:2])
    state = _corrupt(kind, _saved(opt))
    fresh_model, fresh = wrapped("proma", relative_bound=0.5)
    full_step(fresh_model, fresh, BATCHES[2:4])  # some state of its own
    before, steps = optimizer_state(fresh), fresh.engine.steps
    error = (KeyError, ValueError) if kind == "inner-malformed" else gradproj.CheckpointError
    with pytest.raises(error):
        fresh.load_state_dict(state)
    assert same_optimizer_state(optimizer_state(fresh), before) and fresh.engine.steps == steps


def test_version_1_checkpoints_still_load():
    model, opt = wrapped("proma")
    full_step(model, opt, BATCHES[:2])
    state = _saved(opt)
    state["gradproj"] = {"version": 1, "strategies": ["proma"], "steps": 1}
    _, fresh = wrapped("proma")
    fresh.load_state_dict(state)
    assert fresh.engine.steps == 1


# -- 9. off-policy updates: the sequence importance ratio ------------------------------------------


@pytest.mark.parametrize("strategy", ["proma", "none"])
def test_second_update_with_the_sequence_ratio_equals_the_brute_force(strategy):
    """Rollouts reused after an optimizer step: policy_loss(old_logp=) weights each sequence by its
    likelihood ratio, which is constant per row, so PROMA stays exact at the moved policy."""
    model, opt = wrapped(strategy)
    olds = []
    with torch.no_grad():
        for ids, attn, _, _ in BATCHES[:2]:
            olds.append(token_logprobs(model, ids, attn))
    full_step(model, opt, BATCHES[:2])  # the policy moves
    G = {n: None for n, _ in trainable(model)}
    for (ids, attn, mask, adv), old in zip(BATCHES[:2], olds):
        with opt.paused():
            logp = token_logprobs(model, ids, attn)
            S = sequence_gradients(model, logp, mask)
            ratio = torch.exp(((logp.detach() - old) * mask).sum(1))
        assert not torch.allclose(ratio, torch.ones_like(ratio))
        c = grpo_coefficients(adv * ratio, mask, 0.5)
        for n in G:
            G[n] = reference_update(G[n], S[n], c, strategy=strategy)
        logp = token_logprobs(model, ids, attn)
        with opt.microbatch(logp, mask):
            policy_loss(logp, mask, adv, 0.5, old_logp=old).backward()
    assert max(rel_err(p.grad.reshape(-1).double(), G[n]) for n, p in trainable(model)) <= 1e-10


def test_sequence_ratio_is_one_on_policy():
    model, _ = wrapped("none")
    ids, attn, mask, adv = BATCHES[0]
    logp = token_logprobs(model, ids, attn)
    with_ratio = policy_loss(logp, mask, adv, 0.5, old_logp=logp.detach())
    assert torch.equal(with_ratio, policy_loss(logp, mask, adv, 0.5))
    with pytest.raises(ValueError, match="old_logp has shape"):
        policy_loss(logp, mask, adv, old_logp=logp[:, :-1].detach())


def test_the_grpo_loop_weights_its_second_update_by_the_ratio(monkeypatch):
    """The project's own GRPO loop: updates after the first on a rollout use the sampling policy's
    log-probs (it used to take them with no ratio at all)."""
    import gradproj.demo.grpo_loop as loop

    calls = []
    original = loop.policy_loss

    def spy(logp, mask, advantages, scale=1.0, old_logp=None, **options):
        calls.append(old_logp is not None)
        return original(logp, mask, advantages, scale, old_logp=old_logp, **options)

    monkeypatch.setattr(loop, "policy_loss", spy)
    from gradproj.demo.adder import build_tokenizer
    from gradproj.demo.tasks import make_task
    from helpers import tiny_char_model

    tok = build_tokenizer()
    config = loop.GRPOLoopConfig(steps=1, prompts_per_step=2, group_size=2, microbatches=2, updates_per_rollout=2,
                                 eval_every=1, lr=1e-3)
    loop.run_method("proma", lambda: tiny_char_model(tok), tok, make_task("addition"), config, lambda m: 0.0)
    assert calls == [False, False, True, True]


# -- 10. TRL settings --------------------------------------------------------------------------------


def _grpo_config(tmp_path, **overrides):
    import trl
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=4,
                    num_generations=4, max_completion_length=4, beta=0.0, use_cpu=True, bf16=False, report_to="none")
    late = {k: overrides.pop(k) for k in ("deepspeed", "optim") if k in overrides}
    args = trl.GRPOConfig(**{**settings, **overrides})
    for key, value in late.items():  # set after validation (their packages are not installed here)
        setattr(args, key, value)
    return args


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"num_iterations": 2}, "num_iterations=2"),
        ({"steps_per_generation": 8}, "steps_per_generation=8"),
        ({"steps_per_generation": 3}, "does not divide"),
        ({"generation_batch_size": 12}, "does not divide"),
        ({"beta": 0.04}, "beta=0.04"),
        ({"entropy_coef": 0.01}, "entropy bonus"),
        ({"top_entropy_quantile": 0.5}, "top_entropy_quantile"),
        ({"deepspeed": "ds_config.json"}, "DeepSpeed"),
        ({"optim": "lomo"}, "during the backward"),
        ({"optim": "galore_adamw_layerwise"}, "during the backward"),
    ],
    ids=["num-iterations", "spg-over-ga", "spg-not-divisor", "generation-batch-size", "beta", "entropy", "top-entropy",
         "deepspeed", "lomo", "layerwise"],
)
def test_trl_settings_that_break_the_contract_are_refused(overrides, needle, tmp_path):
    from gradproj.integrations.trl import check_grpo_config

    args = _grpo_config(tmp_path, **overrides)
    with pytest.raises(gradproj.ConfigError, match=needle):
        check_grpo_config(args, gradproj.GradProjConfig(strategy="proma"))
    check_grpo_config(args, gradproj.GradProjConfig(strategy="none"))  # plain accumulation accepts anything


@pytest.mark.parametrize("spg", [1, 2, 4])
def test_trl_generations_that_divide_the_accumulation_are_on_policy(spg, tmp_path):
    from gradproj.integrations.trl import check_grpo_config

    check_grpo_config(_grpo_config(tmp_path, steps_per_generation=spg), gradproj.GradProjConfig(strategy="proma"))


# -- 11. the inner optimizer stepped directly ------------------------------------------------------


def test_inner_optimizer_step_equals_the_wrapper_step():
    model, opt = wrapped("proma")
    for batch in BATCHES[:2]:
        block(model, opt, batch)
    opt.optimizer.step()  # a kept reference to the inner optimizer
    assert opt.engine.steps == 1 and opt.metrics()["gradproj/microbatches"] == 2.0
    expect, expect_opt = twin(["proma"], [], BATCHES[:2])
    expect_opt.step()
    assert same(params(model), params(expect))


def test_inner_optimizer_step_inside_a_block_or_on_nan_markers_is_refused():
    model, opt = wrapped("proma")
    before, state = params(model), optimizer_state(opt)
    ids, attn, mask, adv = BATCHES[0]
    logp = token_logprobs(model, ids, attn)
    with pytest.raises(gradproj.ProtocolError, match="inner optimizer"):
        with opt.microbatch(logp, mask):
            grpo_loss(logp, mask, adv, 0.5).backward()
            opt.optimizer.step()
    block(model, opt, _overflowing(BATCHES[1]))  # every microbatch dropped: NaN markers in .grad
    with pytest.raises(gradproj.ProtocolError, match="dropped"):
        opt.optimizer.step()
    assert same(params(model), before) and same_optimizer_state(optimizer_state(opt), state)


# -- 12. found by trying to break it: more siblings ------------------------------------------------


def _later(strategy="proma"):
    """A model whose step already holds one microbatch (the next block is a projected one)."""
    return twin([strategy], [], [BATCHES[0]])


@pytest.mark.parametrize("edit", ["clip_grad_norm_", "model.zero_grad", "grad.mul_"])
def test_gradient_edited_inside_the_block_is_refused(edit):
    model, opt = _later()
    ids, attn, mask, adv = BATCHES[1]
    logp = token_logprobs(model, ids, attn)
    with pytest.raises(gradproj.ProtocolError, match="changed inside the opt.microbatch"):
        with opt.microbatch(logp, mask):
            grpo_loss(logp, mask, adv, 0.5).backward()
            if edit == "clip_grad_norm_":
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
            elif edit == "model.zero_grad":
                model.zero_grad()
            else:
                model.head.weight.grad.mul_(0.5)
            edited = grads(model)
    assert same(grads(model), edited)  # the user's edit stays; the microbatch's update was discarded


def test_gradscaler_unscale_inside_the_block_is_refused_before_it_unscales():
    model, opt = _later()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    before = grads(model)
    ids, attn, mask, adv = BATCHES[1]
    logp = token_logprobs(model, ids, attn)
    with pytest.raises(gradproj.ProtocolError, match="unscale_"):
        with opt.microbatch(logp, mask):
            scaler.scale(grpo_loss(logp, mask, adv, 0.5)).backward()
            scaler.unscale_(opt)
    assert same(grads(model), before)


class _SharedSegments(TinyLM):
    """fc2 used in two separately checkpointed segments (ALBERT-style sharing)."""

    reentrant = None

    def hidden(self, x):
        from torch.utils.checkpoint import checkpoint

        h = torch.tanh(self.fc1(x))
        segment = lambda t: torch.tanh(self.fc2(t))  # noqa: E731
        if self.reentrant is None:
            return h + segment(h + segment(h))
        inner = checkpoint(segment, h, use_reentrant=self.reentrant)
        return h + checkpoint(segment, h + inner, use_reentrant=self.reentrant)


@pytest.mark.parametrize("reentrant", [False, True])
def test_module_in_two_checkpointed_segments(reentrant):
    """Non-reentrant: exact. Reentrant: the second segment's recomputation would split the layer's
    uses -- refused, the microbatch discarded."""
    model = _SharedSegments(seed=2)
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma")
    reference = _brute_force(model, opt, BATCHES[:2], 0.5)
    model.reentrant = reentrant
    block(model, opt, BATCHES[0])
    if not reentrant:
        block(model, opt, BATCHES[1])
        assert max(rel_err(p.grad.reshape(-1).double(), reference[n]) for n, p in trainable(model)) <= 1e-10
        return
    before = grads(model)
    with pytest.raises(gradproj.ProtocolError, match="use_reentrant"):
        block(model, opt, BATCHES[1])
    assert same(grads(model), before)


class _CheckpointedHidden(TinyLM):
    reentrant = True
    seen: list

    def hidden(self, x):
        from torch.utils.checkpoint import checkpoint

        h = torch.tanh(self.fc1(x))  # (the segment's input must require grad for reentrant checkpointing)
        h = checkpoint(lambda t: torch.tanh(self.fc2(t)), h, use_reentrant=self.reentrant)
        self.seen = [h]
        return h


@pytest.mark.parametrize("reentrant", [False, True])
def test_loss_term_on_a_checkpointed_segment_is_refused(reentrant):
    model = _CheckpointedHidden(seed=2)
    model.reentrant = reentrant
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma")
    block(model, opt, BATCHES[0])
    before = grads(model)
    ids, attn, mask, adv = BATCHES[1]
    logp = token_logprobs(model, ids, attn)
    penalty = 1e-3 * model.seen[0].pow(2).sum()
    with pytest.raises(gradproj.LossTermError):
        with opt.microbatch(logp, mask):
            (grpo_loss(logp, mask, adv, 0.5) + penalty).backward()
    assert same(grads(model), before)


class _FusedLogpEntropy(torch.autograd.Function):
    """One kernel returning (log-probs, entropy), as fused log-prob kernels do."""

    @staticmethod
    def forward(ctx, logits, targets):
        logs = torch.log_softmax(logits, -1)
        ctx.save_for_backward(logs, targets)
        return logs.gather(-1, targets[..., None]).squeeze(-1), -(logs.exp() * logs).sum(-1)

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        logs, targets = ctx.saved_tensors
        p = logs.exp()
        onehot = torch.zeros_like(logs).scatter_(-1, targets[..., None], 1.0)
        entropy = -(p * logs).sum(-1, keepdim=True)
        return g_logp[..., None] * (onehot - p) + g_entropy[..., None] * (-p * (logs + entropy)), None


@pytest.mark.parametrize("sibling", ["split", "fused-kernel"])
def test_a_sibling_output_of_logps_node_is_a_loss_term_outside_logp(sibling):
    model, opt = _later()
    before = grads(model)
    ids, attn, mask, adv = BATCHES[1]
    logits = model(ids, attn).logits[:, :-1]
    if sibling == "split":
        logp, other = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1).split([2, 2])
        logp = torch.cat([logp, other.detach()])  # rows 2-3 only through the sibling
        extra = 0.3 * other.sum()
    else:
        logp, entropy = _FusedLogpEntropy.apply(logits, ids[:, 1:])
        extra = -0.01 * (entropy * mask).sum()
    with pytest.raises(gradproj.GradProjError):
        with opt.microbatch(logp, mask):
            (grpo_loss(logp, mask, adv, 0.5) + extra).backward()
    assert same(grads(model), before)


@pytest.mark.parametrize(
    "reorder",
    [lambda t: t[torch.tensor([1, 0, 2, 3])], lambda t: t.flip(0), lambda t: t.roll(1, 0),
     lambda t: t.index_select(0, torch.tensor([3, 2, 1, 0]))],
    ids=["index", "flip", "roll", "index-select"],
)
def test_rows_reordered_after_the_model_are_refused(reorder):
    model, opt = _later()
    ids, attn, mask, adv = BATCHES[1]
    logits = reorder(model(ids, attn).logits[:, :-1])
    logp = torch.log_softmax(logits, -1).gather(-1, reorder(ids[:, 1:])[..., None]).squeeze(-1)
    before = grads(model)
    with pytest.raises(gradproj.InputError, match="rows of logp were reordered"):
        opt.microbatch(logp, reorder(mask)).__enter__()
    assert same(grads(model), before) and opt.engine.current is None
    identity = model(ids, attn).logits[:, :-1][torch.arange(4)]  # an identity index is fine
    logp = torch.log_softmax(identity, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    with opt.microbatch(logp, mask):
        grpo_loss(logp, mask, adv, 0.5).backward()
    expect, _ = twin(["proma"], [], BATCHES[:2])
    assert same(grads(model), grads(expect))


class _BatchNormLM(TinyLM):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.norm = nn.BatchNorm1d(24, affine=False).double()

    def hidden(self, x):
        h = torch.tanh(self.fc1(x))
        h = self.norm(h.transpose(1, 2)).transpose(1, 2)
        return torch.tanh(self.fc2(h))


def test_batch_norm_in_training_mode_is_refused_and_in_eval_mode_exact():
    model = _BatchNormLM(seed=2)
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma")
    with pytest.raises(gradproj.InputError, match="BatchNorm1d in training mode"):
        block(model, opt, BATCHES[0])
    assert all(p.grad is None for _, p in trainable(model))
    model.norm.eval()
    reference = _brute_force(model, opt, BATCHES[:2], 0.5)
    for batch in BATCHES[:2]:
        block(model, opt, batch)
    assert max(rel_err(p.grad.reshape(-1).double(), reference[n]) for n, p in trainable(model)) <= 1e-10


def test_a_module_added_after_wrap_is_refused():
    model, opt = _later()
    before = grads(model)
    model.head = nn.Linear(24, 40).double()  # replaced by a new, uncovered module
    with pytest.raises(gradproj.CoverageError, match="head.weight"):
        block(model, opt, BATCHES[1])
    assert same({n: g for n, g in grads(model).items() if not n.startswith("head")},
                {n: g for n, g in before.items() if not n.startswith("head")})


def test_a_peft_adapter_added_and_activated_after_wrap_is_refused():
    from peft import LoraConfig

    from helpers import tiny_hf, with_lora

    model = with_lora(tiny_hf("llama", layers=1, hidden=16), r=2)
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma")
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"]))
    model.base_model.set_adapter(["default", "b"])
    with pytest.raises(gradproj.CoverageError, match="lora_A.b.weight"):
        block(model, opt, BATCHES[0])
    assert all(p.grad is None for p in model.parameters())


def test_a_hook_on_logp_registered_inside_the_block_is_refused():
    model, opt = _later()
    before = grads(model)
    ids, attn, mask, adv = BATCHES[1]
    logp = token_logprobs(model, ids, attn)
    weights = torch.linspace(0.2, 1.8, logp.shape[1], dtype=logp.dtype)[None]
    with pytest.raises(gradproj.CoefficientError, match="hook was registered on logp"):
        with opt.microbatch(logp, mask):
            logp.register_hook(lambda g: g * weights)
            grpo_loss(logp, mask, adv, 0.5).backward()
    assert same(grads(model), before)


def test_mask_changed_in_place_inside_the_block_is_refused():
    model, opt = _later()
    before = grads(model)
    ids, attn, mask, adv = BATCHES[1]
    mask = mask.clone()
    logp = token_logprobs(model, ids, attn)
    with pytest.raises(gradproj.InputError, match="changed in place"):
        with opt.microbatch(logp, mask):
            mask[2] = False
            grpo_loss(logp, mask, adv, 0.5).backward()
    assert same(grads(model), before)


def test_set_groups_with_other_groups_mid_step_is_refused():
    model = TinyLM(seed=2)
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, ["variance_scaling", "proma"])
    groups, rewards = [0, 0, 1, 1, 2, 2, 3, 3], torch.tensor([1.0, 0.0, 0.5, 0.2, 1.0, 0.9, 0.1, 0.3])
    opt.set_groups(groups, rewards)
    ids, attn, mask, adv = BATCHES[0]
    logp = token_logprobs(model, ids, attn)
    with opt.microbatch(logp, mask, group_ids=groups[:4]):
        grpo_loss(logp, mask, adv, 0.5).backward()
    opt.set_groups(groups, rewards)  # the same again: fine
    with pytest.raises(gradproj.ProtocolError, match="set_groups"):
        opt.set_groups(groups[4:], rewards[4:])
    assert opt.engine.step_groups.same_as(opt.engine.step_groups) and len(opt.engine.step_groups) == 8


def test_dtype_changed_after_wrap_is_refused():
    model, opt = _later()
    model.float()
    with pytest.raises(gradproj.CoverageError, match="changed from torch.float64"):
        token_logprobs(model, *BATCHES[1][:2])


# -- 13. found by a second pass: fused optimizers, other models' log-probs, bf16 weights ------------


def _scaled_run(wrapped_with, fused_cls, nonfinite="drop", overflow=False):
    """Two microbatches under a GradScaler with a fused optimizer; returns (parameters, scale)."""
    model = TinyLM(seed=2, dtype=torch.float32)
    inner = fused_cls([p for _, p in trainable(model)], lr=1e-2, fused=True)
    opt = inner if wrapped_with is None else gradproj.wrap(inner, model, wrapped_with, nonfinite=nonfinite)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    for index, (ids, attn, mask, adv) in enumerate(BATCHES[:2]):
        logp = token_logprobs(model, ids, attn)
        loss = grpo_loss(logp, mask, adv.float(), 0.5) * (float("inf") if overflow and index == 1 else 1.0)
        if wrapped_with is None:
            scaler.scale(loss).backward()
        else:
            with opt.microbatch(logp, mask):
                scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return params(model), scaler.get_scale()


@pytest.mark.parametrize("fused_cls", [torch.optim.SGD, torch.optim.AdamW], ids=["sgd", "adamw"])
def test_fused_optimizers_under_gradscaler_get_the_scale(fused_cls):
    """GradScaler lets fused optimizers unscale inside their step (it sets grad_scale and found_inf on
    the optimizer it steps): the wrapper passes them to the inner optimizer. Strategy 'none' is then
    bit-identical to the unwrapped fused optimizer; an overflow skips the step (no NaN weights)."""
    plain, _ = _scaled_run(None, fused_cls)
    wrapped_none, _ = _scaled_run("none", fused_cls)
    assert same(wrapped_none, plain)
    start = params(TinyLM(seed=2, dtype=torch.float32))
    for nonfinite in ("drop", "propagate"):
        after, scale = _scaled_run("proma", fused_cls, nonfinite=nonfinite, overflow=True)
        assert all(bool(torch.isfinite(p).all()) for p in after.values())
        if nonfinite == "propagate":  # the NaN running gradient: the step is skipped, the scale halved
            assert same(after, start) and scale == 2.0**15
    plain_proma_scale = _scaled_run("proma", fused_cls)[0]
    unscaled = TinyLM(seed=2, dtype=torch.float32)
    inner = fused_cls([p for _, p in trainable(unscaled)], lr=1e-2, fused=True)
    opt = gradproj.wrap(inner, unscaled, "proma")
    for ids, attn, mask, adv in BATCHES[:2]:
        logp = token_logprobs(unscaled, ids, attn)
        with opt.microbatch(logp, mask):
            grpo_loss(logp, mask, adv.float(), 0.5).backward()
    opt.step()
    for name, value in params(unscaled).items():  # the scale cancels (PROMA is scale-equivariant)
        torch.testing.assert_close(plain_proma_scale[name], value, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("strategy", ["proma", "none"])
@pytest.mark.parametrize("position", ["first", "later"])
def test_logprobs_of_another_model_are_refused(strategy, position):
    model, opt = twin([strategy], [], [] if position == "first" else [BATCHES[0]])
    other = copy.deepcopy(model)  # e.g. the reference copy
    before = grads(model)
    ids, attn, mask, adv = BATCHES[1]
    logp = token_logprobs(other, ids, attn)
    if strategy == "none" and position == "later":
        # plain accumulation with gradients already held: nothing to compare against (documented)
        with opt.microbatch(logp, mask):
            grpo_loss(logp, mask, adv, 0.5).backward()
        assert same(grads(model), before)
        return
    with pytest.raises(gradproj.ProtocolError, match="not computed by the model given to wrap"):
        with opt.microbatch(logp, mask):
            grpo_loss(logp, mask, adv, 0.5).backward()
    assert same(grads(model), before)


def test_bf16_per_token_penalty_on_a_zero_advantage_row_is_refused():
    """In bf16 the constant-weight check is relative to each row's own largest weight: a row whose
    weights are only a small KL penalty (advantage 0) is judged on its own scale."""
    model, opt = wrapped("proma")
    ids, attn, mask, adv = BATCHES[1]
    adv = adv.clone()
    adv[0] = 0.0
    logp = token_logprobs(model, ids, attn).to(torch.bfloat16)
    penalty = torch.linspace(0.0, 1.0, logp.shape[1], dtype=torch.bfloat16)[None]  # varies along each row
    with pytest.raises(gradproj.CoefficientError, match="not constant along row 0"):
        with opt.microbatch(logp, mask):
            (grpo_loss(logp, mask, adv.to(torch.bfloat16), 0.5) + 1e-3 * (logp * penalty * mask).sum()).backward()
    assert all(p.grad is None for _, p in trainable(model))


@pytest.mark.parametrize("zero", ["opt", "model", "inner"])
def test_zeroed_gradients_with_set_to_none_false_clear_a_refused_step(zero):
    model, opt = twin(["none"], [], [BATCHES[0]])
    with pytest.raises(RuntimeError):
        _after_backward(RuntimeError("fails"))(model, opt, BATCHES[1])
    with pytest.raises(gradproj.ProtocolError, match="RuntimeError"):
        opt.step()
    {"opt": opt, "model": model, "inner": opt.optimizer}[zero].zero_grad(set_to_none=False)
    for batch in BATCHES[:2]:
        block(model, opt, batch)
    expect, _ = twin(["none"], [], BATCHES[:2])
    assert all(torch.equal(p.grad, q.grad) for (_, p), (_, q) in zip(trainable(model), trainable(expect)))


def test_forward_under_paused_then_a_captured_block_names_the_cause():
    model, opt = _later()
    ids, attn, mask, adv = BATCHES[1]
    with opt.paused():
        logp = token_logprobs(model, ids, attn)
    before = grads(model)
    with pytest.raises(gradproj.CoverageError, match="opt.paused"):
        with opt.microbatch(logp, mask):
            grpo_loss(logp, mask, adv, 0.5).backward()
    assert same(grads(model), before)


# -- 14. the microbatch API for frameworks: begin_microbatch / close ---------------------------------


def test_begin_and_close_equal_the_block():
    model, opt = wrapped("proma")
    for ids, attn, mask, adv in BATCHES[:3]:
        logp = token_logprobs(model, ids, attn)
        handle = opt.begin_microbatch(logp, mask)
        assert handle.k == 4
        grpo_loss(logp, mask, adv, 0.5).backward()
        handle.close()
    expect, _ = twin(["proma"], [], BATCHES[:3])
    assert same(grads(model), grads(expect))
    with pytest.raises(gradproj.ProtocolError, match="already closed"):
        handle.close()


@pytest.mark.parametrize("position", ["first", "later"])
def test_close_with_the_failure_leaves_state_as_before(position):
    model, opt = twin(["proma"], [], [] if position == "first" else [BATCHES[0]])
    before = grads(model)
    ids, attn, mask, adv = BATCHES[1]
    logp = token_logprobs(model, ids, attn)
    handle = opt.begin_microbatch(logp, mask)
    grpo_loss(logp, mask, adv, 0.5).backward()
    handle.close(RuntimeError("the framework's step failed after the backward"))
    assert same(grads(model), before) and opt.engine.current is None
    handle = opt.begin_microbatch(token_logprobs(model, ids, attn), mask)  # a new block opens fine
    handle.close(RuntimeError("nothing ran"))
    assert same(grads(model), before)


def test_begin_refuses_what_the_block_refuses_and_opens_nothing():
    model, opt = _later()
    ids, attn, mask, adv = BATCHES[1]
    with pytest.raises(gradproj.InputError, match="mask has shape"):
        opt.begin_microbatch(token_logprobs(model, ids, attn), mask[:, :-1])
    assert opt.engine.current is None
    assert opt.captures and opt.covers(model.head.weight) and not opt.covers(model.emb.weight)
    assert opt.running_metrics()["gradproj/microbatches"] == 1.0


# -- 15. two layer handlers for one module type ----------------------------------------------------


def test_two_handlers_claiming_one_type_are_refused_and_a_subclass_handler_takes_precedence():
    import types

    from gradproj.capture.handlers import LinearHandler
    from gradproj.plugins.manager import refresh_registry

    class MyLinear(nn.Linear):
        pass

    class Other(LinearHandler):
        """A third-party handler for nn.Linear itself: clashes with the built-in one."""

    class ForSubclass(LinearHandler):
        module_types = (MyLinear,)

        def accepts(self, module):
            return True

    pm = gradproj.get_plugin_manager()
    for name, handler in (("clash", Other()), ("sub", ForSubclass())):
        plugin = types.ModuleType(f"gradproj_{name}_plugin")
        plugin.gradproj_layer_handlers = gradproj.hookimpl(lambda handler=handler: [handler])
        pm.register(plugin, name=name)
        refresh_registry()
        try:
            if name == "clash":
                with pytest.raises(gradproj.ConfigError, match="two layer handlers claim torch.nn.modules.linear.Linear"):
                    gradproj.get_registry()
            else:
                registry = gradproj.get_registry()
                assert isinstance(registry.handler_for(MyLinear(2, 2)), ForSubclass)
                assert type(registry.handler_for(nn.Linear(2, 2))) is LinearHandler
        finally:
            pm.unregister(name=name)
            refresh_registry()
    assert gradproj.get_registry().handler_for(nn.Linear(2, 2)) is not None


def test_a_covered_forward_replaced_after_wrap_is_refused_before_the_backward():
    """Something rebinding a covered module's forward after wrap() -- transformers' hub kernels on
    model.train()/eval() do -- makes the log-probs uncaptured: the next microbatch is refused when it
    opens, .grad untouched, with the fix; once the forward is gradproj's again it runs."""
    import types

    model = linear_only(tiny_hf("llama", seed=2))
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma")
    ids, attn, mask, adv = make_microbatches(count=1, k=3, seed=1)[0]
    module = model.model.layers[0].mlp.up_proj
    installed = module.__dict__["forward"]
    module.forward = types.MethodType(type(module).forward, module)  # what kernelize does
    logp = token_logprobs(model, ids, attn)
    with pytest.raises(gradproj.CoverageError, match=r"model\.layers\.0\.mlp\.up_proj.*use_kernels"):
        with opt.microbatch(logp, mask):
            grpo_loss(logp, mask, adv, 1.0).backward()
    assert all(p.grad is None for _, p in trainable(model))
    module.__dict__["forward"] = installed
    logp = token_logprobs(model, ids, attn)
    with opt.microbatch(logp, mask):
        grpo_loss(logp, mask, adv, 1.0).backward()
    assert all(p.grad is not None for _, p in trainable(model))


def test_hub_kernels_are_turned_off_on_a_wrapped_model(monkeypatch):
    """transformers >= 5.25 enables hub kernels in from_pretrained when `kernels` is installed, and
    train()/eval() then re-kernelize (rebinding forwards): wrap() turns them off -- and on again if
    it fails -- so a model switched between train and eval keeps its capture."""
    model = linear_only(tiny_hf("llama", seed=2))
    calls = []

    class Kernelized(type(model)):
        @property
        def use_kernels(self):
            return self.__dict__.get("_kernels_on", True)

        @use_kernels.setter
        def use_kernels(self, value):
            calls.append(value)
            self.__dict__["_kernels_on"] = value

    model.__class__ = Kernelized
    model.model.norm.weight.requires_grad_(True)  # (its forward is patched: not covered, wrap() fails)
    with pytest.raises(gradproj.CoverageError):
        gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma")
    assert model.use_kernels is True and calls == [False, True]
    model.model.norm.weight.requires_grad_(False)
    opt = gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, "proma")
    assert model.use_kernels is False and calls[-1] is False
    model.eval()
    model.train()
    ids, attn, mask, adv = make_microbatches(count=1, k=3, seed=1)[0]
    for _ in range(2):
        logp = token_logprobs(model, ids, attn)
        with opt.microbatch(logp, mask):
            grpo_loss(logp, mask, adv, 1.0).backward()
