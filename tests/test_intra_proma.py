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
    poisoned_output_grads,
    reference_update,
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


def token_data(model, ids, attn, mask, logp_fn=None, arguments=None):
    """Per covered module: inputs, outputs and unweighted output gradients (one plain backward).
    A module returning a tuple (an MoE router: logits, scores, indices) is seen through its first
    output. ``arguments`` (a dict), if given, receives every module's positional arguments."""
    inputs, outputs = {}, {}
    hooks = []
    for name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)) or _is_param_wrapper(module):
            def hook(mod, args, kwargs, out, name=name):
                inputs[name] = args[0] if args else next(iter(kwargs.values()))
                outputs[name] = out[0] if isinstance(out, tuple) else out
                if arguments is not None:
                    arguments[name] = args
            hooks.append(module.register_forward_hook(hook, with_kwargs=True))
    logp = token_logprobs(model, ids, attn) if logp_fn is None else logp_fn(model)
    for h in hooks:
        h.remove()
    names = list(outputs)
    grads = torch.autograd.grad((logp * mask).sum(), [outputs[n] for n in names], retain_graph=True)
    return logp, inputs, outputs, dict(zip(names, grads))


def _is_param_wrapper(module) -> bool:
    """peft's ParamWrapper (LoRA on a model parameter: fused experts, routers)."""
    return hasattr(module, "parameter_name") and hasattr(module, "lora_A") and hasattr(module, "base_layer")


def _outer_wrapper(model, mod_name):
    """(name, module) of the outermost ParamWrapper above the lora_A/lora_B module ``mod_name``."""
    parts = mod_name.split(".")
    found = None
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        module = model.get_submodule(name)
        if _is_param_wrapper(module):
            found = (name, module)
        elif found is not None:
            break
    return found


class BruteStep:
    """The float64 brute force of one optimizer step under ``none``, ``proma`` or ``intra_proma``,
    fed microbatch by microbatch (sequence gradients by one backward per sequence), and the check
    of the gradients gradproj accumulated against it."""

    def __init__(self, model, strategy: str, rank: int = 2) -> None:
        self.model, self.strategy, self.rank = model, strategy, rank
        self.G = {n: None for n, _ in trainable(model)}
        self.intra = {n: torch.zeros_like(p) for n, p in trainable(model)}

    def add(self, ids, attn, mask, c, logp_fn=None) -> None:
        """One microbatch with coefficients ``c`` (call it under ``opt.paused()``)."""
        if self.strategy == "intra_proma":
            for n, gm in brute_intra(self.model, ids, attn, mask, c, rank=self.rank, logp_fn=logp_fn).items():
                self.intra[n] += gm
            return
        logp = token_logprobs(self.model, ids, attn) if logp_fn is None else logp_fn(self.model)
        S = sequence_gradients(self.model, logp, mask)
        for n in self.G:
            self.G[n] = reference_update(self.G[n], S[n], c, strategy=self.strategy)

    def check(self, tolerance: float = 1e-10) -> None:
        """Every trainable parameter's ``.grad`` equals the brute force (relative error)."""
        for n, p in trainable(self.model):
            want = self.intra[n].detach().reshape(-1) if self.strategy == "intra_proma" else self.G[n]
            assert rel_err(p.grad.detach().reshape(-1).double(), want.double()) <= tolerance, n


