# train_ddp.py -- run: torchrun --nproc-per-node 2 train_ddp.py
import torch
import torch.distributed as dist
import transformers

import gradproj
from gradproj.integrations.torch import policy_loss, token_logprobs

# "nccl" on GPUs (then move the model and batches to the rank's device)
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)  # the same initial model on every rank
config = transformers.LlamaConfig(
    vocab_size=16, hidden_size=32, intermediate_size=64,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
model = transformers.LlamaForCausalLM(config)
ddp = torch.nn.parallel.DistributedDataParallel(model)
opt = gradproj.wrap(torch.optim.AdamW(ddp.parameters(), lr=1e-5),
                    ddp, strategy="proma")

torch.manual_seed(1 + rank)  # each rank its own microbatches
M = 2
for microbatch in range(M):
    input_ids = torch.randint(0, 16, (4, 8))
    response_mask = torch.zeros(4, 7)
    response_mask[:, 2:] = 1
    logp = token_logprobs(ddp, input_ids)
    with opt.microbatch(logp, mask=response_mask):
        policy_loss(logp, response_mask, torch.randn(4),
                    scale=1 / M).backward()
# optional: average .grad over the ranks now (before clipping, logging)
opt.sync_gradients()
torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
opt.step()  # averages over the ranks if you did not
print(f"rank {rank}: {opt.metrics()}")
dist.destroy_process_group()
