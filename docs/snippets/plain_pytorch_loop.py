import torch
import transformers

import gradproj
from gradproj.integrations.torch import group_advantages, policy_loss, token_logprobs
from gradproj.demo.adder import build_tokenizer
from gradproj.demo.rollout import sample_rollout
from gradproj.demo.tasks import AdditionTask

# A policy and its tokenizer (here: a tiny random Llama over the demo's 19-character vocabulary;
# use AutoModelForCausalLM/AutoTokenizer.from_pretrained(folder) for a real one, padding_side="left").
tok = build_tokenizer()
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
    eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
))
model.model.embed_tokens.weight.requires_grad_(False)
task = AdditionTask()


def reward(completion: str, answer: str) -> float:
    """Exact match (task.reward) gives a random policy nothing to learn from: shaped instead, half
    for answering in digits, half for each answer digit in its place."""
    digits = sum(c.isdigit() for c in completion) / max(len(completion), 1)
    in_place = sum(c == a for c, a in zip(completion, answer)) / len(answer)
    return (digits + in_place) / 2


opt = gradproj.wrap(
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3), model, strategy="proma"
)
group_size, microbatches = 8, 2
for step in range(1, 9):
    # 1. sample: 4 prompts x group_size responses, scored by a verifiable reward
    problems = task.train_problems(step, count=4, seed=0)
    roll = sample_rollout(model, tok, problems, group_size, task.max_new_tokens, temperature=1.0,
                          seed=step, reward_fn=reward)
    # 2. group-relative advantages (GRPO)
    advantages = group_advantages(roll.rewards, group_size)
    # 3. one optimizer step over the microbatches: each backward inside opt.microbatch(...)
    for rows in torch.arange(len(roll.rewards)).chunk(microbatches):
        logp = token_logprobs(model, roll.ids[rows], roll.attention_mask[rows])
        mask = roll.response_mask[rows]
        with opt.microbatch(logp, mask):
            policy_loss(logp, mask, advantages[rows], scale=1 / microbatches).backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad()
    print(f"step {step}: reward {roll.rewards.mean():.2f}, "
          f"projected {opt.metrics()['gradproj/proma/projected_fraction']:.2f}")
