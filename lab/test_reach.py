"""Unit tests for reach.py's pure parts: the outcome classifier, the retry
loop, the matrix cell summary, the expectation parser and the comparison of
the render's reachability report with probe results. No lab needed:

    python3 -m unittest discover -s lab -p 'test_*.py'

The outputs fed to classify() are what busybox (ping, wget, timeout) and
socat print on the lab instances for each case.
"""

import contextlib
import hashlib
import io
import json
import os
import tempfile
import unittest
from unittest import mock

import reach

REFUSED_WGET = "wget: can't connect to remote host (10.251.12.10): Connection refused"
REFUSED_SOCAT = "2026/11/24 09:00:00 socat[42] E connect(5, AF=2 10.251.11.1:22, 16): " \
    "Connection refused"
NO_ROUTE_WGET = "wget: can't connect to remote host (10.251.12.10): No route to host"
UNREACH_WGET = "wget: can't connect to remote host (fd42:251:12::10): Host is unreachable"
PING_LOSS = "1 packets transmitted, 0 packets received, 100% packet loss"


def classify(proto, returncode, stdout="", stderr="", target="perso-desk"):
    return reach.classify("pro-dev", target, proto, returncode, stdout, stderr)


class ClassifyIcmp(unittest.TestCase):
    def test_reply_is_yes(self):
        self.assertEqual(classify("icmp", 0, "1 packets transmitted, 1 packets received"),
                         ("yes", "reply"))

    def test_loss_is_no(self):
        self.assertEqual(classify("icmp", 1, PING_LOSS), ("no", "no reply"))

    def test_unreachable_is_no(self):
        self.assertEqual(classify("icmp", 1, "", "ping: sendto: Network unreachable")[0], "no")


class ClassifyTcp(unittest.TestCase):
    def test_answer_from_the_target_is_yes(self):
        self.assertEqual(classify("tcp", 0, "perso-desk\n"), ("yes", "answered by perso-desk"))

    def test_answer_from_someone_else_is_flagged(self):
        # A NAT or a stray responder answering for the target: still "yes"
        # (the path is open) but `check` must count it as a mismatch.
        outcome, detail = classify("tcp", 0, "pro-web\n")
        self.assertEqual(outcome, "yes")
        self.assertTrue(detail.startswith(reach.WRONG), detail)

    def test_empty_answer_with_exit_0_is_inconclusive(self):
        self.assertEqual(classify("tcp", 0, "  \n")[0], "retry")

    def test_refused_is_closed(self):
        self.assertEqual(classify("tcp", 1, "", REFUSED_WGET)[0], "closed")

    def test_busybox_timeout_is_no(self):
        # busybox timeout kills wget with SIGTERM: 143, nothing printed.
        self.assertEqual(classify("tcp", 143), ("no", "timeout"))
        self.assertEqual(classify("tcp", 124), ("no", "timeout"))
        self.assertEqual(classify("tcp", 1, "", "wget: download timed out"), ("no", "timeout"))

    def test_unreachable_is_no(self):
        self.assertEqual(classify("tcp", 1, "", NO_ROUTE_WGET), ("no", "unreachable"))
        self.assertEqual(classify("tcp", 1, "", UNREACH_WGET), ("no", "unreachable"))

    def test_other_failure_is_no_with_last_stderr_line(self):
        outcome, detail = classify("tcp", 1, "", "first\nwget: bad address 'x'")
        self.assertEqual((outcome, detail), ("no", "wget: bad address 'x'"))
        self.assertEqual(classify("tcp", 1), ("no", "exit 1"))

    def test_gateway_connect(self):
        self.assertEqual(classify("tcp", 0, target="gw:lab-net-pro"), ("yes", "connected"))
        self.assertEqual(classify("tcp", 1, "", REFUSED_SOCAT, target="gw:lab-net-pro")[0],
                         "closed")
        self.assertEqual(classify("tcp", 143, target="gw:lab-net-pro")[0], "no")

    def test_gateway_output_is_not_a_hostname(self):
        # Towards gw: the exit code decides, not what was printed.
        self.assertEqual(classify("tcp", 1, "junk", target="gw:lab-net-pro")[0], "no")


