#!/usr/bin/env python3
"""Real-traffic reachability probes for the anklume-isolation lab.

Every probe runs INSIDE the source instance (`incus exec`), against addresses
resolved live from Incus:

  <instance>     its eth0 addresses (inet, and inet6 with scope global)
  upstream       the lab "internet": the global addresses of eth0 in the
                 namespace anklume-lab-up (read live; each must route via the
                 host's lab-up-host veth, or the probe is refused)
  gw:<bridge>    the host's gateway addresses on a managed bridge

Probes (all bounded in count and time):
  icmp       busybox ping -c 1 -W 1 (ping -6 for IPv6)
  tcp/<port> busybox wget of http://<addr>:<port>/ (every lab instance serves
             its hostname on tcp 80 8080 8081 9000 9010 9011, upstream on 80);
             towards gw:<bridge>, a plain TCP connect (socat)
  udp/<port> socat datagram, expects its echo back (lab instances echo on
             udp 5353 5354, upstream on 5353)

Outcome of a probe: "yes" (answered), "no" (no answer: dropped), or "closed"
(the target answered with a TCP reset or ICMP port unreachable: the path is
open but nothing listens). "closed" never satisfies an expectation: probe a
port the lab serves.

With --report (the render's `reachability`, see lab/report.yml), `matrix`
and `check` also compare every probe with what the report says a new
connection may open, and fail on any cell where they disagree. For that
comparison "closed" counts as reached: the packet got through the firewall
to the target, which refused it itself (the ruleset drops, it never
rejects), so the path is open.

  reach.py matrix [--json] [--instances a,b] [--report REPORT.json]
  reach.py check EXPECTATIONS.{json,yml} [--report REPORT.json]
  reach.py compare REPORT.json PROBES.json   (offline: PROBES from matrix --json)
  reach.py probe FROM TO PROTO[/PORT] [-4|-6]
  reach.py addrs
"""

import argparse
import concurrent.futures
import hashlib
import ipaddress
import json
import signal
import subprocess
import sys
import time

DEFAULT_PROJECT = "anklume-lab"
NET_PREFIX = "lab-net-"
UPSTREAM_NS = "anklume-lab-up"
UPSTREAM_VETH = "lab-up-host"
EXEC_TIMEOUT = 6.0     # hard limit on one `incus exec` probe (seconds)
INNER_TIMEOUT = 2      # busybox timeout around wget/socat inside the source
QUERY_TIMEOUT = 30.0
UDP_TOKEN = "anklume-lab-udp-probe"
REFUSED_MARKERS = ("refused",)
WRONG = "wrong responder:"


class LabError(Exception):
    pass


def incus_query(path):
    try:
        r = subprocess.run(["incus", "query", path], capture_output=True, text=True,
                           timeout=QUERY_TIMEOUT, stdin=subprocess.DEVNULL, check=False)
    except FileNotFoundError:
        raise LabError("the incus client is not installed") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"incus query {path}: timed out") from None
    if r.returncode != 0:
        raise LabError(f"incus query {path}: {r.stderr.strip() or 'failed'}")
    return json.loads(r.stdout)


class Instance:
    def __init__(self, data):
        self.name = data["name"]
        self.status = data.get("status", "")
        self.os = (data.get("config", {}).get("image.os") or "").lower()
        dev = (data.get("expanded_devices") or {}).get("eth0") or {}
        self.network = dev.get("network", "")
        self.domain = (self.network[len(NET_PREFIX):]
                       if self.network.startswith(NET_PREFIX) else self.network or "?")
        self.addrs = {4: [], 6: []}
        state = data.get("state") or {}
        eth0 = (state.get("network") or {}).get("eth0") or {}
        for a in eth0.get("addresses") or []:
            if a.get("family") == "inet":
                self.addrs[4].append(a["address"])
            elif a.get("family") == "inet6" and a.get("scope") == "global":
                self.addrs[6].append(a["address"])

    @property
    def running(self):
        return self.status == "Running"

    @property
    def busybox(self):
        return self.os == "busybox"


