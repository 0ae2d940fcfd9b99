"""Unit tests for reach.py's pure parts: the outcome classifier, the retry
loop, the matrix cell summary and the expectation parser. No lab needed:

    python3 -m unittest discover -s lab -p 'test_*.py'

The outputs fed to classify() are what busybox (ping, wget, timeout) and
socat print on the lab instances for each case.
"""

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


if __name__ == "__main__":
    unittest.main()