class ClassifyUdp(unittest.TestCase):
    def test_echo_is_yes(self):
        self.assertEqual(classify("udp", 0, reach.UDP_TOKEN + "\n"), ("yes", "echo"))

    def test_no_echo_is_no(self):
        self.assertEqual(classify("udp", 0, ""), ("no", "no echo"))
        self.assertEqual(classify("udp", 143), ("no", "no echo"))

    def test_port_unreachable_is_closed(self):
        err = "socat[7] E read(5, 0x5616, 8192): Connection refused"
        self.assertEqual(classify("udp", 1, "", err)[0], "closed")


class ClassifyErrors(unittest.TestCase):
    def test_missing_tool_is_an_error_not_a_no(self):
        for rc, err in ((127, "sh: socat: not found"), (126, "permission denied"),
                        (1, "busybox: can't execute 'socat': No such file or directory")):
            with self.subTest(rc=rc):
                self.assertEqual(classify("udp", rc, "", err)[0], "error")


class FakeLab:
    project = "anklume-lab"

    def __init__(self):
        inst = reach.Instance({"name": "pro-dev", "status": "Running"})
        self.instances = {"pro-dev": inst}

    def addresses(self, target, family):
        return {4: ["10.251.12.10"], 6: []}[family]


class RetryLoop(unittest.TestCase):
    def run_one(self, outcomes, retries=2, family=4):
        p = reach.Probe("pro-dev", "perso-desk", "tcp", 80, family)
        with mock.patch.object(reach, "run_probe", side_effect=outcomes) as rp, \
                mock.patch.object(reach.time, "sleep"):
            reach.run_probes(FakeLab(), [p], workers=1, retries=retries)
        return p, rp.call_count

    def test_no_is_retried_then_kept(self):
        p, calls = self.run_one([("no", "timeout")] * 3)
        self.assertEqual((p.outcome, calls), ("no", 3))

    def test_no_then_yes(self):
        p, calls = self.run_one([("no", "timeout"), ("yes", "answered by perso-desk")])
        self.assertEqual((p.outcome, calls), ("yes", 2))

    def test_closed_and_yes_are_final(self):
        for first in (("closed", "refused"), ("yes", "answered")):
            with self.subTest(first=first):
                p, calls = self.run_one([first])
                self.assertEqual((p.outcome, calls), (first[0], 1))

    def test_inconclusive_every_time_is_an_error(self):
        p, calls = self.run_one([("retry", "empty answer with exit 0")] * 3)
        self.assertEqual((p.outcome, calls), ("error", 3))

    def test_no_address_in_family_is_an_error(self):
        p, calls = self.run_one([], family=6)
        self.assertEqual((p.outcome, calls), ("error", 0))
        self.assertIn("no IPv6 address", p.detail)


class Summary(unittest.TestCase):
    ALL = (("icmp", 4), ("icmp", 6), ("tcp", 4), ("tcp", 6))

    def cell(self, yes, other="no"):
        return {k: ("yes" if k in yes else other) for k in self.ALL}

    def test_cells(self):
        self.assertEqual(reach.summarize(self.cell(self.ALL)), "yes")
        self.assertEqual(reach.summarize(self.cell([])), "no")
        self.assertEqual(reach.summarize(self.cell([], "closed")), "closed")
        self.assertEqual(reach.summarize(self.cell([("icmp", 4), ("tcp", 4)])), "v4 only")
        self.assertEqual(reach.summarize(self.cell([("icmp", 4), ("icmp", 6)])), "icmp only")
        cell = self.cell(self.ALL)
        cell[("tcp", 6)] = "error"
        self.assertEqual(reach.summarize(cell), "ERROR")


class Expectations(unittest.TestCase):
    def test_both_families_by_default(self):
        probes = reach.parse_expectation(0, {"from": "pro-dev", "to": "perso-desk",
                                             "proto": "tcp", "port": 80, "expect": False})
        self.assertEqual([p.family for p in probes], [4, 6])

    def test_bad_entries_name_the_problem(self):
        base = {"from": "a", "to": "b", "proto": "tcp", "port": 80, "expect": True}
        for change, msg in (({"port": 0}, "port 1-65535"), ({"port": True}, "port 1-65535"),
                            ({"proto": "sctp"}, "proto must be"),
                            ({"expect": "yes"}, "expect must be"),
                            ({"family": "5"}, "family must be"), ({"colour": 1}, "unknown keys")):
            with self.subTest(change=change), self.assertRaisesRegex(reach.LabError, msg):
                reach.parse_expectation(2, {**base, **change})


