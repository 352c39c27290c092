#!/usr/bin/env python3
"""scripts/lib/supervise.py, the Python side of process supervision: ports, waiting, Daemon.
Run by tests/suites/15-supervision.sh: python3 tests/lib/test_supervise.py"""

import os
import socket
import subprocess
import sys
import tempfile
import time
import unittest

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts", "lib"))
import supervise  # noqa: E402

SCRIPT = supervise.__file__


class Ports(unittest.TestCase):
    def test_free_port_is_free_and_a_listener_makes_it_busy(self):
        port = supervise.free_port()
        self.assertFalse(supervise.port_in_use(port))
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
            s.listen()
            self.assertTrue(supervise.port_in_use(port))
            out = subprocess.run([sys.executable, SCRIPT, "busy-ports", str(port), str(supervise.free_port())],
                                 capture_output=True, text=True, check=True).stdout.split()
            self.assertEqual(out, [str(port)])
            self.assertEqual(subprocess.run([sys.executable, SCRIPT, "port-in-use", str(port)]).returncode, 0)
        self.assertEqual(subprocess.run([sys.executable, SCRIPT, "port-in-use", str(port)]).returncode, 1)


class Waiting(unittest.TestCase):
    def test_returns_the_first_true_result(self):
        calls = []

        def ready():
            calls.append(1)
            if len(calls) < 3:
                raise OSError("not yet")
            return "ready"
        self.assertEqual(supervise.wait_for("it", ready, 5, interval=0.01), "ready")

    def test_times_out_naming_what_the_last_error_and_the_log(self):
        with tempfile.NamedTemporaryFile("w", suffix=".log", delete=False) as log:
            log.write("the daemon's last words\n")

        def never():
            raise OSError("connection refused")
        with self.assertRaises(SystemExit) as e:
            supervise.wait_for("the daemon", never, 0.3, log=log.name, interval=0.05)
        os.unlink(log.name)
        message = str(e.exception.code)
        self.assertTrue(message.startswith("FAIL timed out after 0.3s waiting for the daemon"), message)
        self.assertIn("connection refused", message)
        self.assertIn("the daemon's last words", message)


class Daemons(unittest.TestCase):
    def test_stopped_by_sigterm_when_the_block_ends(self):
        with tempfile.TemporaryDirectory() as work:
            with supervise.Daemon(["sleep", "30"], os.path.join(work, "log")) as d:
                d.check_alive("sleep")
            self.assertIsNotNone(d.proc.poll())

    def test_killed_when_it_ignores_sigterm(self):
        with tempfile.TemporaryDirectory() as work:
            started = time.monotonic()
            with supervise.Daemon(["sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"],
                                  os.path.join(work, "log"), stop_timeout=0.5) as d:
                time.sleep(0.3)
            self.assertIsNotNone(d.proc.poll())
            self.assertLess(time.monotonic() - started, 10)

    def test_check_alive_fails_with_the_log_when_the_process_ended(self):
        with tempfile.TemporaryDirectory() as work:
            with supervise.Daemon(["sh", "-c", "echo bad flag; exit 2"], os.path.join(work, "log")) as d:
                d.proc.wait()
                with self.assertRaises(SystemExit) as e:
                    d.check_alive("the tool")
            self.assertIn("FAIL the tool exited", str(e.exception.code))
            self.assertIn("bad flag", str(e.exception.code))


if __name__ == "__main__":
    unittest.main(verbosity=2)