def _ip_json(*args):
    try:
        r = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, timeout=10,
                           stdin=subprocess.DEVNULL, check=False)
    except (FileNotFoundError, subprocess.TimeoutExpired) as e:
        raise LabError(f"ip {' '.join(args)}: {e}") from None
    if r.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {r.stderr.strip() or 'failed'}")
    return json.loads(r.stdout or "[]")


def upstream_addresses():
    """Global addresses of the upstream namespace, only those the host routes
    through the lab veth (never let a probe leave the machine)."""
    addrs = {4: [], 6: []}
    try:
        links = _ip_json("-n", UPSTREAM_NS, "addr", "show", "dev", "eth0")
    except LabError as e:
        raise LabError(f"upstream namespace {UPSTREAM_NS} not usable ({e}): run lab/lab.sh up") \
            from None
    for link in links:
        for a in link.get("addr_info", []):
            fam = {"inet": 4, "inet6": 6}.get(a.get("family"))
            if fam and a.get("scope") == "global":
                route = _ip_json("route", "get", a["local"])
                dev = route[0].get("dev") if route else None
                if dev != UPSTREAM_VETH:
                    raise LabError(f"upstream {a['local']} is routed via {dev}, not "
                                   f"{UPSTREAM_VETH}: refusing to probe it")
                addrs[fam].append(a["local"])
    return addrs


class Lab:
    def __init__(self, project):
        self.project = project
        data = incus_query(f"/1.0/instances?project={project}&recursion=2")
        self.instances = {d["name"]: Instance(d) for d in data}
        self._gw = {}
        self._upstream = None

    @property
    def upstream(self):
        if self._upstream is None:
            self._upstream = upstream_addresses()
        return self._upstream

    def gateway(self, bridge):
        if bridge not in self._gw:
            try:
                net = incus_query(f"/1.0/networks/{bridge}")
            except LabError as e:
                raise LabError(f"unknown bridge {bridge!r}: {e}") from None
            cfg = net.get("config") or {}
            addrs = {4: [], 6: []}
            for fam, key in ((4, "ipv4.address"), (6, "ipv6.address")):
                v = cfg.get(key) or ""
                if v and v != "none":
                    addrs[fam].append(v.split("/")[0])
            self._gw[bridge] = addrs
        return self._gw[bridge]

    def addresses(self, target, family):
        """Addresses of a target for one family (may be empty)."""
        if target == "upstream":
            return self.upstream[family]
        if target.startswith("gw:"):
            return self.gateway(target[3:])[family]
        inst = self.instances.get(target)
        if inst is None:
            raise LabError(f"unknown target {target!r} (not an instance of project "
                           f"{self.project}, 'upstream' or 'gw:<bridge>')")
        return inst.addrs[family]

    def domain(self, target):
        if target == "upstream":
            return "internet"
        if target.startswith("gw:"):
            return "host"
        inst = self.instances.get(target)
        return inst.domain if inst else "?"


def _url_host(addr):
    return f"[{addr}]" if ":" in addr else addr


def probe_command(proto, port, addr, family, target):
    ipaddress.ip_address(addr)  # never interpolate anything but an address
    if proto == "icmp":
        return ["busybox", "ping", f"-{family}", "-c", "1", "-W", "1", addr]
    if proto == "tcp" and not target.startswith("gw:"):
        return ["busybox", "timeout", str(INNER_TIMEOUT), "busybox", "wget", "-q",
                "-O", "-", f"http://{_url_host(addr)}:{port}/"]
    if proto == "tcp":
        return ["busybox", "timeout", str(INNER_TIMEOUT), "socat", "-T", "1", "/dev/null",
                f"TCP{family}:{_url_host(addr)}:{port},connect-timeout=1.5"]
    if proto == "udp":
        script = (f"echo {UDP_TOKEN} | busybox timeout {INNER_TIMEOUT} "
                  f"socat -T 1.5 - UDP{family}:{_url_host(addr)}:{port}")
        return ["sh", "-c", script]
    raise LabError(f"unknown protocol {proto!r}")


