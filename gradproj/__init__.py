"""gradproj: reference-free policy-gradient strategies (PROMA, ...) as an optimizer wrapper.

    import gradproj
    opt = gradproj.wrap(torch.optim.AdamW(model.parameters(), lr=1e-6), model, strategy="proma")
    for mb in microbatches:
        logp = token_logprobs(model, mb)
        with opt.microbatch(logp, mask=mb.response_mask):
            policy_loss(logp, mb.advantages).backward()
    opt.step(); opt.zero_grad()
"""

from gradproj.config import GradProjConfig
from gradproj.diagnostics import policy_kl
from gradproj.errors import (
    CheckpointError,
    CoefficientError,
    ConfigError,
    CoverageError,
    GradProjError,
    InputError,
    LossTermError,
    ProtocolError,
)
from gradproj.microbatch_handle import MicrobatchHandle
from gradproj.optimizer import GradProjOptimizer
from gradproj.plugins import get_plugin_manager, get_registry, hookimpl, hookspec
from gradproj.strategies import (
    Capabilities,
    CoefficientTransform,
    LayerBatch,
    MicrobatchContext,
    Strategy,
    StrategyOptions,
    StrategySpec,
    Update,
)
from gradproj.wrapping import wrap

__version__ = "0.1.0"

__all__ = [
    "wrap",
    "GradProjOptimizer",
    "MicrobatchHandle",
    "GradProjConfig",
    "GradProjError",
    "ConfigError",
    "InputError",
    "CoefficientError",
    "LossTermError",
    "CoverageError",
    "ProtocolError",
    "CheckpointError",
    "hookimpl",
    "hookspec",
    "get_plugin_manager",
    "get_registry",
    "Strategy",
    "CoefficientTransform",
    "StrategyOptions",
    "StrategySpec",
    "LayerBatch",
    "Update",
    "Capabilities",
    "MicrobatchContext",
    "policy_kl",
    "__version__",
]
