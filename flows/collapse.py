"""Collapse detection: rules over evaluation metrics, relative to the run's baseline.

Sequential editing degrades a model gradually and sometimes at once (docs/math.md,
"Collapse"): downstream accuracy falls toward chance, perplexity rises,
generations repeat (GE drops), the edited matrices' norms grow, earlier edits
are forgotten. Each symptom is a :class:`CollapseRule` — a metric-name pattern,
a test and a threshold — checked at every evaluation against the baseline
evaluation taken before the first batch. Rules are data, so a run records the
exact policy it was checked with.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Mapping

from sqlalchemy import Engine

from db.history import alarms_frame, evaluations_frame

TESTS = {
    "drop": "baseline − value > threshold",
    "ratio": "value / baseline > threshold",
    "below": "value < threshold",
    "above": "value > threshold",
}
ACTIONS = ("warn", "stop", "rollback")


@dataclass(frozen=True)
class CollapseRule:
    """``metric`` is an fnmatch pattern over metric names (``acc.*``); every match is checked."""

    metric: str
    test: str
    threshold: float

    def __post_init__(self) -> None:
        if self.test not in TESTS:
            raise ValueError(f"collapse rule {self.metric!r}: unknown test {self.test!r}; known: {sorted(TESTS)}")

    @classmethod
    def parse(cls, text: str) -> "CollapseRule":
        """``METRIC:TEST:THRESHOLD``, e.g. ``ppl.*:ratio:2``."""
        parts = text.split(":")
        if len(parts) != 3:
            raise ValueError(f"collapse rule {text!r} is not METRIC:TEST:THRESHOLD (e.g. acc.*:drop:0.15)")
        try:
            return cls(parts[0], parts[1], float(parts[2]))
        except ValueError as error:
            raise ValueError(f"collapse rule {text!r}: {error}") from None

    def describe(self) -> str:
        return f"{self.metric}:{self.test}:{self.threshold:g}"

    def fires(self, value: float, baseline: float | None) -> bool:
        if self.test == "below":
            return value < self.threshold
        if self.test == "above":
            return value > self.threshold
        if baseline is None:
            return False
        if self.test == "drop":
            return baseline - value > self.threshold
        return baseline > 0 and value / baseline > self.threshold


DEFAULT_RULES = (
    CollapseRule("acc.*", "drop", 0.15),
    CollapseRule("ppl.*", "ratio", 2.0),
    CollapseRule("norm.w.*", "ratio", 1.5),
    CollapseRule("ge", "drop", 1.5),
    CollapseRule("retention.es", "below", 0.5),
)
"""Defaults: a 15-point downstream drop, doubled perplexity, edited norms up by half, GE down
1.5 bits (repetitive text), or fewer than half of the earlier edits still holding."""


@dataclass(frozen=True)
class CollapsePolicy:
    """What to do when a rule fires: ``warn`` (record and go on), ``stop``, or ``rollback`` to the
    last evaluated batch without alarms, then ``after_rollback`` = ``stop`` or ``continue``."""

    action: str = "warn"
    after_rollback: str = "stop"
    rules: tuple[CollapseRule, ...] = DEFAULT_RULES

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"collapse action {self.action!r} is not one of {ACTIONS}")
        if self.after_rollback not in ("stop", "continue"):
            raise ValueError(f"after_rollback {self.after_rollback!r} is not 'stop' or 'continue'")

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "after_rollback": self.after_rollback,
                "rules": [rule.describe() for rule in self.rules]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CollapsePolicy":
        unknown = set(data) - {"action", "after_rollback", "rules"}
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join('collapse.' + key for key in sorted(unknown))}; "
                             f"known: collapse.action, collapse.after_rollback, collapse.rules")
        rules = data.get("rules")
        return cls(action=data.get("action", "warn"), after_rollback=data.get("after_rollback", "stop"),
                   rules=DEFAULT_RULES if rules is None else tuple(
                       rule if isinstance(rule, CollapseRule) else CollapseRule.parse(rule) for rule in rules))


@dataclass(frozen=True)
class Alarm:
    rule: CollapseRule
    metric: str
    value: float
    baseline: float | None

    @property
    def message(self) -> str:
        base = "n/a" if self.baseline is None else f"{self.baseline:.4g}"
        return f"{self.metric} = {self.value:.4g} (baseline {base}) trips {self.rule.describe()}"


def detect(metrics: Mapping[str, float], baseline: Mapping[str, float], rules: tuple[CollapseRule, ...]) -> list[Alarm]:
    """Every (rule, metric) pair that fires on ``metrics``; metrics a rule does not match are ignored."""
    alarms = []
    for rule in rules:
        for name in sorted(fnmatch.filter(metrics, rule.metric)):
            value = metrics[name]
            if value == value and rule.fires(value, baseline.get(name)):  # NaN never fires
                alarms.append(Alarm(rule, name, value, baseline.get(name)))
    return alarms


def last_healthy_seq(engine: Engine, run_id: int, up_to: int) -> int:
    """The latest batch ≤ ``up_to`` whose active full evaluation raised no alarm; 0 (the baseline) if none.

    "Healthy" needs evidence: a batch that was never fully evaluated is not a candidate
    (a health check between evaluation points sees only norms and a perplexity probe),
    so a rollback lands on a point whose metrics were all seen to be fine.
    """
    evaluations = evaluations_frame(engine, run_id)
    evaluations = evaluations[evaluations["kind"] == "full"]
    alarmed = set(alarms_frame(engine, run_id)["evaluation_id"].dropna().astype(int))
    healthy = evaluations[~evaluations["evaluation_id"].isin(alarmed) & (evaluations["seq"] <= up_to)]
    return int(healthy["seq"].max()) if not healthy.empty else 0
