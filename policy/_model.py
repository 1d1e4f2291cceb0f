"""The RoutingPolicy: a versioned, validated, content-addressed description of how to decide.

A policy is data. Its canonical form (sorted-key compact JSON of the validated model) is hashed with
sha256; that digest is stamped on every decision made under it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from decimal import Decimal
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from nexuscore.kernel.errors import PolicyError
from nexuscore.policy._yaml import decode_document, load_yaml, read_document
from nexuscore.schemas import TIERS, DataClassification, RiskClass, Tier

Region = Annotated[str, Field(min_length=1, pattern=r"^[a-z][a-z0-9-]*$")]
Ident = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")]
Usd = Annotated[Decimal, Field(ge=0, max_digits=18, decimal_places=6)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DecodeStrategy(_Frozen):
    """A way to decode on a deployment and its predicted latency: ttft + per-token time x tokens."""

    name: Ident
    ttft_ms: Annotated[int, Field(ge=0)]
    ms_per_output_token: Annotated[float, Field(ge=0)]


class Deployment(_Frozen):
    """One model served in one region by one provider."""

    id: Ident
    model: str
    provider: Literal["openai", "anthropic"]
    endpoint: str
    tier: Tier
    region: Region
    input_usd_per_1k: Usd
    output_usd_per_1k: Usd
    context_tokens: Annotated[int, Field(ge=256)]
    capabilities: tuple[str, ...] = ()
    decode: tuple[DecodeStrategy, ...] = Field(min_length=1)

    @cached_property
    def input_micros_per_1k(self) -> int:
        return int(self.input_usd_per_1k * 1_000_000)

    @cached_property
    def output_micros_per_1k(self) -> int:
        return int(self.output_usd_per_1k * 1_000_000)

    def cost_micros(self, input_tokens: int, output_tokens: int) -> int:
        """Cost in micro-dollars, rounded up so an estimate is never below the bill."""
        return cost_micros(input_tokens, output_tokens, self.input_micros_per_1k, self.output_micros_per_1k)


class Feature(_Frozen):
    id: Ident
    daily_budget_usd: Usd
    latency_slo_ms: Annotated[int, Field(ge=1)] = 5_000


class Tenant(_Frozen):
    id: Ident
    home_region: Region
    daily_budget_usd: Usd
    features: tuple[Feature, ...] = Field(min_length=1)


class ResidencyRule(_Frozen):
    """Where data of one classification may be processed. ``home`` means the tenant's home region."""

    id: Ident
    classification: DataClassification
    allowed: tuple[str, ...] = Field(min_length=1)
    transfer_basis: str = "none"


class Match(_Frozen):
    """A rule's condition: every non-empty list must match (capabilities: all required present)."""

    task_types: tuple[str, ...] = ()
    risk_classes: tuple[RiskClass, ...] = ()
    capabilities: tuple[str, ...] = ()
    min_complexity: Annotated[float, Field(ge=0, le=1)] | None = None


class RoutingRule(_Frozen):
    """A floor: requests matching ``when`` must be served at ``min_tier`` or above."""

    id: Ident
    when: Match
    min_tier: Tier
    reason: str = ""


class Routing(_Frozen):
    # Complexity at or above this suggests the mid tier. Frontier is never suggested by complexity:
    # only a rule can demand it.
    mid_complexity: Annotated[float, Field(ge=0, le=1)] = 0.6
    rules: tuple[RoutingRule, ...] = ()
    # Requests routed with less confidence than this go to a person (0: never).
    min_confidence: Annotated[float, Field(ge=0, le=1)] = 0.0


class EscalationRule(_Frozen):
    id: Ident
    when: Match
    reason: str
    # How long a person has to decide before the request ends with a recorded timeout.
    review_deadline_s: Annotated[int, Field(ge=1)] | None = None


# What a policy without a ``task_types`` list admits: the task types there were when the list was
# introduced. Such a policy was signed and recorded under a digest of a document without the list,
# so its meaning must not become "any task type" (admission would stop checking) nor "none" (every
# request of its recorded history would replay as a rejection).
DEFAULT_TASK_TYPES: tuple[str, ...] = (
    "chat",
    "summarise",
    "extract",
    "credit_decision",
    "sanctions_screening",
    "claims_triage",
    "kyc_check",
)


