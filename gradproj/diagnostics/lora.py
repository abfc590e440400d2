"""The rank-dependent KL bound of KL-free LoRA training (seed ``lora-implicit-kl``, Theorem 1).

For a LoRA layer ``W = W0 + B A`` (A: r x k, B: d x r) trained from ``(A0, B0)``::

    mu(r) = sqrt(r k) (||B0||_2 ||A - A0||_2 + ||A0||_2 ||B - B0||_2),    KL <= mu e^mu  (first order)

(spectral norms; k the layer's input width). The paper's derivation has no adapter scaling; peft
multiplies the adapter's output by ``lora_alpha / r``, which scales the logit change the same way
(reported separately as ``scaled_mu``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gradproj.errors import ConfigError

__all__ = ["LoraKLBound", "lora_layers"]


def lora_layers(model: nn.Module):
    """``[(name, adapter, lora_A linear, lora_B linear, scaling)]`` for every peft LoRA adapter."""
    found = []
    for name, module in model.named_modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_a, nn.ModuleDict) or not isinstance(lora_b, nn.ModuleDict):
            continue
        scaling = getattr(module, "scaling", {})
        for adapter, a in lora_a.items():
            b = lora_b[adapter] if adapter in lora_b else None  # (ModuleDict has no .get)
            if isinstance(a, nn.Linear) and isinstance(b, nn.Linear):
                found.append((name, adapter, a, b, float(scaling.get(adapter, 1.0))))
    return found


def _spectral(matrix: torch.Tensor) -> float:
    matrix = matrix.detach()
    if hasattr(matrix, "full_tensor"):  # a DTensor (FSDP2): the norm of the whole matrix
        matrix = matrix.full_tensor()
    return float(torch.linalg.matrix_norm(matrix.double(), ord=2))


class LoraKLBound:
    """Snapshots every LoRA adapter at construction; `metrics` gives mu(r) from the drift since.

    Args:
        model: a model with peft LoRA layers.

    Raises:
        ConfigError: the model has no LoRA layer.
    """

    def __init__(self, model: nn.Module) -> None:
        layers = lora_layers(model)
        if not layers:
            raise ConfigError(
                "lora_bound=True needs peft LoRA layers (modules with lora_A / lora_B), but the model has "
                "none; apply LoRA (peft.get_peft_model) before wrapping, or drop lora_bound"
            )
        self.layers = [
            (f"{name}.{adapter}", a, b, scaling, a.weight.detach().clone(), b.weight.detach().clone(),
             _spectral(a.weight), _spectral(b.weight))
            for name, adapter, a, b, scaling in layers
        ]

    def bounds(self) -> dict[str, float]:
        """``{layer.adapter: mu}`` now."""
        out = {}
        for key, a, b, _scaling, a0, b0, a0_norm, b0_norm in self.layers:
            r, k = a.weight.shape
            delta_a = _spectral(a.weight.detach() - a0.to(a.weight.device))
            delta_b = _spectral(b.weight.detach() - b0.to(b.weight.device))
            out[key] = math.sqrt(r * k) * (b0_norm * delta_a + a0_norm * delta_b)
        return out

    def metrics(self) -> dict[str, float]:
        """``lora_bound/mu_max``, ``mu_mean``, ``kl_bound_max`` (mu e^mu), ``scaled_mu_max`` and per layer."""
        bounds = self.bounds()
        mus = list(bounds.values())
        scaled = [mu * layer[3] for mu, layer in zip(mus, self.layers)]
        top = max(mus)
        out = {
            "lora_bound/mu_max": top,
            "lora_bound/mu_mean": sum(mus) / len(mus),
            "lora_bound/kl_bound_max": top * math.exp(top) if top < 700 else math.inf,
            "lora_bound/scaled_mu_max": max(scaled),
        }
        out.update({f"lora_bound/mu/{key}": mu for key, mu in bounds.items()})
        return out
