"""MoE models: fused experts, routers and shared experts on flattened tokens, against float64 brute force."""

import pytest
import torch
from torch import nn

import gradproj
import gradproj.capture.experts_handler
from gradproj.capture.token_rows import flattened_token_shape
from gradproj.errors import CoverageError, InputError
from gradproj.integrations.torch.logprobs import token_logprobs
from gradproj.linalg.expert_grads import ExpertStackGrads, rows_by_sequence
from gradproj.linalg.linear_grads import linear_weight_grads
from gradproj.linalg.sequence_grads import TokenSumGrads
from gradproj.plugins.manager import get_registry
from helpers import (
    MOE_ARCHS,
    exact_norms,
    float64_routers,
    grpo_loss,
    make_microbatches,
    peft_lora,
    run_microbatches,
    tiny_moe,
    trainable,
)


def _wrap(model, strategy, **options):
    return gradproj.wrap(torch.optim.SGD([p for _, p in trainable(model)], lr=0.1), model, strategy, **options)


def _handlers(model):
    registry = get_registry()
    return {name: type(registry.handler_for(m)).__name__ for name, m in model.named_modules()
            if any(True for _ in m.parameters(recurse=False))}


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_modules_are_recognised_by_structure(arch):
    model = tiny_moe(arch)
    handlers = _handlers(model)
    experts = [h for n, h in handlers.items() if n.endswith("experts")]
    routers = [h for n, h in handlers.items() if n.endswith((".gate", ".router"))]
    assert experts and set(experts) == {"FusedExpertsHandler"}
    assert routers and set(routers) == {"FunctionalLinearHandler"}


@pytest.mark.parametrize("strategy", ["none", "proma"])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_full_finetuning_exact(arch, strategy):
    """Every parameter (attention, norms, routers, every expert's slices and biases, shared experts,
    lm_head) against one backward per sequence, several padded microbatches with a zero advantage."""
    model = tiny_moe(arch, seed=1)
    with exact_norms(model), float64_routers():
        opt = _wrap(model, strategy)
        errors = run_microbatches(model, opt, make_microbatches(3, 4, seed=2), ref=dict(strategy=strategy))
        opt.detach()
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-10, (worst, errors[worst])
    assert any("experts.gate_up_proj" in n for n in errors) and any("experts.down_proj" in n for n in errors)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_moe_intra_proma_exact(arch):
    """Intra-PROMA projects each expert's slice with the factors of its own tokens (brute force: one
    autograd call per token, SVD bases), routers like Linears."""
    from test_intra_proma import run

    model = tiny_moe(arch, seed=3)
    # Intra-PROMA keeps the token positions whose output-gradient row is not identically zero. The
    # query of a sequence's first token has a mathematically zero gradient (its softmax has one
    # entry) that round-off leaves at ~1e-17 or at 0 depending on the order of the sums upstream:
    # the brute force's plain backward and the captured one differ there, so the query projections
    # (covered by tests/test_intra_proma.py, where both backward passes are the same code) are frozen.
    for name, p in model.named_parameters():
        if "q_proj" in name or "q_norm" in name:
            p.requires_grad_(False)
    with exact_norms(model), float64_routers():
        opt = _wrap(model, "intra_proma", rank=2)
        errors, changed = run(model, opt, make_microbatches(2, 3, seed=4), rank=2)
        opt.detach()
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-10, (worst, errors[worst])
    assert changed["model.layers.0.mlp.experts.gate_up_proj"] > 1e-3


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe"])
def test_moe_lora_all_linear_exact(arch):
    """peft target_modules='all-linear' on an MoE model: the shared expert's and its gate's adapters
    see flattened tokens (their rows traced back to the (B, T, d) activation through peft's branch)."""
    model = peft_lora(tiny_moe(arch, seed=5), seed=0, target_modules="all-linear")
    with exact_norms(model), float64_routers():
        opt = _wrap(model, "proma")
        errors = run_microbatches(model, opt, make_microbatches(3, 4, seed=6), ref=dict(strategy="proma"))
        opt.detach()
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-10, (worst, errors[worst])
    if arch == "qwen2_moe":
        assert any("shared_expert.down_proj.lora_A" in n for n in errors)
    else:  # peft's all-linear also puts LoRA on Qwen3-MoE's fused experts and router weight
        assert any("experts" in n and "lora_B" in n for n in errors)
        assert any("mlp.gate" in n and "lora_B" in n for n in errors)


