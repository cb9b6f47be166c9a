"""CI step: audit every installed (non-editable) distribution with pip-audit.

Outcomes:
  * a known vulnerability that is not in IGNORED  -> exit 1 (CI fails)
  * the vulnerability service cannot be used (connection error, HTTP 5xx, or it
    answers "not found" for every package, as a proxy that blocks
    /pypi/<name>/<version>/json does)  -> loud WARNING, exit 0 (CI is not
    hostage to an outage)
  * any other pip-audit failure (bad arguments, crash that is not network-shaped)
    -> exit with its status (CI fails, so a broken step cannot pass silently)

The services are tried in order (PyPI's JSON API, then OSV); the first one that
audits at least one package decides.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# Vulnerability id -> why it is ignored. Every entry needs a reason and, where
# possible, the condition under which it can be removed.
IGNORED: dict[str, str] = {}

SERVICES = ("pypi", "osv")

# stderr of a pip-audit run that died talking to the service (pip-audit's own
# ConnectionError/ServiceError messages, or an uncaught requests/urllib3 error).
NETWORK_ERROR = re.compile(
    r"Could not connect|not redirecting properly|ServiceError|ConnectionError|Timeout"
    r"|HTTPError|Max retries exceeded|NameResolution|Temporary failure in name resolution"
    r"|RemoteDisconnected|SSLError|ProxyError|JSONDecodeError",
)


def requirements() -> str:
    """Pinned requirements for the installed, non-editable distributions.

    A local version label is dropped (torch 2.13.0+cpu -> torch==2.13.0): PyPI
    and OSV know only the public version, and the advisories for it apply to
    the local build too. The editable project itself (fuserve) is excluded.
    """
    out = subprocess.run(
        [sys.executable, "-m", "pip", "list", "--format=json", "--exclude-editable"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return "".join(f"{p['name']}=={p['version'].split('+', 1)[0]}\n" for p in json.loads(out))


def warn(msg: str) -> None:
    bar = "!" * 78
    print(f"{bar}\nWARNING: pip-audit: {msg}\n{bar}", file=sys.stderr, flush=True)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        reqs = Path(tmp, "requirements.txt")
        reqs.write_text(requirements())
        n = len(reqs.read_text().splitlines())
        problems = []
        for service in SERVICES:
            report = Path(tmp, f"{service}.json")
            cmd = [
                sys.executable, "-m", "pip_audit",
                "-r", str(reqs), "--no-deps", "--disable-pip",
                "-s", service, "--timeout", "15", "--progress-spinner", "off",
                "-f", "json", "-o", str(report),
            ]  # fmt: skip
            for vuln_id in IGNORED:
                cmd += ["--ignore-vuln", vuln_id]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            stderr = "\n".join(
                line for line in proc.stderr.splitlines() if "--no-deps" not in line and "pip-compile" not in line
            )

            if not report.exists():
                if proc.returncode == 0:
                    # pip-audit writes no JSON when nothing was skipped and nothing found.
                    print(f"pip-audit ({service}): {n} packages audited, no known vulnerabilities")
                    return 0
                if NETWORK_ERROR.search(stderr):
                    problems.append(f"{service}: service error: {stderr.strip().splitlines()[-1]}")
                    continue
                print(stderr, file=sys.stderr)
                print(f"pip-audit ({service}) failed (exit {proc.returncode}), not a network error", file=sys.stderr)
                return proc.returncode or 1

            deps = json.loads(report.read_text())["dependencies"]
            found = [(d, v) for d in deps for v in d.get("vulns", [])]
            if found:
                print(f"pip-audit ({service}): {len(found)} known vulnerabilities:", file=sys.stderr)
                for d, v in found:
                    ids = ", ".join([v["id"], *v.get("aliases", [])])
                    fix = ", ".join(v.get("fix_versions", [])) or "no fixed version"
                    print(f"  {d['name']} {d['version']}: {ids} (fixed in: {fix})", file=sys.stderr)
                print("Fix: raise the version floor in pyproject.toml, or add the id to IGNORED in "
                      ".ci/audit_deps.py with the reason it cannot be fixed.", file=sys.stderr)  # fmt: skip
                return 1
            skipped = [d for d in deps if "skip_reason" in d]
            audited = len(deps) - len(skipped)
            if audited:
                print(f"pip-audit ({service}): {audited} packages audited, no known vulnerabilities")
                for d in skipped:
                    print(f"  not audited: {d['skip_reason']}")
                if IGNORED:
                    print(f"  ignored ids: {', '.join(IGNORED)}")
                return 0
            problems.append(f"{service}: answered for none of the {len(deps)} packages ({skipped[0]['skip_reason']})")

        warn(
            "the dependencies were NOT audited, no vulnerability service was usable:\n  "
            + "\n  ".join(problems)
            + "\nContinuing so that CI does not fail on a service outage; rerun where "
            "a vulnerability service (PyPI's per-version JSON API or OSV) is reachable."
        )
        return 0


if __name__ == "__main__":
    sys.exit(main())