# A report in the render's shape (src/plan/report.rs), made up: pro opens
# tcp/8080 and 9000-9010 to perso, pro-dev (named as `from` by a policy)
# also reaches perso-desk on tcp/22 and anklume on tcp/80; perso has no
# internet; anklume's own bridge is isolated (isolate_machines) with one
# policy port; pro's own-domain cell is absent (a report from before
# isolate_machines).
REPORT = {
    "anklume": {"domains": {"pro": ["all"], "perso": ["all"], "anklume": ["tcp/9000"]},
                "internet": ["all"], "gateway": ["icmp", "tcp/53", "udp/53"], "host": [],
                "inbound": {}},
    "pro": {"domains": {"perso": ["tcp/8080", "tcp/9000-9010"]},
            "internet": ["tcp/80"], "gateway": ["icmp", "tcp/53", "udp/53"], "host": [],
            "inbound": {"198.51.100.2/32": ["tcp/8080"]},
            "machines": {"pro-dev": {"perso-desk": ["tcp/22", "tcp/8080", "tcp/9000-9010"],
                                     "anklume": ["tcp/80"]}}},
    "perso": {"domains": {}, "internet": [], "gateway": ["icmp", "tcp/53", "udp/53"],
              "host": ["tcp/2223"], "inbound": {}},
}
DOMAINS = {"anklume-probe": "anklume", "anklume-instance": "anklume", "pro-dev": "pro",
           "pro-web": "pro", "perso-desk": "perso", "late-a": "late"}


def probe(src, dst, service, outcome, family=4, detail=""):
    proto, _, port = service.partition("/")
    p = reach.Probe(src, dst, proto, int(port) if port else None, family)
    p.outcome, p.detail = outcome, detail or outcome
    return p


def compare(probes, report=REPORT):
    return reach.compare_report(report, probes, lambda n: DOMAINS.get(n, "?"))


class ReportEntries(unittest.TestCase):
    def test_entries_open(self):
        cases = [(["all"], "tcp", 1, True), (["all"], "icmp", None, True),
                 (["icmp"], "icmp", None, True), (["icmp"], "tcp", 80, False),
                 (["tcp/80"], "tcp", 80, True), (["tcp/80"], "tcp", 81, False),
                 (["tcp/80"], "udp", 80, False), (["tcp/80"], "icmp", None, False),
                 (["tcp/8000-8010"], "tcp", 8000, True), (["tcp/8000-8010"], "tcp", 8010, True),
                 (["tcp/8000-8010"], "tcp", 8011, False), (["tcp/8000-8010"], "tcp", 7999, False),
                 ([], "icmp", None, False), (["icmp", "udp/53"], "udp", 53, True)]
        for entries, proto, port, want in cases:
            with self.subTest(entries=entries, proto=proto, port=port):
                self.assertIs(reach.entries_open(entries, proto, port), want)

    def test_a_malformed_entry_is_an_error_not_a_no(self):
        for bad in ("sctp/80", "tcp/", "tcp/http", "icmp/echo-request"):
            with self.subTest(bad=bad), self.assertRaisesRegex(reach.LabError, "is not all"):
                reach.entries_open([bad], "tcp", 80)

    def cell(self, src, dst):
        kind, dom = reach.target_kind(DOMAINS[src], dst, DOMAINS.get)
        return reach.report_entries(REPORT, src, DOMAINS[src], dst, kind, dom)

    def test_which_cell_a_probe_reads(self):
        cases = [
            # A machine no policy names: its domain's cells.
            ("pro-web", "perso-desk", ["tcp/8080", "tcp/9000-9010"], "pro.domains.perso"),
            ("pro-web", "anklume-probe", [], "pro.domains.anklume (absent: nothing)"),
            # A named machine: the target machine's key before its domain's.
            ("pro-dev", "perso-desk", ["tcp/22", "tcp/8080", "tcp/9000-9010"],
             "pro.machines.pro-dev.perso-desk"),
            ("pro-dev", "anklume-probe", ["tcp/80"], "pro.machines.pro-dev.anklume"),
            # ... and its domain's cell for a target its row does not name.
            ("pro-dev", "upstream", ["tcp/80"], "pro.internet"),
            # The own domain: its cell when present (isolate_machines), else all.
            ("anklume-probe", "anklume-instance", ["tcp/9000"], "anklume.domains.anklume"),
            ("pro-dev", "pro-web", ["all"], "pro.domains.pro (absent: same bridge, all)"),
            # Gateways: the own bridge's is `gateway`, another's is `host`.
            ("perso-desk", "gw:lab-net-perso", ["icmp", "tcp/53", "udp/53"], "perso.gateway"),
            ("perso-desk", "gw:lab-net-pro", ["tcp/2223"], "perso.host"),
            ("perso-desk", "upstream", [], "perso.internet"),
        ]
        for src, dst, entries, cell in cases:
            with self.subTest(src=src, dst=dst):
                self.assertEqual(self.cell(src, dst), (entries, cell))

    def test_a_domain_without_a_row(self):
        kind, dom = reach.target_kind("late", "pro-dev", DOMAINS.get)
        self.assertEqual(reach.report_entries(REPORT, "late-a", "late", "pro-dev", kind, dom),
                         (None, "no row for domain 'late'"))


