"""TRL adapter: GradProjGRPOTrainer against the core's brute force, LoRA via peft_config=, resume,
the KL-free LoRA preset, and the refusals."""

import contextlib
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
trl = pytest.importorskip("trl")  # the test extra installs it; this guards a partial environment only

import gradproj  # noqa: E402
from gradproj.demo.adder import build_tokenizer  # noqa: E402
from gradproj.integrations.trl import (  # noqa: E402
    GradProjGRPOTrainer,
    SGRPOSelection,
    check_grpo_config,
    check_trl_version,
    kl_free_lora_grpo,
)
from helpers import float64_exact_norms, reference_update, rel_err  # noqa: E402


def tiny_model(tok, dtype=torch.float64, seed=0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    cfg._attn_implementation = "sdpa"
    model = transformers.Qwen2ForCausalLM(cfg).to(dtype)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    return model


def dataset(n=16):
    from datasets import Dataset

    from gradproj.demo.adder import addition_problems

    problems = addition_problems(n, seed=3, max_digits=1)
    return Dataset.from_dict({"prompt": [p for p, _ in problems], "answer": [a for _, a in problems]})


def reward(completions, answer, **kwargs):
    """Dense: exact answer 1, otherwise closeness of the length (non-zero advantages for a random model)."""
    return [1.0 if c.strip() == a else -abs(len(c) - 2) / 4.0 for c, a in zip(completions, answer)]


def grpo_args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, num_generations=4,
        max_completion_length=4, max_steps=2, learning_rate=5e-2, beta=0.0, use_cpu=True, bf16=False,
        gradient_checkpointing=False, logging_steps=1, report_to="none", save_strategy="no", seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    settings.update(overrides)
    return trl.GRPOConfig(**settings)


def trainer(tmp_path, model=None, gradproj_config="proma", args=None, **kwargs):
    tok = build_tokenizer()
    return GradProjGRPOTrainer(
        model=model if model is not None else tiny_model(tok), reward_funcs=reward,
        args=args if args is not None else grpo_args(tmp_path), train_dataset=dataset(), processing_class=tok,
        gradproj=gradproj_config, **kwargs,
    )


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("strategy", ["none", "proma", "proma_reference", "intra_proma"])
def test_each_strategy_trains(strategy, tmp_path):
    t = trainer(tmp_path, gradproj_config=strategy)
    before = snapshot(t.model)
    t.train()
    after = snapshot(t.model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert isinstance(t.gradproj_optimizer, gradproj.GradProjOptimizer)
    logged = {k for row in t.state.log_history for k in row}
    assert "gradproj/microbatches" in logged
    if strategy != "none":
        assert any(k.startswith(f"gradproj/{strategy.split('_reference')[0]}/") for k in logged), logged


# d loss / d logp[i, t] on valid tokens, per TRL loss type at ratio 1 (TRL 1.16 grpo_trainer.py:3120-3185)
def coefficients(loss_type, advantages, mask, num_items, ga, spg, max_len, epsilon_high):
    count = mask.sum(dim=1).double()
    B = mask.shape[0]
    if loss_type in ("grpo", "sapo"):
        return -advantages / (count.clamp(min=1) * B * ga)
    if loss_type == "bnpo":
        return -advantages / (mask.sum().double().clamp(min=1) * ga)
    if loss_type == "dr_grpo":
        return -advantages / (B * max_len * ga)
    if loss_type == "luspo":
        return -advantages / (B * ga)
    if loss_type == "cispo":  # the detached ratio is clamped at epsilon_high (0.2 unless set)
        advantages = advantages * min(1.0, epsilon_high)
    return -advantages / (float(num_items) * ga / spg)  # dapo, cispo, vespo


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo", "luspo", "cispo", "sapo", "vespo"])
@pytest.mark.parametrize("setup", ["full", "lora"])
def test_one_step_equals_core_brute_force(loss_type, setup, tmp_path):
    """Record the microbatches the trainer trains on and the gradient at its optimizer step, then
    recompute the PROMA update from one backward per sequence (float64; HF's RMSNorm rounds through
    float32, so it is patched to stay in float64 for both sides)."""
    with float64_exact_norms():
        one_step_against_brute_force(loss_type, setup, tmp_path)


def test_fused_lm_head_precision_is_trls_own(tmp_path):
    """The LoRA tolerance above is TRL's: plain accumulation (no capture at all) shows the same error."""
    with float64_exact_norms():
        with pytest.raises(AssertionError, match=r"e-0[78]"):
            one_step_against_brute_force("dapo", "lora", tmp_path, strategy="none", tolerance=1e-10)


def one_step_against_brute_force(loss_type, setup, tmp_path, strategy="proma", tolerance=None, seen=None, **trainer_kwargs):
    """``strategy=None``: plain TRL (no gradproj; TRL's fused LM head). ``seen`` collects the inputs of
    each microbatch; a batch's ``tool_mask`` (S-GRPO's selection) narrows the loss mask."""
    tok = build_tokenizer()
    model = tiny_model(tok)
    extra = {}
    if setup == "lora":
        from peft import LoraConfig

        extra["peft_config"] = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", init_lora_weights=False)
    else:
        model.model.embed_tokens.weight.requires_grad_(False)  # full fine-tuning, lm_head included
    args = grpo_args(tmp_path, max_steps=1, loss_type=loss_type, max_grad_norm=0.0)  # no clipping before the hook
    t = GradProjGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset(), processing_class=tok,
                            gradproj=strategy, **extra, **trainer_kwargs)
    seen = [] if seen is None else seen
    original = t.compute_loss

    def recording(model, inputs, *a, **k):
        seen.append({key: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for key, v in inputs.items()})
        return original(model, inputs, *a, **k)

    t.compute_loss = recording
    for p in t.model.parameters():  # peft creates float32 adapters on a float64 base: make them float64 too
        p.data = p.data.double()
    state = {}

    def pre_step(optimizer, *_):
        state["params"] = {n: p.detach().clone() for n, p in t.model.named_parameters()}
        state["grads"] = {n: p.grad.detach().clone() for n, p in t.model.named_parameters() if p.grad is not None}

    t.create_optimizer()
    (t.optimizer if strategy is None else t.optimizer.optimizer).register_step_pre_hook(pre_step)
    t.train()
    assert len(seen) == 2 and state

    # brute force on an untouched copy holding the pre-step parameters
    net = t.model
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(state["params"][n])
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    params = [p for n, p in net.named_parameters() if p.requires_grad]
    G = {n: None for n in names}
    with contextlib.nullcontext() if strategy is None else t.gradproj_optimizer.paused():
        for inputs in seen:
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
            attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
            C = inputs["completion_ids"].shape[1]
            if setup == "lora" or strategy is None:  # lm_head frozen or no gradproj: TRL's fused LM head, here too
                labels = ids.masked_fill(attn == 0, -100)
                labels[:, :-C] = -100
                logp = net(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True).log_probs[:, -C:]
            else:  # lm_head trained: the trainer runs the ordinary forward
                logits = net(input_ids=ids, attention_mask=attn).logits[:, -C - 1 : -1]
                logp = torch.log_softmax(logits, -1).gather(-1, inputs["completion_ids"][..., None])[..., 0]
            mask = inputs["completion_mask"].bool()
            if "tool_mask" in inputs:
                mask = mask & inputs["tool_mask"].bool()
            rows = []
            for i in range(ids.shape[0]):
                g = torch.autograd.grad((logp[i] * mask[i]).sum(), params, retain_graph=True, allow_unused=True)
                rows.append(torch.cat([(torch.zeros_like(p) if x is None else x).reshape(-1) for x, p in zip(g, params)]))
            S_all = torch.stack(rows).double()
            c = coefficients(loss_type, inputs["advantages"].double(), mask, inputs["num_items_in_batch"],
                             args.gradient_accumulation_steps, args.steps_per_generation, args.max_completion_length,
                             t.epsilon_high)
            offset = 0
            for n, p in zip(names, params):
                S = S_all[:, offset : offset + p.numel()]
                offset += p.numel()
                G[n] = reference_update(G[n], S, c, strategy=strategy or "none")
    worst = max(
        (rel_err(state["grads"].get(n, torch.zeros_like(p)).reshape(-1).double(), G[n]), n) for n, p in zip(names, params)
    )
    # TRL's fused LM head (kept when lm_head is frozen, as with LoRA) accumulates in float32, so TRL's own
    # gradient (strategy "none") is only float32-exact there too; with lm_head trained the path is float64.
    if tolerance is None:
        tolerance = 1e-6 if setup == "lora" or strategy is None else 1e-10
    assert worst[0] <= tolerance, worst
    if setup == "lora":
        assert all("lora_" in n for n in names)


@pytest.mark.parametrize("strategy", ["proma", None])
def test_sgrpo_selection_is_what_the_loss_trains_on(strategy, tmp_path):
    """sgrpo=: the gradient of the step equals the brute force of S-GRPO's loss (each completion's
    mean over its selected tokens, loss_type="grpo") on the recorded selection -- with PROMA, and with
    plain TRL (gradproj=None; TRL's fused LM head, float32-exact) -- and the selection follows the rule."""
    seen = []
    with float64_exact_norms():
        one_step_against_brute_force("grpo", "full", tmp_path, strategy=strategy, seen=seen,
                                     sgrpo=SGRPOSelection(alpha=1, p=0.5, k=2, seed=3))
    for inputs in seen:
        completion, selected = inputs["completion_mask"].bool(), inputs["tool_mask"].bool()
        position = torch.cumsum(completion.long(), 1) - 1
        assert not (selected & ~completion).any() and (selected.sum(1) <= 2).all()
        assert torch.equal(selected & (position < 1), completion & (position < 1))  # the first alpha always
    assert any((inputs["tool_mask"].sum(1) < inputs["completion_mask"].sum(1)).any() for inputs in seen)  # a subset


def test_sgrpo_selection_is_kept_for_every_use_of_a_rollout(tmp_path):
    """num_iterations=2 (plain TRL): both passes over a rollout batch train on the same selection,
    and the same seed gives the same selections."""
    runs = []
    for run in range(2):
        args = grpo_args(tmp_path / str(run), loss_type="grpo", num_iterations=2, max_steps=2)
        t = trainer(tmp_path / str(run), gradproj_config=None, args=args, sgrpo={"alpha": 1, "p": 0.5, "k": 2, "seed": 1})
        seen, original = [], t.compute_loss

        def recording(model, inputs, *a, original=original, seen=seen, **k):
            seen.append((inputs["completion_ids"].clone(), inputs["tool_mask"].clone()))
            return original(model, inputs, *a, **k)

        t.compute_loss = recording
        t.train()
        assert len(seen) == 4 and any("sgrpo/selected_fraction" in row for row in t.state.log_history)
        for first, again in ((0, 2), (1, 3)):  # microbatch i of the rollout, then its second iteration
            assert torch.equal(seen[first][0], seen[again][0]) and torch.equal(seen[first][1], seen[again][1])
        runs.append(seen)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(*runs))


