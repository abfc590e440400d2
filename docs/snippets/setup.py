import torch
import transformers

import gradproj
from gradproj.integrations.torch import group_advantages, policy_loss, token_logprobs

# A tiny random Qwen2-shaped policy (no download) and one GRPO step's rollouts:
# 2 prompts x 4 responses, 12 tokens each, the last 7 of them generated (the response mask).
torch.manual_seed(0)
config = transformers.Qwen2Config(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2,
)
model = transformers.Qwen2ForCausalLM(config)
model.model.embed_tokens.weight.requires_grad_(False)  # train everything but the embeddings
ids = torch.randint(1, 64, (8, 12))
mask = torch.zeros(8, 11, dtype=torch.bool)
mask[:, 4:] = True
rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0])
group_ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
microbatches = [torch.tensor([0, 4, 1, 5]), torch.tensor([2, 6, 3, 7])]  # groups span microbatches
inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def run_step(opt, advantages, group_ids=None):
    """One optimizer step: each microbatch's backward inside opt.microbatch(...)."""
    for rows in microbatches:
        logp = token_logprobs(model, ids[rows])  # (4, 11) log-probs, gradients on
        groups = None if group_ids is None else group_ids[rows]
        with opt.microbatch(logp, mask[rows], group_ids=groups):
            policy_loss(logp, mask[rows], advantages[rows], scale=1 / len(microbatches)).backward()
    opt.step()
    opt.zero_grad()
