import torch
import transformers

import gradproj
from gradproj.integrations.torch import (
    group_advantages, policy_loss, token_logprobs)

torch.manual_seed(0)
# A small policy: a random 2-layer Llama over 16 tokens
# (any Hugging Face causal LM works the same).
config = transformers.LlamaConfig(
    vocab_size=16, hidden_size=32, intermediate_size=64,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
    bos_token_id=None, eos_token_id=None, pad_token_id=None)
model = transformers.LlamaForCausalLM(config)
opt = gradproj.wrap(torch.optim.AdamW(model.parameters(), lr=3e-3),
                    model, strategy="proma")


def reward(completions):
    """A verifiable reward: the share of completion tokens below 4."""
    return (completions < 4).float().mean(dim=1)


prompts = torch.randint(4, 16, (4, 3))  # 4 prompts of 3 tokens
group_size, microbatches = 8, 2
for step in range(1, 11):
    # 1. sample group_size completions per prompt, score them
    with torch.no_grad():
        ids = model.generate(
            prompts.repeat_interleave(group_size, dim=0),
            do_sample=True, max_new_tokens=6, min_new_tokens=6)
    rewards = reward(ids[:, prompts.shape[1]:])
    advantages = group_advantages(rewards, group_size)  # GRPO
    response_mask = torch.zeros(ids.shape)
    response_mask[:, prompts.shape[1]:] = 1
    # 2. one optimizer step; each microbatch's backward inside
    #    opt.microbatch(logp, mask)
    for rows in torch.arange(len(ids)).chunk(microbatches):
        logp = token_logprobs(model, ids[rows])  # scores tokens 1..T-1
        mask = response_mask[rows, 1:]
        with opt.microbatch(logp, mask):
            loss = policy_loss(logp, mask, advantages[rows],
                               scale=1 / microbatches)
            loss.backward()
    opt.step()
    opt.zero_grad()
    fraction = opt.metrics()["gradproj/proma/projected_fraction"]
    print(f"step {step}: reward {rewards.mean():.2f}, "
          f"projected fraction {fraction:.2f}")