class CompareReport(unittest.TestCase):
    def test_agreement(self):
        probes = [probe("pro-web", "perso-desk", "tcp/8080", "yes"),
                  probe("pro-web", "perso-desk", "tcp/80", "no", family=6),
                  probe("pro-web", "perso-desk", "icmp", "no"),
                  probe("pro-dev", "perso-desk", "tcp/22", "closed"),
                  probe("pro-dev", "upstream", "tcp/80", "yes"),
                  probe("pro-dev", "upstream", "udp/5353", "no"),
                  probe("perso-desk", "gw:lab-net-perso", "tcp/53", "yes"),
                  probe("perso-desk", "gw:lab-net-pro", "tcp/53", "no"),
                  probe("pro-dev", "pro-web", "icmp", "yes")]
        self.assertEqual(compare(probes), ([], []))
        self.assertEqual([p.report for p in probes],
                         [True, False, False, True, True, False, True, False, True])

    def test_every_disagreement_is_flagged_both_ways(self):
        leak = probe("perso-desk", "upstream", "tcp/80", "yes")  # report: no internet
        lost = probe("pro-web", "perso-desk", "tcp/9005", "no", family=6)  # report: opens
        same = probe("anklume-probe", "anklume-instance", "tcp/80", "yes")  # isolated bridge
        fine = probe("pro-web", "perso-desk", "tcp/9005", "yes")
        disagree, uncompared = compare([leak, lost, fine, same])
        self.assertEqual((disagree, uncompared), ([leak, lost, same], []))
        text = reach.describe_disagreement(leak)
        self.assertIn("traffic reached", text)
        self.assertIn('report may not open (perso.internet = [])', text)
        self.assertIn("report may open", reach.describe_disagreement(lost))

    def test_closed_counts_as_reached(self):
        # The target refused it itself: the firewall let it through.
        refused = probe("perso-desk", "upstream", "tcp/81", "closed")
        self.assertEqual(compare([refused])[0], [refused])
        refused = probe("pro-dev", "perso-desk", "tcp/22", "closed")
        self.assertEqual(compare([refused]), ([], []))

    def test_failed_probes_and_wrong_responders_are_not_compared(self):
        err = probe("pro-web", "perso-desk", "tcp/8080", "error")
        wrong = probe("pro-web", "perso-desk", "tcp/8080", "yes",
                      detail=f"{reach.WRONG} 'pro-web', not 'perso-desk'")
        self.assertEqual(compare([err, wrong]), ([], [err, wrong]))

    def test_a_source_domain_missing_from_the_report_disagrees(self):
        p = probe("late-a", "pro-dev", "tcp/80", "no")
        self.assertEqual(compare([p]), ([p], []))

    def test_the_matrix_cell_is_marked(self):
        cell = [probe("perso-desk", "upstream", "icmp", "no", 4),
                probe("perso-desk", "upstream", "icmp", "no", 6),
                probe("perso-desk", "upstream", "tcp/80", "no", 4),
                probe("perso-desk", "upstream", "tcp/80", "yes", 6)]
        disagree, _ = compare(cell)
        self.assertEqual(disagree, [cell[3]])
        self.assertEqual(reach.cell_text(cell, disagree), "tcp6!")
        self.assertEqual(reach.cell_text(cell[:3], disagree), "no")
        self.assertEqual(reach.report_text(cell), "none")
        with contextlib.redirect_stdout(io.StringIO()) as out:
            self.assertEqual(reach.print_report_verdict(disagree, [], 4), 1)
            self.assertEqual(reach.print_report_verdict([], [], 4), 0)
        self.assertIn("report: 3 agree, 1 disagree, 0 not compared", out.getvalue())


