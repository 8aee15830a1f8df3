"""Compare the packages installed in a venv with requirements.lock.

    python .ci/check_lock.py requirements.lock            # exit 1 unless `pip freeze` == the lock
    python .ci/check_lock.py requirements.lock --report   # list what differs, exit 0

Run with the venv's python: it reads `pip freeze --all --exclude-editable` of that interpreter,
so pip and setuptools count too, and genunc itself (an editable install) does not.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lines: list[str]) -> dict[str, str]:
    found = {}
    for line in lines:
        match = PIN.match(line.strip())
        if match:
            found[canonical(match[1])] = match[2]
    return found


def main(argv: list[str]) -> int:
    lock_path, report = Path(argv[0]), "--report" in argv[1:]
    locked = pins(lock_path.read_text().splitlines())
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
                            check=True, capture_output=True, text=True).stdout.splitlines()
    installed = pins(freeze)
    rows = []
    for name in sorted(set(locked) | set(installed)):
        have, want = installed.get(name, "-"), locked.get(name, "-")
        if have != want:
            rows.append(f"  {name:32s} lock {want:14s} installed {have}")
    if not rows:
        print(f"pip freeze equals {lock_path} ({len(locked)} packages)")
        return 0
    print(f"{len(rows)} package(s) differ from {lock_path}:", *rows, sep="\n")
    return 0 if report else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
