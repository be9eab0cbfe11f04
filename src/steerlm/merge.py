"""Merge a LoRA adapter into its base model: a standalone folder that transformers loads without peft.

    steerlm merge --adapter runs/x/sft/best --out runs/x/sft-merged

The adapter folder is what `steerlm sft --train.lora.r=8` writes as best/ (a peft adapter plus steerlm_model.json);
its base model is the one named in adapter_config.json (or steerlm_model.json's `base_model`). The output holds the
merged weights (peft `merge_and_unload`: W + scale * B @ A per adapted layer), the tokenizer, and the same
steerlm_model.json with `lora: false`, so `steerlm generate`, `serve` and plain
`AutoModelForCausalLM.from_pretrained` all load it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from steerlm import config as config_lib
from steerlm import model_card, models
from steerlm.errors import UserError

META = models.MODEL_META


@dataclass
class Config:
    adapter: str
    """LoRA adapter folder (e.g. runs/x/sft/best)."""
    out: str
    """Output folder for the merged model."""
    dtype: str = "fp32"
    """dtype of the merged weights: 'fp32', 'bf16', 'fp16' or 'auto' (the adapter's base model's own)."""
    overwrite: bool = False
    """Replace an existing output folder."""

    def __post_init__(self):
        self.dtype = config_lib.dtype_choice(self.dtype)
        if Path(self.adapter).expanduser().resolve() == Path(self.out).expanduser().resolve():
            raise ValueError("out must differ from the adapter folder")


def merge(adapter: str, dtype=None):
    """(merged model, tokenizer, meta or None) for a LoRA adapter folder."""
    folder = Path(adapter)
    if not (folder / "adapter_config.json").is_file():
        raise UserError("is not a LoRA adapter folder (no adapter_config.json)", file=adapter)
    meta = models.model_meta(folder)
    model, tokenizer = models.load_causal_lm(adapter, dtype=dtype)
    merged = model.merge_and_unload()
    if meta is not None:
        meta = {**meta, "lora": False}
    return merged, tokenizer, meta


def main(cfg: Config) -> dict:
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise UserError("output folder exists; pass --overwrite to replace it", field="out")
    merged, tokenizer, meta = merge(cfg.adapter, cfg.dtype)
    models.save_model(merged, tokenizer, out, META if meta is not None else None, meta)
    config_lib.save(cfg, out)
    # The card tells how the adapter was trained (its run's config and summary), now as a standalone model.
    model_card.write(out, origin=cfg.adapter, notes={"merged from adapter": cfg.adapter})
    n = sum(p.numel() for p in merged.parameters())
    print(f"merge: {cfg.adapter} + base -> {out} ({n / 1e6:.1f}M parameters)")
    return {"out": str(out), "parameters": n, "meta": meta}
