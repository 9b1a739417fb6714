#!/usr/bin/env python3
"""Side-by-side per-packet cost of Katran's XDP balancer and xlb, on the same work.

Method (same for every program): BPF_PROG_TEST_RUN, repeat=1 per call, the kernel-reported
duration of each call, the calling thread pinned to one CPU. Programs are interleaved inside
every trial: each case's calls are cut into chunks, and every chunk runs each program in turn
(rotating the order), each after a short unrecorded warm-up. Every call's return code is
checked, outputs are spot-checked (every SAMPLE-th call), and counters are checked per chunk, so
that no program is timed on an early-exit path.

Programs:
  katran_1m    Katran balancer.bpf.o, per-CPU inner LRU maps in lru_mapping (as KatranLb does in
               production), each BPF_MAP_TYPE_LRU_HASH 40 B key / 16 B value, --katran-lru entries.
  katran_500k  Same object, per-CPU LRUs of --katran-lru / CPUs entries (KatranLb's own formula:
               LruSize / forwardingCores.size()), a sensitivity row.
  katran_1k    Same object, per-CPU LRUs of --small-lru entries.
  katran_fallback  Same object with lru_mapping left empty, so it uses its 1000-entry fallback_cache
               (the earlier, unfair anchor's configuration); only in case g.
  xlb_1m       xlb's attached program, agent run with --conntrack-entries --xlb-entries.
  xlb_1k       xlb's attached program, agent run with --conntrack-entries --small-lru.
  floor_pass / floor_parse   xdp_floor.c (empty XDP_PASS; eth/ip/tcp parse then pass).

Cases:
  a_syn_new_big     TCP SYN to the VIP, a fresh 5-tuple every call (never repeated in the run);
                    xlb records a SYN in its handshake table (XLB_HANDSHAKES, half the size of the
                    connection table) and creates the connection's entry on the next packet
  h_ack_new_big     a connection's first ACK without an entry, a fresh 5-tuple every call (no
                    SYN seen): an insert into the connection table for both programs
  b_syn_new_small   the same against the small tables
  c1_ack_one        ACK of one established flow, repeated
  c2_ack_100k       ACKs sampled uniformly across 100k established flows (handshakes sent first)
  d_udp_nonvip      UDP to an address that is no VIP
  e_junk64          64 bytes of junk (not IP)
  f_floor           the floors on the SYN packet
  g_syn_repeat_old  the earlier anchor's method: the same SYN (same 5-tuple) repeated, Katran with
                    its fallback LRU and with the 1M per-CPU LRU (to show what that method measured)

Katran's new-connection rate guard (MAX_CONN_RATE, 125k new flows/s/CPU, after which it skips
the LRU insert) would trip at test-run call rates: its per-CPU counter is zeroed before every
Katran chunk (chunks are far below 125k calls), so every SYN really inserts; the check itself
still runs. The harness verifies the inserts by counting the per-CPU LRU's entries.

Everything runs in network namespaces named kf*; bpffs pins are under /sys/fs/bpf/kf_*; all is
removed at exit. Needs root.
"""
import argparse, array, ctypes, json, os, random, signal, socket, statistics, struct, subprocess
import sys, tempfile, time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bpfsys import libc, NR_bpf, ATTR_SZ, _call, obj_get, map_update, map_lookup, map_update_batch  # noqa: E402

BPF_MAP_CREATE, BPF_MAP_GET_NEXT_KEY, BPF_PROG_TEST_RUN = 0, 4, 10
BPF_PROG_GET_FD_BY_ID, BPF_MAP_GET_FD_BY_ID, BPF_OBJ_GET_INFO_BY_FD = 13, 14, 15
BPF_MAP_TYPE_LRU_HASH = 9
XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)
ACTION = {0: "ABORTED", 1: "DROP", 2: "PASS", 3: "TX", 4: "REDIRECT"}
CLONE_NEWNET = 0x40000000
OUT_SIZE = 512

# Katran constants (katran/lib/bpf/balancer_consts.h)
MAX_VIPS, RING_SIZE = 512, 65537
LRU_CNTRS, LRU_MISS_CNTR, NEW_CONN_RATE_CNTR, FALLBACK_LRU_CNTR = 0, 1, 2, 3
CH_DROP_STATS, XDP_TOTAL_CNTR, XDP_TX_CNTR, XDP_DROP_CNTR, XDP_PASS_CNTR = 9, 16, 17, 18, 19
FLOW_KEY_SZ, REAL_POS_LRU_SZ = 40, 16
# xlb counters (lb-common/src/abi.rs, Counter)
XC = dict(pass_=2, tx=3, redirect=4, malformed=5, not_tcp_udp=8, not_for_us=9, ct_hit=10,
          ct_miss=11, no_backend=12, nh_failure=13, revnat=14, insert_failed=16, via_stack=17)
XLB_NCOUNTERS = 19

VIP, VIP_PORT = "10.200.0.1", 80
REALS = [f"10.201.0.{i}" for i in range(1, 101)]
ROUTER_MAC = bytes.fromhex("020000000009")     # Katran's default-router MAC; xlb's next-hop neighbour
LB_MAC, CLI_MAC = bytes.fromhex("020000000002"), bytes.fromhex("020000000003")


def ncpus_possible():
    s = open("/sys/devices/system/cpu/possible").read().strip()
    n = 0
    for part in s.split(","):
        a, _, b = part.partition("-")
        n += (int(b) if b else int(a)) - int(a) + 1
    return n


NCPU = ncpus_possible()


# ---------------------------------------------------------------- bpf() helpers beyond bpfsys
def attr():
    return (ctypes.c_ubyte * ATTR_SZ)()


def map_create(mtype, ksz, vsz, max_entries, flags=0, name=b""):
    a = attr()
    struct.pack_into("=IIIIIII16s", a, 0, mtype, ksz, vsz, max_entries, flags, 0, 0, name[:15])
    return _call(BPF_MAP_CREATE, a)


def fd_by_id(cmd, oid):
    a = attr(); struct.pack_into("=I", a, 0, oid)
    return _call(cmd, a)


