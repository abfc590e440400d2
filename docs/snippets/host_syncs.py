from gradproj.diagnostics import count_host_syncs

opt = gradproj.wrap(inner, model, "proma")
advantages = group_advantages(rewards, group_size=4)
for rows in microbatches:
    logp = token_logprobs(model, ids[rows])
    with opt.microbatch(logp, mask[rows]):
        loss = policy_loss(logp, mask[rows], advantages[rows], scale=1 / len(microbatches))
        with count_host_syncs() as syncs:  # what would make the host wait for a GPU
            loss.backward()
    print(f"{len(syncs)} host read(s) in the backward:\n{syncs.summary()}")
    assert len(syncs) <= 1  # the check of the loss's per-token weights, whatever the model's size
opt.step()
