opt = gradproj.wrap(inner, model, "proma", diagnostics=True)
opt.set_groups(group_ids, rewards)  # enables the per-group reward std
with torch.no_grad():  # the policy before the update, for the per-step KL
    before = token_logprobs(model, ids)
run_step(opt, group_advantages(rewards, group_size=4), group_ids)
metrics = opt.metrics()
print({k: round(v, 4) for k, v in metrics.items() if k.startswith("gradproj/diagnostics/") and "/layer/" not in k})
with torch.no_grad():
    after = token_logprobs(model, ids)
print(f"step KL {gradproj.policy_kl(before, after, mask):.2e}")