@pytest.mark.parametrize("gradproj_config", ["proma", None])
def test_sgrpo_refusals(gradproj_config, tmp_path):
    selection = SGRPOSelection(alpha=1, p=0.5, k=2)
    for overrides, needle in [({"loss_type": "dapo"}, "loss_type='dapo'"),
                              ({"loss_type": "grpo", "top_entropy_quantile": 0.5}, "top_entropy_quantile")]:
        if gradproj_config and "top_entropy_quantile" in overrides:
            continue  # refused by gradproj's own check first
        with pytest.raises(gradproj.ConfigError, match=needle):
            trainer(tmp_path, gradproj_config=gradproj_config, args=grpo_args(tmp_path, **overrides), sgrpo=selection)
    with pytest.raises(gradproj.ConfigError, match="alpha <= k"):
        SGRPOSelection(alpha=3, p=0.5, k=2)
    with pytest.raises(gradproj.ConfigError, match="give alpha, p, k"):
        trainer(tmp_path, gradproj_config=gradproj_config, args=grpo_args(tmp_path, loss_type="grpo"), sgrpo={"alpha": 1})


def test_training_twice_keeps_one_wrapper(tmp_path):
    t = trainer(tmp_path, args=grpo_args(tmp_path, max_steps=1))
    t.train()
    first = t.gradproj_optimizer
    t.args.max_steps = 2
    t.train()
    assert t.gradproj_optimizer is first


