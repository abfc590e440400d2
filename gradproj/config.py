"""``GradProjConfig``: the validated, serialisable description of what ``wrap()`` builds.

Strategy options are flat fields next to ``strategy`` (``damping``, ``relative_bound``, ...), as
they appear on ``wrap(..., damping=1e-8)`` and in a verl/Hydra YAML block::

    gradproj:
      strategy: proma
      relative_bound: 0.5

Each option is routed to the one selected strategy that declares it and validated by that
strategy's pydantic model. Configs round-trip through ``to_dict``/``from_dict`` and YAML.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gradproj.errors import ConfigError
from gradproj.work.resolved import ResolvedStrategies

__all__ = ["GradProjConfig"]


def _format_validation_error(err: ValidationError, context: str) -> str:
    parts = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item.get("loc", ()))
        msg = item.get("msg", "").removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return f"{context}: " + "; ".join(parts)


def _check_spec(spec) -> None:
    """Refuse a plugin's strategy whose role or class does not follow the contract (plugin bugs,
    or a class written for the earlier contract whose flags would be silently ignored)."""
    if spec.role not in ("accumulate", "transform"):
        raise ConfigError(f"strategy {spec.name!r} has unknown role {spec.role!r} (plugin bug)")
    problems = spec.contract_problems()
    if problems:
        raise ConfigError(
            f"strategy {spec.name!r} does not follow gradproj's strategy contract: {'; '.join(problems)}. "
            "See docs/guides/write-a-strategy.md"
        )


class GradProjConfig(BaseModel):
    """What ``gradproj.wrap`` should do.

    Attributes:
        strategy: a strategy name or a list of names (coefficient transforms, then one
            accumulation rule; ``none`` is implied when only transforms are given).
        exclude: glob patterns over parameter names (``"lm_head.*"``) that gradproj must not
            touch; matching trainable parameters are frozen by ``wrap`` and unfrozen by ``detach``.
        gram: how linear layers represent sequence gradients: ``"auto"`` (cost rule),
            ``"materialize"`` or ``"ghost"``.
        diagnostics: report prompt-group gradient cosines, sequence-gradient norms and reward stds
            under ``gradproj/diagnostics/...`` (costs a Gram per layer; with ``none`` it turns the
            capture on).
        lora_bound: report the LoRA rank KL bound mu(r) per adapter under ``gradproj/lora_bound/...``
            (needs peft LoRA layers; adapters are snapshotted at ``wrap``).
        kl_estimate: report the per-step KL of each update without a reference model or an extra
            pass, ``gradproj/kl_estimate/per_token`` (and ``per_sequence``): the Fisher quadratic
            form ``1/2 mean_i <s_i, dtheta>^2`` of the previous update on this step's sequence
            gradients (turns the capture on; keeps one copy of the trainable parameters -- with
            FSDP2, in full on each rank). See `gradproj.diagnostics.update_monitor`.
        nonfinite: what a microbatch with NaN/inf does: ``"drop"`` (default; it changes no gradient and
            is counted in ``gradproj/dropped_microbatches``) or ``"propagate"`` (every covered gradient
            becomes NaN, as with plain autograd, so ``torch.amp.GradScaler`` skips the step and lowers
            its scale -- use it with fp16 loss scaling). ``"propagate"`` also needs less memory:
            with nothing to roll back, each layer's update goes straight into ``.grad`` instead of
            a staged copy of the whole gradient (``intra_proma`` holds up to 16 MiB of updates it
            projects in batches); the price is that an error raised in the middle of
            a backward (a parameter used outside its covered module) leaves that microbatch partly
            applied -- start the step again after fixing it.
        (any other field): an option of one of the selected strategies, e.g. ``damping``.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    strategy: str | list[str] = "proma"
    exclude: list[str] = Field(default_factory=list)
    gram: Literal["auto", "materialize", "ghost"] = "auto"
    diagnostics: bool = False
    lora_bound: bool = False
    kl_estimate: bool = False
    nonfinite: Literal["drop", "propagate"] = "drop"

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise ConfigError(_format_validation_error(err, "invalid gradproj config")) from None

    @field_validator("strategy")
    @classmethod
    def _non_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("strategy list is empty; give at least one name, e.g. 'proma'")
        return value

    @model_validator(mode="after")
    def _check_against_registry(self):
        self._plan()  # names, order and options; no strategy is instantiated here
        return self

    # -- accessors -------------------------------------------------------------------------
    @property
    def strategies(self) -> list[str]:
        """The strategy names as a list."""
        return [self.strategy] if isinstance(self.strategy, str) else list(self.strategy)

    @property
    def options(self) -> dict[str, Any]:
        """The strategy options given (the extra fields)."""
        return dict(self.model_extra or {})

    def needs_capture(self, registry=None) -> bool:
        """Whether ``wrap()`` with this config captures per-sequence gradients (a strategy needs
        them, or ``diagnostics`` or ``kl_estimate`` is on); without capture gradproj stays out of the backward."""
        return self.diagnostics or self.kl_estimate or any(spec.cls.capabilities.needs_capture for spec, _ in self._plan(registry))

    def resolve(self, registry=None) -> ResolvedStrategies:
        """Look the strategies up in the plugin registry and build them with their options.

        The one place strategy instances are made (``wrap()`` calls it); building the config only
        validates names, order and options."""
        plan = self._plan(registry)
        built = []
        for spec, values in plan:
            try:
                built.append(spec.build(values))
            except ValidationError as err:  # (validated already; a plugin's options may still disagree)
                raise ConfigError(_format_validation_error(err, f"invalid options for strategy {spec.name!r}")) from None
            except ValueError as err:  # a plugin's constructor refusing its options
                raise ConfigError(f"invalid gradproj config: strategy {spec.name!r} refused its options: {err}") from err
        specs = [spec for spec, _ in plan]
        return ResolvedStrategies(specs=specs, transforms=built[:-1], accumulate=built[-1])

    def _plan(self, registry=None) -> list[tuple[Any, dict[str, Any]]]:
        """``[(spec, options)]`` in run order (transforms, then the rule; ``none`` implied), each
        spec's options validated by its options model.

        Raises:
            ConfigError: an unknown name, two rules, a rule not last, a strategy listed twice, an
                unknown or ambiguous option, an invalid option value.
        """
        if registry is None:
            from gradproj.plugins.manager import get_registry

            registry = get_registry()
        specs = [registry.strategy(name) for name in self.strategies]
        rules = [s for s in specs if s.role == "accumulate"]
        if len(rules) > 1:
            raise ConfigError(
                "strategies " + " and ".join(repr(s.name) for s in rules) + " are both accumulation "
                "rules and cannot be stacked; keep one of them (transforms such as variance scaling "
                "can be stacked in front of any one rule)"
            )
        seen = set()
        for spec in specs:
            if spec.name in seen:
                raise ConfigError(f"strategy {spec.name!r} appears twice in {self.strategies}; list it once")
            seen.add(spec.name)
            _check_spec(spec)
        for position, spec in enumerate(specs):
            if spec.role == "accumulate" and position != len(specs) - 1:
                raise ConfigError(
                    f"accumulation rule {spec.name!r} must come last in the strategy list "
                    f"{self.strategies}: coefficient transforms run first"
                )
        if not rules:
            specs.append(registry.strategy("none"))
        values: dict[str, dict[str, Any]] = {s.name: {} for s in specs}
        for key, value in self.options.items():
            owners = [s for s in specs if key in s.option_names()]
            if not owners:
                valid = sorted({o for s in specs for o in s.option_names()})
                raise ConfigError(
                    f"unknown option {key!r} for strategy {'+'.join(s.name for s in specs)}; "
                    f"valid options are: {', '.join(valid) if valid else '(none)'}"
                )
            if len(owners) > 1:
                raise ConfigError(f"option {key!r} is ambiguous: it belongs to {[s.name for s in owners]}")
            values[owners[0].name][key] = value
        for spec in specs:
            try:
                spec.options(**{**spec.defaults, **values[spec.name]})
            except ValidationError as err:
                raise ConfigError(_format_validation_error(err, f"invalid options for strategy {spec.name!r}")) from None
        return [(spec, values[spec.name]) for spec in specs]

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A plain dict (strategy, engine fields and options) that ``from_dict`` accepts."""
        return self.model_dump()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GradProjConfig:
        """Build from a mapping (a dict, or an OmegaConf/Hydra node converted to a container)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a gradproj config must be a mapping, got {type(data).__name__}")
        return cls(**{str(k): (list(v) if isinstance(v, tuple) else v) for k, v in data.items()})

    def to_yaml(self) -> str:
        """YAML text of `to_dict`."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> GradProjConfig:
        """Parse YAML text written by `to_yaml` (or by hand)."""
        return cls.from_dict(yaml.safe_load(text) or {})

    def updated(self, **changes: Any) -> GradProjConfig:
        """A copy with some fields or options changed, validated again."""
        return type(self).from_dict({**self.to_dict(), **changes})
