"""Open a report in headless Chromium: a screenshot, the page after its scripts ran, and every
message the page wrote to the console (``genunc report --png`` and the browser tests)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from genunc.errors import GenuncError

#: what Chromium needs to run headless, as root, on a machine with no network: without the
#: background-networking flags it keeps trying to reach its update and sync services
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--enable-logging=stderr", "--v=0")
CONSOLE = re.compile(r":INFO:CONSOLE[^\]]*\] (.*)$")


@dataclass(frozen=True)
class PageLoad:
    dom: str  # the document after its scripts ran
    console: list[str]  # each console message, as Chromium logs it
    seconds: float  # wall time of the whole browser run (start, load, dump, exit)


def chromium() -> str:
    """The Chromium executable (``GENUNC_CHROMIUM`` or the first of chromium / chromium-browser /
    google-chrome on PATH)."""
    for name in (os.environ.get("GENUNC_CHROMIUM"), "chromium", "chromium-browser",
                 "google-chrome"):
        if name and shutil.which(name):
            return str(shutil.which(name))
    raise GenuncError("no Chromium found: install it (Debian: apt-get install chromium) or set "
                      "GENUNC_CHROMIUM to its path")


def _run(page: Path, *extra: str, timeout: float = 60.0) -> tuple[subprocess.CompletedProcess, float]:
    with tempfile.TemporaryDirectory(prefix="genunc-chromium-") as profile:
        start = time.perf_counter()
        done = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", *extra,
                               Path(page).resolve().as_uri()],
                              capture_output=True, text=True, timeout=timeout)
        return done, time.perf_counter() - start


def load(page: str | os.PathLike[str]) -> PageLoad:
    """The page as the browser sees it once loaded, and what it logged."""
    done, seconds = _run(Path(page), "--dump-dom")
    console = [m.group(1) for line in done.stderr.splitlines() if (m := CONSOLE.search(line))]
    if done.returncode != 0 or "<html" not in done.stdout:
        raise GenuncError(f"Chromium could not load {page}: {done.stderr.strip()[-300:]}")
    return PageLoad(done.stdout, console, seconds)


def screenshot(page: str | os.PathLike[str], png: str | os.PathLike[str],
               size: tuple[int, int] = (1280, 1600)) -> Path:
    """A PNG of the page's first `size` pixels (width, height)."""
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    done, _ = _run(Path(page), f"--screenshot={png}", f"--window-size={size[0]},{size[1]}")
    if done.returncode != 0 or not png.exists():
        raise GenuncError(f"Chromium took no screenshot of {page}: {done.stderr.strip()[-300:]}")
    return png
