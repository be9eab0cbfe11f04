"""Several `steer_check.py` reports on one figure: requested vs mean measured level of one attribute, a line per
(model, guidance scale), a panel per prompt set — e.g. the quickstart's model against λ = 0, guided and unguided.

    python benchmarks/plot_steer_checks.py --attribute verbosity --out docs/steering_lambda0.png \\
        --line "8 held-out OASST|quickstart, s = 2=runs/q_oasst.json@2" --line "8 held-out OASST|λ = 0, s = 2=runs/l0.json@2" \\
        --line "16 MT-Bench|quickstart, s = 2=runs/q_mt.json@2"

Each `--line` is `PANEL|LABEL=REPORT@SCALE`: the panel's title, the line's label, a `steer_check.py --out` file and
the guidance scale inside it. The legend gives each line's Spearman and its 95% interval over prompts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def parse_line(spec: str) -> tuple[str, str, Path, str]:
    """(panel, label, report, scale) of one `--line` value; ValueError naming the value when malformed."""
    try:
        panel, rest = spec.split("|", 1)
        label, rest = rest.rsplit("=", 1)
        report, scale = rest.rsplit("@", 1)
    except ValueError:
        raise ValueError(f"--line {spec!r}: expected PANEL|LABEL=REPORT@SCALE") from None
    return panel, label, Path(report), scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--line", action="append", required=True, help="PANEL|LABEL=REPORT@SCALE, repeatable")
    parser.add_argument("--attribute", default="verbosity")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--title", default="")
    args = parser.parse_args()

    try:
        lines = [parse_line(s) for s in args.line]
    except ValueError as e:
        parser.error(str(e))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(p for p, *_ in lines))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False, sharey=True)
    for ax, panel in zip(axes[0], panels, strict=True):
        lo, hi = None, None
        for p, label, report, scale in lines:
            if p != panel:
                continue
            scales = json.loads(report.read_text(encoding="utf-8"))["scales"]
            if scale not in scales or args.attribute not in scales[scale]:
                raise SystemExit(f"{report}: no scale {scale} with attribute {args.attribute} (has {sorted(scales)})")
            r = scales[scale][args.attribute]
            ci = r.get("spearman_ci")
            rho = f"{r['spearman']:+.2f}" + (f" ({ci[0]:+.2f}..{ci[1]:+.2f})" if ci else "")
            ax.plot(r["requested"], r["measured_mean"], "o-", label=f"{label}: ρ {rho}")
            lo = min(r["requested"]) if lo is None else min(lo, *r["requested"])
            hi = max(r["requested"]) if hi is None else max(hi, *r["requested"])
        ax.plot([lo, hi], [lo, hi], ":", color="gray", label="requested")
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel(f"requested {args.attribute} level")
        ax.set_ylabel(f"measured {args.attribute} level (mean)")
        ax.set_xticks(range(lo, hi + 1))
        ax.legend(fontsize=7)
    if args.title:
        fig.suptitle(args.title, fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    plt.close(fig)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
