"""Issue 2, CLI: help, bad flags and values (exit 2, one-line error, no traceback),
environment variables, aliases."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from harness import LocalApp, ProcessPool, request, run_cli

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["serve", "--help"],
        ["client", "--help"],
        ["server", "--help"],
        ["s", "--help"],
        ["c", "--help"],
    ],
    ids=" ".join,
)
def test_help(args: list[str]) -> None:
    p = run_cli(*args)
    assert p.returncode == 0, p.stderr
    assert "usage" in p.stdout.lower()
    assert "Traceback" not in p.stdout + p.stderr


def test_top_help_lists_subcommands() -> None:
    out = run_cli("--help").stdout
    assert "serve" in out and "client" in out


def test_serve_help_documents_env_vars() -> None:
    out = run_cli("serve", "--help").stdout
    for var in ("BACKSTREAM_ADDR", "BACKSTREAM_TIMEOUT", "BACKSTREAM_NO_CLIENT_CODE"):
        assert var in out, var


BAD = {
    "unknown-flag": ["serve", "--no-such-flag"],
    "unknown-command": ["frobnicate"],
    "bad-addr": ["serve", "-a", "nonsense"],
    "bad-port": ["serve", "-a", "127.0.0.1:99999"],
    "bad-timeout": ["serve", "-a", "127.0.0.1:0", "--timeout", "abc"],
    "negative-timeout": ["serve", "-a", "127.0.0.1:0", "--timeout", "-1"],
    "bad-code": ["serve", "-a", "127.0.0.1:0", "-c", "abc"],
    "out-of-range-code": ["serve", "-a", "127.0.0.1:0", "-c", "1000"],
    "bad-log-level": ["serve", "-a", "127.0.0.1:0", "--log-level", "loud"],
    "bad-log-format": ["serve", "-a", "127.0.0.1:0", "--log-format", "xml"],
    "client-missing-server": ["client", "-d", "http://127.0.0.1:1"],
    "client-bad-server-url": ["client", "-s", "ftp://x", "-d", "http://127.0.0.1:1"],
    "client-bad-dest": ["client", "-s", "http://127.0.0.1:1", "-d", "gopher://x:1"],
    "client-dest-bad-port": ["client", "-s", "http://127.0.0.1:1", "-d", "http://h:99999"],
    "client-bad-header": ["client", "-s", "http://127.0.0.1:1", "-d", "http://h:1", "-H", "x"],
}


@pytest.mark.parametrize("args", BAD.values(), ids=BAD.keys())
def test_bad_flags_exit_2_one_line_no_traceback(args: list[str]) -> None:
    p = run_cli(*args)
    err = p.stderr
    assert p.returncode == 2, (p.returncode, err[-500:])
    assert "Traceback" not in err + p.stdout
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "no error message"
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1, err
    assert lines[-1] == errors[0], "the error is not the last line"


def test_bad_env_value_exit_2() -> None:
    p = run_cli("serve", env={"BACKSTREAM_ADDR": "127.0.0.1:0", "BACKSTREAM_TIMEOUT": "soon"})
    assert p.returncode == 2, p.stderr[-500:]
    assert "Traceback" not in p.stderr


def test_port_in_use_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = run_cli("serve", "-a", f"127.0.0.1:{port}")
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "in use" in p.stderr.lower(), p.stderr


def test_addr_env_var(procs: ProcessPool, local_app: LocalApp) -> None:
    srv = procs.server(addr=False, env={"BACKSTREAM_ADDR": "127.0.0.1:0"})
    assert srv.port > 0
    procs.client(srv, local_app)
    assert request(srv, "GET", "/env").status == 200


def test_flag_overrides_env(procs: ProcessPool) -> None:
    srv = procs.server("-c", "597", env={"BACKSTREAM_NO_CLIENT_CODE": "598"})
    assert request(srv, "GET", "/x").status == 597


def test_short_aliases_work(procs: ProcessPool, local_app: LocalApp) -> None:
    from harness import BACKSTREAM_CMD, Proc

    srv = procs.server()
    cli = procs.add(
        Proc(
            "client-alias",
            [*BACKSTREAM_CMD, "c", "-s", srv.url, "-d", local_app.url],
        )
    )
    cli.wait_for(r"connected to server url=ws://", timeout=20)
    assert request(srv, "GET", "/alias").status == 200


def test_config_file(procs: ProcessPool, tmp_path: Path) -> None:
    conf = tmp_path / "backstream.conf"
    conf.write_text("addr = 127.0.0.1:0\ncode = 596\n")
    srv = procs.server("--config", str(conf), addr=False)
    assert request(srv, "GET", "/x").status == 596


def test_config_file_env_var(procs: ProcessPool, tmp_path: Path) -> None:
    conf = tmp_path / "backstream.conf"
    conf.write_text("addr = 127.0.0.1:0\ncode = 595\n")
    srv = procs.server(addr=False, env={"BACKSTREAM_CONFIG": str(conf)})
    assert request(srv, "GET", "/x").status == 595
