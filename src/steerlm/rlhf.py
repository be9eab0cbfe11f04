"""`steerlm rlhf`: the InstructGPT baseline from one YAML file: data -> SFT -> reward model -> PPO (SPEC §6).

    steerlm rlhf --preset tiny --out=runs/rlhf-tiny     # tiny random models: the whole chain in seconds
    steerlm rlhf --preset quickstart                    # SmolLM2-135M + LoRA, MiniLM reward model (~50 min, 2 CPU cores)

Stages, each in its own folder under `out`, skipped on a re-run when its settings and inputs are unchanged
(`done.json` holds a hash of the stage's resolved config and of its inputs' sizes and times, runner.py):
1. `data`: split each source once, by OASST tree / HH pair, and keep the splits in their own formats
   (`oasst_{train,val}.jsonl`, `hh_{train,val}.jsonl`); from them write the demonstrations (`train.jsonl`,
   `val.jsonl`: OASST conversations whose every answer is the best-ranked reply, and HH-RLHF chosen conversations)
   and the prompts (`prompts_{train,val}.jsonl`);
2. `sft`: plain SFT on the demonstrations (`steerlm sft --conditioning=none`), best model in `sft/best`;
3. `rm`: a reward model on the comparisons of the training split, pairwise accuracy on the held-out split;
4. `ppo`: PPO (PPO-ptx with `ppo.ppo.ptx_coef`) from the SFT model against the reward model, on the training
   prompts; greedy answers to held-out prompts before and after.
A section of the YAML holds one stage's settings exactly as its command takes them; the paths that connect the
stages are filled in. The run ends with a summary table and a few answers before and after PPO.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from steerlm import config as config_lib
from steerlm.data import formats, hh, oasst, preferences
from steerlm.data.records import write_records
from steerlm.errors import UserError
from steerlm.io import read_jsonl, write_json, write_jsonl
from steerlm.runner import run_stage, summary_table


@dataclass
class DataArgs:
    """Where the preference data come from and how the demonstrations are chosen."""

    oasst: list[str] = field(
        default_factory=lambda: ["$STEERLM_DATA/oasst1/oasst1-en-dev.jsonl", "hub:OpenAssistant/oasst1"]
    )
    """OASST sources (flat rows or trees dump, local or hub:ID; `$STEERLM_DATA` and other variables expanded); the
    first usable one in order is used (a local file that exists, or a hub id); empty: none."""
    hh: list[str] = field(default_factory=list)
    """HH-RLHF sources ({chosen, rejected} JSONL[.gz], or hub:ID), picked as for `oasst`; empty: none."""
    max_trees: int = 0
    """Use only the first N OASST trees (0: all)."""
    max_pairs: int = 0
    """Use only the first N HH-RLHF pairs (0: all)."""
    val_fraction: float = 0.1
    """Share of OASST trees and of HH pairs held out (SFT validation, reward-model accuracy, PPO samples)."""
    select_by: Literal["rank", "quality"] = "rank"
    """OASST demonstrations: every answer the best-ranked reply ('rank', InstructGPT's labeler-preferred answer), or
    the highest `quality` label ('quality')."""
    hh_demonstrations: bool = True
    """Add the HH-RLHF chosen conversations to the demonstrations."""
    lang: str = "en"
    """OASST languages kept."""
    skip_invalid: bool = True
    """Skip (and count) malformed rows and pairs (the real HH-RLHF data holds a few with empty turns)."""
    seed: int = 0
    """Seed of the splits and of the prompt order."""

    def __post_init__(self):
        if not self.oasst and not self.hh:
            raise ValueError("give at least one source: oasst and/or hh")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), not {self.val_fraction}")
        if self.max_trees < 0 or self.max_pairs < 0:
            raise ValueError("max_trees and max_pairs must be >= 0")


@dataclass
class Config:
    out: str = "runs/rlhf"
    """Root folder; each stage writes a subfolder (data, sft, rm, ppo)."""
    data: DataArgs = field(default_factory=DataArgs)
    """Sources, split and demonstration choice."""
    sft: dict[str, Any] = field(
        default_factory=dict, metadata={"command": "sft", "filled": "data out conditioning overwrite"}
    )
    """`steerlm sft` settings (model, template, train, ...); `data`, `out`, `conditioning: none` are filled in."""
    rm: dict[str, Any] = field(
        default_factory=dict,
        metadata={"command": "train-rm", "filled": "data val_data out overwrite skip_invalid lang"},
    )
    """`steerlm train-rm` settings (model, pooling, train, ...); `data`, `val_data` and `out` are filled in."""
    ppo: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "command": "ppo",
            "filled": "policy reward_model reward_fn prompts eval_prompts ptx_data out overwrite resume",
        },
    )
    """`steerlm ppo` settings (train, ppo, sampling, ...); `policy`, `reward_model`, `prompts`, `eval_prompts`,
    `ptx_data` and `out` are filled in."""


# ---------------------------------------------------------------- 1. data


def pick_source(candidates: list[str], what: str) -> str | None:
    """The first usable candidate (`formats.first_usable`: an existing path, variables such as `$STEERLM_DATA`
    expanded, or a `hub:` id, read later); None when there are none. UserError when none is usable."""
    if not candidates:
        return None
    return formats.first_usable(candidates, lambda source: None, what=f"{what} source", field=f"data.{what}")[0]


def _raw_rows(source: str) -> list[tuple[int, Any]]:
    if source.startswith("hub:"):
        return [(i, row) for _, i, row in oasst.load_hub_rows(source[4:])]
    return list(read_jsonl(source, on_error=lambda e: None))


def split_oasst(source: str, args: DataArgs, out: Path) -> dict:
    """Split OASST rows (or trees) by tree and write each part in the source's own layout."""
    rows = [row for _, row in _raw_rows(source) if isinstance(row, dict) and row.get("message_tree_id")]
    trees = list(dict.fromkeys(r["message_tree_id"] for r in rows))
    if args.max_trees:
        keep = set(trees[: args.max_trees])
        rows = [r for r in rows if r["message_tree_id"] in keep]
    train, val = preferences.split(rows, args.val_fraction, args.seed, key=lambda r: r["message_tree_id"])
    write_jsonl(out / "oasst_train.jsonl", train)
    write_jsonl(out / "oasst_val.jsonl", val)
    return {"trees": len({r["message_tree_id"] for r in rows}), "train_rows": len(train), "val_rows": len(val)}


def split_hh(source: str, args: DataArgs, out: Path) -> dict:
    """Split HH-RLHF pairs (raw lines) and write each part as {chosen, rejected} JSONL."""
    rows = [row for _, row in _raw_rows(source)]
    if args.max_pairs:
        rows = rows[: args.max_pairs]
    indexed = list(enumerate(rows))
    train, val = preferences.split(indexed, args.val_fraction, args.seed, key=lambda x: x[0])
    write_jsonl(out / "hh_train.jsonl", [r for _, r in train])
    write_jsonl(out / "hh_val.jsonl", [r for _, r in val])
    return {"pairs": len(rows), "train_pairs": len(train), "val_pairs": len(val)}


def make_data(args: DataArgs, out: Path) -> dict:
    """The data stage: splits, demonstrations and prompts (see the module docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    stats: dict = {}
    oasst_src, hh_src = pick_source(args.oasst, "oasst"), pick_source(args.hh, "hh")
    if oasst_src:
        stats["oasst"] = {"source": oasst_src, **split_oasst(oasst_src, args, out)}
    if hh_src:
        stats["hh"] = {"source": hh_src, **split_hh(hh_src, args, out)}
    rng = random.Random(args.seed)
    for split in ("train", "val"):
        demos, prompts, counts = [], [], Counter()
        if oasst_src:
            _, records = preferences.read_source(out / f"oasst_{split}.jsonl", lang=args.lang,
                                                 skip_invalid=args.skip_invalid, stats=counts)  # fmt: skip
            chosen, c = preferences.demonstrations_from_records(records, args.select_by)
            demos += chosen
            counts.update({f"oasst_{k}": v for k, v in c.items()})
            prompts += [p for p, _, _ in preferences.sibling_groups(records).values()]
        if hh_src:
            pairs = hh.read_pairs(out / f"hh_{split}.jsonl", skip_invalid=args.skip_invalid, stats=counts)
            if args.hh_demonstrations:
                demos += preferences.demonstrations_from_hh(pairs)
            prompts += [preferences.comparisons_from_hh([p])[0].prompt for p in pairs]
        rng.shuffle(prompts)  # OASST and HH prompts mixed, so that any prefix of the file has both
        write_records(out / f"{split}.jsonl", demos)
        write_records(out / f"prompts_{split}.jsonl", prompts)
        stats[split] = {"demonstrations": len(demos), "prompts": len(prompts), **dict(counts)}
    if not stats["train"]["demonstrations"]:
        raise UserError("no demonstrations in the training split", field="data")
    write_json(out / "stats.json", stats)
    return stats


# ---------------------------------------------------------------- stages


def _build(module, section: dict, fixed: dict, name: str):
    return config_lib.build(module.Config, {**section, **fixed}, prefix=f"{name}.")


def _sft_metric(r: dict) -> str:
    return f"best val_loss {r['best']:.4f}" if r.get("best") is not None else ""


def _rm_metric(r: dict) -> str:
    m = r.get("best_metrics") or {}
    if "val_accuracy" not in m:
        return ""
    parts = [f"{k.removeprefix('val_accuracy_')} {v:.3f}" for k, v in m.items() if k.startswith("val_accuracy_")]
    return f"held-out pair accuracy {m['val_accuracy']:.3f}" + (f" ({', '.join(parts)})" if parts else "")


def _ppo_metric(r: dict) -> str:
    if r.get("reward_first") is None:
        return ""
    text = f"reward {r['reward_first']:+.3f} -> {r['reward_last']:+.3f}, KL {r['kl_last']:.3f}"
    if r.get("eval_reward_before") is not None:
        text += f"; held-out greedy {r['eval_reward_before']:+.3f} -> {r['eval_reward_after']:+.3f}"
    return text


def main(cfg: Config) -> dict:
    # rlhf is an orchestrator: it runs these stages (their Config and main), the one reason to import stage modules
    from steerlm import ppo, reward, sft

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    config_lib.save(cfg, out)
    results = []

    # 1. data: splits by tree / pair, demonstrations, prompts
    data_dir = out / "data"
    sources = [s for s in (pick_source(cfg.data.oasst, "oasst"), pick_source(cfg.data.hh, "hh")) if s]
    results.append(run_stage("data", data_dir, cfg.data, lambda: make_data(cfg.data, data_dir),
                             inputs=[s for s in sources if not s.startswith("hub:")],
                             metric=lambda r: f"{r['train']['demonstrations']} demonstrations, "
                                              f"{r['train']['prompts']} prompts"))  # fmt: skip
    splits = {k: [str(data_dir / f"{k}_{s}.jsonl") for s in ("train", "val")]
              for k, present in (("oasst", cfg.data.oasst), ("hh", cfg.data.hh)) if present}  # fmt: skip

    # 2. SFT on the demonstrations (plain: no attribute conditioning)
    sft_dir = out / "sft"
    sft_cfg = _build(sft, cfg.sft, {"data": str(data_dir), "out": str(sft_dir), "conditioning": "none",
                                    "overwrite": True}, "sft")  # fmt: skip
    results.append(run_stage("sft", sft_dir, sft_cfg, lambda: sft.main(sft_cfg), inputs=[data_dir],
                             metric=_sft_metric))  # fmt: skip
    policy = str(sft_dir / sft.BEST)

    # 3. reward model: comparisons of the training split, accuracy on the held-out split
    rm_dir = out / "rm"
    rm_fixed = {"data": [v[0] for v in splits.values()], "val_data": [v[1] for v in splits.values()],
                "out": str(rm_dir), "overwrite": True, "skip_invalid": cfg.data.skip_invalid,
                "lang": cfg.data.lang}  # fmt: skip
    rm_cfg = _build(reward, cfg.rm, rm_fixed, "rm")
    results.append(run_stage("rm", rm_dir, rm_cfg, lambda: reward.main(rm_cfg), inputs=[data_dir],
                             metric=_rm_metric))  # fmt: skip

    # 4. PPO from the SFT model against the reward model (PPO-ptx mixes in the demonstrations' LM loss)
    ppo_dir = out / "ppo"
    ppo_cfg = _build(ppo, cfg.ppo, {"policy": policy, "reward_model": str(rm_dir), "reward_fn": "",
                                    "prompts": [str(data_dir / "prompts_train.jsonl")],
                                    "eval_prompts": str(data_dir / "prompts_val.jsonl"),
                                    "ptx_data": [str(data_dir / "train.jsonl")], "out": str(ppo_dir),
                                    "overwrite": True, "resume": False}, "ppo")  # fmt: skip
    results.append(run_stage("ppo", ppo_dir, ppo_cfg, lambda: ppo.main(ppo_cfg), inputs=[sft_dir, rm_dir, data_dir],
                             metric=_ppo_metric))  # fmt: skip

    table = summary_table(results, "rlhf summary")
    print("\n" + table)
    samples_file = ppo_dir / "samples.jsonl"
    if samples_file.exists():
        print("\nanswers before (SFT) and after PPO, greedy, to held-out prompts:")
        for row in [json.loads(x) for x in samples_file.read_text().splitlines() if x.strip()][:3]:
            print(f"\n  prompt: {_short(row['prompt'])}\n  SFT  ({row['reward_before']:+.2f}): {_short(row['before'])}"
                  f"\n  PPO  ({row['reward_after']:+.2f}): {_short(row['after'])}")  # fmt: skip
    summary = {"policy": str(ppo_dir), "sft": policy, "reward_model": str(rm_dir),
               "stages": [r.__dict__ for r in results], "table": table}  # fmt: skip
    write_json(out / "summary.json", summary)
    return summary


def _short(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"
