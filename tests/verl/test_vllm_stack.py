"""The vLLM side of the GPU smoke run, as far as it goes without a GPU: in the verl GPU install
(``verl[vllm]==0.9.1`` then gradproj's extra; .venv-compat, scripts/test_compat.sh). scripts/test.sh
leaves this file out of .venv-verl, which has no vLLM (its wheels are CUDA builds).

What a GPU is still needed for: vLLM's engine itself (its CUDA kernels and memory profiling).
"""

import pytest


@pytest.fixture(scope="module")
def smoke_inputs(tmp_path_factory):
    """The GPU smoke run's model and data (examples/verl/gpu_smoke.py's defaults: 256 hidden units, 4 layers)."""
    from gradproj.testing.verl_cpu.trainer import prepare

    return prepare(tmp_path_factory.mktemp("gpu-smoke"), problems=4, hidden=256, layers=4)


def test_vllm_tokenizer_matches_the_smoke_models(smoke_inputs):
    """vLLM loads gradproj's character tokenizer with its chat template and encodes/decodes as HF does."""
    from transformers import AutoTokenizer
    from vllm.tokenizers import get_tokenizer

    hf = AutoTokenizer.from_pretrained(smoke_inputs["model"])
    tok = get_tokenizer(smoke_inputs["model"])
    chat = [{"role": "user", "content": "12+30="}]
    expected = hf.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    assert tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True) == expected
    answer = hf("42", add_special_tokens=False)["input_ids"] + [hf.eos_token_id]
    assert tok.decode(answer, skip_special_tokens=True) == "42"
    assert (len(tok), tok.eos_token_id, tok.pad_token_id) == (len(hf), hf.eos_token_id, hf.pad_token_id)


def test_vllm_model_config_accepts_the_smoke_model(smoke_inputs):
    """vLLM resolves the random model's architecture, head size and vocabulary as the rollout would
    (bf16, verl's max_model_len = prompt + response lengths)."""
    from transformers import AutoConfig
    from vllm.config import ModelConfig

    hf = AutoConfig.from_pretrained(smoke_inputs["model"])
    config = ModelConfig(model=smoke_inputs["model"], dtype="bfloat16", max_model_len=32)
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.get_head_size() == hf.hidden_size // hf.num_attention_heads == 64
    assert config.get_vocab_size() == hf.vocab_size
    assert config.max_model_len == 32


def test_verl_vllm_replica_imports_against_this_vllm():
    """verl's rollout registry resolves ``rollout.name=vllm`` to its vLLM server replica, whose module
    imports against the vLLM that ``verl[vllm]==0.9.1`` resolves to."""
    from verl.workers.rollout.replica import get_rollout_replica_class

    assert get_rollout_replica_class("vllm").__name__ == "vLLMReplica"
