"""The ledger (BCDB / digital notary): signed transactions, a hash-chained block log, a pure
state machine over twins, farms, nodes, templates, contracts and names, and its HTTP API."""

from zerostack.ledger.block import GENESIS_HASH, Block
from zerostack.ledger.chain import BadBlock, Chain, Replayed, replay, verify_log
from zerostack.ledger.client import AsyncLedgerClient, LedgerClient
from zerostack.ledger.errors import LedgerError, LedgerRejected, Rejected
from zerostack.ledger.state import (
    APPROVED,
    CANCELLED,
    CONTRACT_STATES,
    CREATED,
    DELETED,
    DEPLOYED,
    ERROR,
    EXPIRED,
    State,
    apply,
    apply_with_receipt,
    genesis,
    tick,
)
from zerostack.ledger.store import BlockLog, SqliteLog
from zerostack.ledger.tx import (
    PAYLOADS,
    TX_TYPES,
    Tx,
    parse_tx,
    sign_approval,
    sign_cancel_vote,
    sign_tx,
    tx_hash,
)

__all__ = [
    "APPROVED",
    "CANCELLED",
    "CONTRACT_STATES",
    "CREATED",
    "DELETED",
    "DEPLOYED",
    "ERROR",
    "EXPIRED",
    "GENESIS_HASH",
    "PAYLOADS",
    "TX_TYPES",
    "AsyncLedgerClient",
    "BadBlock",
    "Block",
    "BlockLog",
    "Chain",
    "LedgerClient",
    "LedgerError",
    "LedgerRejected",
    "Rejected",
    "Replayed",
    "SqliteLog",
    "State",
    "Tx",
    "apply",
    "apply_with_receipt",
    "genesis",
    "parse_tx",
    "replay",
    "sign_approval",
    "sign_cancel_vote",
    "sign_tx",
    "tick",
    "tx_hash",
    "verify_log",
]
