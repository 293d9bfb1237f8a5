"""The user's side (3Bot): build a deployment, seal it to a node, contract, approve, follow."""

from zerostack.bot.spec import BotError, build_deployment, load_deployment_file, parse_stakeholder
from zerostack.bot.threebot import Review, ThreeBot, quorum_progress

__all__ = [
    "BotError",
    "Review",
    "ThreeBot",
    "build_deployment",
    "load_deployment_file",
    "parse_stakeholder",
    "quorum_progress",
]
