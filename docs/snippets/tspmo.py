from gradproj.integrations.torch import tspmo_advantages, tspmo_loss, tspmo_weights

opt = gradproj.wrap(inner, model, "none")  # per-token credit: plain accumulation (proma would refuse it)
responses = ids[:, 1:]  # the token each log-prob scores (aligned with mask)
advantages = tspmo_advantages(responses, mask, rewards, group_size=4)  # A(prefix, token) per token
weights = tspmo_weights(responses, mask, rewards, group_size=4)  # A / (n(prefix, token) |Z|), the whole step
for rows in microbatches:  # the groups span both microbatches
    logp = token_logprobs(model, ids[rows])
    with opt.microbatch(logp, mask[rows]):
        tspmo_loss(logp, mask[rows], weights[rows]).backward()
opt.step()
opt.zero_grad()
print("first response token's advantage:", [round(a, 3) for a in advantages[:, 4].tolist()])
print(f"weighted tokens: {int((weights != 0).sum())} of {int(mask.sum())}")