def brute_intra(model, ids, attn, mask, c, *, rank=8, energy=None, projector="complement", layer_c=None, logp_fn=None):
    """{param name: g_m'} for one microbatch, from explicit token matrices and projectors.

    ``layer_c(S_name, c)``: per-layer coefficient transform (stacked isopo), applied to ``c``.
    """
    arguments: dict = {}
    logp, inputs, outputs, deltas = token_data(model, ids, attn, mask, logp_fn, arguments)
    S = sequence_gradients(model, logp, mask)
    out = {}
    c_all = c
    for name, param in trainable(model):
        c = c_all if layer_c is None else layer_c(S[name], c_all)
        mod_name, attr = name.rsplit(".", 1)
        module = model.get_submodule(mod_name)
        wrapper = _outer_wrapper(model, mod_name) if (".lora_A." in name or ".lora_B." in name) else None
        if wrapper is not None:  # peft LoRA on a model parameter (fused experts, a router)
            g = (c @ S[name]).reshape(param.shape)
            out[name] = param_lora_projection(model, name, wrapper, g, arguments, outputs, deltas, rank, energy, projector)
            continue
        delta = deltas[mod_name].reshape(-1, deltas[mod_name].shape[-1])
        keep = delta.abs().amax(1) > 0
        g = (c @ S[name]).reshape(param.shape)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if isinstance(module, nn.Embedding) and head is not None and head.weight is param:
            # tied: the tokens of both uses, concatenated (embedding rows one-hot, materialised)
            head_name = next(n for n, m in model.named_modules() if m is head)
            r1, c1 = deltas[head_name].reshape(-1, param.shape[0]), inputs[head_name].reshape(-1, param.shape[1])
            r2, c2 = embedding_factors(module, inputs[mod_name], deltas[mod_name])
            rows, cols = torch.cat([r1, r2]), torch.cat([c1, c2])
            k2 = torch.cat([r1.abs().amax(1) > 0, c2.abs().amax(1) > 0])
            pd = projector_of(svd_basis(rows[k2], rank, energy))
            pa = projector_of(svd_basis(cols[k2], rank, energy))
            out[name] = apply_projector(g, pd, pa, projector)
            continue
        if hasattr(module, "gate_up_proj"):  # fused MoE experts: each expert's slice on its own tokens
            out[name] = expert_projection(module, attr, g, arguments[mod_name], outputs[mod_name], deltas[mod_name],
                                          rank, energy, projector)
            continue
        if isinstance(module, nn.Embedding):
            rows, cols = embedding_factors(module, inputs[mod_name], deltas[mod_name])
            kept = cols.abs().amax(1) > 0
            ids = inputs[mod_name].reshape(-1)[kept]
            distinct, counts = torch.unique(ids, return_counts=True)
            order = sorted(range(len(distinct)), key=lambda j: (-int(counts[j]), int(distinct[j])))
            r = min(rank, len(order))
            if energy is not None:
                total, acc, r_e = int(counts.sum()), 0, 0
                for j in order:
                    acc += int(counts[j])
                    r_e += 1
                    if acc / total >= energy - 1e-15:
                        break
                r = min(r, r_e)
            pd = torch.zeros(param.shape[0], param.shape[0], dtype=g.dtype)
            for j in order[:r]:
                pd[int(distinct[j]), int(distinct[j])] = 1.0
            pa = projector_of(svd_basis(cols[kept], rank, energy))
            out[name] = apply_projector(g, pd, pa, projector)
            continue
        if type(module).__name__ == "Conv1D" and attr == "weight":  # GPT-2: weight stored (in, out)
            a = inputs[mod_name].reshape(-1, param.shape[0])[keep]
            pd = projector_of(svd_basis(a, rank, energy))
            pa = projector_of(svd_basis(delta[keep], rank, energy))
            out[name] = apply_projector(g, pd, pa, projector)
            continue
        if attr == "weight" and param.dim() == 2:  # nn.Linear, or an MoE router's F.linear
            a = inputs[mod_name].reshape(-1, param.shape[1])[keep]
            d = delta[keep]
            ud, ua = svd_basis(d, rank, energy), svd_basis(a, rank, energy)
            pd, pa = ud @ ud.T, ua @ ua.T
            if projector == "complement":
                out[name] = g - pd @ g @ pa
            else:
                out[name] = (torch.eye(pd.shape[0], dtype=g.dtype) - pd) @ g @ (torch.eye(pa.shape[0], dtype=g.dtype) - pa)
            continue
        # vector parameters: per-row gradient rows (every leading index of the layer's output is a
        # row, e.g. (token, head) for Qwen3's q_norm), one autograd.grad per row
        y = outputs[mod_name].reshape(-1, outputs[mod_name].shape[-1])
        dy = deltas[mod_name].reshape(-1, deltas[mod_name].shape[-1])
        rows = []
        for r in range(dy.shape[0]):
            (row,) = torch.autograd.grad((y[r] * dy[r]).sum(), param, retain_graph=True)
            rows.append(row.reshape(-1))
        rows = torch.stack(rows)[keep]
        u_basis = svd_basis(rows, rank, energy)
        out[name] = (g.reshape(-1) - u_basis @ (u_basis.T @ g.reshape(-1))).reshape(param.shape)
    return out


