"""Draw figures from the benchmark rows in ``bench/results/*.jsonl`` (never from hand-typed numbers).

    python bench/plot.py            # writes bench/results/<op>_<dtype>_<device>.png
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load(RESULTS / "kernels.jsonl") if (RESULTS / "kernels.jsonl").exists() else []
    if not rows:
        print("no rows in bench/results/kernels.jsonl: run bench/bench_kernels.py first")
        return 1
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["op"], r["dtype"], r["device"])].append(r)
    for (op, dtype, device), rs in groups.items():
        latest: dict[tuple, dict] = {}
        for r in rs:  # the newest row per (shape, provider); failed runs have no figures
            if "failed" not in r:
                latest[(r["shape"], r["provider"])] = r
        shapes = sorted({s for s, _ in latest},  # numerically, the last dimension slowest
                        key=lambda s: [int(v) for v in s.split(",")][::-1])
        providers = sorted({p for _, p in latest})
        fig, axes = plt.subplots(1, 2, figsize=(max(11, 0.75 * len(shapes) + 4), 4.8))
        width = 0.8 / len(providers)
        for i, p in enumerate(providers):
            xs = [j + i * width for j in range(len(shapes))]
            ms = [latest.get((s, p), {}).get("total_ms", 0) for s in shapes]
            mem = [latest.get((s, p), {}).get(
                "peak_extra_mib", latest.get((s, p), {}).get("peak_extra_bytes", 0) / 2**20)
                for s in shapes]
            axes[0].bar(xs, ms, width, label=p)
            axes[1].bar(xs, mem, width, label=p)
        for ax, title in zip(axes, ("forward+backward (ms, median)", "peak extra memory (MiB)")):
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, fontsize=8,
                          rotation=60, ha="right")
            ax.set_yscale("log")  # the shapes span orders of magnitude
            ax.set_title(title)
            ax.legend(fontsize=8)
        fig.suptitle(f"{op} {dtype} on {device}")
        fig.tight_layout()
        safe = "".join(c if c.isalnum() else "_" for c in device)[:40]
        out = RESULTS / f"{op}_{dtype}_{safe}.png"
        fig.savefig(out, dpi=110)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
