"""Diagnostics the seeds measure, from what the capture already has (the Gram of the sequence
gradients) or from two sets of log-probs.

* `GradientDiagnostics` -- per layer and averaged: prompt-group gradient cosines (mean |cos|
  and the fraction of pairs with |cos| < 0.15, seed ``grpo-normalization``), sequence-gradient norms,
  and the per-group reward std of the step. Enabled by ``wrap(..., diagnostics=True)``.
* `LoraKLBound` -- the rank-dependent bound mu(r) of seed ``lora-implicit-kl`` (Theorem 1)
  per LoRA layer. Enabled by ``wrap(..., lora_bound=True)``.
* `policy_kl` -- the KL between the policy before and after an update.
* `count_host_syncs` -- what in a block of code would make the host wait for a GPU
  (counted on any device, the CPU included).
"""

from gradproj.diagnostics.gradients import GradientDiagnostics, group_cosines
from gradproj.diagnostics.host_sync import HostSyncs, count_host_syncs
from gradproj.diagnostics.kl import policy_kl
from gradproj.diagnostics.lora import LoraKLBound, lora_layers

__all__ = ["GradientDiagnostics", "group_cosines", "LoraKLBound", "lora_layers", "policy_kl", "count_host_syncs", "HostSyncs"]
