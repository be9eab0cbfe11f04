"""Generation at chosen attribute values from the command line (the model and its decoding: `steerlm.generator`).

    steerlm generate --model runs/x/sft/best --attr quality=9 --attr humor=7 "Tell me about the moon."
    steerlm generate --model runs/x/sft/best --prompts prompts.jsonl --out answers.jsonl --attrs_file attrs.yaml

A model folder written by steerlm carries `steerlm_model.json` (attribute schema, template style, conditioning);
a plain model is used with its chat template and no attributes, which then ignores requested attributes.
Unspecified attributes take the schema defaults (`AttributeSchema.with_defaults`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from steerlm import config as config_lib
from steerlm.data import templates
from steerlm.data.preferences import read_prompts
from steerlm.data.records import ASSISTANT, Record, Turn
from steerlm.errors import UserError
from steerlm.generator import CommandSampling, Generator, load_generator, read_attributes, sampling_from
from steerlm.io import write_jsonl

POSITIONAL = "prompt"


# ---------------------------------------------------------------- the `steerlm generate` command


@dataclass(kw_only=True)
class Config(CommandSampling):
    model: str
    """Model: a steerlm output folder (e.g. runs/x/sft/best), a LoRA adapter folder, a built-in name, a Hugging Face
    folder or hub id."""
    prompt: list[str] = field(default_factory=list)
    """Prompts to answer (positional arguments)."""
    attr: list[str] = field(default_factory=list)
    """Attribute levels as name=level, repeatable (--attr quality=9 --attr humor=7); over --attrs_file."""
    attrs_file: str = ""
    """YAML or JSON file with a mapping of attribute levels (e.g. {quality: 9, toxicity: 0})."""
    prompts: str = ""
    """JSONL file of prompts: strings, {"prompt": ..., "attributes": {...}} objects, or conversation records (the
    last user turn is answered; trailing assistant turns are dropped)."""
    out: str = ""
    """With --prompts: write answers here as JSONL (default: print JSON lines)."""
    system: str | None = None
    """System text for prompt strings (default: NeMo's SteerLM system prompt)."""
    template: str = "auto"
    """Template style: 'nemo', 'chat', or 'auto' (the model's steerlm_model.json, else 'chat')."""
    batch_size: int = 8
    """Prompts generated together."""
    dtype: str = "fp32"
    """Model dtype: 'fp32', 'bf16', 'fp16' or 'auto' (the checkpoint's own)."""
    overwrite: bool = False
    """Replace an existing --out file."""

    def __post_init__(self):
        super().__post_init__()
        self.dtype = config_lib.dtype_choice(self.dtype)
        self.template = config_lib.auto_choice(self.template, "template", templates.STYLES)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {self.batch_size}")
        if not self.prompt and not self.prompts:
            raise ValueError("give a prompt (positional) or --prompts FILE.jsonl")


def main(cfg: Config) -> int:
    levels = read_attributes(cfg.attrs_file, cfg.attr)
    gen = load_generator(cfg)
    if gen.schema is None and (levels or cfg.guidance_scale not in (None, 1.0)):
        print(f"note: {cfg.model} is not attribute-conditioned; attributes and guidance are ignored", file=sys.stderr)
    sampling = sampling_from(cfg, gen)
    if cfg.prompts:
        if cfg.out and Path(cfg.out).exists() and not cfg.overwrite:
            raise UserError("output file exists; pass --overwrite to replace it", file=cfg.out)
        items = read_prompts(cfg.prompts) + [(p, {}, {}) for p in cfg.prompt]
    else:
        items = [(p, {}, {}) for p in cfg.prompt]
    asked, requests = [], []  # what each line names (guidance's 'middle' moves it), and that over the defaults
    for _, attrs, _ in items:
        row = gen.schema.parse(attrs) if isinstance(attrs, str) and gen.schema else attrs
        asked.append({**levels, **(row if isinstance(row, dict) else {})})
        requests.append(gen.resolve_attributes(asked[-1]))
    answers = gen.generate([c for c, _, _ in items], asked, sampling, batch_size=cfg.batch_size)
    if not cfg.prompts:
        print("\n\n".join(answers))
        return 0
    rows = [_output_row(gen, conv, req, extra, answer)
            for (conv, _, extra), req, answer in zip(items, requests, answers, strict=True)]  # fmt: skip
    if cfg.out:
        write_jsonl(cfg.out, rows)
        print(f"generate: {len(rows)} answers -> {cfg.out}")
    else:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    return 0


def _output_row(gen: Generator, conv, levels, extra: dict, answer: str) -> dict:
    if isinstance(conv, Record):  # a record in, the record with its new answer out (ready for `steerlm annotate`)
        label = gen.schema.render(levels) if levels is not None and gen.schema else None
        done = Record(conv.conversations + [Turn(ASSISTANT, answer, label)], conv.system, conv.mask, conv.type,
                      dict(conv.extra))  # fmt: skip
        return {**done.to_json(), "attributes": levels, "answer": answer}
    return {**extra, "prompt": conv, "attributes": levels, "answer": answer}
