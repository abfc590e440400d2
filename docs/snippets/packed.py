import torch
import transformers

import gradproj
from gradproj.integrations.torch import packed_token_logprobs, policy_loss

torch.manual_seed(0)
config = transformers.LlamaConfig(
    vocab_size=16, hidden_size=32, intermediate_size=64,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
model = transformers.LlamaForCausalLM(config)
opt = gradproj.wrap(torch.optim.AdamW(model.parameters(), lr=1e-3),
                    model, strategy="proma")

for microbatch in range(2):  # 2 microbatches, one step
    # three sequences (prompt + response) of 5, 8 and 3 tokens in one row
    sequences = [torch.randint(0, 16, (n,)) for n in (5, 8, 3)]
    input_ids = torch.cat(sequences)[None]     # (1, 16)
    cu_seqlens = torch.tensor([0, 5, 13, 16])  # where each one starts, ends
    # row i, column t: token t+1 of sequence i -- the response tokens
    response_mask = torch.zeros(3, 7)
    response_mask[0, 2:4] = response_mask[1, 3:7] = response_mask[2, 1] = 1
    # (3, 7): row i is sequence i, laid out like a right-padded batch
    logp = packed_token_logprobs(model, input_ids, cu_seqlens)
    with opt.microbatch(logp, mask=response_mask, cu_seqlens=cu_seqlens):
        policy_loss(logp, response_mask, torch.randn(3),
                    scale=1 / 2).backward()
opt.step()
opt.zero_grad()
print(opt.metrics())
