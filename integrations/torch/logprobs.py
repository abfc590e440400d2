"""Per-token log-probabilities of a causal LM, padding-aware."""

from __future__ import annotations

import importlib
import sys

import torch

from gradproj.errors import InputError


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


def packed_token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Log-probs of packed (remove-padding) sequences, one row per sequence.

    The sequences are concatenated in one row, ``input_ids`` of shape (1, total), and sequence i
    occupies columns ``cu_seqlens[i]:cu_seqlens[i+1]``. The model is called with position ids that
    restart at 0 for each sequence and ``use_cache=False`` -- from which Hugging Face models build
    attention that keeps the sequences apart -- and the log-probs are laid out as
    `token_logprobs` lays out a right-padded batch, so that row i of the result is sequence i: pass
    it with the same ``cu_seqlens`` to ``opt.microbatch(logp, mask, cu_seqlens=cu_seqlens)``.

    Args:
        model: a causal LM returning ``.logits`` of shape (1, total, vocab) that keeps packed
            sequences apart given restarting ``position_ids`` and no attention mask -- Hugging Face
            models do (a transformers release without that detection is refused); a custom model
            must keep the sequences apart itself.
        input_ids: (1, total) token ids of the packed sequences.
        cu_seqlens: (k+1,) sequence boundaries, starting at 0 and ending at ``total``.

    Returns:
        (k, L-1) tensor with L the longest sequence's length: position t of row i scores token
        t+1 of sequence i; positions past a sequence's end are 0 (mask them out).

    Raises:
        ValueError: ``input_ids`` not of shape (1, total), or ``cu_seqlens`` not boundaries from 0 to total.
        InputError: a transformers release that does not keep packed sequences apart.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"packed input_ids must have shape (1, total), got {tuple(input_ids.shape)}")
    _check_packing_support(model)
    bounds = cu_seqlens.detach().to("cpu", torch.long)  # (boundaries are host data: checked and sized here)
    total = input_ids.shape[1]
    if bounds.dim() != 1 or bounds.numel() < 2 or int(bounds[0]) != 0 or int(bounds[-1]) != total or bool(
        (bounds[1:] < bounds[:-1]).any()
    ):
        raise ValueError(f"cu_seqlens must be (k+1,) non-decreasing boundaries from 0 to {total}, got {bounds.tolist()}")
    width = int((bounds[1:] - bounds[:-1]).max()) - 1
    cu = bounds.to(input_ids.device)
    lengths = cu[1:] - cu[:-1]
    k = lengths.numel()
    sequence = torch.repeat_interleave(torch.arange(k, device=cu.device), lengths, output_size=total)
    position_ids = torch.arange(total, device=cu.device) - cu[sequence]
    logits = model(input_ids=input_ids, position_ids=position_ids[None], use_cache=False).logits[0, :-1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    scores = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[0, 1:, None]).squeeze(-1)  # (total-1,)
    # packed position p scores token p+1 of its own sequence unless p is that sequence's last token;
    # those go to a spare column that is cut off (no boolean indexing: no host synchronisation)
    row = sequence[:-1]
    column = position_ids[:-1]
    column = torch.where(column < lengths[row] - 1, column, torch.full_like(column, width))
    rows = scores.new_zeros(k, width + 1).index_put((row, column), scores)
    return rows[:, :width]


def _check_packing_support(model: torch.nn.Module) -> None:
    """Refuse a Hugging Face model from a transformers release that does not keep packed sequences
    apart given restarting position ids (they would attend to each other: wrong log-probs, no error)."""
    transformers = sys.modules.get("transformers")
    if transformers is None or not hasattr(model, "config"):
        return  # not a Hugging Face model: keeping the sequences apart is the model's own job
    masking = sys.modules.get("transformers.masking_utils")
    if masking is None:
        try:
            masking = importlib.import_module("transformers.masking_utils")
        except ImportError:
            masking = None
    if masking is None or not hasattr(masking, "find_packed_sequence_indices"):
        raise InputError(
            f"packed_token_logprobs: transformers {transformers.__version__} does not detect packed sequences from "
            "position_ids, so they would attend to each other; upgrade transformers (5.x), or run the padded batch "
            "with token_logprobs"
        )
