"""Namespaces: NSNEW, NSDEL, NSLIST, NSINFO, NSSET, SELECT, DBSIZE, FLUSH, NSJUMP, RELOAD
(the reference's commands_namespace)."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path
from typing import Final

from zerostack.zdb.commands.rules import (
    MAX_NAMESPACE_LENGTH,
    NAMESPACE_NOT_FOUND,
    NAMESPACE_TOO_LONG,
    admin,
    arity,
)
from zerostack.zdb.commands.session import DEFAULT_NAMESPACE, IoErrors, Session
from zerostack.zdb.commands.system import MB, count_disk
from zerostack.zdb.engine import Namespace, ZdbError
from zerostack.zdb.protocol import OK, error

ACCESS_DENIED = error("Access denied")
MAX_PROPERTY_VALUE = 63
# What one key costs the reference's in-memory index besides the key itself: its entry
# struct on a 64-bit build (two pointers, then the fields of an index entry, padded).
# NSINFO's index_size_bytes is this plus the key length, summed over the live keys.
REFERENCE_ENTRY_SIZE: Final = 64


def secure_hash(nonce: str, password: str) -> str:
    """What `SELECT ns SECURE` and `AUTH SECURE` expect: hex sha1 of "<challenge>:<password>"."""
    return hashlib.sha1(f"{nonce}:{password}".encode()).hexdigest()


def _name(args: list[bytes], index: int = 1) -> str | bytes:
    """The namespace name argument, or the error reply when it is too long / not text."""
    raw = args[index]
    if len(raw) > MAX_NAMESPACE_LENGTH:
        return NAMESPACE_TOO_LONG
    return raw.decode("utf-8", "surrogateescape")


def _lookup(s: Session, name: str) -> Namespace | None:
    return s.state.engine.namespaces.get(name)


def cmd_nsnew(s: Session, args: list[bytes]) -> bytes:
    bad = admin(s) or arity(args, 2)
    if bad is not None:
        return bad
    name = _name(args)
    if isinstance(name, bytes):
        return name
    try:
        s.state.engine.create_namespace(name)
    except ZdbError as exc:
        return error(str(exc))
    return OK


def cmd_nsdel(s: Session, args: list[bytes]) -> bytes:
    bad = admin(s) or arity(args, 2)
    if bad is not None:
        return bad
    name = _name(args)
    if isinstance(name, bytes):
        return name
    if name == DEFAULT_NAMESPACE:
        return error("Cannot remove default namespace")
    if _lookup(s, name) is None:
        return error("This namespace doesn't exists")
    if s.ns.name == name:
        return error("Cannot remove namespace you're currently using.")
    count_disk(s.state)  # what its files took counts as written
    try:
        s.state.engine.delete_namespace(name)
    except ZdbError as exc:
        return error(str(exc))
    s.state.on_namespace_removed(name)
    return OK


def cmd_nslist(s: Session, args: list[bytes]) -> bytes:
    names = [n.encode("utf-8", "surrogateescape") for n in s.state.engine.namespaces]
    return b"*%d\r\n" % len(names) + b"".join(b"$%d\r\n%b\r\n" % (len(n), n) for n in names)


def _free_space(path: Path) -> int | None:
    """Bytes available to the server on the file system holding `path`, as the reference
    computes them (block size times blocks available); None when statvfs fails."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bsize * st.f_bavail


def _hex_id(value: int) -> str:
    """The reference prints its next entry id byte-swapped, capped to 32 bits: the id's
    little-endian bytes read as hex."""
    return "0x" + (value & 0xFFFFFFFF).to_bytes(4, "little").hex()


def nsinfo_text(s: Session, ns: Namespace) -> str:
    """The `# namespace` block of NSINFO, one `key: value` per line: every field of the
    reference, in its order, then the ones only zerostack reports."""
    info = dict(ns.info())
    password, public = s.state.credentials(ns)
    errors = s.state.io_errors.get(ns.name) or IoErrors()
    index_size = 0
    if ns.dbsize() and info["mode"] == "userkey":
        index_size = REFERENCE_ENTRY_SIZE * ns.dbsize() + ns.live_key_bytes()
    lines = [
        "# namespace",
        f"name: {info['name']}",
        f"entries: {info['entries']}",
        f"public: {'yes' if public else 'no'}",
        f"worm: {info['worm']}",
        f"locked: {info['locked']}",
        f"password: {'yes' if password else 'no'}",
        f"data_size_bytes: {info['data_size_bytes']}",
        f"data_size_mb: {info['data_size_mb']}",
        f"data_limits_bytes: {info['data_limits_bytes']}",
        f"index_size_bytes: {index_size}",
        f"index_size_kb: {index_size / 1024:.2f}",
        f"next_internal_id: {_hex_id(ns.next_internal_id())}",
        f"mode: {info['mode']}",
        f"stats_index_io_errors: {errors.index}",
        f"stats_index_io_error_last: {errors.index_last}",
        "stats_index_faults: 0",
        f"stats_data_io_errors: {errors.data}",
        f"stats_data_io_error_last: {errors.data_last}",
        "stats_data_faults: 0",
    ]
    if "space_available" in info:
        lines.append(f"space_available: {info['space_available']}")
    for which, path in (("index", ns.index_root), ("data", ns.data_root)):
        free = _free_space(path)
        if free is not None:
            lines.append(f"{which}_disk_freespace_bytes: {free}")
            lines.append(f"{which}_disk_freespace_mb: {free / MB:.2f}")
    if s.admin:
        # Where the files are is for the operator only, as in the reference.
        index_file, data_file = ns.active_files()
        lines += [f"data_path: {ns.data_root}", f"data_path_active: {data_file}",
                  f"index_path: {ns.index_root}", f"index_path_active: {index_file}"]
    lines += [
        f"data_current_id: {info['data_current_id']}",
        f"data_current_offset: {info['data_current_offset']}",
        f"frozen: {info['frozen']}",
    ]
    return "\n".join(lines) + "\n"