def map_info(fd):
    info = ctypes.create_string_buffer(256)
    a = attr(); struct.pack_into("=IIQ", a, 0, fd, 256, ctypes.addressof(info))
    _call(BPF_OBJ_GET_INFO_BY_FD, a)
    t, mid, ks, vs, me, fl = struct.unpack_from("=IIIIII", info, 0)
    name = info.raw[24:40].split(b"\0")[0].decode()
    return dict(type=t, id=mid, key_size=ks, value_size=vs, max_entries=me, flags=fl, name=name)


def set_table_count(fd, info, key_size=16, state_size=32):
    """Occupied ways in xlb's XLB_FLOWS4 (mmapable array of sets: 16-byte keys, then their
    32-byte states; an all-zero key is an empty way), read through a shared read-only mapping."""
    import mmap
    vs, n_sets = info["value_size"], info["max_entries"] - 1  # the last element is the table's seed
    ways = vs // (key_size + state_size)
    length = (vs * (n_sets + 1) + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
    with mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ) as m:
        data = memoryview(m)
        empty = bytes(key_size)
        n = 0
        for base in range(0, vs * n_sets, vs):
            for w in range(ways):
                o = base + w * key_size
                if data[o:o + key_size] != empty:
                    n += 1
        data.release()
    return n


def map_count(fd, ksz):
    """Entries in a hash map, by walking it with GET_NEXT_KEY (does not touch LRU state)."""
    kb, nb = ctypes.create_string_buffer(ksz), ctypes.create_string_buffer(ksz)
    a = attr()
    struct.pack_into("=IIQQ", a, 0, fd, 0, 0, ctypes.addressof(nb))
    ref, n = ctypes.byref(a), 0
    while True:
        if libc.syscall(NR_bpf, BPF_MAP_GET_NEXT_KEY, ref, ATTR_SZ) < 0:
            e = ctypes.get_errno()
            if e == 2:
                return n
            raise OSError(e, os.strerror(e))
        n += 1
        ctypes.memmove(kb, nb, ksz)
        struct.pack_into("=Q", a, 8, ctypes.addressof(kb))


def percpu_sum_u64(fd, key, vsz, nfields):
    """Sum over CPUs of a per-CPU array entry made of nfields u64s."""
    raw = map_lookup(fd, struct.pack("=I", key), ((vsz + 7) // 8 * 8) * NCPU)
    step = (vsz + 7) // 8 * 8
    tot = [0] * nfields
    for c in range(NCPU):
        vals = struct.unpack_from(f"={nfields}Q", raw, c * step)
        tot = [x + y for x, y in zip(tot, vals)]
    return tot


def cpu_ticks():
    """Per-CPU (busy, total, steal) jiffies from /proc/stat."""
    out = {}
    for line in open("/proc/stat"):
        f = line.split()
        if f[0].startswith("cpu") and f[0] != "cpu":
            v = list(map(int, f[1:9]))
            busy = v[0] + v[1] + v[2] + v[5] + v[6]
            out[f[0]] = (busy, busy + v[3] + v[4] + v[7], v[7])
    return out


def setns(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            e = ctypes.get_errno(); raise OSError(e, f"setns {path}: {os.strerror(e)}")
    finally:
        os.close(fd)


# ---------------------------------------------------------------- packets
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return (~s) & 0xffff


def tcp_frame(src, sport, dst, dport, flags, seq=1000, ack=0):
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    t = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 8192, 0, 0)
    t = t[:16] + struct.pack("!H", csum(s + d + struct.pack("!BBH", 0, 6, len(t)) + t)) + t[18:]
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(t), 1, 0, 64, 6, 0, s, d)
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return LB_MAC + CLI_MAC + b"\x08\x00" + h + t


def udp_frame(src, sport, dst, dport, payload):
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    u = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    c = csum(s + d + struct.pack("!BBH", 0, 17, len(u)) + u) or 0xffff
    u = u[:6] + struct.pack("!H", c) + u[8:]
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(u), 1, 0, 64, 17, 0, s, d)
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return LB_MAC + CLI_MAC + b"\x08\x00" + h + u


def tuple_at(net, i):
    """i-th distinct client (address, port) in 10.<net>.0.0/16: addresses first, then ports."""
    a = i % 65536
    return f"10.{net}.{a >> 8}.{a & 255}", 10000 + i // 65536


class Pool:
    """Frames stored back to back in one C buffer; addr(i) is what data_in points at."""
    def __init__(self, frames):
        self.size = len(frames[0])
        assert all(len(f) == self.size for f in frames)
        self.buf = ctypes.create_string_buffer(b"".join(frames), self.size * len(frames))
        self.base, self.n = ctypes.addressof(self.buf), len(frames)
    def addr(self, i): return self.base + i * self.size
    def frame(self, i): return self.buf.raw[i * self.size:(i + 1) * self.size]


# ---------------------------------------------------------------- output checks
def ip_ok(ip):
    return ip[0] == 0x45 and csum(ip[:20]) == 0


def check_katran_vip(inp, out):
    """IPIP-encapsulated copy of the input, to a real, towards the default router MAC."""
    if len(out) != len(inp) + 20: return f"len {len(out)} != {len(inp) + 20}"
    if out[0:6] != ROUTER_MAC or out[6:12] != inp[0:6] or out[12:14] != b"\x08\x00":
        return "ethernet header"
    o = out[14:34]
    if not ip_ok(o) or o[9] != 4: return "outer IPv4 header (proto must be 4 = IPIP)"
    if struct.unpack("!H", o[2:4])[0] != len(inp) - 14 + 20: return "outer tot_len"
    if socket.inet_ntoa(o[16:20]) not in REALS: return f"outer dst {socket.inet_ntoa(o[16:20])} not a real"
    if o[12:14] != bytes([172, 16]): return "outer src not 172.16/16"
    if out[34:] != inp[14:]: return "inner packet changed"
    return None


def check_xlb_vip(inp, out, lb_mac):
    """DNAT to a backend (address and port), towards the permanent neighbour's MAC."""
    if len(out) != len(inp): return "length changed"
    if out[0:6] != ROUTER_MAC or out[6:12] != lb_mac or out[12:14] != b"\x08\x00": return "ethernet header"
    ip, l4 = out[14:34], out[34:]
    if not ip_ok(ip): return "IPv4 header/checksum"
    if socket.inet_ntoa(ip[16:20]) not in REALS: return f"dst {socket.inet_ntoa(ip[16:20])} not a backend"
    if ip[12:16] != inp[26:30]: return "src changed"
    if l4[0:2] != inp[34:36] or struct.unpack("!H", l4[2:4])[0] != 80: return "ports"
    pseudo = ip[12:20] + struct.pack("!BBH", 0, ip[9], len(l4))
    if csum(pseudo + l4) != 0: return "L4 checksum"
    return None


