"""No credential is committed: scan every git-tracked file for secret-like strings.

Flags private keys, AWS-style and other well-known token formats, passwords in URLs
(`redis://:<password>@host`) and password/secret/token/key assignments with a literal value. Placeholders pass:
values containing changeme, example, placeholder, dummy, fake, redacted, test, xxx, `***`, a few
canonical junk passwords, templates (`<password>`, `${VAR}`, `{name}`, `%s`, `$VAR`), URLs on
documentation hosts (example.com, *.example, *.test, *.invalid), and any line marked
`pragma: allowlist secret` (for a deliberate fake that must look real).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_BYTES = 2_000_000

PLACEHOLDERS = ("changeme", "change-me", "change_me", "example", "placeholder", "dummy", "fake", "redacted",
                "test", "xxx", "***", "hunter2", "p@ss", "s3cret", "passw0rd")
ALLOW_MARK = "pragma: allowlist secret"
TEMPLATE = re.compile(r"^(<[^>]*>|\$\{[^}]*\}|\$\w+|\{[^}]*\}|%s|%\(\w+\)s)$")
DOC_HOST = re.compile(r"(^|\.)(example\.(com|org|net)|example|test|invalid|localhost\.test)$", re.I)

# (kind, pattern); a pattern's group "value" is what a placeholder may excuse (else the whole match)
TOKENS = [
    ("private key", re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")),
    ("AWS access key id", re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[0-9A-Z]{16}\b")),
    ("AWS secret access key", re.compile(r"(?i)aws_?secret_?access_?key\W{1,4}(?P<value>[A-Za-z0-9/+=]{40})\b")),
    ("GitHub token", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})\b")),
    ("Slack token", re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b")),
    ("Google API key", re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b")),
    ("npm token", re.compile(r"\bnpm_[A-Za-z0-9]{36}\b")),
    ("API secret key", re.compile(r"\bsk-(?:proj-|live_|test_)?[A-Za-z0-9]{20,}\b")),
    ("JSON web token", re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")),
]
URL_PASSWORD = re.compile(r"\b[a-z][a-z0-9+.-]*://(?P<user>[^\s:/@'\"]*):(?P<value>[^\s@/'\"]+)@(?P<host>[^\s:/'\"?]+)")
_KEY = r"[\w.-]*(?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|credential)[\w.-]*"
ASSIGNED = re.compile(rf"(?i)(?P<key>{_KEY})[\"']?\s*(?:=|:|=>)\s*(?P<q>[\"'])(?P<value>[^\"'\n]{{3,}})(?P=q)")
ENV_STYLE = re.compile(rf"(?im)^\s*(?:export\s+|ENV\s+)?(?P<key>{_KEY})\s*[=:]\s*(?P<value>[^\s#\"']+)")
ENV_FILES = re.compile(r"(^|/)(\.env[^/]*|[^/]*\.(sh|ini|cfg|conf|ya?ml|toml|properties)|Makefile|Dockerfile[^/]*)$")


@dataclass(frozen=True)
class Finding:
    path: str
    line: int
    kind: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.kind}"


def _placeholder(value: str) -> bool:
    v = value.strip().lower()
    return not v or any(p in v for p in PLACEHOLDERS) or bool(TEMPLATE.match(value.strip()))


def scan_text(text: str, path: str) -> list[Finding]:
    """Secret-like strings in one file's text, by line."""
    found: list[Finding] = []
    env_style = bool(ENV_FILES.search(path))
    for number, line in enumerate(text.splitlines(), 1):
        if ALLOW_MARK in line:
            continue
        for kind, pattern in TOKENS:
            for m in pattern.finditer(line):
                if not _placeholder(m.groupdict().get("value") or m.group(0)):
                    found.append(Finding(path, number, kind))
        for m in URL_PASSWORD.finditer(line):
            if not (_placeholder(m["value"]) or DOC_HOST.search(m["host"])):
                found.append(Finding(path, number, f"password in a URL ({m['host']})"))
        for m in ASSIGNED.finditer(line):
            if "://" not in m["value"] and not _placeholder(m["value"]):
                found.append(Finding(path, number, f"{m['key']} set to a literal"))
        if env_style:
            for m in ENV_STYLE.finditer(line):
                if not _placeholder(m["value"]):
                    found.append(Finding(path, number, f"{m['key']} set to a literal"))
    return sorted(set(found), key=lambda f: (f.line, f.kind))


def tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing is tracked")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p]


def test_no_tracked_file_holds_a_secret():
    files = tracked_files()
    assert len(files) > 20
    findings: list[Finding] = []
    for rel in files:
        path = ROOT / rel
        if not path.is_file() or path.is_symlink() or path.stat().st_size > MAX_BYTES:
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary
        findings += scan_text(data.decode("utf-8", errors="replace"), rel)
    assert not findings, "secret-like strings in tracked files (use a placeholder, or the environment):\n" + "\n".join(
        map(str, findings)
    )


# The samples are assembled at run time so that this file itself holds none of them.
_AWS_ID = "AKIA" + "Q3EXAMPLEKEY0QZ1"[::-1].upper().replace("E", "Z")
SECRET_LINES = [
    ("-----BEGIN " + "RSA PRIVATE KEY-----", "private key"),
    ("-----BEGIN " + "OPENSSH PRIVATE KEY-----", "private key"),
    (f"key_id = {_AWS_ID}", "AWS access key id"),
    ("aws_secret_access_key = " + "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + "9Zq3Lm8Rt2",  # pragma: allowlist secret
     "AWS secret access key"),
    ("token: gh" + "p_" + "a1B2" * 9, "GitHub token"),
    ("SLACK=xox" + "b-1234567890-abcdefghij", "Slack token"),
    ("key = 'AI" + "za" + "S" * 35 + "'", "Google API key"),
    ("client = Client('sk-" + "A1b2C3d4" * 4 + "')", "API secret key"),
    ("auth = 'ey" + "JhbGciOiJIUzI1NiJ9.ey" + "JzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U'",
     "JSON web token"),
    ("url = 'redis://:" + "Tr0ub4dor&3@cache.internal:6379/0'", "password in a URL (cache.internal)"),
    ("REDIS_URL=rediss://admin:" + "k9Vq2mZx@10.0.0.5:6380", "password in a URL (10.0.0.5)"),
    ('connect(password="' + 'k9Vq2mZx")', "password set to a literal"),
    ('{"api_key": "' + '3f9a1c07b2d84e6f"}', "api_key set to a literal"),
]
ENV_LINES = [("REDIS_PASSWORD=" + "k9Vq2mZx", "REDIS_PASSWORD set to a literal")]  # pragma: allowlist secret
PLACEHOLDER_LINES = [
    "REDIS_URL=redis://:changeme@localhost:6379",
    "url = 'redis://:<password>@127.0.0.1:6379'",
    "url = f'redis://:{password}@{host}'",
    "url = 'rediss://:s3cret@redis.example.com:6380'",
    'connect(password="example-password")',
    "connect(password=os.environ['REDIS_PASSWORD'])",
    'server = RedisServer(tmp, password="fsw-test-secret")',
    "display = 'redis://:***@127.0.0.1:6379'",
    "auth = f':{self.password}@' if self.password else ''",
    'token: str | None = None',
    "conn = redis://:" + "k9Vq2mZx@10.0.0.5  # a deliberate fake, " + ALLOW_MARK,
]
ENV_PLACEHOLDERS = ["# REDIS_PASSWORD=change-me", "REDIS_PASSWORD=${REDIS_PASSWORD}", "export API_TOKEN=$API_TOKEN"]


@pytest.mark.parametrize(("line", "kind"), SECRET_LINES)
def test_each_kind_of_secret_is_found_and_named_with_its_line(line, kind):
    assert scan_text(f"first line\n{line}\n", "src/settings.py") == [Finding("src/settings.py", 2, kind)]


@pytest.mark.parametrize(("line", "kind"), ENV_LINES)
def test_unquoted_values_count_in_env_files_only(line, kind):
    assert scan_text(line, "deploy/.env") == [Finding("deploy/.env", 1, kind)]
    assert scan_text(line, "docs/notes.md") == []


@pytest.mark.parametrize("line", PLACEHOLDER_LINES)
def test_placeholders_and_code_are_allowed(line):
    assert scan_text(line, "src/settings.py") == []


@pytest.mark.parametrize("line", ENV_PLACEHOLDERS)
def test_placeholders_are_allowed_in_env_files(line):
    assert scan_text(line, ".env.example") == []