def run_probe(project, src, target, proto, port, family, addr):
    """Run one probe inside src. Returns (outcome, detail)."""
    cmd = ["incus", "exec", "--project", project, src, "--",
           *probe_command(proto, port, addr, family, target)]
    try:
        # check=False: the exit code is part of the outcome, read by classify().
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=EXEC_TIMEOUT,
                           stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        return "no", "timeout"
    return classify(src, target, proto, r.returncode, r.stdout, r.stderr)


def classify(src, target, proto, returncode, stdout, stderr):
    """Outcome of one finished probe from its exit code and output: "yes",
    "no", "closed", "retry" (inconclusive) or "error" (the probe could not
    run). Pure, so the unit tests can feed it what busybox and socat print."""
    out, err = stdout.strip(), stderr.strip().lower()
    if returncode in (126, 127) or "can't execute" in err:
        return "error", f"probe tool missing in {src}: {stderr.strip()}"
    if proto == "icmp":
        return ("yes", "reply") if returncode == 0 else ("no", "no reply")
    if proto == "tcp" and target.startswith("gw:"):
        if returncode == 0:
            return "yes", "connected"
    elif proto == "tcp":
        if out:
            who = out.splitlines()[0].strip()
            if who != target:
                return "yes", f"{WRONG} {who!r}, not {target!r}"
            return "yes", f"answered by {who}"
        if returncode == 0:
            # wget said it succeeded but nothing came back through
            # `incus exec`: inconclusive, probe again.
            return "retry", "empty answer with exit 0"
    elif proto == "udp" and UDP_TOKEN in out:
        return "yes", "echo"
    if any(m in err for m in REFUSED_MARKERS):
        return "closed", "refused (path open, nothing listening)"
    if proto == "udp":
        return "no", "no echo"
    if returncode in (124, 143) or "timed out" in err:
        return "no", "timeout"
    if "unreachable" in err or "no route" in err:
        return "no", "unreachable"
    return "no", (stderr.strip().splitlines() or [f"exit {returncode}"])[-1][:80]


class Probe:
    def __init__(self, src, dst, proto, port, family, expect=None, label=None):
        self.src, self.dst, self.proto, self.port = src, dst, proto, port
        self.family, self.expect, self.label = family, expect, label
        self.addr = None
        self.outcome = None
        self.detail = ""
        # Filled by compare_report(): what the report says (True: may
        # open, False: may not, None: not compared) and the cell it read.
        self.report = None
        self.report_cell = None
        self.report_entries = None

    @property
    def service(self):
        return self.proto if self.proto == "icmp" else f"{self.proto}/{self.port}"

    def describe(self):
        addr = f" [{self.addr}]" if self.addr else ""
        return f"{self.src} -> {self.dst} {self.service} v{self.family}{addr}"

    def as_dict(self):
        d = {"from": self.src, "to": self.dst, "proto": self.proto, "family": self.family,
             "address": self.addr, "result": self.outcome, "detail": self.detail}
        if self.port is not None:
            d["port"] = self.port
        if self.expect is not None:
            d["expect"] = self.expect
        if self.report_cell is not None:
            d["report"] = {"opens": self.report, "cell": self.report_cell,
                           "entries": self.report_entries}
        return d

    @classmethod
    def from_dict(cls, d):
        """A probe saved by `matrix --json` (for the offline `compare`)."""
        try:
            p = cls(d["from"], d["to"], d["proto"], d.get("port"), d["family"], d.get("expect"))
            p.addr, p.outcome, p.detail = d.get("address"), d["result"], d.get("detail", "")
        except (KeyError, TypeError) as e:
            raise LabError(f"saved probe {json.dumps(d, default=str)}: missing {e}") from None
        return p


