"""Does a SteerLM model read its attribute line? The model's own attribute read-out, before generating anything.

    steerlm readout --model=runs/quickstart/sft/best --data=runs/quickstart/data
    steerlm readout --model=runs/x/sft/best --data=val.jsonl --attributes=verbosity --examples=40 --out=readout.json

For each held-out answer and each attribute, the answer's log-likelihood is computed under every level of that
attribute (the others at their true levels) and turned into a posterior over the levels by Bayes' rule with a
uniform prior: the model used as its own APM, as GeDi uses class-conditional likelihoods (Krause et al., 2021, §3).
Printed per attribute: Spearman of the expected level against the true level, exact and ±1 accuracy, and the
chance rate 1/L. A model that ignores its attribute line scores chance, whatever its answers look like.

The records need labels on the model's scale (`steerlm prepare` with the model's `levels`, or `steerlm annotate`);
computed attributes (verbosity) are set from each answer's text with the model's own bucket edges.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from steerlm import conditioning
from steerlm import config as config_lib
from steerlm.data.records import read_records, val_records_file
from steerlm.errors import UserError
from steerlm.io import write_json


@dataclass
class Config:
    model: str
    """A SteerLM model folder (from `steerlm sft`, `bootstrap` or `merge`; a LoRA adapter folder works too)."""
    data: str
    """Held-out labelled records: a .jsonl file, or a `steerlm prepare` folder (its val.jsonl is read)."""
    attributes: list[str] = field(default_factory=list)
    """Attributes to read out (default: every attribute of the model's schema the records label)."""
    examples: int = 40
    """Held-out answers read (the records' last labelled answers, in file order); 0: all."""
    max_length: int = 512
    """Tokens per scored sequence (prompt + attribute line + answer; truncated on the right)."""
    batch_size: int = 8
    """Sequences per forward pass (one answer under L levels makes L sequences)."""
    out: str = ""
    """Write the result as JSON here (default: print only)."""
    skip_invalid: bool = False
    """Count and skip malformed records instead of stopping at the first."""

    def __post_init__(self):
        self.attributes = config_lib.split_names(self.attributes)
        if self.examples < 0:
            raise ValueError(f"examples must be >= 0, not {self.examples}")
        if self.max_length < 8 or self.batch_size < 1:
            raise ValueError("max_length must be >= 8 and batch_size >= 1")


def main(cfg: Config) -> dict:
    from steerlm.generator import Generator

    gen = Generator.load(cfg.model)
    if gen.schema is None:
        raise UserError("this model has no attribute schema (plain SFT or a base model): nothing to read out",
                        field="model")  # fmt: skip
    unknown = [n for n in cfg.attributes if n not in gen.schema.names]
    if unknown:
        raise UserError(f"attribute {unknown[0]!r} is not in the model's schema ({', '.join(gen.schema.names)})",
                        field="attributes")  # fmt: skip
    path = val_records_file(cfg.data)
    records = read_records(path, skip_invalid=cfg.skip_invalid)
    conditioning.add_computed_labels(records, gen.computed, gen.schema.levels)
    try:
        items = conditioning.readout_items(
            records,
            gen.schema,
            cfg.attributes or None,
            cfg.examples,
            tokenizer=gen.tokenizer,
            style=gen.template,
            max_length=cfg.max_length,
        )
    except UserError as e:
        raise UserError(f"a label does not fit the model's {gen.schema.levels} levels: {e.reason}", file=str(path),
                        field=e.field) from None  # fmt: skip
    if not items:
        raise UserError("no record has a trained answer labelled with the attributes to read", file=str(path))
    bar = tqdm(total=len(items) * len(cfg.attributes or gen.schema.names), desc="readout")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    result = conditioning.readout(gen.model, gen.tokenizer, items, gen.schema, gen.template, cfg.max_length,
                                  cfg.batch_size, gen.device, progress)  # fmt: skip
    bar.close()
    print(conditioning.format_readout(result))
    report = {"model": cfg.model, "data": str(path), "levels": gen.schema.levels, "attributes": result}
    if cfg.out:
        write_json(Path(cfg.out), report)
    best = max(result.items(), key=lambda kv: kv[1]["accuracy"] - kv[1]["chance"], default=None)
    print(f"readout: {len(items)} answers, {len(result)} attributes"
          + (f"; best above chance: {best[0]} {best[1]['accuracy']:.2f} vs {best[1]['chance']:.2f}" if best else ""))  # fmt: skip
    return report
