# after `pip install ./examples/gradproj-example-plugin`: the new names work like built-ins
opt = gradproj.wrap(inner, model, ["clip_coefficients", "damped"], max_abs=0.05, decay=0.5)
advantages = group_advantages(rewards, group_size=4)
for rows in microbatches:
    logp = token_logprobs(model, ids[rows])
    with opt.microbatch(logp, mask[rows]):
        policy_loss(logp, mask[rows], advantages[rows], scale=0.5).backward()
opt.step()
opt.zero_grad()
print(gradproj.get_registry().strategy("damped").summary)
