"""Telling a link's neighbours that an address is here now: a gratuitous ARP request
(IPv4) or an unsolicited neighbour advertisement with the override flag (IPv6), sent by
the node that has just taken a public address. Neighbours that knew the address at
another link-layer address (the node that held it before, possibly across the farm's
VXLAN segment) replace their entry at once instead of waiting for it to expire.

Both are made here from raw sockets (AF_PACKET for ARP, a raw ICMPv6 socket whose
checksum the kernel computes), so nothing but the kernel is needed. Runs in the node's
network namespace (the calling thread's).
"""

from __future__ import annotations

import ipaddress
import json
import socket
import struct

from zerostack.node.network import resource
from zerostack.node.provisioners.base import ProvisionError

ETH_P_ARP = 0x0806
ALL_NODES = "ff02::1"
NA_TYPE = 136
NA_OVERRIDE = 0x20000000
OPT_TARGET_LLADDR = 2


def link_mac(link: str) -> bytes:
    """The link-layer address of `link` (6 bytes), asked of the kernel through `ip` (the
    node's /sys may be another namespace's)."""
    out = resource._ip(None, "-j", "link", "show", "dev", link, check=False)
    try:
        text = str(json.loads(out or "[]")[0]["address"])
        mac = bytes.fromhex(text.replace(":", ""))
    except (ValueError, LookupError, TypeError):
        raise ProvisionError(f"link {link} has no readable link-layer address") from None
    if len(mac) != 6:
        raise ProvisionError(f"link {link} has no Ethernet address")
    return mac


def arp_frame(mac: bytes, address: str) -> bytes:
    """A broadcast gratuitous ARP request for `address` from `mac` (pure)."""
    ip = ipaddress.IPv4Address(address).packed
    header = b"\xff" * 6 + mac + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ip + b"\x00" * 6 + ip
    return header + arp


def na_message(mac: bytes, address: str) -> bytes:
    """An unsolicited neighbour advertisement for `address` at `mac`, override set
    (pure; the checksum is left to the kernel)."""
    target = ipaddress.IPv6Address(address).packed
    return (struct.pack("!BBHI", NA_TYPE, 0, 0, NA_OVERRIDE) + target
            + struct.pack("!BB", OPT_TARGET_LLADDR, 1) + mac)


def announce(link: str, address: str, count: int = 2) -> None:
    """Announce `address` (IPv4 or IPv6) on `link` at the link's own link-layer address.
    Raises ProvisionError when it cannot be sent."""
    mac = link_mac(link)
    try:
        if ipaddress.ip_address(address).version == 4:
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as s:
                s.bind((link, ETH_P_ARP))
                for _ in range(count):
                    s.send(arp_frame(mac, address))
            return
        with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, link.encode())
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF,
                         socket.if_nametoindex(link))
            for _ in range(count):
                s.sendto(na_message(mac, address), (ALL_NODES, 0, 0,
                                                    socket.if_nametoindex(link)))
    except (OSError, ValueError) as exc:
        raise ProvisionError(f"cannot announce {address} on {link}: {exc}") from None