def expert_projection(module, attr, g, args, y, dy, rank, energy, projector):
    """Brute force for a fused experts parameter: per token t and routed expert e, the gradient of
    ``<y_t, dy_t>`` with respect to the parameter (one autograd call per token) -- rank one,
    ``u v^T`` -- with the factor on the known side (the expert's input x_t for ``gate_up``, the
    down projection's output gradient ``w_te dy_t`` for ``down``) taken as is and the other side
    read off the gradient; each expert's slice is then projected with the SVD bases of its own
    tokens' factors."""
    x, index, weights = args[0], args[1], args[2]
    param = getattr(module, attr)
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    transposed = module.gate_up_proj.shape[1] == x.shape[-1] and module.gate_up_proj.shape[2] != x.shape[-1]
    factors = {}  # expert -> list of (row-side factor, col-side factor or None)
    for t in range(x2.shape[0]):
        if not bool(dy2[t].abs().amax() > 0):
            continue
        (grad,) = torch.autograd.grad((y.reshape(-1, y.shape[-1])[t] * dy2[t]).sum(), param, retain_graph=True)
        for slot, e in enumerate(index[t].tolist()):
            if e >= param.shape[0] or not bool(grad[e].abs().amax() > 0):
                continue
            block = grad[e]
            if block.dim() == 1:  # a bias: the token's gradient row itself
                factors.setdefault(e, []).append((block, None))
                continue
            known = x2[t] if attr == "gate_up_proj" else weights[t, slot] * dy2[t]
            # gate_up: block = dh x^T (x^T dh transposed); down: block = do a^T (a do^T transposed)
            if attr == "gate_up_proj":
                other = (block.T @ known if transposed else block @ known) / known.dot(known)
                row, col = (known, other) if transposed else (other, known)
            else:
                other = (block @ known if transposed else block.T @ known) / known.dot(known)
                row, col = (other, known) if transposed else (known, other)
            factors.setdefault(e, []).append((row, col))
    out = g.clone()
    for e, pairs in factors.items():
        rows = torch.stack([r for r, _ in pairs])
        u_r = svd_basis(rows, rank, energy)
        if pairs[0][1] is None:
            out[e] = g[e] - u_r @ (u_r.T @ g[e])
            continue
        u_c = svd_basis(torch.stack([c for _, c in pairs]), rank, energy)
        out[e] = apply_projector(g[e], projector_of(u_r), projector_of(u_c), projector)
    return out


