"""IT smart-contract templates: parameter schema, expansion into per-node parts in a
sandbox, placement onto ledger nodes, and the solution digest stakeholders sign."""

from zerostack.contracts.errors import PlacementError, TemplateError
from zerostack.contracts.expand import GatewayPlan, NetworkPlan, PartPlan, Plan, Where, expand
from zerostack.contracts.parameters import resolve, schema
from zerostack.contracts.placement import NodeOffer, Placed, part_hourly, place
from zerostack.contracts.template import Template, TemplateSpec, from_data, load_text

__all__ = [
    "GatewayPlan",
    "NetworkPlan",
    "NodeOffer",
    "PartPlan",
    "Placed",
    "PlacementError",
    "Plan",
    "Template",
    "TemplateError",
    "TemplateSpec",
    "Where",
    "expand",
    "from_data",
    "load_text",
    "part_hourly",
    "place",
    "resolve",
    "schema",
]