def test_moe_packed_layout_exact():
    """Packed (1, total) input: the experts' and routers' flattened rows map to sequences through cu_seqlens."""
    from helpers import grpo_coefficients, reference_update, sequence_gradients

    model = tiny_moe("qwen3_moe", seed=7)
    with exact_norms(model), float64_routers():
        opt = _wrap(model, "proma")
        expected = {n: None for n, _ in trainable(model)}
        for ids, attn, mask, adv in make_microbatches(2, 3, seed=8):
            packed, cu, resp = _pack(ids, attn, mask)
            c = grpo_coefficients(adv, resp, 0.5)
            with opt.paused():
                S = sequence_gradients(model, _packed_logprobs(model, packed, cu), resp)
            for n in expected:
                expected[n] = reference_update(expected[n], S[n], c, strategy="proma")
            logp = _packed_logprobs(model, packed, cu)
            with opt.microbatch(logp, resp, cu_seqlens=cu):
                grpo_loss(logp, resp, adv, 0.5).backward()
        opt.detach()
    for n, p in trainable(model):
        got = p.grad.detach().reshape(-1).double()
        assert float((got - expected[n]).norm()) <= 1e-10 * max(float(expected[n].norm()), 1e-300), n


def _pack(ids, attn, mask):
    """Each row's real tokens, packed into one row; cu_seqlens; response mask aligned per sequence."""
    seqs = [ids[i][attn[i].bool()] for i in range(ids.shape[0])]
    starts = [int(attn[i].nonzero()[0]) for i in range(ids.shape[0])]
    resp = torch.zeros(ids.shape[0], max(len(s) for s in seqs) - 1, dtype=torch.bool)
    for i, s in enumerate(seqs):
        resp[i, : len(s) - 1] = mask[i, starts[i] : starts[i] + len(s) - 1]
    cu = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
    return torch.cat(seqs)[None], cu, resp


def _packed_logprobs(model, packed, cu):
    """(k, max_len - 1) log-probs of each packed sequence's next tokens (zero past its end)."""
    positions = torch.cat([torch.arange(int(b - a)) for a, b in zip(cu[:-1], cu[1:])])[None]
    logits = model(input_ids=packed, position_ids=positions, use_cache=False).logits[0]
    logp_all = torch.log_softmax(logits, -1)
    k, width = cu.numel() - 1, int((cu[1:] - cu[:-1]).max()) - 1
    rows = []
    for i in range(k):
        a, b = int(cu[i]), int(cu[i + 1])
        lp = logp_all[a : b - 1].gather(1, packed[0, a + 1 : b, None])[:, 0]
        rows.append(torch.nn.functional.pad(lp, (0, width - lp.numel())))
    return torch.stack(rows)


# -- what is refused ----------------------------------------------------------------------------


def test_gathered_rows_are_refused_before_anything_changes():
    """A Linear on rows gathered from the flattened tokens (hand-written MoE with nn.Linear experts):
    gradproj cannot tell which sequence each row is -> InputError; .grad and the optimizer untouched."""

    class GatheredMoE(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Embedding(40, 8).double().requires_grad_(False)
            self.expert = nn.Linear(8, 8).double()
            self.head = nn.Linear(8, 40).double()

        def forward(self, input_ids, attention_mask=None):
            h = self.embed(input_ids)
            flat = h.reshape(-1, 8)
            order = torch.argsort(flat[:, 0])  # tokens regrouped, as an expert dispatch does
            out = torch.zeros_like(flat).index_add(0, order, self.expert(flat[order]))
            return self.head(out.view_as(h) + h)

    model = GatheredMoE()
    opt = _wrap(model, "proma")
    first, second = make_microbatches(2, 4, seed=1)

    def block(ids, mask, adv):
        logits = model(ids)
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        with opt.microbatch(logp, mask):
            grpo_loss(logp, mask, adv, 0.5).backward()

    block(first[0], first[2], first[3])  # the first microbatch needs no sequence gradients (G = 0)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with pytest.raises(InputError, match="sequence axis gone"):
        block(second[0], second[2], second[3])
    assert {n: p.grad for n, p in model.named_parameters() if p.grad is not None}.keys() == grads.keys()
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters() if p.grad is not None)
    assert not opt.state