def test_lora_via_peft_config_trains_every_adapter(tmp_path):
    from peft import LoraConfig

    t = trainer(tmp_path, peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    before = snapshot(t.model)
    assert before and all("lora_" in n for n in before)
    t.train()
    after = snapshot(t.model)
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, unchanged


@pytest.mark.parametrize("sgrpo", [None, {"alpha": 1, "p": 0.5, "k": 2, "seed": 5}])
def test_resume_equals_uninterrupted(sgrpo, tmp_path):
    """With sgrpo=, the resumed run draws the selections the uninterrupted one does (seeded per step)."""
    extra = {} if sgrpo is None else {"loss_type": "grpo"}
    full = trainer(tmp_path / "a", args=grpo_args(tmp_path / "a", max_steps=3, **extra), sgrpo=sgrpo)
    full.train()
    expected = snapshot(full.model)

    first = trainer(tmp_path / "b", args=grpo_args(tmp_path / "b", max_steps=3, save_strategy="steps", save_steps=2, **extra),
                    sgrpo=sgrpo)
    first.train()
    ckpt = tmp_path / "b" / "checkpoint-2"
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert state["gradproj"]["strategies"] == ["proma"] and state["gradproj"]["steps"] == 2
    resumed = trainer(tmp_path / "c", args=grpo_args(tmp_path / "c", max_steps=3, **extra), sgrpo=sgrpo)
    resumed.train(resume_from_checkpoint=str(ckpt))
    got = snapshot(resumed.model)
    assert all(torch.equal(expected[n], got[n]) for n in expected)


def test_gradproj_none_is_plain_grpotrainer(tmp_path):
    tok = build_tokenizer()
    plain = trl.GRPOTrainer(model=tiny_model(tok), reward_funcs=reward, args=grpo_args(tmp_path / "p"),
                            train_dataset=dataset(), processing_class=tok)
    plain.train()
    ours = trainer(tmp_path / "o", gradproj_config=None)
    ours.train()
    a, b = snapshot(plain.model), snapshot(ours.model)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert ours.gradproj_optimizer is None


def test_kl_free_lora_preset(tmp_path):
    preset = kl_free_lora_grpo(str(tmp_path), rank=4, learning_rate=5e-2, per_device_train_batch_size=4,
                               gradient_accumulation_steps=2, num_generations=4, max_completion_length=4, max_steps=1,
                               use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none",
                               save_strategy="no", disable_tqdm=True)
    assert preset.args.beta == 0.0 and preset.args.num_iterations == 1 and preset.gradproj is None
    assert preset.peft_config.r == 4
    tok = build_tokenizer()
    t = GradProjGRPOTrainer(model=tiny_model(tok), reward_funcs=reward, train_dataset=dataset(), processing_class=tok,
                            **preset.trainer_kwargs())
    assert t.ref_model is None
    t.train()
    with_proma = kl_free_lora_grpo(str(tmp_path), rank=8, proma=True, strategy_options={"relative_bound": 0.5},
                                   use_cpu=True, bf16=False)
    assert with_proma.gradproj.strategies == ["proma"] and with_proma.gradproj.options == {"relative_bound": 0.5}
    with pytest.raises(gradproj.ConfigError, match="beta=0"):
        kl_free_lora_grpo(str(tmp_path), beta=0.04)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"beta": 0.04}, "beta=0.04"),
        ({"num_iterations": 2}, "num_iterations=2"),
        ({"steps_per_generation": 4}, "steps_per_generation=4"),
        ({"entropy_coef": 0.01}, "entropy bonus"),
        ({"top_entropy_quantile": 0.5}, "top_entropy_quantile"),
    ],
)
def test_misconfigurations_are_refused(overrides, needle, tmp_path):
    args = grpo_args(tmp_path, **overrides)
    with pytest.raises(gradproj.ConfigError, match=needle):
        trainer(tmp_path, args=args)
    check_grpo_config(args, gradproj.GradProjConfig(strategy="none"))  # plain accumulation accepts anything


