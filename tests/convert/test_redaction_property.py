"""No secret, in any form the redaction rules name, reaches ``process.command_line`` or
``process.command_args`` (receiver/convert/logs.py, ``redact_command_line``).

Hypothesis builds command lines around a secret, in every form the rules name (``--password=s``,
``--token s``, ``user=u,password=s``, ``?token=s``, ``Authorization: s``, JSON, URL userinfo with
anything in the password, a token as a URL's user, ``-u user:s``, ``-p s``, ``mysql -ps``,
``redis-cli -a s``, ...), pads single arguments so the kernel's cut at ``ARG_CAPTURE_BYTES`` falls
anywhere (in the secret, before an ``@`` that is then lost), keeps the kernel's first
``PROC_MAX_ARGS`` arguments and a random ``max_args``, and converts the record as the agent does.

The property is non-interference: the same command line with the secret's twin (every letter,
digit and non-ASCII character replaced by another of the same kind and UTF-8 length, punctuation
kept: the same structure, the same cut) must give exactly the same exported attributes. A rule
that lets any character of a secret through makes the two differ.
"""

from __future__ import annotations

import os
import string
from collections.abc import Callable

from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st

from receiver.convert.logs import _SECRET_SHORT, ARG_CAPTURE_BYTES, process_event, process_event_to_log
from receiver.model import EbpfEventType
from receiver.records import ProcessRecord
from receiver.sources.process import PROC_MAX_ARGS

from ..harness import examples

_SWAP = {"é": "ß", "ß": "é", "€": "→", "→": "€", "😀": "🔑", "🔑": "😀"}   # same UTF-8 length
_PUNCT = "/@:!#$%^&*()+=,.;?[]{}~_-'\"\\|<> "


def twin(s: str) -> str:
    """``s`` with every letter, digit and non-ASCII character changed, its structure kept."""
    out = []
    for c in s:
        if c in string.ascii_lowercase:
            out.append(chr((ord(c) - 97 + 13) % 26 + 97))
        elif c in string.ascii_uppercase:
            out.append(chr((ord(c) - 65 + 13) % 26 + 65))
        elif c in string.digits:
            out.append(str((int(c) + 5) % 10))
        else:
            out.append(_SWAP.get(c, c))
    return "".join(out)


def _visible(s: str) -> bool:
    return any(c.isalnum() or c in _SWAP for c in s)


_ANY = string.ascii_letters + string.digits + _PUNCT + "".join(_SWAP)
# Characters that end or split a credential in some rule ('@', '/', ':', separators) come often.
secrets = st.lists(st.one_of(st.sampled_from(_ANY), st.sampled_from("/@:=&?#, ")), min_size=1,
                   max_size=40).map("".join).filter(_visible)
# A token as a URL's user: no ':', '/' or '@' (RFC 3986 userinfo; they would be %-encoded).
tokens = st.text(string.ascii_letters + string.digits + "-._~!$&'()*+,;=%", min_size=1, max_size=40).filter(_visible)
# The generic ``-p VALUE``: masked unless VALUE looks like a port, path or option (documented).
p_values = st.tuples(st.sampled_from(string.ascii_letters),
                     st.text(_ANY.replace("/", ""), max_size=30)).map("".join)

_benign_chars = string.ascii_lowercase + string.digits
words = st.text(_benign_chars, min_size=1, max_size=10)
benign_args = st.lists(st.one_of(words, st.sampled_from(["-p", "-u", "-v", "-a", "-w", "-P", "--", "-o", "x.yaml",
                                                         "/etc/x", "8080:80", "--user", "-U"])), max_size=4)
KEYS = ["password", "passwd", "pass", "secret", "token", "api-key", "api_key", "apikey", "auth",
        "credential", "private-key", "private_key", "session", "cookie", "client-secret", "access_token"]
key_variants = st.builds(lambda k, form, app: form.format(k=k, K=k.upper().replace("-", "_"), app=app),
                         st.sampled_from(KEYS),
                         st.sampled_from(["--{k}", "--db-{k}", "-{k}", "{K}", "-D{app}.{k}", "{k}",
                                          "--{app}-{k}", "{app}_{K}"]), words)
HEADERS = ["Authorization", "Proxy-Authorization", "X-Api-Key", "X-Auth-Token", "Cookie", "authorization"]
schemes = st.sampled_from(["https", "http", "git+ssh", "postgresql", "redis", "mongodb+srv", "amqp", "ftp"])
hosts = st.builds(lambda h, port: h + (f":{port}" if port else ""), words, st.integers(0, 65535))
paths = st.sampled_from(["", "/", "/r.git", "/db?sslmode=require", "/@scope/pkg", "/a@b"])

# A form: (program or None, arguments before, the argument that holds the secret, whether that
# argument may start with other text: a pad that the kernel's cut then moves the secret across).
Form = tuple[str | None, list[str], str, bool]
# A user that starts with a letter: ``-u 1000:1000`` is taken as uid:gid and stays (documented).
users = st.one_of(st.builds(str.__add__, st.sampled_from(string.ascii_letters), st.text(_benign_chars, max_size=9)),
                  st.integers(60, 140).map(lambda n: "u" * n))   # long: the kernel cuts in user:pass