def param_lora_projection(model, name, wrapper, g, arguments, outputs, deltas, rank, energy, projector):
    """Brute force for peft LoRA on a model parameter: per token t (and routed expert e), the
    gradient of ``<y_t, dy_t>`` (the wrapped module's output) with respect to the adapter -- rank one
    per expert block, ``u v^T`` -- one side taken as known (the projection's input x_t for gate_up
    and a router, its output gradient ``w_te dy_t`` for down; through the other adapter factor and
    the scale where the side is ``s B^T y`` or ``s A x``), the other read off the gradient; each
    block projected with the SVD bases of its own tokens' factors."""
    outer_name, outer = wrapper
    param = model.get_parameter(name)
    owner_name = name.rsplit(".lora_", 1)[0]
    owner = model.get_submodule(owner_name)  # the ParamWrapper holding this adapter
    side = "A" if ".lora_A." in name else "B"
    adapter = name.split(".lora_" + side + ".", 1)[1].split(".")[0]
    scale = float(owner.scaling[adapter])
    a_w, b_w = owner.lora_A[adapter].weight, owner.lora_B[adapter].weight
    args, y, dy = arguments[outer_name], outputs[outer_name], deltas[outer_name]
    x = args[0].reshape(-1, args[0].shape[-1])
    y2, dy2 = y.reshape(-1, y.shape[-1]), dy.reshape(-1, dy.shape[-1])
    experts = getattr(owner, "num_experts", 1)
    a_blocks = a_w.detach().view(experts, -1, a_w.shape[-1])
    b_blocks = b_w.detach().view(b_w.shape[0], -1, experts)
    routed = args[1] if experts > 1 else None
    weights = args[2] if experts > 1 else None
    x_known = owner.parameter_name in ("gate_up_proj", "weight")

    def blocks_of(t):
        return t.view(experts, -1, t.shape[-1]) if side == "A" else t.view(t.shape[0], -1, experts).movedim(-1, 0)

    factors = {}
    for t in range(x2_len := x.shape[0]):
        if not bool(dy2[t].abs().amax() > 0):
            continue
        (grad,) = torch.autograd.grad((y2[t] * dy2[t]).sum(), param, retain_graph=True)
        pairs = [(slot, e) for slot, e in enumerate(routed[t].tolist())] if routed is not None else [(0, 0)]
        for slot, e in pairs:
            block = blocks_of(grad)[e]
            if not bool(block.abs().amax() > 0):
                continue
            if x_known:
                known = x[t]
                if side == "A":  # block = (s B^T y) x^T
                    row, col = block @ known / known.dot(known), known
                else:  # block = y (s A x)^T
                    col = scale * (a_blocks[e] @ known)
                    row, col = block @ col / col.dot(col), col
            else:
                y_t = weights[t, slot] * dy2[t]
                if side == "A":  # block = (s B^T y) x^T
                    row = scale * (b_blocks[:, :, e].T @ y_t)
                    row, col = row, block.T @ row / row.dot(row)
                else:  # block = y (s A x)^T
                    row, col = y_t, block.T @ y_t / y_t.dot(y_t)
            factors.setdefault(e, []).append((row, col))
    del x2_len
    out = g.clone()
    out_blocks = blocks_of(out)
    g_blocks = blocks_of(g)
    for e, pairs in factors.items():
        u_r = svd_basis(torch.stack([r for r, _ in pairs]), rank, energy)
        u_c = svd_basis(torch.stack([c for _, c in pairs]), rank, energy)
        out_blocks[e].copy_(apply_projector(g_blocks[e], projector_of(u_r), projector_of(u_c), projector))
    return out


def projector_of(basis):
    return basis @ basis.T


def apply_projector(g, pd, pa, projector):
    if projector == "complement":
        return g - pd @ g @ pa
    return (torch.eye(pd.shape[0], dtype=g.dtype) - pd) @ g @ (torch.eye(pa.shape[0], dtype=g.dtype) - pa)


def embedding_factors(module, ids, delta):
    """One-hot rows and the lookups' weight-gradient rows (Gemma3's scale and padding_idx applied)."""
    ids = ids.reshape(-1)
    cols = delta.reshape(ids.numel(), -1)
    if hasattr(module, "embed_scale"):
        cols = cols * module.embed_scale.to(cols.dtype)
    if module.padding_idx is not None:
        cols = cols * (ids != module.padding_idx)[:, None].to(cols.dtype)
    rows = torch.nn.functional.one_hot(ids, module.num_embeddings).to(cols.dtype)
    return rows, cols


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


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3", "gemma3", "gpt2"])
def test_intra_proma_full_finetuning_with_embeddings(arch, tie):
    """Every parameter trained: embeddings (one-hot row factor; Gemma3's scaled one; GPT-2's wte/wpe
    and Conv1D), norms, Linears, tied embedding <-> lm_head (the tokens of both uses concatenated)."""
    from test_full_finetuning import tiny_gpt2

    with float64_exact_norms():
        model = tiny_gpt2(seed=3, tie=tie) if arch == "gpt2" else tiny_full(arch, seed=3, train_embeddings=True, tie=tie)
        opt = wrapped(model, rank=3)
        errors, changed = run(model, opt, make_microbatches(count=2, k=3, seed=7), rank=3)
        worst = max(errors, key=errors.get)
        assert errors[worst] <= 1e-10, (worst, errors[worst])
        assert max(changed.values()) > 1e-3
        opt.detach()