class ReportFiles(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.addCleanup(self.dir.cleanup)

    def write(self, name, data):
        path = os.path.join(self.dir.name, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(data if isinstance(data, str) else json.dumps(data))
        return path

    def test_the_report_must_be_of_the_deployed_ruleset(self):
        deployed = self.write("deployed.nft", "table inet anklume_lab {}\n")
        sha = hashlib.sha256(b"table inet anklume_lab {}\n").hexdigest()
        ok = self.write("ok.json", {"reachability": REPORT, "sha256": sha, "deployed": deployed})
        self.assertEqual(reach.load_report(ok), REPORT)
        other = self.write("other.json", {"reachability": REPORT, "sha256": "0" * 64,
                                          "deployed": deployed})
        with self.assertRaisesRegex(reach.LabError, "other inputs than the ruleset"):
            reach.load_report(other)
        gone = self.write("gone.json", {"reachability": REPORT, "sha256": sha,
                                        "deployed": deployed + ".absent"})
        with self.assertRaisesRegex(reach.LabError, "no ruleset is deployed"):
            reach.load_report(gone)

    def test_a_bare_map_or_a_module_result(self):
        self.assertEqual(reach.load_report(self.write("m.json", REPORT)), REPORT)
        self.assertEqual(reach.load_report(self.write("r.json", {"reachability": REPORT})),
                         REPORT)
        with self.assertRaisesRegex(reach.LabError, "no reachability"):
            reach.load_report(self.write("n.json", {"reachability": None}))

    def test_compare_saved_probes(self):
        saved = {"instances": {n: {"domain": d} for n, d in DOMAINS.items()},
                 "probes": [probe("pro-dev", "upstream", "tcp/80", "yes").as_dict(),
                            probe("perso-desk", "upstream", "icmp", "no").as_dict()]}
        probes = self.write("probes.json", saved)
        good = self.write("good.json", REPORT)
        tampered = self.write("bad.json", {**REPORT, "perso": {**REPORT["perso"],
                                                               "internet": ["all"]}})
        for report, rc, line in ((good, 0, "report: 2 agree, 0 disagree"),
                                 (tampered, 1, "DISAGREE perso-desk -> upstream icmp v4")):
            out = io.StringIO()
            with self.subTest(report=report), contextlib.redirect_stdout(out):
                self.assertEqual(reach.main(["compare", report, probes]), rc)
            self.assertIn(line, out.getvalue())


class MatrixColumns(unittest.TestCase):
    def test_gateway_and_host_targets(self):
        lab = mock.Mock()
        lab.instances = {n: reach.Instance({"name": n, "expanded_devices": {
            "eth0": {"network": f"lab-net-{d}"}}}) for n, d in DOMAINS.items()}
        self.assertEqual(reach.column_target(lab, "pro-dev", "gateway"), "gw:lab-net-pro")
        self.assertEqual(reach.column_target(lab, "pro-dev", "host"), "gw:lab-net-anklume")
        self.assertEqual(reach.column_target(lab, "anklume-probe", "host"), "gw:lab-net-late")
        self.assertEqual(reach.column_target(lab, "pro-dev", "upstream"), "upstream")


if __name__ == "__main__":
    unittest.main()
