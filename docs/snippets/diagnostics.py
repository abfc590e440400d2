opt = gradproj.wrap(inner, model, "proma", diagnostics=True)
opt.set_groups(group_ids, rewards)  # enables the per-group reward std
advantages = group_advantages(rewards, group_size=4)
before = []
for rows in microbatches:
    logp = token_logprobs(model, ids[rows])
    before.append(logp.detach())
    with opt.microbatch(logp, mask[rows], group_ids=group_ids[rows]):
        policy_loss(logp, mask[rows], advantages[rows], scale=0.5).backward()
opt.step()
opt.zero_grad()
metrics = opt.metrics()
print({k: round(v, 4) for k, v in metrics.items() if k.startswith("gradproj/diagnostics/") and "/layer/" not in k})

with torch.no_grad():  # per-step KL between the policy before and after the update
    after = [token_logprobs(model, ids[rows]) for rows in microbatches]
kl = gradproj.policy_kl(torch.cat(before), torch.cat(after), torch.cat([mask[rows] for rows in microbatches]))
print(f"step KL {kl:.2e}")
