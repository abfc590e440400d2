import torch
import transformers
from peft import LoraConfig, get_peft_model

import gradproj
from gradproj.integrations.torch import policy_loss, token_logprobs

torch.manual_seed(0)
config = transformers.LlamaConfig(
    vocab_size=16, hidden_size=32, intermediate_size=64,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
model = transformers.LlamaForCausalLM(config)
model = get_peft_model(model, LoraConfig(
    r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
adapters = [p for p in model.parameters() if p.requires_grad]
opt = gradproj.wrap(torch.optim.AdamW(adapters, lr=1e-4),
                    model, strategy="proma")

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