def test_router_using_its_weight_outside_linear_is_not_covered():
    """A router that scales its weight before the linear step (anything but F.linear after at most a
    dtype cast) is not recognised: wrap() refuses it by name. A float32 cast alone is covered
    (DeepSeek's routers: tests/test_coverage_matrix.py)."""

    class ScaledRouter(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 8, dtype=torch.float64))

        def forward(self, x):
            return torch.nn.functional.linear(x.float(), (2.0 * self.weight).float())

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.router = ScaledRouter()

        def forward(self, x):
            return self.router(x)

    model = Model()
    with pytest.raises(CoverageError, match="router.weight"):
        _wrap(model, "proma")


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("targets", [["mlp.experts.gate_up_proj"], ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]])
def test_peft_lora_on_expert_parameters_exact(arch, targets):
    """peft target_parameters: LoRA on the fused expert tensors (one wrapper, or two nested), the
    adapters' sequence gradients read off the experts' token factors; Qwen's (E, out, in) storage
    and gpt-oss's transposed (E, in, out) one."""
    model = peft_lora(tiny_moe(arch, seed=9), seed=1, target_modules=["o_proj"], target_parameters=targets)
    with exact_norms(model), float64_routers():
        opt = _wrap(model, "proma")
        errors = run_microbatches(model, opt, make_microbatches(3, 4, seed=10), ref=dict(strategy="proma"))
        opt.detach()
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-10, (worst, errors[worst])
    assert sum("experts" in n and "lora_B" in n for n in errors) == 2 * len(targets)


def test_trainable_parametrization_is_refused_at_wrap():
    """A weight computed by a torch parametrization with its own trainable parameters never passes a
    captured layer as that parameter: refused at wrap(), nothing installed."""
    from torch.nn.utils import parametrize

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1, dtype=torch.float64))

        def forward(self, weight):
            return weight * self.scale

    model = nn.Sequential(nn.Linear(4, 4).double())
    parametrize.register_parametrization(model[0], "weight", Scale())
    with pytest.raises(CoverageError, match="parametrization"):
        _wrap(model, "proma")
    assert "forward" not in model[0].__dict__


# -- building blocks ----------------------------------------------------------------------------


def test_flattened_token_provenance():
    h = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    flat = h.view(-1, 4)
    assert flattened_token_shape(flat) == (3, 5)
    assert flattened_token_shape(h.detach().view(-1, 4)) == (3, 5)  # no grad: the view's base
    w = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    mixed = torch.nn.functional.silu(flat @ w.T).chunk(2, dim=-1)
    assert flattened_token_shape(mixed[0] * mixed[1]) == (3, 5)  # elementwise, split of features
    assert flattened_token_shape(flat[torch.randperm(15)]) is None  # gathered rows
    assert flattened_token_shape(flat.flip(0)) is None
    assert flattened_token_shape(h.transpose(0, 1).reshape(-1, 4)) is None  # sequence-minor order
    assert flattened_token_shape(h.permute(1, 0, 2).contiguous().view(-1, 4)) is None
    assert flattened_token_shape(torch.randn(15, 4)) is None  # no provenance at all


def test_rows_by_sequence_and_expert_stack():
    """The grouped per-expert factors give the Gram and combination of the dense per-sequence sums."""
    g = torch.Generator().manual_seed(0)
    k, n_tok, d_in, d_out, experts = 3, 11, 5, 4, 3
    seq = torch.sort(torch.randint(0, k, (n_tok,), generator=g)).values
    expert = torch.randint(0, experts, (n_tok,), generator=g)
    x = torch.randn(n_tok, d_in, generator=g, dtype=torch.float64)
    dy = torch.randn(n_tok, d_out, generator=g, dtype=torch.float64)
    dense = torch.zeros(k, experts, d_out, d_in, dtype=torch.float64)
    for t in range(n_tok):
        dense[seq[t], expert[t]] += torch.outer(dy[t], x[t])
    blocks = []
    for e in range(experts):
        rows = expert == e
        if not rows.any():
            blocks.append(None)
            continue
        a, d = rows_by_sequence(seq[rows], k, x[rows], dy[rows])
        blocks.append(linear_weight_grads(a, d, "ghost" if e % 2 else "materialize"))
    stack = ExpertStackGrads(blocks, k, dense.shape[1:], torch.float64, x.device)
    flat = dense.reshape(k, -1)
    assert torch.allclose(stack.gram(), flat @ flat.T, rtol=1e-12, atol=1e-12)
    gamma = torch.randn(k, generator=g, dtype=torch.float64)
    assert torch.allclose(stack.combine(gamma), torch.einsum("i,i...->...", gamma, dense), rtol=1e-12, atol=1e-12)
    other = torch.randn(dense.shape[1:], generator=g, dtype=torch.float64)
    assert torch.allclose(stack.inner(other), flat @ other.reshape(-1), rtol=1e-12, atol=1e-12)
    bias = ExpertStackGrads([TokenSumGrads(rows_by_sequence(seq, k, dy)[0])], k, (1, d_out), torch.float64, x.device)
    sums = torch.zeros(k, d_out, dtype=torch.float64).index_add_(0, seq, dy)
    assert torch.allclose(bias.gram(), sums @ sums.T, rtol=1e-12, atol=1e-12)


