"""Command layer under random requests, against a real engine in a temporary directory:
every reply is one well-formed RESP reply, nothing raises, and stored data matches a model
that follows the replies."""

from __future__ import annotations

import tempfile
from pathlib import Path

import hiredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zerostack.zdb.commands import COMMANDS, INTERNAL_ERROR, ServerState, Session, execute
from zerostack.zdb.engine import Engine, EngineConfig, Mode

KEYS = [b"a", b"b", b"key", b"\x00\xff", b"x" * 255, b"", b"y" * 256]
NAMES = [b"default", b"ns1", b"ns2", b".", b"a/b", b"x" * 129]
WORDS = [b"0", b"1", b"-1", b"*", b"password", b"public", b"worm", b"lock", b"freeze", b"mode",
         b"maxsize", b"seq", b"user", b"SECURE", b"CHALLENGE", b"RAW", b"100", b"28"]

command_names = st.sampled_from([*sorted(COMMANDS), b"get", b"set", b"CONFIG", b"NOPE"])
argument = st.one_of(st.sampled_from(KEYS), st.sampled_from(NAMES), st.sampled_from(WORDS),
                     st.binary(max_size=40))
request = st.tuples(command_names, st.lists(argument, max_size=4)).map(
    lambda t: [t[0], *t[1]])
requests = st.lists(request, min_size=1, max_size=40)


def parse_one(reply: bytes) -> object:
    """The reply must be exactly one RESP value."""
    reader = hiredis.Reader()
    reader.feed(reply)
    value = reader.gets()
    assert value is not False, reply[:80]
    assert reader.gets() is False and not reader.has_data(), reply[:80]
    if reply.startswith(b"-"):
        assert reply.count(b"\r\n") == 1 and reply.endswith(b"\r\n"), reply
    return value


def apply_model(model: dict[str, dict[bytes, bytes]], session: Session, req: list[bytes],
                reply: bytes) -> None:
    """Update the model from what the server said it did."""
    name = req[0].upper()
    ns = session.ns.name
    if name in (b"SET", b"SETX") and len(req) >= 3 and not reply.startswith(b"-"):
        if reply != b"$-1\r\n":
            model.setdefault(ns, {})[req[1] if req[1] else parse_one(reply)] = req[2]  # type: ignore[index]
    elif name == b"DEL" and reply == b"+OK\r\n":
        model.setdefault(ns, {}).pop(req[1], None)
    elif name == b"FLUSH" and reply == b"+OK\r\n":
        model[ns] = {}
    elif name == b"NSDEL" and reply == b"+OK\r\n":
        model.pop(req[1].decode("utf-8", "surrogateescape"), None)
    elif name == b"NSNEW" and reply == b"+OK\r\n":
        model[req[1].decode("utf-8", "surrogateescape")] = {}


def check_against_model(engine: Engine, model: dict[str, dict[bytes, bytes]]) -> None:
    assert set(engine.namespaces) == set(model) | {"default"}
    for name, ns in engine.namespaces.items():
        expected = model.get(name, {})
        assert ns.dbsize() == len(expected), name
        for key, value in expected.items():
            assert ns.get(key) == value, (name, key)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests, st.sampled_from([None, "pw"]))
def test_random_requests_give_well_formed_replies_and_data_matches_the_model(
        batch: list[list[bytes]], admin_password: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = EngineConfig(data_dir=Path(tmp) / "d", index_dir=Path(tmp) / "i",
                              mode=Mode.MIXED, datasize=64 * 1024)
        engine = Engine(config)
        try:
            state = ServerState(engine=engine, admin_password=admin_password)
            sessions = [Session(state), Session(state)]
            if admin_password:
                sessions[0].admin = True  # one admin, one plain client
            model: dict[str, dict[bytes, bytes]] = {"default": {}}
            for i, req in enumerate(batch):
                session = sessions[i % 2]
                if session.removed:
                    continue
                reply = execute(session, req)
                if reply is None:  # WAIT: nothing to answer in-process
                    session.wait_for = None
                    continue
                assert reply != INTERNAL_ERROR, req
                parse_one(reply)
                apply_model(model, session, req, reply)
                engine.flush_all()
            check_against_model(engine, model)
            engine.close()
            engine = Engine(config)  # and the same after reopening the files
            check_against_model(engine, model)
        finally:
            engine.close()


def test_regression_examples() -> None:
    """Inputs that once broke the command layer stay here as explicit cases."""
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(EngineConfig(data_dir=Path(tmp) / "d", index_dir=Path(tmp) / "i"))
        try:
            s = Session(ServerState(engine=engine))
            for req in ([b"SET"], [b"MGET"], [b"SCAN", b""], [b"HISTORY", b"k", b""],
                        [b"DATA", b"RAW", b"-1", b"x"], [b"SELECT", b"\xff\xfe"],
                        [b"NSINFO", b"\xff"], [b"WAIT", b"*", b"99999999999999999"],
                        [b"KEYCUR", b""], [b"SET", b"k", b"v", b"notanumber"],
                        [b"NSSET", b"ns", b"maxsize", b"x" * 64], [b"AUTH", b"SECURE", b"x"]):
                reply = execute(s, req)
                assert reply is not None and reply != INTERNAL_ERROR, req
                parse_one(reply)
        finally:
            engine.close()
