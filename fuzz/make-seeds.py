#!/usr/bin/env python3
"""Writes the hand-made seeds of fuzz/corpus/<target>/ (files named seed-*); regression
inputs found by fuzzing are kept beside them as regress-*. Standard library only.

    python3 fuzz/make-seeds.py
"""
import ipaddress
import json
import pathlib
import struct

CORPUS = pathlib.Path(__file__).resolve().parent / "corpus"
MACS = bytes.fromhex("020000000001020000000002")


def csum(data: bytes, initial: int = 0) -> int:
    if len(data) % 2:
        data += b"\0"
    s = initial + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def addr(a: str) -> bytes:
    return ipaddress.ip_address(a).packed


def pseudo(src: bytes, dst: bytes, proto: int, length: int) -> int:
    words = src + dst
    return sum(struct.unpack(f"!{len(words) // 2}H", words)) + proto + (length >> 16) + (length & 0xFFFF)


def tcp(sport, dport, flags=0x10, payload=b"", options=b""):
    hlen = 20 + len(options)
    return struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, (hlen // 4) << 4, flags, 65535, 0, 0) + options + payload


def udp(sport, dport, payload=b""):
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def l4_with_checksum(src, dst, proto, seg, zero_udp=False):
    if zero_udp:
        return seg
    c = csum(seg, pseudo(src, dst, proto, len(seg)))
    if proto == 17 and c == 0:
        c = 0xFFFF
    at = 16 if proto == 6 else 6
    return seg[:at] + struct.pack("!H", c) + seg[at + 2:]


def ipv4(src, dst, proto, l4, ttl=64, options=b"", frag=0x4000, fix_l4=True, zero_udp=False):
    s, d = addr(src), addr(dst)
    if fix_l4 and proto in (6, 17):
        l4 = l4_with_checksum(s, d, proto, l4, zero_udp)
    hlen = 20 + len(options)
    h = struct.pack("!BBHHHBBH4s4s", 0x40 | hlen // 4, 0, hlen + len(l4), 0x1234, frag, ttl, proto, 0, s, d) + options
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return h + l4


def ipv6(src, dst, next_header, l4, hop_limit=64, fix_l4=True, ext=b""):
    s, d = addr(src), addr(dst)
    if fix_l4 and next_header in (6, 17) and not ext:
        l4 = l4_with_checksum(s, d, next_header, l4)
    payload = ext + l4
    return struct.pack("!IHBB16s16s", 0x60000000, len(payload), next_header, hop_limit, s, d) + payload


def eth(ethertype, l3, vlan=None):
    """`vlan`: (VLAN id, inner ethertype), `ethertype` then being the tag's TPID."""
    tag = b"" if vlan is None else struct.pack("!HH", vlan[0], vlan[1])
    return MACS + struct.pack("!H", ethertype) + tag + l3


def icmp4_error(src, dst, icmp_type, code, rest, quoted):
    body = struct.pack("!BBH4s", icmp_type, code, 0, rest) + quoted
    body = body[:2] + struct.pack("!H", csum(body)) + body[4:]
    return ipv4(src, dst, 1, body)


def icmp6_error(src, dst, icmp_type, code, rest, quoted):
    s, d = addr(src), addr(dst)
    body = struct.pack("!BBH4s", icmp_type, code, 0, rest) + quoted
    c = csum(body, pseudo(s, d, 58, len(body)))
    body = body[:2] + struct.pack("!H", c) + body[4:]
    return ipv6(src, dst, 58, body)


def frames():
    syn = tcp(40000, 80, 0x02, options=bytes.fromhex("020405b40402080a0000000100000000"))
    f = {
        "v4-tcp-syn": eth(0x0800, ipv4("10.0.0.1", "192.0.2.10", 6, syn)),
        "v4-tcp-ack-payload": eth(0x0800, ipv4("10.0.0.1", "192.0.2.10", 6, tcp(40000, 80, 0x18, b"GET / HTTP/1.0\r\n\r\n"))),
        "v4-tcp-fin": eth(0x0800, ipv4("10.0.0.2", "10.0.0.1", 6, tcp(8080, 40000, 0x11))),
        "v4-tcp-rst": eth(0x0800, ipv4("10.0.0.1", "192.0.2.10", 6, tcp(40000, 80, 0x04))),
        "v4-udp-dns": eth(0x0800, ipv4("10.0.0.1", "192.0.2.10", 17, udp(5353, 53, b"\x12\x34\x01\x00\x00\x01" + b"\0" * 6))),
        "v4-udp-zero-checksum": eth(0x0800, ipv4("10.0.0.1", "192.0.2.10", 17, udp(5353, 53, b"hello"), zero_udp=True)),
        "v4-udp-empty": eth(0x0800, ipv4("10.0.0.1", "192.0.2.10", 17, udp(1, 2))),
        "v4-udp-odd-payload": eth(0x0800, ipv4("10.0.0.1", "192.0.2.10", 17, udp(1000, 443, b"abc"))),
        "v4-options-tcp": eth(0x0800, ipv4("10.0.0.1", "192.0.2.10", 6, tcp(40000, 80), options=bytes.fromhex("0101010194040000"))),
        "v4-ttl-1": eth(0x0800, ipv4("10.0.0.1", "192.0.2.10", 6, tcp(40000, 80), ttl=1)),
        "v4-ttl-0": eth(0x0800, ipv4("10.0.0.1", "192.0.2.10", 17, udp(1, 53), ttl=0)),
        "v4-padded-to-60": eth(0x0800, ipv4("10.0.0.1", "192.0.2.10", 17, udp(1, 53))).ljust(60, b"\0"),
        "v4-fragment-first": eth(0x0800, ipv4("10.0.0.1", "192.0.2.10", 17, udp(1, 53, b"x" * 16), frag=0x2000)),
        "v4-fragment-later": eth(0x0800, ipv4("10.0.0.1", "192.0.2.10", 17, b"x" * 16, frag=0x0002, fix_l4=False)),
        "v4-gre": eth(0x0800, ipv4("10.0.0.1", "192.0.2.10", 47, b"\0" * 8)),
        "vlan-v4-tcp": eth(0x8100, ipv4("10.0.0.1", "192.0.2.10", 6, tcp(40000, 80)), vlan=(42, 0x0800)),
        "qinq-outer-88a8-v4-udp": eth(0x88A8, ipv4("10.0.0.1", "192.0.2.10", 17, udp(1, 53)), vlan=(7, 0x0800)),
        "double-vlan": MACS + bytes.fromhex("88a80001810000020800") + ipv4("10.0.0.1", "192.0.2.10", 6, tcp(1, 2)),
        "v6-tcp-syn": eth(0x86DD, ipv6("2001:db8::1", "2001:db8::10", 6, syn)),
        "v6-tcp-payload": eth(0x86DD, ipv6("2001:db8::1", "2001:db8::10", 6, tcp(40000, 443, 0x18, b"\x16\x03\x01" + b"\0" * 40))),
        "v6-udp": eth(0x86DD, ipv6("2001:db8::1", "2001:db8::10", 17, udp(1000, 53, b"query"))),
        "vlan-v6-udp": eth(0x8100, ipv6("fd00::2", "2001:db8::1", 17, udp(5353, 1000, b"answer")), vlan=(100, 0x86DD)),
        # Never balanced: IPv4-mapped addresses do not appear in IPv6 headers (RFC 4291 2.5.5.2).
        "v6-mapped-v4": eth(0x86DD, ipv6("::ffff:10.0.0.1", "::ffff:192.0.2.10", 6, tcp(1, 80))),
        "v6-hop-by-hop": eth(0x86DD, ipv6("2001:db8::1", "2001:db8::10", 0, tcp(1, 80), ext=bytes([6, 0, 1, 4, 0, 0, 0, 0]))),
        "v6-fragment-header": eth(0x86DD, ipv6("2001:db8::1", "2001:db8::10", 44, udp(1, 53), ext=bytes([17, 0, 0, 1, 0, 0, 0, 9]))),
        "arp": MACS + b"\x08\x06" + bytes.fromhex("0001080006040001020000000001c0a80001000000000000c0a80002"),
        "short-ethernet": MACS[:10],
        "truncated-tcp": eth(0x0800, ipv4("10.0.0.1", "192.0.2.10", 6, tcp(1, 2)))[:-1],
        "v4-icmp-echo": eth(0x0800, ipv4("10.0.0.1", "192.0.2.10", 1, bytes.fromhex("0800f7ff00000000"))),
    }
    quoted_tcp = ipv4("192.0.2.10", "10.0.0.1", 6, tcp(80, 40000, 0x12))[:28]
    f["icmp-frag-needed-quoting-tcp"] = eth(0x0800, icmp4_error("10.9.0.1", "192.0.2.10", 3, 4, struct.pack("!HH", 0, 1400), quoted_tcp))
    quoted_udp = ipv4("10.0.0.1", "192.0.2.10", 17, udp(5353, 53, b"q"))
    f["icmp-port-unreachable-quoting-udp"] = eth(0x0800, icmp4_error("192.0.2.10", "10.0.0.1", 3, 3, b"\0" * 4, quoted_udp))
    f["icmp-time-exceeded"] = eth(0x0800, icmp4_error("10.9.0.1", "10.0.0.1", 11, 0, b"\0" * 4, quoted_tcp))
    quoted6 = ipv6("2001:db8::10", "2001:db8::1", 6, tcp(443, 40000, 0x12))
    f["icmp6-packet-too-big"] = eth(0x86DD, icmp6_error("2001:db8:9::1", "2001:db8::10", 2, 0, struct.pack("!I", 1280), quoted6))
    f["icmp6-port-unreachable"] = eth(0x86DD, icmp6_error("2001:db8::10", "2001:db8::1", 1, 4, b"\0" * 4, ipv6("2001:db8::1", "2001:db8::10", 17, udp(1, 53))))
    return f


def write(target: str, name: str, data: bytes) -> None:
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / f"seed-{name}").write_bytes(data)


def rewrite_head(source: bool, decrement: bool, a: str, port: int) -> bytes:
    packed = addr(a)
    if len(packed) == 4:
        packed = b"\0" * 10 + b"\xff\xff" + packed
    return bytes([int(source) | int(decrement) << 1]) + packed + struct.pack("!H", port)


def main() -> None:
    f = frames()
    for name, frame in f.items():
        write("packet_parse", name, frame)
    rewrites = [
        ("v4-tcp-syn", rewrite_head(False, True, "10.0.0.2", 8080)),
        ("v4-tcp-ack-payload", rewrite_head(False, False, "10.0.0.3", 8080)),
        ("v4-tcp-fin", rewrite_head(True, False, "192.0.2.10", 80)),
        ("v4-udp-dns", rewrite_head(False, True, "10.0.0.2", 5353)),
        ("v4-udp-zero-checksum", rewrite_head(False, False, "10.0.0.2", 5353)),
        ("v4-udp-odd-payload", rewrite_head(True, True, "192.0.2.10", 443)),
        ("v4-options-tcp", rewrite_head(False, True, "10.0.0.4", 8443)),
        ("v4-ttl-1", rewrite_head(False, True, "10.0.0.2", 8080)),
        ("v4-padded-to-60", rewrite_head(False, False, "10.0.0.2", 53)),
        ("vlan-v4-tcp", rewrite_head(False, True, "10.0.0.2", 8080)),
        ("qinq-outer-88a8-v4-udp", rewrite_head(True, False, "192.0.2.10", 53)),
        ("v6-tcp-syn", rewrite_head(False, True, "fd00::2", 8080)),
        ("v6-tcp-payload", rewrite_head(True, False, "2001:db8::10", 443)),
        ("v6-udp", rewrite_head(False, True, "fd00::3", 5353)),
        ("vlan-v6-udp", rewrite_head(True, True, "2001:db8::10", 53)),
    ]
    for name, head in rewrites:
        write("packet_rewrite", name, head + f[name])
    # The same address and port: a rewrite that changes nothing.
    write("packet_rewrite", "v4-tcp-identity", rewrite_head(False, False, "192.0.2.10", 80) + f["v4-tcp-syn"])
    write("packet_rewrite", "v4-udp-to-zero-sum", rewrite_head(False, False, "0.0.0.0", 0) + f["v4-udp-dns"])

    tcp_health = {"probe": {"kind": "tcp"}, "interval_ms": 2000, "timeout_ms": 1000, "rise": 2, "fall": 3}
    http_health = {"probe": {"kind": "http", "path": "/healthz", "expect_status": 200}, "interval_ms": 2000, "timeout_ms": 1000, "rise": 2, "fall": 3}
    udp_health = {"probe": {"kind": "udp", "payload_hex": "1234010000010000", "expect_reply": True}, "interval_ms": 1000, "timeout_ms": 500, "rise": 1, "fall": 1}
    requests = {
        "vip-add": {"op": "vip_add", "vip": "192.0.2.10:80/tcp"},
        "vip-add-health": {"op": "vip_add", "vip": "192.0.2.10:80/tcp", "health": http_health, "idle_timeout_s": 900},
        "vip-add-udp-v6": {"op": "vip_add", "vip": "[2001:db8::10]:53/udp", "health": udp_health, "idle_timeout_s": 30},
        "vip-add-mapped": {"op": "vip_add", "vip": "[::ffff:10.100.0.1]:80/tcp", "health": tcp_health},
        "vip-del": {"op": "vip_del", "vip": "192.0.2.10:80/tcp"},
        "vip-list": {"op": "vip_list"},
        "backend-add": {"op": "backend_add", "vip": "192.0.2.10:80/tcp", "backend": "10.88.0.14:8080", "weight": 1},
        "backend-add-v6": {"op": "backend_add", "vip": "[2001:db8::10]:53/udp", "backend": "[fd00::2]:5353", "weight": 1000},
        "backend-del": {"op": "backend_del", "vip": "192.0.2.10:80/tcp", "backend": "10.88.0.14:8080"},
        "backend-set-drain": {"op": "backend_set", "vip": "192.0.2.10:80/tcp", "backend": "10.88.0.14:8080", "weight": None, "state": "draining"},
        "backend-set-weight": {"op": "backend_set", "vip": "192.0.2.10:80/tcp", "backend": "10.88.0.14:8080", "weight": 3, "state": "active"},
        "backend-list": {"op": "backend_list", "vip": "192.0.2.10:80/tcp"},
        "stats": {"op": "stats"},
        "explain": {"op": "explain", "client": "198.51.100.7:40000", "vip": "192.0.2.10:80/tcp"},
        "reload": {"op": "reload"},
    }
    # Head: line limit - 1, read buffer size; then the stream a client sends.
    for name, r in requests.items():
        write("control_request", name, bytes([255, 64]) + json.dumps(r, separators=(",", ":")).encode() + b"\n")
    write("control_request", "session", bytes([255, 16]) + b"".join(json.dumps(r).encode() + b"\n" for r in requests.values()))
    write("control_request", "unknown-op", bytes([255, 8]) + b'{"op":"shutdown"}\n{"op":"stats"}\n')
    write("control_request", "not-utf8", bytes([255, 8]) + b'{"op":"vip_add","vip":"\xff"}\n{"op":"vip_list"}\n')
    write("control_request", "too-long", bytes([20, 4]) + b'{"op":"vip_list"}\n' + b'{"op":"backend_list","vip":"192.0.2.10:80/tcp"}\n{"op":"stats"}\n')
    write("control_request", "no-final-newline", bytes([255, 3]) + b'{"op":"stats"}')
    write("control_request", "empty-lines", bytes([255, 1]) + b"\n\n{}\n[]\nnull\n")
    write("control_request", "bad-addresses", bytes([255, 64]) + b'{"op":"vip_add","vip":"192.0.2.10:80/sctp"}\n{"op":"explain","client":"1.2.3.4","vip":"[::1]:1/udp"}\n')

    example = (CORPUS.parent.parent / "examples" / "xlb.toml").read_text()
    configs = {
        "example": example,
        "empty": "",
        "agent-only": '[agent]\nifaces = ["eth0", "eth1"]\nxdp_mode = "native"\nsocket = "/run/xlb/xlb.sock"\nstate = "/var/lib/xlb/state.json"\nbpffs = "/sys/fs/bpf/xlb"\n',
        "minimal-vip": '[[vip]]\naddress = "192.0.2.10:80/tcp"\n\n[[vip.backend]]\naddress = "10.0.0.2:8080"\n',
        "tcp-health": '[[vip]]\naddress = "192.0.2.10:443/tcp"\n[vip.health]\nprobe = "tcp"\ninterval_ms = 1000\ntimeout_ms = 500\nrise = 1\nfall = 2\n[[vip.backend]]\naddress = "10.0.0.2:443"\nweight = 1000\n',
        "udp-health-hex": '[[vip]]\naddress = "[2001:db8::10]:53/udp"\nudp_timeout = 30\n[vip.health]\nprobe = "udp"\npayload_hex = "12340100000100000000000003777777076578616d706c6503636f6d0000010001"\nexpect_reply = true\n[[vip.backend]]\naddress = "[fd00::2]:5353"\n',
        "udp-health-text": '[[vip]]\naddress = "192.0.2.10:53/udp"\n[vip.health]\nprobe = "udp"\npayload = "ping"\n[[vip.backend]]\naddress = "10.0.0.2:53"\n',
        "udp-silent-health": '[[vip]]\naddress = "192.0.2.10:53/udp"\n[vip.health]\nprobe = "udp"\ninterval_ms = 1000\n[[vip.backend]]\naddress = "10.0.0.2:53"\n',
        "draining": '[[vip]]\naddress = "192.0.2.10:80/tcp"\n[[vip.backend]]\naddress = "10.0.0.2:8080"\nstate = "draining"\n[[vip.backend]]\naddress = "10.0.0.3:8080"\nweight = 2\n',
        "duplicate-vip": '[[vip]]\naddress = "192.0.2.10:80/tcp"\n[[vip]]\naddress = "192.0.2.10:80/tcp"\n',
        "duplicate-backend": '[[vip]]\naddress = "192.0.2.10:80/tcp"\n[[vip.backend]]\naddress = "10.0.0.2:8080"\n[[vip.backend]]\naddress = "10.0.0.2:8080"\n',
        "weight-zero": '[[vip]]\naddress = "192.0.2.10:80/tcp"\n[[vip.backend]]\naddress = "10.0.0.2:8080"\nweight = 0\n',
        "unknown-key": '[[vip]]\naddress = "192.0.2.10:80/tcp"\nport = 80\n',
        "wrong-protocol-health": '[[vip]]\naddress = "192.0.2.10:53/udp"\n[vip.health]\nprobe = "http"\npath = "/"\n',
        "bad-toml": '[[vip]\naddress = "192.0.2.10:80/tcp"\n',
        "timeouts": '[[vip]]\naddress = "192.0.2.10:80/tcp"\ntcp_timeout = 4294967295\n[[vip]]\naddress = "192.0.2.10:53/udp"\nudp_timeout = 0\n',
        "mapped-and-v6": '[[vip]]\naddress = "[::ffff:192.0.2.10]:80/tcp"\n[[vip.backend]]\naddress = "[2001:db8::2]:80"\n[[vip]]\naddress = "192.0.2.10:80/tcp"\n',
        "metrics-v6": '[agent]\nmetrics = "[::1]:9464"\nxdp_mode = "skb"\n',
        "multiline-strings": '[agent]\nifaces = ["""eth0"""]\n# comment\n[[vip]]\naddress = \'192.0.2.10:80/tcp\'\n',
        "crlf": '[[vip]]\r\naddress = "192.0.2.10:80/tcp"\r\n\r\n[[vip.backend]]\r\naddress = "10.0.0.2:8080"\r\n',
    }
    for name, text in configs.items():
        write("config_toml", name, text.encode())

    backend = lambda a, w=1, s="active", i=None: {k: v for k, v in {"addr": a, "weight": w, "state": s, "id": i}.items() if v is not None}
    states = {
        "empty": {"vips": []},
        "one-vip": {"vips": [{"vip": "192.0.2.10:80/tcp", "backends": [backend("10.0.0.2:8080", 2, "active", 0), backend("10.0.0.3:8080", 1, "draining", 1)], "id": 0}]},
        "health-and-timeout": {"vips": [{"vip": "192.0.2.10:80/tcp", "backends": [backend("10.0.0.2:8080", 1, "active", 3)], "id": 1, "health": http_health, "idle_timeout_s": 900}]},
        "udp-v6": {"vips": [{"vip": "[2001:db8::10]:53/udp", "backends": [backend("[fd00::2]:5353", 1, "active", 0), backend("[fd00::3]:5353", 5, "active", 1)], "id": 2, "health": udp_health, "idle_timeout_s": 30}]},
        "no-ids": {"vips": [{"vip": "192.0.2.10:80/tcp", "backends": [backend("10.0.0.2:8080")]}]},
        "old-no-state": {"vips": [{"vip": "192.0.2.10:80/tcp", "backends": [{"addr": "10.0.0.2:8080", "weight": 1}]}]},
        "two-vips": {"vips": [{"vip": "192.0.2.10:80/tcp", "backends": [], "id": 0, "health": tcp_health}, {"vip": "192.0.2.10:53/udp", "backends": [backend("10.0.0.2:53", 1, "active", 0)], "id": 1}]},
        "duplicate-vip": {"vips": [{"vip": "192.0.2.10:80/tcp", "backends": []}, {"vip": "192.0.2.10:80/tcp", "backends": []}]},
        "bad-health": {"vips": [{"vip": "192.0.2.10:80/tcp", "backends": [], "health": {**tcp_health, "interval_ms": 0}}]},
    }
    for name, s in states.items():
        write("state_file", name, (json.dumps(s, indent=2) + "\n").encode())
    write("state_file", "truncated", json.dumps(states["one-vip"]).encode()[:60])
    write("state_file", "not-json", b"vips = []\n")


if __name__ == "__main__":
    main()
