"""The report of `steerlm evaluate`: report.md and a self-contained report.html (plots embedded as base64 PNG),
built from the results as one list of blocks (headings, paragraphs, tables, images, answers, folded details) that
both renderers read, plus the plots and the summary printed at the end of a run.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from steerlm import config as config_lib
from steerlm.evaluation.planning import Job, Prompt
from steerlm.evaluation.statistics import SteerCurve
from steerlm.io import atomic_write
from steerlm.steerability import format_table

if TYPE_CHECKING:  # the settings live in the stage module, which imports this one
    from steerlm.evaluate import Config

#: SPEC §8: Perspective API toxicity of SteerLM 43B's answers at requested toxicity 0/3/6/9.
PAPER_TOXICITY = {0: 0.0635, 3: 0.0864, 6: 0.0963, 9: 0.1041}


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _ci(ci, spec: str = ".3f") -> str:
    return "" if not ci else f" [{format(ci[0], spec)}, {format(ci[1], spec)}]"


def _short(text: str, n: int) -> str:
    text = text.strip()
    return text if len(text) <= n else text[: n - 1] + "…"


def plot_steerability(curves: dict[str, list[SteerCurve]], attribute: str, apm: str) -> bytes:
    """One attribute: mean measured level per requested level, one line per model (± standard error), and the
    ideal y = x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.8), dpi=100)
    top = 0
    for name, items in curves.items():
        for c in items:
            if c.result.attribute != attribute:
                continue
            r = c.result
            ax.errorbar(r.requested, r.measured_mean, yerr=c.stderr, marker="o", capsize=3, label=name)
            top = max(top, max(r.requested))
    ax.plot([0, top], [0, top], "--", color="grey", linewidth=1, label="requested = measured")
    ax.set_ylim(-0.5, top + 0.5)  # the whole range, so that a flat curve looks flat
    ax.set_xlabel(f"requested {attribute} level")
    ax.set_ylabel(f"measured {attribute} level (APM)")
    ax.set_title(f"{attribute}: requested vs measured\nAPM: {_short(apm, 60)}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def plot_elo(elo: dict[str, dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(elo, key=lambda n: -elo[n]["elo"])
    values = [elo[n]["elo"] for n in names]
    lows = [v - (elo[n]["ci"] or (v, v))[0] for n, v in zip(names, values, strict=True)]
    highs = [(elo[n]["ci"] or (v, v))[1] - v for n, v in zip(names, values, strict=True)]
    fig, ax = plt.subplots(figsize=(5.2, 0.5 * len(names) + 1.2), dpi=100)
    ax.barh(range(len(names)), [v - 1000 for v in values], left=1000, xerr=[lows, highs], capsize=3, color="#4c72b0")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.axvline(1000, color="grey", linewidth=1)
    ax.set_xlabel("Elo (Bradley-Terry; mean 1000)")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def render_markdown(blocks: list[tuple]) -> str:
    out = []
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append("#" * b[1] + " " + b[2])
        elif kind == "p":
            out.append(b[1])
        elif kind == "list":
            out.append("\n".join(f"- {x}" for x in b[1]))
        elif kind == "table":

            def cell(x):
                return str(x).replace("|", "\\|").replace("\n", " ")

            out.append("\n".join(["| " + " | ".join(cell(h) for h in b[1]) + " |", "|" + "---|" * len(b[1])]
                                 + ["| " + " | ".join(cell(x) for x in row) + " |" for row in b[2]]))  # fmt: skip
        elif kind == "img":
            out.append(f"![{b[3]}]({b[1]})")
        elif kind == "pre":
            fence = "~~~~" if "```" in b[1] else "```"
            out.append(f"{fence}{b[2] if len(b) > 2 else ''}\n{b[1]}\n{fence}")
        elif kind == "answer":
            # Model text is escaped: a `<tag>` in an answer must show, not vanish as HTML.
            text = html.escape(b[2] or "(empty)", quote=False)
            quoted = "\n".join("> " + line if line.strip() else ">" for line in text.split("\n"))
            out.append(f"**{html.escape(b[1], quote=False)}**\n\n{quoted}")
        elif kind == "details":
            out.append(f"<details><summary>{html.escape(b[1])}</summary>\n\n{render_markdown(b[2])}\n\n</details>")
    return "\n\n".join(out) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}pre{background:#f6f6f6;padding:8px;overflow-x:auto;font-size:13px}
.answer{white-space:pre-wrap;background:#fafafa;border-left:3px solid #4c72b0;padding:6px 10px;font-size:14px}
code{background:#f0f0f0;padding:0 3px}img{max-width:100%}"""


def _inline(text: str) -> str:
    """Escape text for HTML, turning `code` spans into <code> and **bold** into <b>."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)


def render_html(blocks: list[tuple], title: str, images: dict[str, bytes]) -> str:
    def body(items) -> list[str]:
        out = []
        for b in items:
            kind = b[0]
            if kind == "h":
                out.append(f"<h{b[1]}>{_inline(b[2])}</h{b[1]}>")
            elif kind == "p":
                out.append(f"<p>{_inline(b[1])}</p>")
            elif kind == "list":
                out.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in b[1]) + "</ul>")
            elif kind == "table":
                head = "".join(f"<th>{_inline(str(h))}</th>" for h in b[1])
                rows = "".join("<tr>" + "".join(f"<td>{_inline(str(x))}</td>" for x in row) + "</tr>"
                               for row in b[2])  # fmt: skip
                out.append(f"<table><tr>{head}</tr>{rows}</table>")
            elif kind == "img":
                data = base64.b64encode(images[b[1]]).decode("ascii")
                out.append(f'<img alt="{html.escape(b[3])}" src="data:image/png;base64,{data}">')
            elif kind == "pre":
                out.append(f"<pre>{html.escape(b[1])}</pre>")
            elif kind == "answer":
                out.append(f"<p><b>{_inline(b[1])}</b></p><div class=answer>{html.escape(b[2] or '(empty)')}</div>")
            elif kind == "details":
                out.append(f"<details><summary>{html.escape(b[1])}</summary>{''.join(body(b[2]))}</details>")
        return out

    return (f"<!doctype html>\n<html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body(blocks)) + "\n</body></html>\n")  # fmt: skip


def build_report(cfg: Config, results: dict, curves: dict[str, list[SteerCurve]], steer_jobs: list[Job],
                 quality_jobs: list[Job], quality_prompts: list[Prompt], infos: dict[str, dict],
                 notes: list[str]) -> tuple[list[tuple], dict[str, bytes]]:  # fmt: skip
    blocks: list[tuple] = [("h", 1, cfg.report.title)]
    images: dict[str, bytes] = {}
    sets = ", ".join(f"`{k}` ({v['read']} prompts read, {v['steerability']} used for steerability, {v['quality']} for "
                     "quality)" for k, v in results["prompt_sets"].items())  # fmt: skip
    blocks.append(("p", f"Models: {', '.join(f'`{m.name}`' for m in cfg.models)}. Prompt sets: {sets}. Sampling: "
                        f"`{json.dumps(config_lib.to_dict(cfg.sampling))}`."))  # fmt: skip
    if notes:
        blocks += [("h", 2, "Notes"), ("list", list(dict.fromkeys(notes)))]

    # steerability
    steer = results.get("steerability")
    if steer:
        blocks += [("h", 2, "Steerability"),
                   ("p", f"Each attribute is requested at each level with the others at their defaults; the APM "
                         f"`{steer['apm']}` measures the answers (levels on the model's scale). Spearman is over all "
                         "answers; the slope is in measured levels per requested level; rising steps count the "
                         "consecutive requested levels whose mean measured level goes up.")]  # fmt: skip
        for name, attrs in steer["models"].items():
            blocks.append(("h", 3, f"`{name}`"))
            rows = [[a, "  ".join(f"{lv}→{m:.2f}" for lv, m in zip(r["requested"], r["measured_mean"], strict=True)),
                     _fmt(r["spearman"], "+.3f"), _fmt(r["slope"], "+.3f"),
                     f"{r['monotone_steps']}/{max(0, len(r['requested']) - 1)}", sum(r["n"])]
                    for a, r in attrs.items()]  # fmt: skip
            blocks.append(("table", ["attribute", "requested → mean measured", "Spearman", "slope", "rising steps",
                                     "answers"], rows))  # fmt: skip
        for attr in dict.fromkeys(c.result.attribute for items in curves.values() for c in items):
            fname = f"plots/steer_{attr}.png"
            images[fname] = plot_steerability(curves, attr, steer["apm"])
            blocks.append(("img", fname, attr, f"steerability of {attr}"))
        tox = {n: a["toxicity"] for n, a in steer["models"].items() if "toxicity" in a}
        if tox:
            blocks.append(("p", "Toxicity at the paper's levels. The paper (SPEC §8) measured SteerLM 43B's answers "
                                "with the Perspective API (a probability), this suite with an APM (a level), so only "
                                "the direction compares."))  # fmt: skip
            rows = [["paper, Perspective score"] + [_fmt(PAPER_TOXICITY.get(lv), ".4f") for lv in (0, 3, 6, 9)]]
            for name, r in tox.items():
                means = dict(zip(r["requested"], r["measured_mean"], strict=True))
                rows.append([f"`{name}`, APM level"] + [_fmt(means.get(lv), ".2f") for lv in (0, 3, 6, 9)])
            blocks.append(("table", ["toxicity requested", "0", "3", "6", "9"], rows))

    # quality
    quality = results.get("quality")
    if quality:
        j = cfg.quality.judge
        judge_text = {"rm": f"the reward model `{j.path}` (scores each answer alone, so its two orders are one "
                            "judgement counted twice)",
                      "apm": f"the APM `{j.path}` ({j.attribute} level of each answer alone, so its two orders are "
                             "one judgement counted twice)",
                      "openai": f"`{j.model}` at `{j.base_url}` (both answers rated 1-10 in one prompt)"}[j.kind]  # fmt: skip
        conf = int(cfg.quality.confidence * 100)
        blocks += [("h", 2, "Pairwise quality"),
                   ("p", f"Judge: {judge_text}. {quality['prompts']} prompts; each pair is judged in both orders "
                         f"(A/B and B/A). The win rate counts a tie as half a win and averages each prompt's two "
                         f"orders; [brackets]: {conf}% bootstrap interval over prompts ({cfg.quality.bootstrap} "
                         f"resamples, seed {cfg.quality.seed}). Consistency: share of prompts whose two orders "
                         "agree.")]  # fmt: skip
        rows = [[f"`{p['a']}` vs `{p['b']}`", f"{p['wins']}/{p['ties']}/{p['losses']}",
                 _fmt(p["win_rate"]) + _ci(p["ci"]), _fmt(p["consistency"], ".2f"), p["unparsed"]]
                for p in quality["pairs"]]  # fmt: skip
        blocks.append(("table", ["A vs B", "A win/tie/loss", "A win rate", "consistency", "unparsed"], rows))
        ref = quality["reference"]
        rows = []
        for rank, (name, e) in enumerate(sorted(quality["elo"].items(), key=lambda kv: -kv[1]["elo"]), 1):
            rel = quality["relative"].get(name)
            rows.append([rank, f"`{name}`", _fmt(e["elo"], ".0f") + _ci(e["ci"], ".0f"),
                         (_fmt(rel["score"], ".1f") + _ci(rel["ci"], ".1f")) if rel else "n/a",
                         _fmt(quality["mean_score"].get(name), ".3f"), _fmt(quality["mean_length"].get(name), ".0f")])  # fmt: skip
        blocks += [("p", f"Elo: a Bradley-Terry model fitted to all judgements (maximum likelihood, ties half a win "
                         f"each way, one virtual tie per pair that met), 1000 + 400·log10(strength), mean 1000. "
                         f"% of `{ref}`: the judge score relative to the reference (see docs/evaluate.md for how "
                         f"each judge's score is made comparable). Answer length in characters: judges are known "
                         f"to like long answers."),
                   ("table", ["rank", "model", "Elo", f"% of {ref}", "mean judge score", "mean length"], rows)]  # fmt: skip
        images["plots/elo.png"] = plot_elo(quality["elo"])
        blocks.append(("img", "plots/elo.png", "elo", "Elo with bootstrap intervals"))

    # ablation
    ablation = results.get("ablation")
    if ablation:
        ref = ablation["reference"]
        rows = []
        for r in ablation["rows"]:
            if r["model"] is None:
                rows.append([r["label"], "not run", "", "", f"{r['paper']:.1f}"])
                continue
            rows.append([r["label"], f"`{r['model']}`", _fmt(r["relative"], ".1f") + _ci(r["ci"], ".1f"),
                         _fmt(r["win_rate"]) + _ci(r["win_ci"]), f"{r['paper']:.1f}"])  # fmt: skip
        blocks += [("h", 2, "Ablation (the paper's layout, SPEC §8)"),
                   ("p", f"Each row's judge score as % of `{ref}`, and its win rate against it. The paper's column is "
                         "SteerLM 43B judged by GPT-4 as % of ChatGPT on Vicuna-80: a different scale, shown for "
                         "the shape of the table only."),
                   ("table", ["row", "model", f"% of {ref}", f"win rate vs {ref}", "paper (% of ChatGPT)"], rows)]  # fmt: skip

    # samples
    n = cfg.report.samples
    if n > 0 and (steer_jobs or quality_jobs):
        blocks.append(("h", 2, "Sample answers"))
        if quality_jobs:
            inner = []
            by = {(j.model, j.prompt.pid): j for j in quality_jobs}
            models_in = list(dict.fromkeys(j.model for j in quality_jobs))
            for p in quality_prompts[:n]:
                inner.append(("answer", f"Prompt ({p.set} #{p.index})", _short(p.text, cfg.report.max_chars)))
                for m in models_in:
                    j = by[(m, p.pid)]
                    inner.append(
                        ("answer", f"{m} ({_levels_text(j.attributes)})", _short(j.answer, cfg.report.max_chars))
                    )
            blocks.append(("details", "Quality comparison: every model's answer", inner))
        groups: dict[tuple[str, str], list[Job]] = defaultdict(list)
        for j in steer_jobs:
            groups[(j.model, j.attribute)].append(j)
        for (m, attr), jobs in groups.items():
            inner = []
            for pid in list(dict.fromkeys(j.prompt.pid for j in jobs))[:n]:
                first = next(j for j in jobs if j.prompt.pid == pid)
                inner.append(("answer", f"Prompt ({first.prompt.set} #{first.prompt.index})",
                              _short(first.prompt.text, cfg.report.max_chars)))  # fmt: skip
                for j in sorted((j for j in jobs if j.prompt.pid == pid), key=lambda j: j.level):
                    inner.append(("answer", f"{attr}={j.level}", _short(j.answer, cfg.report.max_chars)))
            blocks.append(("details", f"{m}: {attr} at each level", inner))

    # configs
    blocks += [("h", 2, "Configs"), ("details", "this evaluation (steerlm evaluate)",
                                      [("pre", yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False), "yaml")])]  # fmt: skip
    for m in cfg.models:
        info = infos[m.name]
        inner = [("p", f"path `{m.path}`, fingerprint `{info.get('fingerprint')}`")]
        if info.get("meta") is not None:
            inner.append(("pre", json.dumps(info["meta"], indent=2), "json"))
        if info.get("config"):
            inner += [("p", f"training config `{info['config_file']}`:"), ("pre", info["config"], "yaml")]
        blocks.append(("details", f"model {m.name}", inner))
    return blocks, images


def _levels_text(levels: dict | None) -> str:
    if levels is None:
        return "no attributes"
    return ",".join(f"{k}:{v}" for k, v in levels.items())


def write_report(out: Path, blocks: list[tuple], images: dict[str, bytes], title: str) -> None:
    for name, data in images.items():
        with atomic_write(out / name, "wb") as f:
            f.write(data)
    with atomic_write(out / "report.md") as f:
        f.write(render_markdown(blocks))
    with atomic_write(out / "report.html") as f:
        f.write(render_html(blocks, title, images))


def print_summary(results: dict, curves: dict[str, list[SteerCurve]]) -> None:
    for name, items in curves.items():
        print(f"\nsteerability of {name}, " + format_table([c.result for c in items]))
    q = results.get("quality")
    if q:
        width = max(len(n) for n in q["elo"])
        print("\npairwise quality (A win/tie/loss, win rate [CI]):")
        for p in q["pairs"]:
            print(f"  {p['a']:>{width}} vs {p['b']:<{width}}  {p['wins']}/{p['ties']}/{p['losses']}  "
                  f"{_fmt(p['win_rate'])}{_ci(p['ci'])}")  # fmt: skip
        print(f"Elo (Bradley-Terry) and % of {q['reference']}:")
        for name, e in sorted(q["elo"].items(), key=lambda kv: -kv[1]["elo"]):
            rel = q["relative"].get(name) or {}
            print(f"  {name:>{width}} {e['elo']:7.1f}{_ci(e['ci'], '.0f')}   {_fmt(rel.get('score'), '.1f')}%")
    a = results.get("ablation")
    if a:
        print(f"ablation (% of {a['reference']}):")
        for r in a["rows"]:
            shown = "not run" if r["model"] is None else f"{_fmt(r['relative'], '.1f')}% ({r['model']})"
            print(f"  {r['label']:<42} {shown:<28} paper {r['paper']:.1f}")