def test_intra_proma_packed_layout():
    """Packed (1, total, d) activations: the same tokens, so the same subspaces (brute force on the packed run)."""
    from test_packed_layout import PackedLM, pack, packed_logprobs

    model = PackedLM(seed=2)
    opt = wrapped(model, rank=3)
    expected = {n: torch.zeros_like(p) for n, p in trainable(model)}
    for ids, attn, mask, adv in make_microbatches(count=2, k=4, seed=5):
        packed, cu, resp = pack(ids, attn, mask)
        c = grpo_coefficients(adv, resp, 0.5)
        with opt.paused():
            for n, gm in brute_intra(model, packed, None, resp, c, rank=3,
                                     logp_fn=lambda m, packed=packed, cu=cu: packed_logprobs(m, packed, cu)).items():
                expected[n] += gm
        logp = packed_logprobs(model, packed, cu)
        with opt.microbatch(logp, resp, cu_seqlens=cu):
            grpo_loss(logp, resp, adv, 0.5).backward()
    for n, p in trainable(model):
        assert rel_err(p.grad.detach().reshape(-1), expected[n].detach().reshape(-1)) <= 1e-10, n


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "qwen3", "gemma3"])
def test_intra_proma_gradient_checkpointing(arch, reentrant):
    """HF gradient checkpointing, full fine-tuning with tied embeddings: equals the brute force of a
    non-checkpointed twin."""
    from test_full_finetuning import tiny_gpt2

    def build():
        return tiny_gpt2(seed=4, tie=True) if arch == "gpt2" else tiny_full(arch, seed=4, train_embeddings=True, tie=True)

    with float64_exact_norms():
        model, twin = build(), build()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        opt = wrapped(model, rank=3)
        expected = {n: torch.zeros_like(p) for n, p in trainable(twin)}
        for ids, attn, mask, adv in make_microbatches(count=2, k=3, seed=8):
            c = grpo_coefficients(adv, mask, 0.5)
            for n, gm in brute_intra(twin, ids, attn, mask, c, rank=3).items():
                expected[n] += gm
            logp = token_logprobs(model, ids, attn)
            with opt.microbatch(logp, mask):
                grpo_loss(logp, mask, adv, 0.5).backward()
        for n, p in trainable(model):
            assert rel_err(p.grad.detach().reshape(-1), expected[n].detach().reshape(-1)) <= 1e-10, n
        opt.detach()


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
    # orthonormal to fp32 rounding: the basis is formed in float64 from the last sketch
    assert torch.allclose(approx32.T @ approx32, torch.eye(r), atol=1e-6)
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


def test_subspaces_shared_between_parameters_with_the_same_factor(monkeypatch):
    """q/k/v (and gate/up) see the same input tensor, and a bias the output gradients of its weight:
    each subspace is computed once per microbatch, with the same result as computing it per parameter."""
    import gradproj.linalg.factored as factored
    import gradproj.strategies.intra_proma as intra

    calls = {"n": 0}
    real = factored.sketch_subspace

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(factored, "sketch_subspace", counting)
    grads = []
    for share in (True, False):
        if not share:  # one parameter at a time and nothing looked up: no factor is shared
            monkeypatch.setattr(intra, "DEFER_MAX_BYTES", 0)
            monkeypatch.setattr(factored.SubspaceCache, "get", lambda self, x, keep: None)
        model = linear_only(tiny_hf("qwen2", seed=3))
        opt = wrapped(model, rank=3)
        calls["n"] = 0
        ids, attn, mask, adv = make_microbatches(count=1, k=4, seed=1)[0]
        logp = token_logprobs(model, ids, attn)
        with opt.microbatch(logp, mask):
            grpo_loss(logp, mask, adv, 1.0).backward()
        grads.append((calls["n"], [p.grad.clone() for _, p in trainable(model)]))
    (shared_calls, a), (separate_calls, b) = grads
    # at most 2 layers x (q,k,v inputs -> 1, gate,up inputs -> 1, the q,k,v biases -> their
    # weights') = 12 fewer; fewer when a layer drops other positions (e.g. keys/values no later
    # query attends to carry no gradient)
    assert 6 < separate_calls - shared_calls <= 12
    # equal up to rounding: resolved together, smaller Grams are zero-padded into one batched call
    assert all(rel_err(x.reshape(-1), y.reshape(-1)) <= 1e-12 for x, y in zip(a, b))


