"""Time genunc report on a synthetic N-sample PNG export and its load in headless Chromium.

usage: python benchmarks/report_open_time.py N OUT_DIR   (prints one line of figures)
"""

import re
import sys
import time

import numpy as np
import torch

from genunc.export import ExportWriter
from genunc.report import write_report
from genunc.report.browser import load

n, directory = int(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(0)
with ExportWriter(directory, "png", metadata={"modality": "image", "model": "synthetic"}) as w:
    for i in range(n):
        s = rng.random(2)
        w.add(i, torch.rand(1, 16, 16) * 2 - 1,
              {"semantic": float(s[0]), "random": float(s[1]),
               "judge_agrees": bool(rng.random() > s[0] * 0.5)})
start = time.perf_counter()
page = write_report(directory, directory + ".html")
build = time.perf_counter() - start
loads = [load(page) for _ in range(3)]
ms = sorted(float(re.search(r'data-load-ms="([0-9.]+)"', x.dom).group(1)) for x in loads)[1]
wall = sorted(x.seconds for x in loads)[1]
print(f"n={n} write_report {build:.2f}s page {len(page.read_bytes()) / 1e3:.0f} kB; chromium "
      f"wall {wall:.2f}s (median of 3); load event at {ms:.0f} ms; console {loads[0].console}")