def run_probes(lab, probes, workers, retries=1):
    def one(p):
        try:
            addrs = lab.addresses(p.dst, p.family)
        except LabError as e:
            p.outcome, p.detail = "error", str(e)
            return p
        if not addrs:
            p.outcome, p.detail = "error", f"{p.dst} has no IPv{p.family} address"
            return p
        p.addr = addrs[0]
        src = lab.instances.get(p.src)
        if src is None:
            p.outcome, p.detail = "error", f"unknown source instance {p.src!r}"
        elif not src.running:
            p.outcome, p.detail = "error", f"source {p.src} is {src.status or 'not running'}"
        else:
            for attempt in range(1 + max(0, retries)):
                if attempt:
                    time.sleep(0.5)
                p.outcome, p.detail = run_probe(lab.project, p.src, p.dst, p.proto, p.port,
                                                p.family, p.addr)
                if p.outcome not in ("no", "retry"):
                    break
            if p.outcome == "retry":
                p.outcome = "error"
        return p

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        return list(ex.map(one, probes))


# ------------------------------------------------------------------ report --
# The render's `reachability` (src/plan/report.rs), per source domain:
#   domains:  {<domain>: entries}   absent: nothing opens (own domain absent:
#                                   the same bridge, everything)
#   internet, gateway, host: entries
#   machines: {<machine named as `from`>: {<machine or domain>: entries}}
# entries: ["all"] or "icmp", "tcp/80", "udp/8000-8010", ...
# "What a new connection from a machine of the row may open".
REACHED = ("yes", "closed")