@pytest.mark.parametrize("solver", ["exact", "randomized"])
def test_non_finite_output_gradient_drops_the_microbatch(solver):
    """A NaN reaching one layer's output gradients (finite log-prob gradients) makes that layer's
    projected update non-finite: the whole microbatch is dropped and the running gradient kept."""
    model = linear_only(tiny_hf("qwen2", seed=6))
    opt = wrapped(model, rank=3, solver=solver)
    first, second = make_microbatches(count=2, k=3, seed=4)
    ids, attn, mask, adv = first
    logp = token_logprobs(model, ids, attn)
    with opt.microbatch(logp, mask):
        grpo_loss(logp, mask, adv, 0.5).backward()
    before = {n: p.grad.clone() for n, p in trainable(model)}
    target = model.get_submodule("model.layers.0.mlp.down_proj")

    def poison(grad):
        grad = grad.clone()
        grad[..., 0] = float("nan")
        return grad

    ids, attn, mask, adv = second
    with poisoned_output_grads(target, poison):
        logp = token_logprobs(model, ids, attn)
        with opt.microbatch(logp, mask):
            grpo_loss(logp, mask, adv, 0.5).backward()
    assert opt.metrics()["gradproj/dropped_microbatches"] == 1
    for n, p in trainable(model):
        assert torch.equal(p.grad, before[n]), n
    # the same microbatch again, without the NaN, is accepted
    logp = token_logprobs(model, ids, attn)
    with opt.microbatch(logp, mask):
        grpo_loss(logp, mask, adv, 0.5).backward()
    assert all(torch.isfinite(p.grad).all() for _, p in trainable(model))
    assert any(not torch.equal(p.grad, before[n]) for n, p in trainable(model))


