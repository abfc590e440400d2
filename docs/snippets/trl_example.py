import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers
from datasets import Dataset

from gradproj.demo.adder import addition_problems, build_tokenizer
from gradproj.integrations.trl import GradProjGRPOTrainer, kl_free_lora_grpo

# An offline tiny policy and task (use your own model, tokenizer and dataset instead)
tok = build_tokenizer()
model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
    vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
))
model.generation_config.pad_token_id = tok.pad_token_id
problems = addition_problems(32, seed=0, max_digits=1)
train = Dataset.from_dict({"prompt": [p for p, _ in problems], "answer": [a for _, a in problems]})


def reward(completions, answer, **kwargs):
    """1 for the exact sum, else closer to 0 the closer the length: a signal even a random policy gets."""
    return [1.0 if c.strip() == a else -abs(len(c.strip()) - len(a)) / 4 for c, a in zip(completions, answer)]


# KL-free LoRA GRPO (beta=0: no reference model) with PROMA on top, as configuration
preset = kl_free_lora_grpo(
    tempfile.mkdtemp(), rank=8, proma=True, strategy_options={"relative_bound": 0.5},
    learning_rate=1e-3, per_device_train_batch_size=8, gradient_accumulation_steps=2, num_generations=4,
    max_completion_length=4, max_steps=2, logging_steps=1,  # (no GPU: the preset sets use_cpu=True, bf16=False)
    gradient_checkpointing=False, report_to="none", save_strategy="no", disable_tqdm=True,
)
trainer = GradProjGRPOTrainer(model=model, reward_funcs=reward, train_dataset=train, processing_class=tok,
                              **preset.trainer_kwargs())
assert trainer.ref_model is None
trainer.train()
logs = trainer.state.log_history[-2]
print({k: v for k, v in logs.items() if k.startswith("gradproj/") or k == "reward"})
assert logs["gradproj/proma/projected_fraction"] > 0  # PROMA removed part of the running gradient