def test_other_refusals(tmp_path):
    with pytest.raises(gradproj.ConfigError, match="transforms"):
        trainer(tmp_path, gradproj_config=["variance_scaling", "proma"])
    from peft import LoraConfig

    tok = build_tokenizer()
    model = tiny_model(tok)
    stale = torch.optim.AdamW(model.parameters(), lr=1e-3)  # built before PEFT: holds the base weights
    t = GradProjGRPOTrainer(model=model, reward_funcs=reward, args=grpo_args(tmp_path), train_dataset=dataset(),
                            processing_class=tok, gradproj="proma", optimizers=(stale, None),
                            peft_config=LoraConfig(r=4, target_modules="all-linear"))
    with pytest.raises(gradproj.ConfigError, match="not in the optimizer"):
        t.train()


def test_trl_version_check():
    assert check_trl_version("1.16.0") == "1.16.0"
    for bad in ("1.15.2", "1.17.0", "2.0.0"):
        with pytest.raises(ImportError, match=r">=1\.16\.0,<1\.17\.0"):
            check_trl_version(bad)


def test_kl_free_preset_takes_the_cpu_defaults_without_a_gpu(tmp_path, monkeypatch):
    """TRL's bf16 default is refused on a CPU: the preset says use_cpu=True, bf16=False there,
    unless the caller chose."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    preset = kl_free_lora_grpo(str(tmp_path))
    assert preset.args.use_cpu is True and preset.args.bf16 is False
    chosen = kl_free_lora_grpo(str(tmp_path), use_cpu=True, bf16=False, learning_rate=1e-3)
    assert chosen.args.learning_rate == 1e-3


def test_unsupported_adapters_are_refused_with_trl_advice(tmp_path):
    """DoRA adapters have no gradproj handler: refused when training starts, with advice in TRL's terms."""
    from peft import LoraConfig

    dora = LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    with pytest.raises(gradproj.CoverageError, match="With TRL: freeze those parameters"):
        trainer(tmp_path, model=tiny_model(build_tokenizer(), dtype=torch.float32), peft_config=dora).train()


def test_reference_free_monitoring_in_trls_logs(tmp_path):
    """beta=0 (no reference model): gradproj logs the token entropy every step and, with
    kl_estimate, the per-step KL of the previous update from the second step on."""
    t = trainer(tmp_path, gradproj_config={"strategy": "proma", "kl_estimate": True}, args=grpo_args(tmp_path, max_steps=3))
    t.train()
    rows = [row for row in t.state.log_history if "gradproj/microbatches" in row]
    assert len(rows) == 3
    assert all(row["gradproj/entropy"] > 0 for row in rows)
    assert "gradproj/kl_estimate/per_token" not in rows[0]
    assert all(row["gradproj/kl_estimate/per_token"] > 0 for row in rows[1:])
