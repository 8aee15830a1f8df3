"""Time genunc report on a synthetic N-sample PNG export and its load in headless Chromium.

usage: python benchmarks/report_open_time.py N OUT_DIR   (prints one line of figures)
"""
import sys
import time

import numpy as np
import torch

from genunc.export import ExportWriter
from genunc.report import write_report
from genunc.report.browser import load

n = int(sys.argv[1]); d = sys.argv[2]
rng = np.random.default_rng(0)
with ExportWriter(d, "png", metadata={"modality": "image", "model": "synthetic"}) as w:
    for i in range(n):
        s = rng.random(2)
        w.add(i, torch.rand(1, 16, 16) * 2 - 1, {"semantic": float(s[0]), "random": float(s[1]),
                                                 "judge_agrees": bool(rng.random() > s[0] * 0.5)})
t = time.perf_counter(); page = write_report(d, d + ".html"); t1 = time.perf_counter() - t
loads = [load(page) for _ in range(3)]
import re

ms = sorted(float(re.search(r'data-load-ms="([0-9.]+)"', l.dom).group(1)) for l in loads)[1]
wall = sorted(l.seconds for l in loads)[1]
print(f"n={n} write_report {t1:.2f}s page {len(page.read_bytes())/1e3:.0f} kB; chromium wall {wall:.2f}s (median of 3); load event at {ms:.0f} ms; console {loads[0].console}")
