opt = gradproj.wrap(inner, model, "proma", relative_bound=0.5)
advantages = group_advantages(rewards, group_size=4)
for rows in microbatches:
    logp = token_logprobs(model, ids[rows])
    with opt.microbatch(logp, mask[rows]):
        policy_loss(logp, mask[rows], advantages[rows], scale=0.5).backward()
opt.step()
opt.zero_grad()
metrics = opt.metrics()
print(f"projected fraction {metrics['gradproj/proma/projected_fraction']:.3f}")
assert 0.0 < metrics["gradproj/proma/projected_fraction"] < 1.0
