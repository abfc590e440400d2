import torch
import transformers

import gradproj
from gradproj.integrations.torch import policy_loss, token_logprobs

torch.manual_seed(0)
config = transformers.LlamaConfig(
    vocab_size=16, hidden_size=32, intermediate_size=64,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
model = transformers.LlamaForCausalLM(config)
# full fine-tuning of everything but the token embedding (an exclude glob)
opt = gradproj.wrap(torch.optim.AdamW(model.parameters(), lr=1e-5),
                    model, strategy="proma", exclude=["*embed_tokens*"])
# False: excluded parameters are frozen
print(model.model.embed_tokens.weight.requires_grad)

for microbatch in range(2):  # 2 microbatches of 4 sequences, one step
    input_ids = torch.randint(0, 16, (4, 8))  # 3 prompt + 5 response
    response_mask = torch.zeros(4, 7)
    response_mask[:, 2:] = 1  # log-prob t scores token t+1
    logp = token_logprobs(model, input_ids)
    with opt.microbatch(logp, mask=response_mask):
        policy_loss(logp, response_mask, torch.randn(4),
                    scale=1 / 2).backward()
opt.step()
opt.zero_grad()
print(opt.metrics())
