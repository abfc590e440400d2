from gradproj.integrations.torch import dmpo_loss, dmpo_weights

opt = gradproj.wrap(inner, model, "proma")
advantages = group_advantages(rewards, group_size=4)
with torch.no_grad():  # the sampling policy's mean token log-probs, for the whole step
    sampled = token_logprobs(model, ids)
    mean_logp = (sampled * mask).sum(1) / mask.sum(1)
weights = dmpo_weights(rewards, mean_logp, group_ids)  # lambda = 2, alpha = 1/15
for rows in microbatches:  # the groups span both microbatches
    logp = token_logprobs(model, ids[rows])
    with opt.microbatch(logp, mask[rows]):
        loss = policy_loss(logp, mask[rows], advantages[rows], scale=1 / len(microbatches))
        (loss + dmpo_loss(logp, mask[rows], weights[rows])).backward()
opt.step()
opt.zero_grad()
print("DMPO weights:", [round(w, 4) for w in weights.tolist()])
print(f"projected fraction {opt.metrics()['gradproj/proma/projected_fraction']:.2f}")
