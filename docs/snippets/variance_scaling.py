opt = gradproj.wrap(inner, model, ["variance_scaling", "proma"], power=1.0, scope="group")
opt.set_groups(group_ids, rewards)  # the whole step's groups and rewards, before its first microbatch
centred = group_advantages(rewards, group_size=4, normalize_std=False)  # REINFORCE, group baseline
for rows in microbatches:
    logp = token_logprobs(model, ids[rows])
    with opt.microbatch(logp, mask[rows], group_ids=group_ids[rows]):
        policy_loss(logp, mask[rows], centred[rows], scale=0.5).backward()
opt.step()  # the update GRPO's std-normalised advantages would give (then PROMA's projection)
opt.zero_grad()
print(opt.metrics()["gradproj/variance_scaling/scale_mean"])
