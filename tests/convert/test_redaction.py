"""Secrets in command lines (``process.command_line``, ``process.command_args``): what is masked,
and what is not. tests/convert/test_redaction_property.py generates the forms named here."""

from __future__ import annotations

import pytest

from receiver.convert.logs import ARG_CAPTURE_BYTES, redact_command_line


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
    ("git clone https://bob:s3cret@h/r", "git clone https://REDACTED@h/r"),
    # userinfo whatever it holds: / and @ in the password, a token as the user
    ("git clone https://bob:pa/ss@h/r", "git clone https://REDACTED@h/r"),
    ("git clone https://bob:p@ss@h/r", "git clone https://REDACTED@h/r"),
    ("git clone https://ghp_tok3n@github.com/o/r", "git clone https://REDACTED@github.com/o/r"),
    ("git clone https://ghp_tok3n:x-oauth-basic@github.com/o/r", "git clone https://REDACTED@github.com/o/r"),
    ("app --db=postgresql://u:p@db:5432/x", "app --db=postgresql://REDACTED@db:5432/x"),
    # a key naming a secret anywhere in an argument
    ("mount -o user=bob,password=hunter3,uid=1 /mnt", "mount -o user=bob,password=REDACTED /mnt"),
    ("java -Dspring.datasource.password=hunter3 -jar a.jar", "java -Dspring.datasource.password=REDACTED -jar a.jar"),
    ("curl https://h/p?x=1&access_token=hunter3", "curl https://h/p?x=1&access_token=REDACTED"),
    ('curl -d {"user":"a","password":"hunter3"}', 'curl -d {"user":"a","password":REDACTED'),
    ("app --token -hunter3", "app --token REDACTED"),   # a value starting with '-' (base64url)
    ("curl --user=alice:hunter3 -ualice:hunter3 -U p:hunter3",
     "curl --user=alice:REDACTED -ualice:REDACTED -U p:REDACTED"),
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
    "npm i https://registry.npmjs.org/@scope/pkg",   # '@' in a path is no userinfo
    "curl https://host:8443/api/v1",
    "ssh git@github.com",                       # no scheme: a login, not a URL's userinfo
    "curl -H Accept:application/json",
])
def test_no_false_positives(argv: str) -> None:
    assert " ".join(redact_command_line(argv.split())) == argv


def test_headers_are_masked() -> None:
    assert redact_command_line(["curl", "-H", "Authorization: Bearer hunter3", "-H", "Cookie: sid=hunter3",
                                "-H", "X-Api-Key:hunter3", "-H", "Accept: */*"]) == \
        ["curl", "-H", "Authorization: REDACTED", "-H", "Cookie: REDACTED", "-H", "X-Api-Key:REDACTED",
         "-H", "Accept: */*"]


def _cut(arg: str) -> str:
    """What the kernel keeps of an argument (bpf/process.h ``PROC_ARG_LEN`` - 1 bytes) and
    receiver/sources/process.py decodes."""
    return arg.encode()[:ARG_CAPTURE_BYTES].decode("utf-8", "replace")


@pytest.mark.parametrize("tail,expected_tail", [
    ("https://user:password@host", "https://REDACTED"),   # cut after the ':' or in the password
    ("https://ghp_0123456789abcdef@github.com", "https://REDACTED"),   # a token as the user, cut
    ("password=hunter3hunter3", "password=REDACTED"),
])
@pytest.mark.parametrize("cut_in", range(1, 12))
def test_an_argument_cut_at_the_kernel_limit_is_masked_from_the_credential(
        tail: str, expected_tail: str, cut_in: int) -> None:
    """``--long-option=…https://user:password@host`` cut before its '@' (the issue's case), at
    every point inside the credential."""
    start = expected_tail.index("REDACTED")
    arg = "--long-option=" + "x" * (ARG_CAPTURE_BYTES - len("--long-option=") - start - cut_in) + tail
    cut = _cut(arg)
    assert cut.endswith(tail[:start + cut_in])    # the first cut_in characters of the credential
    (masked,) = redact_command_line([cut])
    assert masked == cut[:len(cut) - cut_in] + "REDACTED"
    assert masked.endswith(expected_tail[:start] + "REDACTED")


def test_a_short_argument_is_not_taken_as_cut() -> None:
    """Below the kernel's limit the '@' would have been read: host:port stays."""
    arg = "--url=https://host:8080/" + "x" * 20
    assert redact_command_line([arg]) == [arg]
    long = arg + "x" * ARG_CAPTURE_BYTES
    assert redact_command_line([long], cut_at=None) == [long]
    assert redact_command_line([long]) == ["--url=https://REDACTED"]