def cmd_nsinfo(s: Session, args: list[bytes]) -> bytes:
    bad = arity(args, 2)
    if bad is not None:
        return bad
    name = _name(args)
    if isinstance(name, bytes):
        return name
    ns = _lookup(s, name)
    if ns is None:
        return NAMESPACE_NOT_FOUND
    text = nsinfo_text(s, ns).encode()
    return b"$%d\r\n%b\r\n" % (len(text), text)


def cmd_nsset(s: Session, args: list[bytes]) -> bytes:
    """NSSET ns property value: password (`*` clears), maxsize, public, worm, lock, freeze, mode."""
    bad = admin(s) or arity(args, 4)
    if bad is not None:
        return bad
    name = _name(args)
    if isinstance(name, bytes):
        return name
    if len(args[3]) > MAX_PROPERTY_VALUE:
        return error("Invalid value")
    if name == DEFAULT_NAMESPACE:
        return error("Cannot update default namespace")
    ns = _lookup(s, name)
    if ns is None:
        return NAMESPACE_NOT_FOUND
    try:
        ns.set_property(args[2].decode("utf-8", "replace"), args[3].decode("utf-8", "replace"))
    except ZdbError as exc:
        return error(str(exc))
    return OK


def cmd_select(s: Session, args: list[bytes]) -> bytes:
    """SELECT ns [password] | SELECT ns SECURE <sha1(challenge:password)>."""
    if len(args) < 2:
        return error("Invalid argument")
    name = _name(args)
    if isinstance(name, bytes):
        return name
    ns = _lookup(s, name)
    if ns is None:
        return NAMESPACE_NOT_FOUND
    password, public = s.state.credentials(ns)
    writable = True
    if password:
        if len(args) == 2:
            # A public namespace with a password is readable by everyone, writable by owners.
            if not public:
                return error("Namespace protected and private")
            writable = False
        elif len(args) > 4:
            return error("Too many arguments")
        elif len(args) == 3:
            if len(args[2]) > 255:
                return error("Password too long")
            if not hmac.compare_digest(args[2], password.encode()):
                return ACCESS_DENIED
        else:
            if args[2].upper() != b"SECURE":
                return error("Only SECURE extra method supported")
            if s.nonce is None:
                return error("No CHALLENGE requested, secure authentication not available")
            if len(args[3]) != 40:
                return error("Invalid hash length")
            expected = secure_hash(s.nonce, password).encode()
            if not hmac.compare_digest(args[3].lower(), expected):
                return ACCESS_DENIED
    s.ns = ns
    s.writable = writable
    return OK


def cmd_dbsize(s: Session, args: list[bytes]) -> bytes:
    return b":%d\r\n" % s.ns.dbsize()


def cmd_flush(s: Session, args: list[bytes]) -> bytes:
    """FLUSH: empty the current namespace; only a private, password-protected one."""
    password, public = s.state.credentials(s.ns)
    if public or not password:
        return error("Flushing public namespace denied")
    count_disk(s.state)
    try:
        s.ns.flush()
    except ZdbError as exc:
        return error(str(exc))
    return OK


def cmd_nsjump(s: Session, args: list[bytes]) -> bytes:
    """NSJUMP: close the current data/index files of this namespace and start the next pair."""
    bad = admin(s)
    if bad is not None:
        return bad
    try:
        s.ns.jump()
    except ZdbError as exc:
        return error(str(exc))
    return OK


def cmd_reload(s: Session, args: list[bytes]) -> bytes:
    """RELOAD ns: the engine's memory always matches its files, so there is nothing to re-read."""
    bad = admin(s) or arity(args, 2)
    if bad is not None:
        return bad
    name = _name(args)
    if isinstance(name, bytes):
        return name
    if _lookup(s, name) is None:
        return NAMESPACE_NOT_FOUND
    return OK


HANDLERS = {
    b"NSNEW": cmd_nsnew,
    b"NSDEL": cmd_nsdel,
    b"NSLIST": cmd_nslist,
    b"NSINFO": cmd_nsinfo,
    b"NSSET": cmd_nsset,
    b"SELECT": cmd_select,
    b"DBSIZE": cmd_dbsize,
    b"FLUSH": cmd_flush,
    b"NSJUMP": cmd_nsjump,
    b"RELOAD": cmd_reload,
}