class RoutingPolicy(_Frozen):
    """The whole policy. Cross-references (regions, deployments, tenants, task types) are checked
    on load."""

    name: Ident
    version: Ident
    regions: tuple[Region, ...] = Field(min_length=1)
    # Every task type a request may name: admission rejects any other, and a rule may name only
    # these, so a misspelt task type in a rule is an error rather than a rule that never matches.
    task_types: tuple[Ident, ...] = Field(default=DEFAULT_TASK_TYPES, min_length=1)
    deployments: tuple[Deployment, ...] = Field(min_length=1)
    tenants: tuple[Tenant, ...] = Field(min_length=1)
    residency: tuple[ResidencyRule, ...] = Field(min_length=1)
    routing: Routing = Routing()
    escalation: tuple[EscalationRule, ...] = ()
    # The review deadline of an escalation whose rule does not set its own.
    review_deadline_s: Annotated[int, Field(ge=1)] = 3600
    max_input_tokens: Annotated[int, Field(ge=1)] = 100_000

    @model_validator(mode="after")
    def _check_references(self) -> RoutingPolicy:
        regions = set(self.regions)
        _unique("deployments", [d.id for d in self.deployments])
        _unique("tenants", [t.id for t in self.tenants])
        for d in self.deployments:
            if d.region not in regions:
                raise ValueError(
                    f"deployment {d.id!r} is in region {d.region!r}, not one of {sorted(regions)}"
                )
        for t in self.tenants:
            _unique(f"features of tenant {t.id!r}", [f.id for f in t.features])
            if t.home_region not in regions:
                raise ValueError(
                    f"tenant {t.id!r} has home region {t.home_region!r}, not one of {sorted(regions)}"
                )
        for r in self.residency:
            for region in r.allowed:
                if region != "home" and region not in regions:
                    raise ValueError(f"residency rule {r.id!r} allows unknown region {region!r}")
        classes = [r.classification for r in self.residency]
        _unique("residency classifications", classes)
        self._check_task_types()
        return self

    def _check_task_types(self) -> None:
        _unique("task_types", self.task_types)
        known = set(self.task_types)
        rules = [("routing", r.id, r.when) for r in self.routing.rules]
        rules += [("escalation", r.id, r.when) for r in self.escalation]
        for kind, rule_id, when in rules:
            unknown = [t for t in when.task_types if t not in known]
            if unknown:
                raise ValueError(
                    f"{kind} rule {rule_id!r} names task type(s) {', '.join(map(repr, unknown))}, "
                    f"not in task_types"
                )

    @cached_property
    def canonical_bytes(self) -> bytes:
        """Sorted-key compact JSON of the validated policy: equal policies give equal bytes.

        Amounts are written in their shortest exact form, so ``40`` and ``40.0`` hash alike.
        """
        # A policy that does not list its task types keeps the digest it had before the field
        # existed (its signatures and recorded decisions name that digest); one that lists them,
        # even the default list, is a different document and hashes as one.
        omit = set() if "task_types" in self.model_fields_set else {"task_types"}
        data = _canonical(self.model_dump(mode="python", exclude=omit))
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    @cached_property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.canonical_bytes).hexdigest()

    @cached_property
    def tenants_by_id(self) -> dict[str, Tenant]:
        return {t.id: t for t in self.tenants}

    @cached_property
    def deployments_by_id(self) -> dict[str, Deployment]:
        return {d.id: d for d in self.deployments}

    @cached_property
    def residency_by_class(self) -> dict[str, ResidencyRule]:
        return {r.classification: r for r in self.residency}

    @cached_property
    def max_context_tokens(self) -> int:
        return max(d.context_tokens for d in self.deployments)


def _canonical(value: object) -> object:
    if isinstance(value, Decimal):
        text = format(value.normalize(), "f")
        return "0" if text in ("-0", "0") else text
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def cost_micros(
    input_tokens: int, output_tokens: int, input_micros_per_1k: int, output_micros_per_1k: int
) -> int:
    """Cost in micro-dollars, rounded up so that an estimate is never below the bill."""
    micros = input_tokens * input_micros_per_1k + output_tokens * output_micros_per_1k
    return -(-micros // 1000)


def _unique(what: str, ids: Sequence[str]) -> None:
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise ValueError(f"duplicate id {i!r} in {what}")
        seen.add(i)


def tier_rank(tier: Tier) -> int:
    return TIERS.index(tier)


# A hostile document can fail on thousands of fields: the first few say enough, on one line.
_MAX_PROBLEMS = 10


def parse_policy(text: str, source: str = "<policy>") -> RoutingPolicy:
    """Parse and validate YAML text; PolicyError names the source, the field and what is wrong."""
    data = load_yaml(text, source)
    if data is None:
        raise PolicyError(f"{source}: empty document, expected a policy (a mapping)")
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return RoutingPolicy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(f"{source}: invalid policy: {_problems(exc)}") from exc


def _problems(exc: ValidationError) -> str:
    errors = exc.errors()
    problems = [
        f"{'.'.join(str(p)[:60] for p in err['loc']) or '(top level)'}: {err['msg']}"
        for err in errors[:_MAX_PROBLEMS]
    ]
    more = f" (and {len(errors) - _MAX_PROBLEMS} more)" if len(errors) > _MAX_PROBLEMS else ""
    return " ".join(("; ".join(problems) + more).split())


def load_policy(path: str | Path) -> RoutingPolicy:
    """Read and validate a policy file."""
    p = Path(path)
    try:
        document = read_document(p)
    except OSError as exc:
        raise PolicyError(f"{p}: cannot read policy file: {exc.strerror}") from exc
    return parse_policy(decode_document(document, str(p)), str(p))


DEFAULT_POLICY_PATH = Path(__file__).resolve().parent / "policies" / "default.yaml"


def default_policy() -> RoutingPolicy:
    return load_policy(DEFAULT_POLICY_PATH)