def load_report(path):
    """The reachability map from a JSON file: the map itself, the module's
    result (`reachability` key), or lab/report.yml's file, whose `deployed`
    and `sha256` say which deployed ruleset the report must be of."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise LabError(f"report {path}: {e}") from None
    if isinstance(data, dict) and "reachability" in data:
        check_deployed(data, path)
        data = data["reachability"]
    if not isinstance(data, dict) or not data:
        raise LabError(f"report {path}: no reachability (more domains than the render "
                       "reports on, or the router target?)")
    return data


def check_deployed(data, path):
    """The report is only worth comparing if it was rendered from the same
    inputs as the ruleset the host runs: same rendered text, same hash."""
    dest, want = data.get("deployed"), data.get("sha256")
    if not dest or not want:
        return
    try:
        with open(dest, "rb") as f:
            have = hashlib.sha256(f.read()).hexdigest()
    except FileNotFoundError:
        raise LabError(f"report {path}: no ruleset is deployed at {dest}: deploy it "
                       "first (make demo), the report is of what the render would deploy") \
            from None
    except OSError as e:
        raise LabError(f"report {path}: {dest}: {e}") from None
    if have != want:
        raise LabError(f"report {path}: rendered from other inputs than the ruleset "
                       f"deployed at {dest} (sha256 {want[:12]} != {have[:12]}): render "
                       "with the deploy's variables (FIREWALL_MODE, -e ...)")


def bridge_domain(bridge):
    return bridge[len(NET_PREFIX):] if bridge.startswith(NET_PREFIX) else bridge


def target_kind(src_domain, dst, domain_of):
    """(kind, domain) of a probe target: ("instance", its domain),
    ("internet", None), ("gateway", own domain) or ("host", the domain of
    the other bridge whose gateway address is probed)."""
    if dst == "upstream":
        return "internet", None
    if dst.startswith("gw:"):
        d = bridge_domain(dst[3:])
        return ("gateway" if d == src_domain else "host"), d
    return "instance", domain_of(dst)


def report_entries(report, src, src_domain, dst, kind, dst_domain):
    """(entries, cell) the report gives for a new connection from instance
    src (of src_domain) to dst; entries None when the report has no row
    for src_domain."""
    row = report.get(src_domain)
    if not isinstance(row, dict):
        return None, f"no row for domain {src_domain!r}"
    named = (row.get("machines") or {}).get(src) or {}
    if kind == "internet":
        return list(row.get("internet") or []), f"{src_domain}.internet"
    if kind in ("gateway", "host"):
        entries, cell = list(row.get(kind) or []), f"{src_domain}.{kind}"
        # A policy naming the machine `to: host` adds to its domain's share.
        if "host" in named:
            entries += named["host"]
            cell += f" + {src_domain}.machines.{src}.host"
        return entries, cell
    # The machine's own row first (its real address, so policies naming
    # it count), the target machine before its domain.
    for key in (dst, dst_domain):
        if key in named:
            return list(named[key]), f"{src_domain}.machines.{src}.{key}"
    domains = row.get("domains") or {}
    if dst_domain in domains:
        return list(domains[dst_domain]), f"{src_domain}.domains.{dst_domain}"
    if dst_domain == src_domain:
        # Reports without the own-domain cell (before isolate_machines):
        # the same bridge is open.
        return ["all"], f"{src_domain}.domains.{src_domain} (absent: same bridge, all)"
    return [], f"{src_domain}.domains.{dst_domain} (absent: nothing)"


def entries_open(entries, proto, port):
    """Whether report entries open proto/port (port None for icmp)."""
    for e in entries:
        if e == "all":
            return True
        if e == "icmp":
            if proto == "icmp":
                return True
            continue
        p, _, span = str(e).partition("/")
        lo, _, hi = span.partition("-")
        if p not in ("tcp", "udp") or not lo.isdigit() or not (hi or lo).isdigit():
            raise LabError(f"report entry {e!r} is not all, icmp or <tcp|udp>/<port[-port]>")
        if p == proto and port is not None and int(lo) <= port <= int(hi or lo):
            return True
    return False


def observed(p):
    """What the traffic says for the comparison: True (reached the target:
    answered or refused by it), False (dropped), None (no verdict: the
    probe failed, or someone else answered)."""
    if p.outcome in REACHED and not p.detail.startswith(WRONG):
        return True
    if p.outcome == "no":
        return False
    return None


def compare_report(report, probes, domain_of):
    """Sets each probe's report verdict; returns (disagreeing probes, probes
    that could not be compared). domain_of(instance) -> its domain."""
    disagree, uncompared = [], []
    for p in probes:
        src_domain = domain_of(p.src)
        kind, dst_domain = target_kind(src_domain, p.dst, domain_of)
        entries, p.report_cell = report_entries(report, p.src, src_domain, p.dst, kind,
                                                dst_domain)
        p.report_entries = entries
        p.report = None if entries is None else entries_open(entries, p.proto, p.port)
        seen = observed(p)
        if seen is None:
            uncompared.append(p)
        elif p.report is None or p.report != seen:
            disagree.append(p)
    return disagree, uncompared


def traffic_word(p):
    return "reached" if observed(p) else "dropped" if p.outcome == "no" else p.outcome


def describe_disagreement(p):
    said = "no row" if p.report is None else "may open" if p.report else "may not open"
    return (f"DISAGREE {p.describe()}: traffic {traffic_word(p)} ({p.outcome}: {p.detail}), "
            f"report {said} ({p.report_cell} = {json.dumps(p.report_entries)})")


def print_report_verdict(disagree, uncompared, total):
    for p in disagree:
        print(describe_disagreement(p))
    for p in uncompared:
        print(f"UNCOMPARED {p.describe()}: {p.outcome} ({p.detail})")
    agree = total - len(disagree) - len(uncompared)
    print(f"report: {agree} agree, {len(disagree)} disagree, {len(uncompared)} not compared")
    return 1 if disagree or uncompared else 0


# ------------------------------------------------------------------ matrix --
MATRIX_PROBES = [("icmp", None, 4), ("icmp", None, 6), ("tcp", 80, 4), ("tcp", 80, 6)]
# Towards the host: its dnsmasq's tcp/53 (a connect), on the source's own
# gateway and on another bridge's gateway address (the report's `host`).
HOST_PROBES = [("icmp", None, 4), ("icmp", None, 6), ("tcp", 53, 4), ("tcp", 53, 6)]
HOST_COLUMNS = ("gateway", "host")


def summarize(cell):
    """cell: {(proto, family): outcome} -> short text."""
    ok = {k for k, v in cell.items() if v == "yes"}
    if any(v == "error" for v in cell.values()):
        return "ERROR"
    if len(ok) == len(cell):
        return "yes"
    if not ok:
        return "closed" if all(v == "closed" for v in cell.values()) else "no"
    v4 = {k for k in cell if k[1] == 4}
    v6 = {k for k in cell if k[1] == 6}
    if ok == v4:
        return "v4 only"
    if ok == v6:
        return "v6 only"
    icmp = {k for k in cell if k[0] == "icmp"}
    tcp = {k for k in cell if k[0] == "tcp"}
    if ok == icmp:
        return "icmp only"
    if ok == tcp:
        return "tcp only"
    return ",".join(f"{p[0]}{p[1]}" for p in sorted(ok))


def cell_text(probes, disagree=()):
    """A matrix cell: the traffic's summary, marked `!` when one of its
    probes disagrees with the report."""
    text = summarize({(p.proto, p.family): p.outcome for p in probes})
    return text + "!" if any(p in disagree for p in probes) else text


def report_text(probes):
    """What the report's cell for these probes (same source and target)
    opens: its entries, "none" for nothing, "?" for no row."""
    entries = probes[0].report_entries
    if entries is None:
        return "?"
    return ",".join(entries) or "none"


def column_target(lab, src, column):
    """The probe target of a matrix column for one source instance."""
    if column not in HOST_COLUMNS:
        return column
    own = lab.instances[src].network
    if column == "gateway":
        return f"gw:{own}"
    others = sorted({i.network for i in lab.instances.values()
                     if i.network.startswith(NET_PREFIX) and i.network != own})
    return f"gw:{others[0]}" if others else None


def cmd_matrix(lab, args):
    names = sorted(lab.instances)
    if args.instances:
        wanted = args.instances.split(",")
        unknown = [n for n in wanted if n not in lab.instances]
        if unknown:
            raise LabError(f"unknown instances: {', '.join(unknown)}")
        names = [n for n in names if n in wanted]
    report = load_report(args.report) if args.report else None
    sources = [n for n in names if lab.instances[n].busybox and lab.instances[n].running]
    columns = [*names, "upstream", *HOST_COLUMNS]
    cells = {}
    for s in sources:
        for c in columns:
            dst = column_target(lab, s, c)
            if dst is None or dst == s:
                continue
            kinds = HOST_PROBES if c in HOST_COLUMNS else MATRIX_PROBES
            cells[(s, c)] = [Probe(s, dst, proto, port, fam) for proto, port, fam in kinds]
    probes = [p for cell in cells.values() for p in cell]
    run_probes(lab, probes, args.workers, args.retries)
    disagree, uncompared = [], []
    if report is not None:
        disagree, uncompared = compare_report(report, probes, lab.domain)

    if args.json:
        json.dump({
            "project": lab.project,
            "instances": {n: {"domain": i.domain, "network": i.network, "os": i.os,
                              "status": i.status, "ipv4": i.addrs[4], "ipv6": i.addrs[6]}
                          for n, i in lab.instances.items()},
            "upstream": {"ipv4": lab.upstream[4], "ipv6": lab.upstream[6]},
            "matrix": {s: {c: cell_text(cells[(s, c)], disagree)
                           for c in columns if (s, c) in cells}
                       for s in sources},
            "probes": [p.as_dict() for p in probes],
            "disagreements": [describe_disagreement(p) for p in disagree],
        }, sys.stdout, indent=2)
        print()
    else:
        sub = [f"({lab.domain(c)})" if c not in HOST_COLUMNS else "(own)"
               if c == "gateway" else "(other gw)" for c in columns]
        rows = [[f"{s} ({lab.domain(s)})"] +
                [cell_text(cells[(s, c)], disagree) if (s, c) in cells else "-"
                 for c in columns] for s in sources]
        print_table(columns, sub, rows)
        print("cells: icmp and tcp/80 (gateway, host: tcp/53 connect), v4+v6 "
              "('yes' = all four answered)")
        if report is not None:
            print("\nthe report (what a new connection from the row's domain may open):")
            rows = [[f"{s} ({lab.domain(s)})"] +
                    [report_text(cells[(s, c)]) if (s, c) in cells else "-"
                     for c in columns] for s in sources]
            print_table(columns, sub, rows)
            print("'!' in the traffic matrix: a probe of the cell disagrees with the report "
                  "(closed = reached)")
            print_report_verdict(disagree, uncompared, len(probes))
    errors = [p for p in probes if p.outcome == "error"]
    for p in errors:
        print(f"error: {p.describe()}: {p.detail}", file=sys.stderr)
    return 1 if errors or disagree or uncompared else 0


def print_table(head, sub, rows):
    first = max([len("from \\ to")] + [len(r[0]) for r in rows])
    widths = [max(len(head[i]), len(sub[i]), *(len(r[i + 1]) for r in rows))
              for i in range(len(head))]

    def line(left, cells):
        return (left.ljust(first) + "  " + "  ".join(
            c.ljust(w) for c, w in zip(cells, widths, strict=True))).rstrip()

    print(line("from \\ to", head))
    print(line("", sub))
    for r in rows:
        print(line(r[0], r[1:]))


def cmd_compare(args):
    """Offline: a report against the probes a `matrix --json` run saved."""
    report = load_report(args.report)
    try:
        with open(args.probes, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise LabError(f"probes {args.probes}: {e}") from None
    domains = {n: i["domain"] for n, i in (saved.get("instances") or {}).items()}
    probes = [Probe.from_dict(d) for d in saved.get("probes") or []]
    if not probes:
        raise LabError(f"probes {args.probes}: no probes (save them with matrix --json)")
    disagree, uncompared = compare_report(report, probes, lambda n: domains.get(n, "?"))
    return print_report_verdict(disagree, uncompared, len(probes))


# ------------------------------------------------------------------- check --
ALLOWED_KEYS = {"from", "to", "proto", "port", "family", "expect", "description", "name"}


def load_expectations(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as jerr:
        try:
            import yaml  # type: ignore
        except ImportError:
            raise LabError(f"{path}: not JSON ({jerr}) and PyYAML is not available") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise LabError(f"{path}: invalid YAML: {e}") from None
    if isinstance(data, dict) and "expectations" in data:
        data = data["expectations"]
    if not isinstance(data, list):
        raise LabError(f"{path}: expected a list of expectations")
    return data


def parse_expectation(i, e):
    where = f"expectation #{i + 1} {json.dumps(e, default=str)}"
    if not isinstance(e, dict):
        raise LabError(f"{where}: not a mapping")
    unknown = set(e) - ALLOWED_KEYS
    if unknown:
        raise LabError(f"{where}: unknown keys {sorted(unknown)} "
                       f"(valid: {', '.join(sorted(ALLOWED_KEYS))})")
    for k in ("from", "to", "proto", "expect"):
        if k not in e:
            raise LabError(f"{where}: missing '{k}'")
    proto = str(e["proto"]).lower()
    if proto not in ("icmp", "tcp", "udp"):
        raise LabError(f"{where}: proto must be icmp, tcp or udp")
    port = e.get("port")
    if proto == "icmp":
        if port is not None:
            raise LabError(f"{where}: icmp takes no port")
    else:
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise LabError(f"{where}: {proto} needs an integer port 1-65535")
    fam = str(e.get("family", "both")).lower()
    fams = {"4": [4], "6": [6], "both": [4, 6]}.get(fam)
    if fams is None:
        raise LabError(f"{where}: family must be 4, 6 or both")
    if not isinstance(e["expect"], bool):
        raise LabError(f"{where}: expect must be true or false")
    label = e.get("description") or e.get("name")
    return [Probe(str(e["from"]), str(e["to"]), proto, port, f, e["expect"], label)
            for f in fams]


def cmd_check(lab, args):
    raw = load_expectations(args.file)
    report = load_report(args.report) if args.report else None
    probes = []
    for i, e in enumerate(raw):
        probes.extend(parse_expectation(i, e))
    run_probes(lab, probes, args.workers, args.retries)
    passed = failed = 0
    for p in probes:
        want = "yes" if p.expect else "no"
        good = p.outcome == want and not p.detail.startswith(WRONG)
        if good:
            passed += 1
        else:
            failed += 1
        tag = "ok      " if good else "MISMATCH"
        label = f"  # {p.label}" if p.label else ""
        print(f"{tag} {p.describe()}: {p.outcome} (expected {want}; {p.detail}){label}")
    print(f"{passed} passed, {failed} failed")
    if report is not None:
        disagree, uncompared = compare_report(report, probes, lab.domain)
        if print_report_verdict(disagree, uncompared, len(probes)):
            return 1
    return 1 if failed else 0


def cmd_probe(lab, args):
    proto, _, port = args.service.partition("/")
    port = int(port) if port else None
    fams = [4] if args.v4 else [6] if args.v6 else [4, 6]
    probes = [Probe(args.src, args.dst, proto, port, f) for f in fams]
    run_probes(lab, probes, args.workers, args.retries)
    for p in probes:
        print(f"{p.describe()}: {p.outcome} ({p.detail})")
    return 0 if all(p.outcome == "yes" for p in probes) else 1


def cmd_addrs(lab, args):
    for n in sorted(lab.instances):
        i = lab.instances[n]
        print(f"{n:20} {i.domain:10} {i.status:8} v4={','.join(i.addrs[4]) or '-'} "
              f"v6={','.join(i.addrs[6]) or '-'}")
    up = lab.upstream
    print(f"{'upstream':20} {'internet':10} {'':8} v4={','.join(up[4]) or '-'} "
          f"v6={','.join(up[6]) or '-'}")
    return 0


def main(argv=None):
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # quiet `reach.py ... | head`
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.split("\n")[2:]))
    ap.add_argument("--project", default=DEFAULT_PROJECT,
                    help="Incus project of the lab instances (default %(default)s)")
    ap.add_argument("--instances-from-project", action="store_true", default=True,
                    help="take the instance list from the project (default; always on)")
    ap.add_argument("--workers", type=int, default=8, help="concurrent probes (default 8)")
    ap.add_argument("--retries", type=int, default=2,
                    help="re-run a probe that got no answer this many times (default 2)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("matrix", help="who reaches whom (icmp and tcp/80, v4 and v6)")
    m.add_argument("--json", action="store_true")
    m.add_argument("--instances", help="comma-separated subset of instances")
    m.add_argument("--report", help="the render's reachability (JSON): flag every cell "
                   "where it disagrees with the traffic")
    c = sub.add_parser("check", help="run probes from an expectations file")
    c.add_argument("file")
    c.add_argument("--report", help="also compare every probe with this reachability report")
    r = sub.add_parser("compare", help="a report against saved probes (matrix --json), no lab")
    r.add_argument("report")
    r.add_argument("probes")
    p = sub.add_parser("probe", help="one probe, e.g. probe pro-dev perso-desk tcp/80 -4")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("service", help="icmp, tcp/<port> or udp/<port>")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-4", dest="v4", action="store_true")
    g.add_argument("-6", dest="v6", action="store_true")
    sub.add_parser("addrs", help="print the resolved addresses")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "compare":
            return cmd_compare(args)
        lab = Lab(args.project)
        return {"matrix": cmd_matrix, "check": cmd_check, "probe": cmd_probe,
                "addrs": cmd_addrs}[args.cmd](lab, args)
    except LabError as e:
        print(f"reach.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
