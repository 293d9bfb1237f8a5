"""Admin authentication and admin-only tools: AUTH, STOP, DATA RAW, HOOKS, INDEX DIRTY, and the
refusals of the reference's MIRROR and MASTER."""

from __future__ import annotations

import hmac
import secrets

from zerostack.zdb.commands.namespace import ACCESS_DENIED, secure_hash
from zerostack.zdb.commands.rules import UNEXPECTED_ARGUMENTS, admin, arity, atoll
from zerostack.zdb.commands.session import Session
from zerostack.zdb.engine import ZdbError
from zerostack.zdb.protocol import EMPTY_ARRAY, OK, error

AUTH_DISABLED = error("Authentication disabled")


def cmd_auth(s: Session, args: list[bytes]) -> bytes:
    """AUTH password | AUTH SECURE CHALLENGE | AUTH SECURE <sha1(challenge:password)>."""
    if len(args) == 2:
        return _auth_plain(s, args)
    if len(args) == 3:
        return _auth_secure(s, args)
    return UNEXPECTED_ARGUMENTS


def _auth_plain(s: Session, args: list[bytes]) -> bytes:
    password = s.state.admin_password
    if password is None:
        return AUTH_DISABLED
    bad = arity(args, 2)
    if bad is not None:
        return bad
    if len(args[1]) > 128:
        return error("Password too long")
    if hmac.compare_digest(args[1], password.encode()):
        s.admin = True
        return OK
    return ACCESS_DENIED


def _auth_secure(s: Session, args: list[bytes]) -> bytes:
    bad = arity(args, 3)
    if bad is not None:
        return bad
    if args[1].upper() != b"SECURE":
        return error("Only SECURE extra method supported")
    if args[2].upper() == b"CHALLENGE":
        # A challenge is also what SELECT ns SECURE needs, so it works without an admin password.
        s.nonce = secrets.token_hex(8)
        return b"+%b\r\n" % s.nonce.encode()
    password = s.state.admin_password
    if password is None:
        return AUTH_DISABLED
    if s.nonce is None:
        return error("No CHALLENGE requested, secure authentication not available")
    if len(args[2]) != 40:
        return error("Invalid hash length")
    expected = secure_hash(s.nonce, password).encode()
    s.nonce = None  # one attempt per challenge
    if hmac.compare_digest(args[2].lower(), expected):
        s.admin = True
        return OK
    return ACCESS_DENIED


STOP_REFUSED = error("Unauthorized")
# The reference's MIRROR and MASTER, and what replaces them here (see docs/zdb.md).
MIRROR_REFUSED = error("MIRROR is not supported: run a replica with --replica-of "
                       "(see docs/zdb-replication.md)")
MASTER_REFUSED = error("MASTER is not supported: a replica started with --replica-of "
                       "follows its primary (see docs/zdb-replication.md)")


def cmd_stop(s: Session, args: list[bytes]) -> bytes:
    """STOP: end the server cleanly. Only an authenticated admin may: without an admin
    password every client would be admin, so STOP is refused then (as the reference's
    release build always does); stop such a server with SIGTERM."""
    if s.state.admin_password is None:
        s.state.commands_unauthorized += 1
        return STOP_REFUSED
    bad = admin(s)
    if bad is not None:
        return bad
    s.state.on_stop()
    return b"+Stopping\r\n"


def cmd_mirror(s: Session, args: list[bytes]) -> bytes:
    """MIRROR: the reference copies every later request of other clients to this one, tagged
    with an owner id its 2.0 server never sets; replicas ship the data log instead."""
    return admin(s) or MIRROR_REFUSED


def cmd_master(s: Session, args: list[bytes]) -> bytes:
    """MASTER: the reference then takes the last argument of each request from this client
    as an owner id and drops it; a replica applies its primary's log instead."""
    return admin(s) or MASTER_REFUSED


def cmd_data(s: Session, args: list[bytes]) -> bytes:
    """DATA RAW fileid offset: one raw data-file entry, the basis of log-shipping replication."""
    bad = admin(s)
    if bad is not None:
        return bad
    if len(args) < 2:
        return error("Missing arguments")
    if args[1].upper() != b"RAW":
        return error("Unknown DATA subcommand")
    if len(args) != 4:
        return UNEXPECTED_ARGUMENTS
    fileid, offset = atoll(args[2]), atoll(args[3])
    if fileid < 0 or offset < 0:
        return error("Invalid arguments")
    try:
        key, previous, crc, flags, timestamp, payload = s.ns.data_raw(fileid, offset)
    except ZdbError as exc:
        return error(str(exc))
    crc_text = b"0x%08x" % crc
    return b"*6\r\n$%d\r\n%b\r\n:%d\r\n$%d\r\n%b\r\n:%d\r\n:%d\r\n$%d\r\n%b\r\n" % (
        len(key), key, previous, len(crc_text), crc_text, flags, timestamp, len(payload), payload,
    )


def cmd_hooks(s: Session, args: list[bytes]) -> bytes:
    """HOOKS: running hook processes. zerostack runs no hooks, so the list is empty."""
    return admin(s) or EMPTY_ARRAY


def cmd_index(s: Session, args: list[bytes]) -> bytes:
    """INDEX DIRTY [RESET]: index files changed since the last reset (admin)."""
    bad = admin(s)
    if bad is not None:
        return bad
    if len(args) < 2:
        return error("Missing arguments")
    if args[1].upper() != b"DIRTY":
        return error("Unknown INDEX subcommand")
    if len(args) == 3:
        if args[2].upper() == b"RESET":
            return OK
        return error("Unknown INDEX DIRTY subcommand")
    return EMPTY_ARRAY


HANDLERS = {
    b"AUTH": cmd_auth,
    b"STOP": cmd_stop,
    b"MIRROR": cmd_mirror,
    b"MASTER": cmd_master,
    b"DATA": cmd_data,
    b"HOOKS": cmd_hooks,
    b"INDEX": cmd_index,
}
