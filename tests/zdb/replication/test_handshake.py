"""The REPLAUTH handshake's two sides without a network: a shared password passes both
ways, anything else fails at the first side that checks; addresses are written alike by
both ends; text from the other end is made safe for a log line."""

from __future__ import annotations

import hiredis
import pytest

from zerostack.zdb.replication.handshake import (
    ClientHandshake,
    ServerChallenge,
    Unproven,
    address_text,
    escape,
    key_of,
)

ADDRESS = "198.18.0.10:24001"


def _serve(client: ClientHandshake, passwords: list[str]) -> tuple[ServerChallenge, list[bytes]]:
    challenge = ServerChallenge.parse(list(client.challenge()))
    assert isinstance(challenge, ServerChallenge)
    keys = [key_of(p) for p in passwords]
    return challenge, keys


def test_a_shared_password_is_proven_both_ways_once_per_pair_of_nonces() -> None:
    client = ClientHandshake("s3cret", ADDRESS)
    challenge, keys = _serve(client, ["other", "s3cret"])
    proof = client.answer(challenge.answer(keys))
    assert proof[:2] == (b"REPLAUTH", b"PROOF") and b"s3cret" not in b"".join(proof)
    assert challenge.check(keys, proof[2])
    # the same proof for another challenge (new server nonce) does not fit
    again, _ = _serve(client, ["s3cret"])
    assert not again.check(keys, proof[2])


def test_the_server_must_prove_first_and_a_wrong_client_proof_is_refused() -> None:
    client = ClientHandshake("s3cret", ADDRESS)
    challenge, keys = _serve(client, ["not-it"])
    with pytest.raises(Unproven, match="did not prove"):
        client.answer(challenge.answer(keys))
    liar = ClientHandshake("not-it", ADDRESS)
    challenge, keys = _serve(liar, ["s3cret"])
    answer = challenge.answer([key_of("not-it")])  # what a server with its password says
    assert not challenge.check(keys, liar.answer(answer)[2])
    assert not challenge.check(keys, b"zz" * 32) and not challenge.check(keys, b"")


def test_a_proof_for_another_address_is_refused_by_the_client() -> None:
    client = ClientHandshake("s3cret", ADDRESS)
    args = list(client.challenge())
    args[3] = b"198.18.0.11:24001"  # rewritten on the way
    challenge = ServerChallenge.parse(args)
    assert isinstance(challenge, ServerChallenge)
    with pytest.raises(Unproven):
        client.answer(challenge.answer([key_of("s3cret")]))


@pytest.mark.parametrize("reply", [b"OK", [], [b"ab" * 32], [b"xyz", b"00" * 32],
                                   [b"ab" * 4, b"00" * 32], hiredis.ReplyError("no"),
                                   [b"ab" * 32, b"00" * 32, b"11" * 32, b"22" * 32]])
def test_an_answer_out_of_protocol_is_unproven(reply: object) -> None:
    with pytest.raises(Unproven):
        ClientHandshake("s3cret", ADDRESS).answer(reply)


@pytest.mark.parametrize("args, why", [
    ([b"REPLAUTH", b"CHALLENGE", b"ab" * 32], "Invalid arguments"),
    ([b"REPLAUTH", b"CHALLENGE", b"ab" * 15, b"a:1"], "nonce"),
    ([b"REPLAUTH", b"CHALLENGE", b"ab" * 65, b"a:1"], "nonce"),
    ([b"REPLAUTH", b"CHALLENGE", b"g" * 64, b"a:1"], "nonce"),
    ([b"REPLAUTH", b"CHALLENGE", b"ab" * 32, b""], "address"),
    ([b"REPLAUTH", b"CHALLENGE", b"ab" * 32, b"a" * 301], "address"),
    ([b"REPLAUTH", b"CHALLENGE", b"ab" * 32, "é:1".encode()], "address"),
])
def test_a_bad_challenge_gets_a_clear_error(args: list[bytes], why: str) -> None:
    said = ServerChallenge.parse(args)
    assert isinstance(said, str) and why in said


def test_both_ends_write_an_address_alike() -> None:
    assert address_text(("::ffff:127.0.0.1", 9900, 0, 0)) == "127.0.0.1:9900"
    assert address_text(("127.0.0.1", 9900)) == "127.0.0.1:9900"
    assert address_text(("fd00:0:0::1", 9900, 0, 0)) == "[fd00::1]:9900"
    assert address_text(("fe80::1%eth0", 9900, 0, 2)) == "[fe80::1]:9900"
    assert address_text("/run/zdb.sock") == "unix:/run/zdb.sock"
    assert address_text(None) == ""


def test_text_from_the_other_end_stays_on_one_line() -> None:
    said = escape('bad\r\nevent=forged "x"\x1b[31m')
    assert "\n" not in said and "\r" not in said and "\x1b" not in said and '"' not in said
    assert len(escape("x" * 1000, 50)) == 50
