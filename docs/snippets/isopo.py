opt = gradproj.wrap(inner, model, ["isopo", "none"], variant="normalize")
advantages = group_advantages(rewards, group_size=4)
for rows in microbatches:
    logp = token_logprobs(model, ids[rows])
    with opt.microbatch(logp, mask[rows]):
        policy_loss(logp, mask[rows], advantages[rows], scale=0.5).backward()
opt.step()
opt.zero_grad()
print(opt.metrics()["gradproj/isopo/coefficient_ratio"])
