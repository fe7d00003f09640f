"""Secrets in command lines (``process.command_line``): what is masked, and what is not."""

from __future__ import annotations

import pytest

from receiver.convert.logs import redact_command_line


@pytest.mark.parametrize("argv,expected", [
    # short options followed by a secret
    ("someprog -p hunter3", "someprog -p REDACTED"),
    ("mysql -u root -phunter3 db", "mysql -u root -pREDACTED db"),
    ("mysql -u root -p hunter3", "mysql -u root -p REDACTED"),
    ("sshpass -p hunter3 ssh host", "sshpass -p REDACTED ssh host"),
    ("redis-cli -a hunter3 ping", "redis-cli -a REDACTED ping"),
    ("/usr/bin/ldapsearch -x -w hunter3 -b dc=x", "/usr/bin/ldapsearch -x -w REDACTED -b dc=x"),
    ("unzip -P hunter3 a.zip", "unzip -P REDACTED a.zip"),
    ("curl -u alice:hunter3 http://h/", "curl -u alice:REDACTED http://h/"),
    # long options, assignments, URLs (as before)
    ("app --password=hunter2 --token abc123 plain", "app --password=REDACTED --token REDACTED plain"),
    ("env API_KEY=k1 x", "env API_KEY=REDACTED x"),
    ("git clone https://bob:s3cret@h/r", "git clone https://bob:REDACTED@h/r"),
])
def test_secrets_are_masked(argv: str, expected: str) -> None:
    assert " ".join(redact_command_line(argv.split())) == expected


@pytest.mark.parametrize("argv", [
    "ssh -p 2222 host",                         # a port
    "docker run -p 8080:80 -p 127.0.0.1:9000:9000/tcp img",   # port mappings
    "ps -p 1234",                               # a pid
    "mkdir -p /var/lib/x",                      # a path
    "mkdir -p ./build",
    "patch -p1",                                # attached value for a program not known
    "gcc -pedantic -pthread x.c",
    "docker run -u 1000:1000 img",              # uid:gid
    "ls -la /tmp",
    "/bin/sh -p",                               # nothing follows
])
def test_no_false_positives(argv: str) -> None:
    assert " ".join(redact_command_line(argv.split())) == argv
