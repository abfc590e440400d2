"""Per-token log-probabilities of a causal LM, padding-aware."""

from __future__ import annotations

import torch


def token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probs of each token given its prefix: ``logp[i, t] = log p(ids[i, t+1] | ids[i, :t+1])``.

    Works with left and right padding (the attention mask is passed to the model and HF derives
    position ids from it for left padding).

    Args:
        model: a causal LM returning ``.logits`` of shape (B, T, vocab) (a Hugging Face model,
            a peft ``PeftModel``, or anything with the same call signature).
        input_ids: (B, T) token ids, prompt and response concatenated.
        attention_mask: (B, T) 1 for real tokens, 0 for padding (``None``: no padding).

    Returns:
        (B, T-1) tensor; position t scores token t+1. Mask it with the response mask shifted the
        same way (``response_mask[:, 1:]``).
    """
    kwargs = {"input_ids": input_ids}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        kwargs["position_ids"] = position_ids
    logits = model(**kwargs).logits[:, :-1]
    targets = input_ids[:, 1:]
    return torch.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=-1).gather(
        -1, targets.unsqueeze(-1)
    ).squeeze(-1)
