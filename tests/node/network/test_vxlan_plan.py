"""Who takes part in a farm's VXLAN segment, decided from ledger facts alone (pure), and
the frames a node sends when it takes an address."""

from __future__ import annotations

import struct
import subprocess

from tests.conftest import require_root, require_tool
from zerostack.node.network.announce import arp_frame, na_message
from zerostack.node.network.vxlan import SegmentNames, plan

POOL = [{"ip": "198.18.0.200/24", "gateway": "198.18.0.1"},
        {"ip": "fd00:5a::200/64", "gateway": "fd00:5a::1"}]


def gw(node: int, ipv4: str) -> dict[str, object]:
    return {"node": node, "domain": f"gw{node}.grid.test", "ipv4": ipv4, "ipv6": ""}


def test_members_are_one_gateway_per_subnet_and_anchors_hold_the_pool() -> None:
    peers = [gw(2, "198.18.1.11/24"), gw(3, "198.18.0.12/24"), gw(4, "198.18.1.13/24")]
    seg = plan(1, 1, gw(1, "198.18.0.10/24"), peers, POOL)
    assert seg is not None
    assert seg.peers == ("198.18.1.11",)  # node 4 is on node 2's subnet: 2 is its member
    assert seg.anchor and seg.local == "198.18.0.10" and seg.vni == 1
    assert seg.pool == ("198.18.0.200", "fd00:5a::200")
    site1 = plan(1, 2, gw(2, "198.18.1.11/24"), [gw(1, "198.18.0.10/24"), *peers[1:]], POOL)
    assert site1 is not None and not site1.anchor and site1.peers == ("198.18.0.10",)
    # a second gateway of a subnet takes no part: two members there would loop
    assert plan(1, 3, gw(3, "198.18.0.12/24"), [gw(1, "198.18.0.10/24"),
                                                 gw(2, "198.18.1.11/24")], POOL) is None
    assert plan(1, 4, gw(4, "198.18.1.13/24"), [gw(2, "198.18.1.11/24"),
                                                 gw(1, "198.18.0.10/24")], POOL) is None


def test_no_segment_without_another_subnet_or_a_usable_record() -> None:
    assert plan(1, 1, gw(1, "198.18.0.10/24"), [gw(3, "198.18.0.12/24")], POOL) is None
    assert plan(1, 1, None, [gw(2, "198.18.1.11/24")], POOL) is None
    assert plan(1, 1, gw(1, "not-an-address"), [gw(2, "198.18.1.11/24")], POOL) is None
    assert plan(0, 1, gw(1, "198.18.0.10/24"), [gw(2, "198.18.1.11/24")], POOL) is None
    assert plan(1 << 24, 1, gw(1, "198.18.0.10/24"), [gw(2, "198.18.1.11/24")], POOL) is None
    bad = [{"node": "2", "ipv4": "198.18.1.11/24"}, {"node": 5, "ipv4": "x"}]
    assert plan(1, 1, gw(1, "198.18.0.10/24"), bad, POOL) is None


def test_names_fit_the_kernel_and_the_filter_passes_only_the_pool() -> None:
    names = SegmentNames((1 << 24) - 1)
    assert max(len(names.bridge), len(names.vxlan), len(names.table)) <= 15
    seg = plan(1, 1, gw(1, "198.18.0.10/24"), [gw(2, "198.18.1.11/24")], POOL)
    assert seg is not None
    rules = seg.filter_rules("wan0")
    assert "arp daddr ip { 198.18.0.200 } accept" in rules
    assert "ip6 saddr { fd00:5a::200 } accept" in rules
    assert rules.rstrip().splitlines()[-3].strip().endswith("drop")
    v4only = plan(1, 1, gw(1, "198.18.0.10/24"), [gw(2, "198.18.1.11/24")], POOL[:1])
    assert v4only is not None and "ip6 saddr" not in v4only.filter_rules("wan0")


def test_gratuitous_arp_and_unsolicited_advertisement() -> None:
    mac = bytes.fromhex("02aabbccddee")
    frame = arp_frame(mac, "198.18.0.200")
    assert frame[:6] == b"\xff" * 6 and frame[6:12] == mac and frame[12:14] == b"\x08\x06"
    htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", frame[14:22])
    assert (htype, ptype, hlen, plen, op) == (1, 0x0800, 6, 4, 1)
    assert frame[28:32] == frame[38:42] == bytes([198, 18, 0, 200])  # sender = target
    na = na_message(mac, "fd00:5a::200")
    assert na[0] == 136 and struct.unpack("!I", na[4:8])[0] == 0x20000000  # override
    assert na[8:24] == bytes.fromhex("fd00005a000000000000000000000200")
    assert na[24:26] == b"\x02\x01" and na[26:] == mac


def test_the_filter_and_the_public_v6_rules_are_valid_nftables() -> None:
    require_root()
    require_tool("nft")
    from zerostack.node.provisioners.public_ip import v6_rules

    seg = plan(1, 1, gw(1, "198.18.0.10/24"), [gw(2, "198.18.1.11/24")], POOL)
    assert seg is not None
    for rules in (seg.filter_rules("wan0"), v6_rules("zgqtest", "fd00:5a::200", "zgqx", "wan0")):
        # -c: checked by the kernel's parser, nothing applied
        out = subprocess.run(["nft", "-c", "-f", "-"], input=rules.replace(
            f"delete table bridge {seg.names.table}\n", "").replace(
            "delete table ip6 zgqtest\n", ""), capture_output=True, text=True, check=False)
        assert out.returncode == 0, out.stderr