def test_lora_on_experts_while_training_the_experts_is_refused():
    """peft LoRA on the expert tensors while the tensors themselves are trained too: refused at wrap()."""
    from peft import LoraConfig, get_peft_model

    base = tiny_moe("qwen3_moe")
    for p in base.parameters():
        p.requires_grad_(False)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj"]))
    for name, p in model.named_parameters():
        if name.endswith("experts.base_layer.gate_up_proj") or name.endswith("experts.base_layer.down_proj"):
            p.requires_grad_(True)
    with pytest.raises(CoverageError, match="target_parameters"):
        _wrap(model, "proma")


def test_dropped_tokens_and_routing_weights_exact():
    """Tokens the routing drops (expert id E, transformers' sentinel: skipped by the experts) and
    routing weights that carry the router's gradient: exact, experts and router alike."""
    import transformers.models.qwen3_moe.modeling_qwen3_moe as q3m

    original = q3m.Qwen3MoeTopKRouter.forward

    def dropping(self, hidden_states):
        logits, scores, index = original(self, hidden_states)
        index = index.clone()
        index[::3, 1] = self.num_experts  # every third token keeps only its first choice
        return logits, scores, index

    model = tiny_moe("qwen3_moe", seed=11)
    q3m.Qwen3MoeTopKRouter.forward = dropping
    try:
        with exact_norms(model), float64_routers():
            opt = _wrap(model, "proma")
            errors = run_microbatches(model, opt, make_microbatches(3, 4, seed=12), ref=dict(strategy="proma"))
            opt.detach()
    finally:
        q3m.Qwen3MoeTopKRouter.forward = original
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-10, (worst, errors[worst])
    assert errors["model.layers.0.mlp.gate.weight"] <= 1e-10


def test_grouped_matmul_path_matches_the_per_expert_loop(monkeypatch):
    """float32 with aligned sizes runs the experts' projections as torch's grouped matmul (forward,
    the tokens' and the gate's gradients); it agrees with the per-expert loop (float64's path), and
    the whole step stays exact to float32 round-off against the brute force."""
    import gradproj.capture.expert_op as expert_op

    model = tiny_moe("qwen3_moe", seed=13).float()
    calls = []
    grouped = torch.nn.functional.grouped_mm

    def counting(*args, **kwargs):
        calls.append(1)
        return grouped(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "grouped_mm", counting)
    experts = model.model.layers[0].mlp.experts
    form = gradproj.capture.experts_handler.recognise_experts(experts)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 32, generator=g)
    index = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(10)])
    weights = torch.rand(10, 2, generator=g)
    args = (x, index, weights, experts.gate_up_proj.detach(), experts.down_proj.detach())
    fast, _ = expert_op.experts_forward(form, *args)
    assert calls
    monkeypatch.setattr(expert_op, "_grouped_ok", lambda rows, mat_b: False)
    slow, _ = expert_op.experts_forward(form, *args)
    assert torch.allclose(fast, slow, rtol=1e-5, atol=1e-6)
    monkeypatch.undo()
    errors = run_microbatches(model, _wrap(model, "proma"), make_microbatches(2, 4, seed=14), ref=dict(strategy="proma"))
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-4, (worst, errors[worst])


def test_expert_stack_gram_with_matches_the_dense_augmented_gram():
    g = torch.Generator().manual_seed(3)
    k, experts, d_in, d_out = 3, 4, 5, 6
    blocks, dense = [], torch.zeros(k, experts, d_out, d_in, dtype=torch.float64)
    for e in range(experts):
        if e == 2:  # no token reached this expert
            blocks.append(None)
            continue
        n = 7
        seq = torch.sort(torch.randint(0, k, (n,), generator=g)).values
        x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
        dy = torch.randn(n, d_out, generator=g, dtype=torch.float64)
        for t in range(n):
            dense[seq[t], e] += torch.outer(dy[t], x[t])
        a, d = rows_by_sequence(seq, k, x, dy)
        blocks.append(linear_weight_grads(a, d, ("ghost", "materialize", "auto")[e % 3]))
    stack = ExpertStackGrads(blocks, k, (experts, d_out, d_in), torch.float64, torch.device("cpu"))
    other = torch.randn(experts, d_out, d_in, generator=g, dtype=torch.float64)
    rows = torch.cat([dense.reshape(k, -1), other.reshape(1, -1)])
    assert torch.allclose(stack.gram_with(other), rows @ rows.T, rtol=1e-12, atol=1e-12)
    assert torch.allclose(stack.gram(), rows[:k] @ rows[:k].T, rtol=1e-12, atol=1e-12)
