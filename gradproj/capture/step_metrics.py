"""What one optimizer step counted: microbatches, sequences, drops and where the time went."""

from __future__ import annotations

__all__ = ["StepMetrics"]


class StepMetrics:
    """The counters of the step in progress, and the ``gradproj/...`` metrics made from them.

    Attributes:
        microbatches: microbatches closed (applied or dropped as non-finite) in this step.
        sequences: their sequences.
        dropped: microbatches dropped as non-finite.
        in_step: microbatches opened in this step (numbers the next one).
        capture_seconds: time in the engine's backward work, strategy time included.
        strategy_seconds: time in the strategies' hooks.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start counting a new step."""
        self.microbatches = 0
        self.sequences = 0
        self.dropped = 0
        self.in_step = 0
        self.capture_seconds = 0.0
        self.strategy_seconds = 0.0

    def closed(self, k: int) -> None:
        """A microbatch of ``k`` sequences closed after its backward reached ``logp``."""
        self.microbatches += 1
        self.sequences += k
        self.in_step += 1

    @property
    def pending(self) -> bool:
        """Whether microbatches ran since the step began."""
        return self.in_step > 0 or self.microbatches > 0 or self.dropped > 0

    def collect(self, strategies, diagnostics=None, lora_bound=None, step_groups=None, monitor=None) -> dict[str, float]:
        """The step's metrics: the counters, then each strategy's, the diagnostics', the LoRA
        bound's and the entropy / KL monitor's own (all under ``gradproj/``)."""
        out = {
            "gradproj/microbatches": float(self.microbatches),
            "gradproj/sequences": float(self.sequences),
            "gradproj/dropped_microbatches": float(self.dropped),
            "gradproj/capture_seconds": max(self.capture_seconds - self.strategy_seconds, 0.0),
            "gradproj/projection_seconds": self.strategy_seconds,
        }
        for strategy in strategies:
            out.update({f"gradproj/{k}": float(v) for k, v in strategy.step_metrics().items()})
        if diagnostics is not None:
            out.update({f"gradproj/{k}": float(v) for k, v in diagnostics.metrics(step_groups).items()})
        if lora_bound is not None:
            out.update({f"gradproj/{k}": float(v) for k, v in lora_bound.metrics().items()})
        if monitor is not None:
            out.update({f"gradproj/{k}": float(v) for k, v in monitor.metrics().items()})
        return out
