from gradproj.integrations.torch import sgrpo_token_mask

opt = gradproj.wrap(inner, model, "proma")
advantages = group_advantages(rewards, group_size=4)
selector = torch.Generator().manual_seed(0)  # reproducible selections
for rows in microbatches:
    logp = token_logprobs(model, ids[rows])
    # the first 2 response tokens, then each later one with probability 0.5, at most 5 per response
    selected = sgrpo_token_mask(mask[rows], alpha=2, p=0.5, k=5, generator=selector)
    with opt.microbatch(logp, selected):  # the selection is the mask: gradients over those tokens
        policy_loss(logp, selected, advantages[rows], scale=1 / len(microbatches),
                    aggregation="sequence_mean").backward()
    print(f"selected {int(selected.sum())} of {int(mask[rows].sum())} response tokens")
opt.step()
opt.zero_grad()
print(f"projected fraction {opt.metrics()['gradproj/proma/projected_fraction']:.2f}")
