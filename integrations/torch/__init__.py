"""Plain-PyTorch helpers for policy-gradient loops with gradproj (``gradproj.integrations.torch``)."""

from gradproj.integrations.torch.dmpo import dmpo_loss, dmpo_weights
from gradproj.integrations.torch.grpo import group_advantages, policy_loss, token_kl
from gradproj.integrations.torch.logprobs import packed_token_logprobs, token_logprobs
from gradproj.integrations.torch.token_selection import sgrpo_token_mask
from gradproj.integrations.torch.tspmo import tspmo_advantages, tspmo_loss, tspmo_weights

__all__ = ["token_logprobs", "packed_token_logprobs", "group_advantages", "policy_loss", "token_kl", "sgrpo_token_mask", "dmpo_weights", "dmpo_loss",
           "tspmo_advantages", "tspmo_weights", "tspmo_loss"]