def forms(s: str, token: str, p: str) -> st.SearchStrategy[Form]:
    return st.one_of(
        st.builds(lambda k, sep: (None, [], f"{k}{sep}{s}", True), key_variants, st.sampled_from(["=", ":", ": "])),
        st.builds(lambda k: (None, [k], s, True), st.sampled_from(["--password", "--token", "--db-password",
                                                                   "--api-key", "--client-secret", "-password"])),
        st.builds(lambda w, k: (None, ["-o"], f"user={w},{k}={s}", True), words, st.sampled_from(KEYS)),
        st.builds(lambda h, w, k: (None, [], f"https://{h}/p?{w}=1&{k}={s}", True), hosts, words,
                  st.sampled_from(KEYS)),
        st.builds(lambda hd: (None, ["-H"], f"{hd}: {s}", True), st.sampled_from(HEADERS)),
        st.builds(lambda w, k: (None, ["-d"], f'{{"user":"{w}","{k}":"{s}"}}', True), words, st.sampled_from(KEYS)),
        st.builds(lambda sc, u, h, pa: (None, [], f"{sc}://{u}:{s}@{h}{pa}", True), schemes, words, hosts, paths),
        st.builds(lambda sc, h, pa: (None, [], f"{sc}://{token}@{h}{pa}", True), schemes, hosts, paths),
        st.builds(lambda sc, w, h, pa: (None, [], f"{sc}://{token}:{w}@{h}{pa}", True), schemes, words, hosts, paths),
        st.builds(lambda opt, u: (None, [opt], f"{u}:{s}", False),
                  st.sampled_from(["-u", "--user", "-U", "--proxy-user"]), users),
        st.builds(lambda opt, u: (None, [], f"{opt}{u}:{s}", False),
                  st.sampled_from(["-u", "--user=", "--proxy-user="]), users),
        st.just((None, ["-p"], p, False)),
        st.builds(lambda prog, attached: (prog, [], f"-{_SECRET_SHORT[prog]}{s}", False) if attached
                  else (prog, [f"-{_SECRET_SHORT[prog]}"], s, True),
                  st.sampled_from(sorted(_SECRET_SHORT)), st.booleans()),
    )


programs = st.sampled_from(["/usr/bin/app", "curl", "git", "java", "mount", "/bin/sh", "redis-cli", "ssh",
                            "docker", "mysql"])
# What may come before the secret in the same argument: nothing, or a long option cut by the
# kernel somewhere in what follows.
pads = st.one_of(st.just(""), st.builds(lambda w, n, sep: f"--{w}=" + "x" * n + sep, words,
                                        st.integers(0, ARG_CAPTURE_BYTES + 10),
                                        st.sampled_from(["", ",", " ", "=", ";", "&"])))


def kernel_capture(argv: list[str]) -> tuple[list[str], bool]:
    """What bpf/process.bpf.c keeps and receiver/sources/process.py decodes: the first
    ``PROC_MAX_ARGS`` arguments, each cut to ``ARG_CAPTURE_BYTES`` bytes."""
    kept = [a.encode()[:ARG_CAPTURE_BYTES].decode("utf-8", "replace") for a in argv[:PROC_MAX_ARGS]]
    return kept, len(argv) > PROC_MAX_ARGS


def exported(argv: list[str], max_args: int) -> tuple[str, list[str], bytes]:
    kept, truncated = kernel_capture(argv)
    rec = ProcessRecord(EbpfEventType.PROCESS_EXEC, 4242, 4242, 1, "app", executable_path="/usr/bin/app",
                        argv=kept, argv_truncated=truncated)
    event = process_event(rec, "redacted", max_args)
    a = event.attributes
    return (a["process.command_line"], a["process.command_args"],
            process_event_to_log(event).SerializeToString(deterministic=True))


@st.composite
def command_lines(draw: st.DrawFn) -> tuple[Callable[[str, str, str], list[str]], str, str, str]:
    """A command line as a function of (secret, token, -p value), and those three."""
    s, token, p = draw(secrets), draw(tokens), draw(p_values)
    prog = draw(programs)
    before, after, extra = draw(benign_args), draw(benign_args), draw(st.lists(words, max_size=14))
    # The form's shape (its words, keys, hosts) is drawn once, the secret put in by name: the
    # twin gets exactly the same command line around it.
    fprog, fargs, last, paddable = draw(forms("\0S", "\0T", "\0P"))
    pad = draw(pads) if paddable else ""

    def build(s_: str, t_: str, p_: str) -> list[str]:
        def fill(x: str) -> str:
            return x.replace("\0S", s_).replace("\0T", t_).replace("\0P", p_)
        return [fprog or prog, *before, *[fill(a) for a in fargs], pad + fill(last), *after, *extra]

    return build, s, token, p


@settings(max_examples=int(os.environ.get("REDACTION_EXAMPLES", examples(400))), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(command_lines(), st.integers(1, PROC_MAX_ARGS))
@example((lambda s, t, p: ["git", "clone", f"https://bob:{s}@h/r"], "pa/ss", "t", "p"), 20)
@example((lambda s, t, p: ["git", "clone", f"https://bob:{s}@h/r"], "p@ss", "t", "p"), 20)
@example((lambda s, t, p: ["app", "--long-option=" + "x" * 86 + f"https://user:{s}@host"], "password", "t", "p"), 20)
def test_no_secret_reaches_the_exported_command_line(case: tuple, max_args: int) -> None:
    build, s, token, p = case
    note(f"argv: {build(s, token, p)!r}")
    line, args, record = exported(build(s, token, p), max_args)
    line2, args2, record2 = exported(build(twin(s), twin(token), twin(p)), max_args)
    assert line == line2, f"the secret shows in process.command_line: {line!r} vs {line2!r}"
    assert args == args2, f"the secret shows in process.command_args: {args!r} vs {args2!r}"
    assert record == record2