def check_xlb_ipip(inp, out, lb_mac):
    """The input inside an outer IPv4 header (protocol 4) from the LB's own address on the route
    (10.199.0.1) to a backend, towards the permanent neighbour's MAC: Katran's work, xlb's way."""
    if len(out) != len(inp) + 20: return f"len {len(out)} != {len(inp) + 20}"
    if out[0:6] != ROUTER_MAC or out[6:12] != lb_mac or out[12:14] != b"\x08\x00": return "ethernet header"
    o = out[14:34]
    if not ip_ok(o) or o[9] != 4: return "outer IPv4 header (proto must be 4 = IPIP)"
    if struct.unpack("!H", o[2:4])[0] != len(inp) - 14 + 20: return "outer tot_len"
    if socket.inet_ntoa(o[16:20]) not in REALS: return f"outer dst {socket.inet_ntoa(o[16:20])} not a real"
    if socket.inet_ntoa(o[12:16]) != "10.199.0.1": return f"outer src {socket.inet_ntoa(o[12:16])}"
    if out[34:] != inp[14:]: return "inner packet changed"
    return None


def check_pass(inp, out):
    return None if out == inp else "pass-through frame changed"


# ---------------------------------------------------------------- programs
class Prog:
    def __init__(self, name, kind, fd, netns=None):
        self.name, self.kind, self.fd, self.netns = name, kind, fd, netns
        self.a = attr()
        self.outb = ctypes.create_string_buffer(OUT_SIZE)
        struct.pack_into("=IIIIQQII", self.a, 0, fd, 0, 0, OUT_SIZE, 0, ctypes.addressof(self.outb), 1, 0)
        self.u32 = (ctypes.c_uint32 * (ATTR_SZ // 4)).from_buffer(self.a)
        self.u64 = (ctypes.c_uint64 * (ATTR_SZ // 8)).from_buffer(self.a)
        self.ref = ctypes.byref(self.a)
        self.cursor = {}   # per pool: next fresh index

    def chunk(self, addrs, size, warm, n, dur, off, rets, sample_every, samples):
        """Runs len(addrs) calls: the first `warm` unrecorded, then n recorded into dur[off:]."""
        u32, u64, ref, sc = self.u32, self.u64, self.ref, libc.syscall
        u32[2] = size
        for i in range(warm + n):
            u64[2] = addrs[i]
            u32[3] = OUT_SIZE
            if sc(NR_bpf, BPF_PROG_TEST_RUN, ref, ATTR_SZ) < 0:
                e = ctypes.get_errno(); raise OSError(e, f"{self.name}: test run: {os.strerror(e)}")
            r = u32[1]
            rets[r] = rets.get(r, 0) + 1
            if i >= warm:
                dur[off + i - warm] = u32[9]
                if (i - warm) % sample_every == 0:
                    samples.append((addrs[i], self.outb.raw[:u32[3]]))


class KatranInstance:
    def __init__(self, name, obj, lru_entries, ring):
        self.name, self.lru_entries = name, lru_entries
        self.pdir, self.mdir = f"/sys/fs/bpf/kf_{name}", f"/sys/fs/bpf/kf_{name}_maps"
        sh(f"bpftool prog loadall {obj} {self.pdir} type xdp pinmaps {self.mdir}")
        self.prog_fd = obj_get(f"{self.pdir}/balancer_ingress")
        m = lambda n: obj_get(f"{self.mdir}/{n}")
        self.stats, self.fallback, self.lru_mapping = m("stats"), m("fallback_cache"), m("lru_mapping")
        # ctl_array[0]: default router MAC (KatranLb::changeMac)
        map_update(m("ctl_array"), struct.pack("=I", 0), ROUTER_MAC + b"\0\0")
        # vip_map: VIP 10.200.0.1:80/tcp, flags 0, vip_num 0 (KatranLb::addVip; port big-endian)
        vkey = socket.inet_aton(VIP) + bytes(12) + struct.pack("!H", VIP_PORT) + bytes([6, 0])
        map_update(m("vip_map"), vkey, struct.pack("=II", 0, 0))
        # reals: ids 1..100 (0 means "no real"), IPv4, flags 0
        for i, r in enumerate(REALS, 1):
            map_update(m("reals"), struct.pack("=I", i), socket.inet_aton(r) + bytes(12) + bytes(4))
        # ch_rings: slots [vip_num*RING_SIZE, +RING_SIZE) -> real id
        n = len(ring)
        keys = array.array("I", range(0, n)).tobytes()
        vals = array.array("I", ring).tobytes()
        done = map_update_batch(m("ch_rings"), keys, vals, n)
        assert done == n, f"ch_rings batch wrote {done}/{n}"
        # per-CPU connection tables, as KatranLb::initLrus/attachLrus (every CPU forwards);
        # lru_entries None: none, so the program falls back to fallback_cache
        self.lru_fds = []
        for cpu in range(NCPU if lru_entries else 0):
            fd = map_create(BPF_MAP_TYPE_LRU_HASH, FLOW_KEY_SZ, REAL_POS_LRU_SZ, lru_entries, 0,
                            f"katran_lru{cpu}".encode())
            map_update(self.lru_mapping, struct.pack("=I", cpu), struct.pack("=I", fd))
            self.lru_fds.append(fd)
        self.zero_stat = bytes(16 * NCPU)

    def reset_rate_guard(self):
        map_update(self.stats, struct.pack("=I", MAX_VIPS + NEW_CONN_RATE_CNTR), self.zero_stat)

    def counters(self):
        g = lambda k: percpu_sum_u64(self.stats, MAX_VIPS + k, 16, 2)
        return dict(lru_total=g(LRU_CNTRS), lru_miss=g(LRU_MISS_CNTR), fallback=g(FALLBACK_LRU_CNTR),
                    ch_drop=g(CH_DROP_STATS), tx=g(XDP_TX_CNTR), drop=g(XDP_DROP_CNTR), pass_=g(XDP_PASS_CNTR))

    def lru_count(self, cpu):
        return map_count(self.lru_fds[cpu], FLOW_KEY_SZ) if self.lru_fds else self.fallback_count()

    def fallback_count(self):
        return map_count(self.fallback, FLOW_KEY_SZ)


def maglev(n_backends, m, seed=b"katran-fair"):
    """Maglev table (Eisenbud et al. 2016): slot -> backend id 1..n."""
    import hashlib
    perm = []
    for b in range(n_backends):
        h = hashlib.blake2b(seed + REALS[b].encode(), digest_size=16).digest()
        off, skip = int.from_bytes(h[:8], "little") % m, int.from_bytes(h[8:], "little") % (m - 1) + 1
        perm.append((off, skip))
    nxt, table, filled = [0] * n_backends, [0] * m, 0
    while True:
        for b in range(n_backends):
            off, skip = perm[b]
            c = (off + nxt[b] * skip) % m
            while table[c]:
                nxt[b] += 1; c = (off + nxt[b] * skip) % m
            table[c] = b + 1; nxt[b] += 1; filled += 1
            if filled == m:
                return table


# ---------------------------------------------------------------- environment
procs, cleanup_paths, netns_made = [], [], []


def sh(c, check=True, timeout=300):
    r = subprocess.run(c, shell=True, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode:
        raise RuntimeError(f"{c}: {(r.stderr or r.stdout).strip()[:400]}")
    return r


class XlbInstance:
    def __init__(self, name, xlb, tag, entries, tmp, forwarding="nat"):
        self.name, self.entries, self.forwarding = name, entries, forwarding
        ns, peer = f"kf{tag}", f"kf{tag}p"
        self.netns = f"/run/netns/{ns}"
        for n in (ns, peer):
            sh(f"ip netns add {n}"); netns_made.append(n)
        a, b = f"kf{tag}0", f"kf{tag}1"
        sh(f"ip link add {a} netns {ns} type veth peer name {b} netns {peer}")
        sh(f"ip -n {ns} addr add 10.199.0.1/24 dev {a}"); sh(f"ip -n {peer} addr add 10.199.0.2/24 dev {b}")
        sh(f"ip -n {ns} link set {a} up"); sh(f"ip -n {peer} link set {b} up"); sh(f"ip -n {ns} link set lo up")
        sh(f"ip -n {ns} route add 10.201.0.0/16 via 10.199.0.2")
        sh(f"ip -n {ns} neigh replace 10.199.0.2 lladdr {ROUTER_MAC.hex(':')} dev {a} nud permanent")
        self.bpffs = f"/sys/fs/bpf/kf_{name}"
        cleanup_paths.append(self.bpffs)
        sock = f"{tmp}/{name}.sock"
        log = open(f"{tmp}/{name}.log", "w")
        # nsenter --net keeps the host's mount namespace, so the pins land on the host's bpffs
        self.agent = subprocess.Popen(
            ["nsenter", f"--net={self.netns}", xlb, "run", "--iface", a, "--xdp-mode", "native", "--socket", sock,
             "--state", f"{tmp}/{name}.state.json", "--bpffs", self.bpffs,
             "--conntrack-entries", str(entries), "--no-metrics"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(self.agent)
        for _ in range(300):
            if os.path.exists(sock): break
            if self.agent.poll() is not None:
                raise RuntimeError(f"xlb agent {name} exited: {open(f'{tmp}/{name}.log').read()[-600:]}")
            time.sleep(0.1)
        time.sleep(0.3)
        x = lambda args: sh(f"{xlb} --socket {sock} {args}")
        if forwarding == "nat":
            x(f"vip add {VIP}:{VIP_PORT}/tcp")
        else:
            x(f"vip add {VIP}:{VIP_PORT}/tcp --forwarding {forwarding}")
        for r in REALS:
            # A tunnelled backend serves the VIP's own port: the packet reaches it unchanged.
            x(f"backend add {VIP}:{VIP_PORT}/tcp {r}:80" if forwarding == "nat"
              else f"backend add {VIP}:{VIP_PORT}/tcp {r}")
        time.sleep(0.5)
        info = json.loads(sh(f"ip -n {ns} -j link show {a}").stdout)[0]
        self.lb_mac = bytes.fromhex(info["address"].replace(":", ""))
        pid = info.get("xdp", {}).get("prog", {}).get("id")
        if not pid:
            raise RuntimeError(f"{name}: no XDP program attached to {a}")
        self.prog_id = pid
        self.prog_fd = fd_by_id(BPF_PROG_GET_FD_BY_ID, pid)
        self.gstats = obj_get(f"{self.bpffs}/XLB_GSTATS")
        self.conntrack = obj_get(f"{self.bpffs}/XLB_CONNTRACK")
        self.ct_info = map_info(self.conntrack)
        # IPv4 flows live in XLB_FLOWS4 (a set-associative array) since 2026-12-06.
        flows4 = f"{self.bpffs}/XLB_FLOWS4"
        self.flows4 = obj_get(flows4) if os.path.exists(flows4) else None
        self.flows4_info = map_info(self.flows4) if self.flows4 is not None else None
        self.handshakes = obj_get(f"{self.bpffs}/XLB_HANDSHAKES")
        self.hs_info = map_info(self.handshakes)
        self.revnat_info = map_info(obj_get(f"{self.bpffs}/XLB_REVNAT"))
        self.maglev_info = map_info(obj_get(f"{self.bpffs}/XLB_MAGLEV"))
        self.vip_show = sh(f"{xlb} --socket {sock} vip list", check=False).stdout.strip()[:400]

    def counters(self):
        raw = {}
        for k, i in XC.items():
            raw[k] = percpu_sum_u64(self.gstats, i, 8, 1)[0]
        return raw

    def ct_count(self):
        n = map_count(self.conntrack, self.ct_info["key_size"])
        if self.flows4 is not None:
            n += set_table_count(self.flows4, self.flows4_info)
        return n

    def hs_count(self):
        return map_count(self.handshakes, self.hs_info["key_size"])


def teardown():
    for p in procs:
        try:
            os.kill(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL); p.wait(timeout=5)
    for path in cleanup_paths:
        subprocess.run(["rm", "-rf", path])
    for n in netns_made:
        subprocess.run(["ip", "netns", "del", n], capture_output=True)


# ---------------------------------------------------------------- measurement
def pct(sorted_d, q):
    return sorted_d[min(len(sorted_d) - 1, int(q * len(sorted_d)))]


def summarize(d):
    s = sorted(d)
    return dict(n=len(s), median=statistics.median(s), p10=pct(s, 0.10), p90=pct(s, 0.90),
                p99=pct(s, 0.99), mean=round(sum(s) / len(s), 1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build-dir", default=os.environ.get("KATRAN_FAIR_OUT", "/tmp/katran-fair"),
                    help="where build.sh put balancer.bpf.o and xdp_floor.o")
    ap.add_argument("--xlb", default=os.environ.get("XLB_BIN", "target/release/xlb"))
    ap.add_argument("--cpu", type=int, default=1)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--calls", type=int, default=50000, help="recorded calls per program, case and trial")
    ap.add_argument("--chunk", type=int, default=5000, help="recorded calls per interleaved chunk")
    ap.add_argument("--warm", type=int, default=200, help="unrecorded calls before each chunk")
    ap.add_argument("--sample", type=int, default=500, help="spot-check every N-th recorded output")
    ap.add_argument("--katran-lru", type=int, default=1_000_000, help="per-CPU LRU entries, katran_1m")
    ap.add_argument("--xlb-entries", type=int, default=1_000_000, help="xlb --conntrack-entries, xlb_1m")
    ap.add_argument("--small-lru", type=int, default=1000, help="Katran per-CPU LRU and xlb --conntrack-entries, small")
    ap.add_argument("--established", type=int, default=100_000, help="flows for c2_ack_100k")
    ap.add_argument("--no-500k", action="store_true", help="skip the katran_500k sensitivity row")
    ap.add_argument("--no-old-method", action="store_true", help="skip case g (repeated SYN, fallback LRU)")
    ap.add_argument("--xlb-forwarding", choices=["nat", "ipip"], default="nat",
                    help="xlb's VIP forwarding: nat (DNAT, xlb's default) or ipip (direct server return, "
                         "the same IPIP encapsulation Katran does: like for like)")
    ap.add_argument("--cases", default=None, help="comma-separated subset of case names (default: all)")
    ap.add_argument("--out", default=None, help="JSON report path (default: BUILD_DIR/results.json)")
    args = ap.parse_args()
    assert args.calls % args.chunk == 0
    out_path = args.out or os.path.join(args.build_dir, "results.json")
    obj, floor_obj = f"{args.build_dir}/balancer.bpf.o", f"{args.build_dir}/xdp_floor.o"
    for f in (obj, floor_obj, args.xlb):
        if not os.path.exists(f):
            sys.exit(f"missing {f} (run build.sh / build xlb first)")
    if not os.path.ismount("/sys/fs/bpf"):
        sh("mount -t bpf bpf /sys/fs/bpf")
    for n in os.listdir("/sys/fs/bpf"):
        if n.startswith("kf_"):
            sys.exit(f"/sys/fs/bpf/{n} exists: another run, or a leftover (remove it)")
    tmp = tempfile.mkdtemp(prefix="kf-")   # agents' sockets, state files and logs; removed at exit
    cleanup_paths.append(tmp)
    t0 = time.time()
    log = lambda *a: print(f"[{time.time() - t0:6.1f}s]", *a, flush=True)

    # ---- programs
    chunks = args.calls // args.chunk
    per_trial = chunks * (args.chunk + args.warm)
    ring = maglev(len(REALS), RING_SIZE)
    kat = {}
    for name, entries in (("katran_1m", args.katran_lru), ("katran_500k", args.katran_lru // NCPU),
                          ("katran_1k", args.small_lru), ("katran_fallback", None)):
        if (name == "katran_500k" and args.no_500k) or (name == "katran_fallback" and args.no_old_method):
            continue
        cleanup_paths.extend([f"/sys/fs/bpf/kf_{name}", f"/sys/fs/bpf/kf_{name}_maps"])
        kat[name] = KatranInstance(name, obj, entries, ring)
        log(f"loaded {name}: " + (f"per-CPU LRU {entries} entries x {NCPU} CPUs" if entries
                                  else "no per-CPU LRU (fallback_cache, 1000 entries)"))
    xl = {}
    xl["xlb_1m"] = XlbInstance("xlb_1m", args.xlb, "b", args.xlb_entries, tmp, args.xlb_forwarding)
    xl["xlb_1k"] = XlbInstance("xlb_1k", args.xlb, "s", args.small_lru, tmp, args.xlb_forwarding)
    for x in xl.values():
        log(f"started {x.name}: prog id {x.prog_id}, XLB_CONNTRACK {x.ct_info}")
    cleanup_paths.append("/sys/fs/bpf/kf_floor")
    sh(f"bpftool prog loadall {floor_obj} /sys/fs/bpf/kf_floor type xdp")
    progs = {}
    for k in kat.values():
        progs[k.name] = Prog(k.name, "katran", k.prog_fd)
    for x in xl.values():
        progs[x.name] = Prog(x.name, "xlb", x.prog_fd, x.netns)
    progs["floor_pass"] = Prog("floor_pass", "floor", obj_get("/sys/fs/bpf/kf_floor/xdp_pass"))
    progs["floor_parse"] = Prog("floor_parse", "floor", obj_get("/sys/fs/bpf/kf_floor/xdp_parse"))

    os.sched_setaffinity(0, {args.cpu})
    # ---- packets
    fresh_n = args.trials * per_trial + 10
    log(f"building packets: {fresh_n} fresh SYN tuples per pool")
    pool_a = Pool([tcp_frame(*tuple_at(202, i), VIP, VIP_PORT, 0x02) for i in range(fresh_n)])
    pool_b = Pool([tcp_frame(*tuple_at(204, i), VIP, VIP_PORT, 0x02) for i in range(fresh_n)])
    est_syn = Pool([tcp_frame(*tuple_at(205, i), VIP, VIP_PORT, 0x02) for i in range(args.established)])
    est_ack = Pool([tcp_frame(*tuple_at(205, i), VIP, VIP_PORT, 0x10, 1001, 5001) for i in range(args.established)])
    one_syn = Pool([tcp_frame("10.206.0.5", 40000, VIP, VIP_PORT, 0x02)])
    one_ack = Pool([tcp_frame("10.206.0.5", 40000, VIP, VIP_PORT, 0x10, 1001, 5001)])
    pool_h = Pool([tcp_frame(*tuple_at(207, i), VIP, VIP_PORT, 0x10, 1001, 5001) for i in range(fresh_n)])
    udp = Pool([udp_frame("10.206.0.5", 40000, "10.99.0.1", 53, bytes(18))])
    junk = Pool([bytes((i * 37 + 11) & 0xff for i in range(64))])
    syn_ref = Pool([tcp_frame("10.206.0.7", 40000, VIP, VIP_PORT, 0x02)])
    syn_old = Pool([tcp_frame("10.206.0.9", 40000, VIP, VIP_PORT, 0x02)])
    assert len(set(tuple_at(202, i) for i in range(fresh_n))) == fresh_n

    big = [p for p in ("katran_1m", "katran_500k", "xlb_1m") if p in progs]
    small = ["katran_1k", "xlb_1k"]
    problems = []

    def enter(p):
        if p.netns:
            setns(p.netns)

    def before_chunk(p):
        enter(p)
        if p.name in kat:
            kat[p.name].reset_rate_guard()

    # ---- establish flows (c1's one flow, c2's 100k), with checks
    log(f"establishing 1 + {args.established} flows in {big}")
    t_established = {}
    for name in big:
        p = progs[name]
        t_established[name] = time.monotonic()
        # A connection is established by its handshake: xlb creates a TCP flow's entry on the
        # first packet after the SYN, Katran on the SYN (its ACKs then hit).
        for pool in (one_syn, one_ack, est_syn, est_ack):
            for s in range(0, pool.n, 10000):
                before_chunk(p)
                addrs = array.array("Q", (pool.addr(i) for i in range(s, min(pool.n, s + 10000))))
                rets, samples = {}, []
                p.chunk(addrs, pool.size, len(addrs), 0, None, 0, rets, 1, samples)
                want = XDP_TX if p.kind == "katran" else XDP_REDIRECT
                if set(rets) != {want}:
                    problems.append(f"establish {name}: rets {rets}")
        if name in kat:
            c = kat[name].lru_count(args.cpu)
            if c != args.established + 1:
                problems.append(f"{name}: LRU(cpu{args.cpu}) holds {c} after establishing, want {args.established + 1}")
            log(f"{name}: LRU(cpu{args.cpu}) entries {c}")
        else:
            c = xl[name].ct_count()
            if c != args.established + 1:
                problems.append(f"{name}: XLB_CONNTRACK holds {c} after establishing, want {args.established + 1}")
            log(f"{name}: XLB_CONNTRACK entries {c}")
    enter(progs["xlb_1m"])

    # ---- cases: name -> (programs, source of addresses, expected action per kind, checker kind)
    rng_seed = 12345
    def seq_fresh(pool):
        def f(p, trial, k, n):
            c = p.cursor.get(id(pool), 0)
            if c + n > pool.n:
                raise RuntimeError("fresh pool exhausted")
            p.cursor[id(pool)] = c + n
            return array.array("Q", (pool.addr(i) for i in range(c, c + n)))
        return f
    def seq_const(pool):
        return lambda p, trial, k, n: array.array("Q", [pool.addr(0)] * n)
    c2_seq = {}
    def seq_est(p, trial, k, n):
        if trial not in c2_seq:
            r = random.Random(rng_seed + trial)
            c2_seq[trial] = array.array("Q", (est_ack.addr(r.randrange(est_ack.n)) for _ in range(per_trial)))
        return c2_seq[trial][k * n:(k + 1) * n]

    cases = [
        ("a_syn_new_big", big + ["floor_pass"], seq_fresh(pool_a), pool_a, "vip"),
        ("h_ack_new_big", big + ["floor_pass"], seq_fresh(pool_h), pool_h, "vip"),
        ("b_syn_new_small", small + ["floor_pass"], seq_fresh(pool_b), pool_b, "vip"),
        ("c1_ack_one", big + ["floor_pass"], seq_const(one_ack), one_ack, "vip"),
        ("c2_ack_100k", big + ["floor_pass"], seq_est, est_ack, "vip"),
        ("d_udp_nonvip", ["katran_1m", "xlb_1m", "floor_pass"], seq_const(udp), udp, "pass"),
        ("e_junk64", ["katran_1m", "xlb_1m", "floor_pass"], seq_const(junk), junk, "pass"),
        ("f_floor", ["floor_pass", "floor_parse"], seq_const(syn_ref), syn_ref, "floor"),
    ]
    if "katran_fallback" in kat:
        cases.append(("g_syn_repeat_old", ["katran_fallback", "katran_1m", "floor_pass"], seq_const(syn_old),
                      syn_old, "vip"))
    if args.cases:
        keep = args.cases.split(",")
        cases = [c for c in cases if c[0] in keep or c[0] == "f_floor"]
    res = {c[0]: {p: dict(durs=[], trial_medians=[], rets={}, samples_checked=0) for p in c[1]} for c in cases}
    cnt = {}
    # c2: when each program last sent each established flow a packet (xlb refreshes a flow's
    # last-seen time and cached next hop when more than 1 s has passed: split c2 by that gap)
    last_touch = {p: array.array("d", [t_established[p]] * est_ack.n) for p in t_established}
    gap_split = {p: ([], []) for p in t_established}
    addr_frame = lambda pool, a: pool.frame((a - pool.base) // pool.size)

    ticks0, tm0 = cpu_ticks(), time.time()
    log(f"measuring: {args.trials} trials x {args.calls} calls, chunks of {args.chunk} (+{args.warm} warm-up), CPU {args.cpu}")
    for trial in range(args.trials):
        for cname, plist, seq, pool, kind in cases:
            durs = {p: array.array("I", bytes(4 * args.calls)) for p in plist}
            lru_before = {p: kat[p].lru_count(args.cpu) for p in plist if p in kat and cname.startswith(("a_", "b_", "h_"))}
            ct_before = {p: xl[p].ct_count() for p in plist if p in xl and cname.startswith(("a_", "b_", "h_"))}
            hs_before = {p: xl[p].hs_count() for p in plist if p in xl and cname.startswith(("a_", "b_"))}
            for k in range(chunks):
                order = plist[k % len(plist):] + plist[:k % len(plist)]
                for name in order:
                    p = progs[name]
                    addrs = seq(p, trial, k, args.chunk + args.warm)
                    before_chunk(p)
                    c0 = (kat[name].counters() if name in kat else xl[name].counters() if name in xl else None)
                    rets, samples = {}, []
                    tc = time.monotonic()
                    p.chunk(addrs, pool.size, args.warm, args.chunk, durs[name], k * args.chunk, rets,
                            args.sample, samples)
                    if cname == "c2_ack_100k" and name in last_touch:
                        lt, (fresh_d, stale_d) = last_touch[name], gap_split[name]
                        for j, a_ in enumerate(addrs):
                            ix = (a_ - est_ack.base) // est_ack.size
                            g = tc - lt[ix]; lt[ix] = tc
                            if j >= args.warm:
                                (stale_d if g > 1.0 else fresh_d).append(durs[name][k * args.chunk + j - args.warm])
                    c1 = (kat[name].counters() if name in kat else xl[name].counters() if name in xl else None)
                    r = res[cname][name]
                    for a_, b_ in rets.items():
                        r["rets"][ACTION.get(a_, a_)] = r["rets"].get(ACTION.get(a_, a_), 0) + b_
                    # expected action
                    if kind == "vip":
                        want = XDP_TX if p.kind == "katran" else XDP_REDIRECT if p.kind == "xlb" else XDP_PASS
                    else:
                        want = XDP_PASS
                    if set(rets) != {want}:
                        problems.append(f"{cname} t{trial} {name}: actions {rets}, want only {ACTION[want]}")
                    # outputs
                    for a_, out in samples:
                        inp = addr_frame(pool, a_)
                        if kind == "vip" and p.kind == "katran": err = check_katran_vip(inp, out)
                        elif kind == "vip" and p.kind == "xlb":
                            check = check_xlb_ipip if xl[name].forwarding == "ipip" else check_xlb_vip
                            err = check(inp, out, xl[name].lb_mac)
                        else: err = check_pass(inp, out)
                        if err:
                            problems.append(f"{cname} t{trial} {name}: output: {err}")
                        r["samples_checked"] += 1
                    # counters
                    ncall = args.chunk + args.warm
                    if name in kat:
                        d = {k2: [y - x for x, y in zip(c0[k2], c1[k2])] for k2 in c0}
                        bad = []
                        want_fb = ncall if kat[name].lru_entries is None and kind == "vip" else 0
                        if d["fallback"][0] != want_fb: bad.append(f"fallback LRU used {d['fallback'][0]} times, want {want_fb}")
                        if d["ch_drop"] != [0, 0]: bad.append("CH drops")
                        if kind == "vip":
                            if d["tx"][0] != ncall: bad.append(f"tx {d['tx'][0]}")
                            if cname.startswith(("a_", "b_", "g_")) and d["lru_miss"] != [ncall, 0]:
                                bad.append(f"lru_miss {d['lru_miss']} (want [{ncall}, 0])")
                            if cname.startswith("h_") and sum(d["lru_miss"]) != ncall:
                                bad.append(f"lru_miss {d['lru_miss']} (want {ncall} in all)")
                            if cname.startswith("c") and d["lru_miss"] != [0, 0]:
                                bad.append(f"lru_miss {d['lru_miss']} (want none: LRU hits)")
                        else:
                            if d["pass_"][0] != ncall: bad.append(f"pass {d['pass_'][0]}")
                        if bad:
                            problems.append(f"{cname} t{trial} {name}: counters: {', '.join(bad)}")
                        cnt.setdefault(cname, {}).setdefault(name, {})
                        for k2, v in d.items():
                            acc = cnt[cname][name].setdefault(k2, [0, 0])
                            cnt[cname][name][k2] = [acc[0] + v[0], acc[1] + v[1]]
                    elif name in xl:
                        d = {k2: c1[k2] - c0[k2] for k2 in c0}
                        bad = []
                        for z in ("nh_failure", "via_stack", "insert_failed", "no_backend", "malformed"):
                            if d[z]: bad.append(f"{z} {d[z]}")
                        if kind == "vip":
                            if d["redirect"] != ncall: bad.append(f"redirect {d['redirect']}")
                            if cname.startswith(("a_", "b_", "h_")) and (d["ct_miss"], d["ct_hit"]) != (ncall, 0):
                                bad.append(f"ct miss/hit {d['ct_miss']}/{d['ct_hit']} (want {ncall}/0)")
                            if cname.startswith("c") and (d["ct_miss"], d["ct_hit"]) != (0, ncall):
                                bad.append(f"ct miss/hit {d['ct_miss']}/{d['ct_hit']} (want 0/{ncall})")
                        else:
                            if d["pass_"] != ncall: bad.append(f"pass {d['pass_']}")
                        if bad:
                            problems.append(f"{cname} t{trial} {name}: counters: {', '.join(bad)}")
                        cnt.setdefault(cname, {}).setdefault(name, {})
                        for k2, v in d.items():
                            cnt[cname][name][k2] = cnt[cname][name].get(k2, 0) + v
            enter(progs["xlb_1m"])
            # table growth: every fresh SYN must have been inserted (no flood bypass, no repeats)
            for name, before in lru_before.items():
                after = kat[name].lru_count(args.cpu)
                want = min(before + per_trial, kat[name].lru_entries)
                grew = after - before
                note = f"{cname} t{trial} {name}: LRU(cpu{args.cpu}) {before} -> {after}"
                if kat[name].lru_entries > before + per_trial and grew != per_trial:
                    problems.append(note + f" (want +{per_trial})")
                res[cname][name].setdefault("table", []).append([before, after])
            for name, before in ct_before.items():
                after = xl[name].ct_count()
                # xlb's SYN inserts into its handshake table; the connection's first ACK into
                # the connection table
                want = 0 if cname.startswith(("a_", "b_")) else per_trial
                if xl[name].entries // NCPU > before + per_trial and after - before != want:
                    problems.append(f"{cname} t{trial} {name}: XLB_CONNTRACK {before} -> {after} (want +{want})")
                res[cname][name].setdefault("table", []).append([before, after])
            for name, before in hs_before.items():
                after = xl[name].hs_count()
                if xl[name].hs_info["max_entries"] // NCPU > before + per_trial and after - before != per_trial:
                    problems.append(f"{cname} t{trial} {name}: XLB_HANDSHAKES {before} -> {after} (want +{per_trial})")
                res[cname][name].setdefault("handshakes", []).append([before, after])
            for name in plist:
                res[cname][name]["durs"].extend(durs[name])
                res[cname][name]["trial_medians"].append(statistics.median(durs[name]))
            log(f"t{trial} {cname}: " + "  ".join(f"{n}={statistics.median(durs[n]):.0f}" for n in plist))
    ticks1, tm1 = cpu_ticks(), time.time()
    load = {c: dict(busy_pct=round(100 * (ticks1[c][0] - ticks0[c][0]) / max(1, ticks1[c][1] - ticks0[c][1]), 1),
                    steal_pct=round(100 * (ticks1[c][2] - ticks0[c][2]) / max(1, ticks1[c][1] - ticks0[c][1]), 1))
            for c in ticks0}
    log(f"CPU load during the measurement ({tm1 - tm0:.0f} s; cpu{args.cpu} is this harness): {load}")
    # ---- fallback cache must be empty, LRU on the other CPU untouched
    for name, k in kat.items():
        fb = k.fallback_count()
        if fb and k.lru_entries is not None:
            problems.append(f"{name}: fallback_cache holds {fb} entries")
        if k.lru_fds:
            other = [k.lru_count(c) for c in range(NCPU) if c != args.cpu]
            log(f"{name}: fallback_cache entries {fb}; LRU entries on other CPUs {other}; "
                f"on cpu{args.cpu} {k.lru_count(args.cpu)}")
        else:
            log(f"{name}: fallback_cache entries {fb} (expected: this instance has no per-CPU LRU)")

    # ---- report
    summary = {}
    for cname, plist, *_ in cases:
        summary[cname] = {}
        for name in plist:
            r = res[cname][name]
            s = summarize(r["durs"])
            s.update(trial_medians=r["trial_medians"], rets=r["rets"], samples_checked=r["samples_checked"])
            if "table" in r: s["table_before_after"] = r["table"]
            summary[cname][name] = s
    config = dict(
        cpu=args.cpu, trials=args.trials, calls=args.calls, chunk=args.chunk, warm=args.warm, ncpus=NCPU,
        katran=dict(obj=os.path.basename(obj), build_info=open(f"{args.build_dir}/BUILD_INFO").read().strip()
                    if os.path.exists(f"{args.build_dir}/BUILD_INFO") else None,
                    lru_per_cpu={k: (v.lru_entries or "none: fallback_cache 1000") for k, v in kat.items()},
                    ring_size=RING_SIZE,
                    reals=len(REALS), vip=f"{VIP}:{VIP_PORT}/tcp", vip_flags=0,
                    lru_map=dict(type="LRU_HASH", key=FLOW_KEY_SZ, value=REAL_POS_LRU_SZ, flags=0)),
        xlb={x.name: dict(forwarding=x.forwarding, conntrack_entries=x.entries, conntrack=x.ct_info,
                          revnat=x.revnat_info,
                          maglev=x.maglev_info, prog_id=x.prog_id) for x in xl.values()},
        established=args.established, fresh_tuples_per_pool=fresh_n)
    c2_split = {}
    for name, (fresh_d, stale_d) in gap_split.items():
        c2_split[name] = dict(
            last_packet_within_1s=dict(n=len(fresh_d), median=statistics.median(fresh_d) if fresh_d else None),
            last_packet_over_1s_ago=dict(n=len(stale_d), median=statistics.median(stale_d) if stale_d else None))
    report = dict(config=config, summary=summary, counters=cnt, problems=problems, c2_gap_split=c2_split,
                  cpu_load_during_measurement=load,
                  when=time.strftime("%Y-%m-%dT%H:%M:%S%z"), kernel=os.uname().release)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)
    floor = summary["f_floor"]["floor_pass"]["median"]
    print()
    print(f"medians ns (p10/p90), CPU {args.cpu}, {args.trials} trials x {args.calls} calls; floor_pass (f) = {floor:.0f}")
    print(f"{'case':18} {'program':12} {'median':>7} {'p10':>6} {'p90':>6}  {'trial medians':24} actions")
    for cname, plist, *_ in cases:
        for name in plist:
            s = summary[cname][name]
            print(f"{cname:18} {name:12} {s['median']:7.0f} {s['p10']:6} {s['p90']:6}  "
                  f"{str([round(x) for x in s['trial_medians']]):24} {s['rets']}")
    print("\nnet of floor_pass (case f), xlb / Katran:")
    pairs = [("a_syn_new_big", "xlb_1m", "katran_1m"), ("a_syn_new_big", "xlb_1m", "katran_500k"),
             ("h_ack_new_big", "xlb_1m", "katran_1m"),
             ("b_syn_new_small", "xlb_1k", "katran_1k"), ("c1_ack_one", "xlb_1m", "katran_1m"),
             ("c2_ack_100k", "xlb_1m", "katran_1m"), ("d_udp_nonvip", "xlb_1m", "katran_1m"),
             ("e_junk64", "xlb_1m", "katran_1m")]
    for cname, xn, kn in pairs:
        if cname not in summary or kn not in summary[cname]: continue
        xm, km = summary[cname][xn]["median"], summary[cname][kn]["median"]
        ratio = (xm - floor) / (km - floor) if km - floor > 0 else float("nan")
        print(f"  {cname:18} {xn} {xm:.0f} / {kn} {km:.0f}: net {xm - floor:.0f} / {km - floor:.0f} = {ratio:.2f}x")
    print("\nc2_ack_100k split by time since the flow's previous packet (xlb refreshes after 1 s):")
    for name, v in c2_split.items():
        a_, b_ = v["last_packet_within_1s"], v["last_packet_over_1s_ago"]
        print(f"  {name:12} <=1s: n={a_['n']} median={a_['median']}   >1s: n={b_['n']} median={b_['median']}")
    print(f"\nproblems: {len(problems)}")
    for p in problems[:40]:
        print("  " + p)
    print(f"report: {out_path}")
    return 0 if not problems else 1


if __name__ == "__main__":
    rc = 1
    try:
        rc = main()
    finally:
        teardown()
    sys.exit(rc)