def test_randomized_subspace_of_a_low_rank_factor():
    """A sketch wider than the factor's rank (Cholesky of its Gram fails): the eigendecomposition
    route keeps the rank-3 subspace, exactly that of the factor."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 100, generator=g, dtype=torch.float64)
    basis, _ = top_subspace(x, 8, solver="randomized")
    exact, _ = top_subspace(x, 8, solver="exact")
    assert basis.shape == exact.shape == (100, 3)
    assert float((exact @ exact.T - basis @ basis.T).norm()) < 1e-8
    assert torch.allclose(basis.T @ basis, torch.eye(3, dtype=x.dtype), atol=1e-10)


def test_subspace_cache_keeps_recent_inputs_and_the_last_output():
    from gradproj.linalg.factored import SubspaceCache

    cache = SubspaceCache(size=2)
    keep = torch.ones(4, 1, dtype=torch.bool)
    a, b, c, out1, out2 = (torch.randn(4, 3) for _ in range(5))
    for x, name in ((a, "a"), (b, "b")):
        cache.put(x, keep, name)
    assert cache.get(a, keep) == "a"  # a is now the most recent
    cache.put(c, keep, "c")  # evicts b, the least recently used
    assert cache.get(b, keep) is None and cache.get(a, keep) == "a" and cache.get(c, keep) == "c"
    assert cache.get(a, torch.zeros(4, 1, dtype=torch.bool)) is None  # other kept positions
    cache.put(out1, keep, "out1", output=True)
    cache.put(out2, keep, "out2", output=True)  # replaces out1, evicts no input
    assert cache.get(out1, keep) is None and cache.get(out2, keep) == "out2"
    assert cache.get(a, keep) == "a" and cache.get(c, keep) == "c"
    cache.clear()
    assert cache.get(a, keep) is None and cache.get(out2, keep) is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batched_subspaces_equal_one_at_a_time(dtype):
    """top_subspaces over a mixed batch (both routes, given and derived kept rows, a low-rank factor
    whose sketch needs the eigendecomposition fallback, a NaN factor) equals top_subspace per item."""
    from gradproj.linalg.subspace import top_subspaces

    g = torch.Generator().manual_seed(5)
    n = 120
    keep = torch.rand(n, 1, generator=g) > 0.2
    padded = torch.randn(n, 90, generator=g, dtype=torch.float64)
    padded[:7] = 0.0  # zero rows: not kept when the mask is derived
    items = [
        (torch.randn(n, 200, generator=g, dtype=torch.float64), None),
        (torch.randn(n, 80, generator=g, dtype=torch.float64), keep),
        (padded, None),
        (torch.randn(n, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 100, generator=g, dtype=torch.float64), None),
        (torch.full((n, 70), float("nan"), dtype=torch.float64), None),
        (torch.randn(n, 16, generator=g, dtype=torch.float64), None),  # exact route
        (torch.randn(n, 16, generator=g, dtype=torch.float64), keep),
        (torch.randn(n, 48, generator=g, dtype=torch.float64), keep),
    ]
    items = [(x.to(dtype), k) for x, k in items]
    for options in (dict(rank=6), dict(rank=6, energy=0.5, niter=2), dict(rank=6, solver="randomized", oversample=2)):
        batched = top_subspaces(items, **options)
        for index, ((x, k), (basis, kept)) in enumerate(zip(items, batched)):
            single, single_keep = top_subspace(x, keep=k, **options)
            assert torch.equal(kept, single_keep), index
            assert basis.shape == single.shape, index
            if torch.isnan(single).any():
                assert torch.isnan(basis).all(), index
                continue
            tol = 1e-12 if dtype == torch.float64 else 1e-5  # the same subspace (column signs may differ)
            assert float((basis @ basis.T - single @ single.T).abs().max()) <= tol, (index, options)
            eye = torch.eye(basis.shape[1], dtype=torch.float64)
            assert float((basis.double().T @ basis.double() - eye).abs().max()) <= (1e-10 if dtype == torch.float64 else 1e-6)
    assert int(top_subspaces(items, rank=6)[2][1].sum()) == n - 7


def test_deferred_projection_equals_one_layer_at_a_time(monkeypatch):
    """Layers projected in batches (the default) or each right away give the same gradients, on
    the randomized route -- also with nonfinite="propagate", where the engine holds the deferred
    updates and writes them to .grad once they are finished."""
    import gradproj.strategies.intra_proma as intra

    def run(**options):
        model = linear_only(tiny_hf("qwen2", seed=6))
        opt = wrapped(model, rank=3, solver="randomized", **options)
        for ids, attn, mask, adv in make_microbatches(count=2, k=4, seed=3):
            logp = token_logprobs(model, ids, attn)
            with opt.microbatch(logp, mask):
                grpo_loss(logp, mask, adv, 0.5).backward()
        return [p.grad.clone() for _, p in trainable(model)], opt.metrics()

    import gradproj.capture.layer_updates as updates_module

    batched, metrics = run()
    direct, _ = run(nonfinite="propagate")  # held by the engine, written after the flush
    monkeypatch.setattr(updates_module, "DEFERRED_WRITES_MAX_BYTES", 0)
    direct_each, _ = run(nonfinite="propagate")  # finished and written one layer at a time
    monkeypatch.setattr(intra, "DEFER_MAX_BYTES", 0)
    single, single_metrics = run()
    for a, b, c, d in zip(batched, single, direct, direct_each):
        for other in (a, c, d):
            assert float((other - b).abs().max()) <= 1e-12 * float(b.abs().max())
    assert metrics["gradproj/intra_proma/projected_fraction"] == pytest.approx(single_metrics["gradproj/intra_proma/projected_fraction"], rel=1e-9)
    assert metrics["gradproj/intra_proma/projected_fraction"] > 0
