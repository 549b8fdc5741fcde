"""``dicom-node console``: the web console alone, against the node's database and storage root (``serve`` runs it
itself while ``console.enabled``), and ``dicom-node console hash-password``, which makes the value of
``console.admin_password_hash``.

Exit status: 0 stopped by SIGINT/SIGTERM, or the hash printed; 1 the port cannot be bound; 2 the configuration
does not allow the console (bound beyond loopback without an admin password hash), or no usable password given.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import signal
import sys
import threading
from typing import Any

from ai.safe_text import exception_summary

from .runtime import Runtime

LOG = logging.getLogger("dicom_node")
COMMANDS = ("console",)
EXIT_PORT = 1
EXIT_CONFIG = 2


def add_commands(subparsers: Any, common: argparse.ArgumentParser) -> None:
    console = subparsers.add_parser("console", parents=[common],
                                    help="run the web console alone (serve runs it too while console.enabled)",
                                    description="Without a subcommand: serve the console on console.bind_address:"
                                                "console.port until SIGINT/SIGTERM.")
    sub = console.add_subparsers(dest="console_command")
    sub.add_parser("hash-password", help="print the hash of a new admin password for console.admin_password_hash",
                   description="Reads the password from standard input when it is not a terminal (first line), "
                               "else asks twice.")


def run_early(args: argparse.Namespace) -> int | None:
    """What needs no configuration nor database: ``console hash-password``; None for everything else."""
    if args.command != "console" or getattr(args, "console_command", None) != "hash-password":
        return None
    from .console.passwords import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("new admin password: ")
        if password != getpass.getpass("again: "):
            print("dicom-node: the two passwords differ; nothing printed", file=sys.stderr)
            return EXIT_CONFIG
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 8:
        print("dicom-node: the password must have at least 8 characters", file=sys.stderr)
        return EXIT_CONFIG
    print(hash_password(password))
    print("put it in config.toml: [console] admin_password_hash = \"<the line above>\"", file=sys.stderr)
    return 0


def run(rt: Runtime, args: argparse.Namespace) -> int:
    early = run_early(args)
    if early is not None:
        return early
    from .console.app import ConsoleConfigError
    from .console.context import ConsoleContext
    from .console.server import ConsoleServer

    server = ConsoleServer(ConsoleContext(rt.config, rt.engine, rt.archive, in_serve=False,
                                          config_path=rt.config_path, overrides=rt.overrides))
    try:
        server.start()
    except ConsoleConfigError as exc:
        print(f"dicom-node: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        LOG.error("cannot serve the console on %s:%d: %s", rt.config.console.bind_address, rt.config.console.port,
                  exception_summary(exc, message=exc.strerror or None))
        return EXIT_PORT
    stop = threading.Event()

    def _request_stop(signum: int, _frame: object) -> None:
        LOG.info("%s received: stopping the console", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGINT, _request_stop)
    while not stop.wait(1.0) and server.running:
        pass
    server.stop()
    return 0


def status_lines(rt: Runtime) -> list[str]:
    from .console.server import console_url

    console = rt.config.console
    if not console.enabled:
        return [f"{'console':<13}: disabled (console.enabled = false)"]
    login = "loopback: no login" if console.is_local else "admin login"
    return [f"{'console':<13}: {console_url(console.bind_address, console.port)} ({login})"]
