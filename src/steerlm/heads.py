"""A backbone read out by a linear head: the regression APM (one output per attribute, SPEC §5.1) and the reward
model (one output, r(x, y), SPEC §6) are both this model, so it and what surrounds it are defined here once and
neither stage imports the other: what they score and the text they read (`scored_conversation`, `plain_text`),
the kind of backbone, the model (`HeadModel`) and the two layouts of its folder (docs/apm.md, docs/rlhf.md):

- **standard** (`layout: sequence-classification`): where the model is exactly a transformers
  `*ForSequenceClassification` (an encoder read through its pooler, as `BertForSequenceClassification`; a causal LM
  read at its last token by a head without bias, as `LlamaForSequenceClassification`), the folder is one, and
  `AutoModelForSequenceClassification` alone computes the same outputs;
- **backbone + head**: everything else (mean or response pooling, the length input, LoRA): the backbone folder
  (`AutoModel`, or a LoRA adapter) and the head's weight and bias in a safetensors file.

What each loaded model adds on top (its folder's names, `load_apm` / `load_rm`, predicting and scoring) is in
`apm_model.py` and `rm_model.py`, which the stages that use the models import.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForSequenceClassification
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

from steerlm import models
from steerlm.data.records import ASSISTANT, DEFAULT_SYSTEM, USER, Record, Turn, record_from_json
from steerlm.errors import UserError

#: Version tag of `plain_text` (and of the final EOS of a causal backbone) stored in model folders, so that a changed
#: rendering cannot silently mismatch old models.
TEXT_FORMAT = "plain-v1"
#: `layout` of a folder saved as a standard `AutoModelForSequenceClassification` model.
SEQ_CLS = "sequence-classification"
#: The pad token added to a causal tokenizer that has no token but EOS to pad with (`pad_apart_from_eos`).
PAD = "<|pad|>"


# ---------------------------------------------------------------- what the model reads


def plain_text(turns: Sequence[Turn]) -> str:
    """The conversation as a head model reads it: `User: ...` / `Assistant: ...` blocks separated by a blank line
    (the system prompt is left out: it is the same boilerplate in every record)."""
    return "\n\n".join(f"{t.role}: {t.value}" for t in turns)


def scored_conversation(item: Any) -> tuple[str, list[Turn]]:
    """(system prompt, turns up to and including the scored answer) of what a head model scores: a Record or a JSON
    record (scored at its last assistant turn; later turns are ignored), a list of Turns ending with the answer, or
    a `(prompt, response)` pair of strings (with the default system prompt). Another type is a TypeError; a
    conversation without an assistant turn is a UserError."""
    if isinstance(item, dict):
        item = record_from_json(item)
    if isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, str) for x in item):
        return DEFAULT_SYSTEM, [Turn(USER, item[0]), Turn(ASSISTANT, item[1])]
    system = DEFAULT_SYSTEM
    if isinstance(item, Record):
        system, turns = item.system, item.conversations
    elif isinstance(item, list) and all(isinstance(t, Turn) for t in item):
        turns = item
    else:
        raise TypeError(
            f"cannot score {type(item).__name__}; expected a Record, a list of Turns or (prompt, response)"
        )
    last = max((i for i, t in enumerate(turns) if t.role == ASSISTANT), default=None)
    if last is None:
        raise UserError("the conversation has no Assistant turn to score", field="conversations")
    return system, turns[: last + 1]


def text_end(backbone: str, tokenizer) -> str:
    """What follows `plain_text`: EOS on a causal backbone (its read-out token, then the same whatever the answer's
    last word), nothing on an encoder (its tokenizer closes the text with [SEP] itself)."""
    return tokenizer.eos_token if backbone == "causal" and tokenizer.eos_token else ""


def tokenize_left(tokenizer, texts: list[str], max_length: int, offsets: bool = False):
    """Token ids of `texts` cut to `max_length` from the left, so that the end of the text (the scored answer) is
    kept and the oldest context goes; with `offsets`, (ids, character offsets) from a fast tokenizer."""
    tokenizer.truncation_side = "left"
    enc = tokenizer(texts, truncation=True, max_length=max_length, return_offsets_mapping=offsets)
    return (enc["input_ids"], enc["offset_mapping"]) if offsets else enc["input_ids"]


# ---------------------------------------------------------------- backbones


def backbone_kind(name: str) -> str:
    """'encoder' or 'causal' for a model name (built-in, folder, adapter folder); hub ids default to causal."""
    if name in models.ENCODER_BUILTINS:
        return "encoder"
    if name in models.CAUSAL_BUILTINS or str(name).endswith(".gguf"):
        return "causal"
    folder = Path(name).expanduser()
    if (folder / "config.json").exists():
        arch = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("architectures") or []
        return "causal" if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in arch) else "encoder"
    if (folder / "adapter_config.json").exists():
        return backbone_kind(models._adapter_base(folder))
    return "causal"


def resolve_pooling(requested: str, backbone: str, base: nn.Module, model_name: str) -> str:
    """The read-out of a head model on `base`: `requested`, or for 'auto' the last token of a causal LM and, on an
    encoder, its pooler where it has one (so that the folder is a standard one, `as_sequence_classifier`), else the
    mean. Raises UserError for 'cls' on a model without a pooler."""
    has_pooler = getattr(models.unwrap(base), "pooler", None) is not None
    pooling = requested
    if requested == "auto":
        pooling = "last" if backbone == "causal" else "cls" if has_pooler else "mean"
    if pooling == "cls" and (backbone != "encoder" or not has_pooler):
        raise UserError(f"{model_name!r} has no pooler for the 'cls' read-out; use mean or last", field="pooling")
    return pooling


def freeze_unused(backbone: nn.Module, pooler_used: bool = False) -> None:
    """Parameters the read-out never touches get no gradient; freeze them so that 'every trainable parameter
    changed' holds (BERT's pooler unless `pooler_used`, an untied LM head)."""
    m = models.unwrap(backbone)
    if getattr(m, "pooler", None) is not None and not pooler_used:
        m.pooler.requires_grad_(False)
    out, inp = getattr(m, "get_output_embeddings", lambda: None)(), m.get_input_embeddings()
    if out is not None and out.weight is not inp.weight:
        out.requires_grad_(False)


def pad_apart_from_eos(tokenizer, backbone: nn.Module) -> None:
    """Give a causal tokenizer that pads with EOS (SmolLM2's does) another pad token: its unk or bos token, else a
    new `PAD` token (the backbone's embeddings grow by one row). A causal head model is read at the final EOS, and
    transformers' sequence-classification models read the rightmost token that is not padding, so the two agree
    only when padding is not EOS. Padding positions are masked, so the outputs do not change."""
    eos = tokenizer.eos_token_id
    if eos is None or tokenizer.pad_token_id != eos:
        return
    for token in (tokenizer.unk_token, tokenizer.bos_token):
        if token is not None and tokenizer.convert_tokens_to_ids(token) != eos:
            tokenizer.pad_token = token
            return
    tokenizer.add_special_tokens({"pad_token": PAD})
    backbone.resize_token_embeddings(len(tokenizer))


# ---------------------------------------------------------------- the model


def length_input(tokens: torch.Tensor) -> torch.Tensor:
    """The length feature: log(1 + response tokens) - 4.6 (0 at ~100 tokens)."""
    return torch.log1p(tokens) - 4.6


class HeadModel(nn.Module):
    """Backbone + one linear output per target: (B, n_outputs), times `scale`.

    `pooling` is the read-out: 'cls' (the encoder's pooler on its first token, as BertForSequenceClassification),
    'mean' over the attended tokens, 'response' (mean over `response_mask`), or 'last' (the last attended token;
    right padding). `layers` (indices into the backbone's `hidden_states`: 0 the embeddings, -1 the last layer's
    output) are averaged before pooling, with equal weights (ELMo's scalar mix, fixed; a Llama-type model's last state
    is after its final norm, the others before it); empty = the last hidden state. The 'cls' pooler reads the last
    layer only, so it takes no `layers`.
    With `length_feature` the head also reads `length_input` of the response's token count. `scale`
    is 1 except for APM folders written before levels were predicted directly (their head gave levels / (L-1))."""

    def __init__(self, backbone: nn.Module, n_outputs: int, pooling: str, length_feature: bool = False,
                 head: nn.Linear | None = None, scale: float = 1.0, bias: bool = True, layers: Sequence[int] = ()):  # fmt: skip
        super().__init__()
        self.backbone, self.pooling, self.length_feature, self.scale = backbone, pooling, length_feature, scale
        self.layers = tuple(layers)
        if self.layers:
            n = models.unwrap(backbone).config.num_hidden_layers + 1
            if any(not -n <= i < n for i in self.layers):
                raise UserError(f"hidden layers {list(self.layers)} outside the backbone's {-n}..{n - 1}",
                                field="hidden_layers")  # fmt: skip
        hidden = models.unwrap(backbone).config.hidden_size
        self.head = head if head is not None else nn.Linear(hidden + int(length_feature), n_outputs, bias=bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, response_length: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        features = self.features(input_ids, attention_mask, response_mask, token_type_ids, response_length)
        return self.head(features) * self.scale

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor | None = None,
                 token_type_ids: torch.Tensor | None = None, response_length: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """What the head reads: the pooled hidden state, plus the length input with `length_feature`; (B, hidden
        [+1]), float32."""
        # `base_model` is the bare transformer (itself for AutoModel backbones), so no vocabulary logits are built.
        trunk = models.unwrap(self.backbone).base_model
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        out = trunk(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=bool(self.layers), **kwargs
        )
        if self.layers:
            hidden = torch.stack([out.hidden_states[i].float() for i in self.layers]).mean(0)
        else:
            hidden = out.last_hidden_state.float()
        if self.pooling == "cls":  # the pooler (dense + tanh on the first token), as BertForSequenceClassification
            pooled = out.pooler_output.float()
        elif self.pooling in ("mean", "response"):
            use = response_mask if self.pooling == "response" and response_mask is not None else attention_mask
            mask = use.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        else:  # last real token (right padding)
            last = attention_mask.sum(1).long() - 1
            pooled = hidden[torch.arange(hidden.size(0), device=hidden.device), last]
        if self.length_feature:
            # log(1 + response tokens), centred on ~100 tokens: the whole response's count where the input gives it
            # ('pair' input keeps only the response's beginning), else the tokens in the input
            n = response_length if response_length is not None else (response_mask if response_mask is not None else attention_mask).sum(1)  # fmt: skip
            pooled = torch.cat([pooled, length_input(n.float()).unsqueeze(-1)], dim=-1)
        return pooled


# ---------------------------------------------------------------- the two folder layouts


def _classifier(seq: nn.Module) -> nn.Linear | None:
    """The output layer of a transformers sequence-classification model when it is one linear layer on the pooled
    state (`classifier`: BERT-like; `score`: decoders), else None (RoBERTa's two-layer head, ...)."""
    return next((getattr(seq, n) for n in ("classifier", "score") if isinstance(getattr(seq, n, None), nn.Linear)),
                None)  # fmt: skip


def as_sequence_classifier(m: HeadModel, backbone: str, tokenizer, labels: Sequence[str]) -> nn.Module | None:
    """`m` as a standard `AutoModelForSequenceClassification` model (eval mode) with one output per name of
    `labels` (`id2label`, `problem_type: regression`) and the same weights, so that transformers alone computes
    the same outputs; None where no transformers class computes what `m` does.

    Standard: an encoder (`backbone` 'encoder') read through its pooler ('cls'), or a causal LM read at its last
    token ('last') by a head without bias, whose tokenizer ends the text with EOS and pads with another token (the
    class reads the rightmost token that is not `pad_token_id`); never with the length input, LoRA, other hidden
    layers or a `scale`."""
    base = m.backbone
    config = base.config
    if (m.length_feature or m.scale != 1.0 or m.layers or base is not models.unwrap(base)
            or config.model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES):  # fmt: skip
        return None
    if m.pooling == "cls":
        if backbone != "encoder" or getattr(base, "pooler", None) is None:
            return None
    elif m.pooling == "last":
        if backbone != "causal" or m.head.bias is not None or tokenizer.eos_token_id in (None, tokenizer.pad_token_id):
            return None
    else:
        return None
    config = type(config).from_dict(config.to_dict())
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {n: i for i, n in enumerate(labels)}
    config.problem_type = "regression"
    config.pad_token_id = tokenizer.pad_token_id
    seq = AutoModelForSequenceClassification.from_config(config)
    out = _classifier(seq)
    if out is None or (m.head.bias is not None and out.bias is None):
        return None
    seq.base_model.load_state_dict(base.state_dict())
    with torch.no_grad():
        out.weight.copy_(m.head.weight)
        if out.bias is not None:  # a head without bias (the reward model's) is one whose bias is 0
            out.bias.copy_(m.head.bias if m.head.bias is not None else torch.zeros_like(out.bias))
    return seq.eval()


def save(m: HeadModel, tokenizer, folder: str | Path, meta_name: str, meta: dict, *, backbone: str,
         labels: Sequence[str], head_file: str) -> None:  # fmt: skip
    """Write `m`, `tokenizer` and the steerlm JSON `meta_name` into `folder` (replaced whole, atomically:
    `models.save_model`): the standard layout (`meta` plus `layout: SEQ_CLS`) where `as_sequence_classifier` gives a
    model, else the backbone (or its LoRA adapter) and the head in `head_file` (`meta` plus `head: head_file`)."""
    seq = as_sequence_classifier(m, backbone, tokenizer, labels)
    if seq is not None:
        models.save_model(seq, tokenizer, folder, meta_name, {**meta, "layout": SEQ_CLS, "head": None})
        return
    models.save_model(m.backbone, tokenizer, folder, meta_name, {**meta, "head": head_file})
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in m.head.state_dict().items()}, str(Path(folder) / head_file)
    )


def load(path: str | Path, meta: dict, head_file: str, device: torch.device, *, length_feature: bool = False,
         scale: float = 1.0) -> tuple[HeadModel, object]:  # fmt: skip
    """(model in eval mode on `device`, tokenizer) of a folder written by `save`, or by earlier versions (backbone +
    head, with no `layout` in `meta`; a head with a bias or without). `meta` is the folder's steerlm JSON: its
    `pooling` (default 'mean') and `head` (default `head_file`) are read. A LoRA backbone is merged: the loaded
    model scores, it does not train. A missing head file is a UserError."""
    path = Path(path)
    pooling, layers = meta.get("pooling") or "mean", meta.get("hidden_layers") or ()
    if meta.get("layout") == SEQ_CLS:
        with models._folder_errors(str(path)):
            seq = AutoModelForSequenceClassification.from_pretrained(str(path))
        model = HeadModel(seq.base_model, seq.config.num_labels, pooling, head=_classifier(seq))
        tokenizer = models.load_tokenizer(str(path))
    else:
        backbone, tokenizer = models.load_encoder(str(path), device=device)
        if hasattr(backbone, "merge_and_unload"):
            backbone = backbone.merge_and_unload()
        file = path / (meta.get("head") or head_file)
        if not file.exists():
            raise UserError(f"missing the head {file.name}", file=str(path))
        state = load_file(str(file))
        n_out, n_in = state["weight"].shape
        head = nn.Linear(n_in, n_out, bias="bias" in state)
        head.load_state_dict(state)
        model = HeadModel(backbone, n_out, pooling, length_feature, head=head, scale=scale, layers=layers)
    return model.to(device).eval(), tokenizer
