opt = gradproj.wrap(inner, model, "none")  # installs nothing: exactly the inner optimizer
advantages = group_advantages(rewards, group_size=4)
for rows in microbatches:
    logp = token_logprobs(model, ids[rows])
    with opt.microbatch(logp, mask[rows]):  # optional with "none"
        policy_loss(logp, mask[rows], advantages[rows], scale=0.5).backward()
opt.step()
opt.zero_grad()
print(opt.metrics()["gradproj/microbatches"])
