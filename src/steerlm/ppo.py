"""`steerlm ppo`: PPO (and PPO-ptx) against a reward model, the RLHF baseline's third step (InstructGPT, SPEC §6).

    steerlm ppo --policy runs/rlhf/sft/best --reward_model runs/rlhf/rm --prompts runs/rlhf/data/prompts_train.jsonl \\
        --out runs/ppo --train.lora.r=8 --train.lr=0.0001 --train.max_steps=20
    steerlm ppo ... --ppo.ptx_coef=1.0 --ptx_data runs/rlhf/data/train.jsonl        # PPO-ptx

One step:
1. rollout: sample answers to `train.batch_size` prompts with the policy (the shared `generator.Generator` loop);
2. score: the reward model's r(x, y) (or a scripted reward function) for each answer;
3. evaluate the sampled tokens: log π (policy), log π_ref (the frozen SFT model: a copy, or with LoRA the same
   weights with the adapter disabled) and values V (a linear value head on the policy's last hidden state);
4. per-token reward r_t = -β·(log π - log π_ref), plus r(x, y) at the answer's last token (SPEC §6); advantages by
   GAE (γ = 1, λ = 0.95), whitened over the batch;
5. `ppo.epochs` passes over the rollouts in mini-batches: clipped policy loss, clipped value loss, and with
   `ppo.ptx_coef` > 0 the language-modelling loss on SFT/pretraining text (PPO-ptx);
6. log reward, KL, entropy, clip fraction, value loss and answer length (metrics.jsonl and one fixed-format line);
   optionally adapt β towards a KL target (Ziegler et al. 2019).

The output folder holds the trained policy as a standalone model folder (LoRA merged; `steerlm_model.json`
copied from the SFT model), `metrics.jsonl`, `curves.png`, `samples.jsonl` (greedy answers to a few prompts before
and after, with their rewards), `config.yaml`, and while training a resumable `checkpoint/`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from steerlm import conditioning, model_card, models, tracking, train
from steerlm import config as config_lib
from steerlm.attributes import AttributeSchema
from steerlm.config import TrainArgs
from steerlm.data import invariants, preferences, templates
from steerlm.data.collate import collate_lm, pad, supports_logits_to_keep
from steerlm.data.records import Record, Turn, read_records
from steerlm.errors import UserError
from steerlm.generator import META, Generator, SamplingArgs
from steerlm.io import write_json, write_jsonl

#: A scripted reward: (prompts, answers) -> one float per answer.
RewardFn = Callable[[list[Record], list[str]], list[float]]
CHECKPOINT_FILE = "state.pt"


@dataclass
class PPOTrainArgs(TrainArgs):
    """TrainArgs as PPO reads them: one step = one rollout batch and its updates (`grad_accum` and `eval_every` are
    not used: each mini-batch is one optimiser step, and the held-out answers are scored at the start and end)."""

    epochs: float = 1.0
    """Passes over the prompt set (used when max_steps is 0)."""
    max_steps: int = 20
    """PPO steps (rollout + updates); 0 derives them from epochs over the prompts."""
    lr: float = 1e-5
    """Peak learning rate (full fine-tuning ~1e-5; LoRA ~1e-4)."""
    warmup_ratio: float = 0.0
    """Fraction of the optimiser steps of linear warm-up."""
    schedule: Literal["constant", "cosine"] = "constant"
    """Learning rate after warm-up: 'constant' (a short PPO run keeps learning to its last step) or 'cosine' decay
    to zero."""
    batch_size: int = 8
    """Prompts (= rollouts) per PPO step."""
    max_length: int = 384
    """Longest prompt in tokens; longer prompts are left out (cutting would lose the template's header)."""
    log_every: int = 1
    """Print the metrics line every N steps (every step is written to metrics.jsonl)."""
    checkpoint_every: int = 10
    """Save a resumable checkpoint every N PPO steps (and at the end)."""


@dataclass
class PPOArgs:
    """The PPO algorithm's own settings (InstructGPT / Ziegler et al. defaults where they apply)."""

    epochs: int = 4
    """Passes over each rollout batch."""
    mini_batch_size: int = 4
    """Rollouts per gradient step."""
    clip_range: float = 0.2
    """ε of the clipped policy ratio."""
    value_clip_range: float = 0.2
    """How far a value prediction may move from its rollout-time value before its loss is clipped."""
    vf_coef: float = 0.1
    """Weight of the value loss (the value head shares the policy's trunk)."""
    kl_coef: float = 0.05
    """β: weight of the per-token KL penalty log π - log π_ref (InstructGPT: 0.02)."""
    adaptive_kl: bool = False
    """Adapt β so that the KL per answer approaches `kl_target` (proportional controller, Ziegler et al. 2019)."""
    kl_target: float = 6.0
    """Target KL per answer (nats) of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon of the adaptive controller, in rollouts."""
    gamma: float = 1.0
    """Discount (SPEC §6: 1)."""
    lam: float = 0.95
    """GAE λ (SPEC §6: 0.95)."""
    whiten_advantages: bool = True
    """Normalise advantages to mean 0, variance 1 over each rollout batch."""
    reward_clip: float = 0.0
    """Clip the reward model's score to [-c, c] (0: no clipping)."""
    ptx_coef: float = 0.0
    """γ_ptx of PPO-ptx: weight of the language-modelling loss on `ptx_data` (0: plain PPO; InstructGPT: 27.8 with
    pretraining data)."""
    ptx_batch_size: int = 4
    """SFT/pretraining sequences per gradient step for the ptx loss."""

    def __post_init__(self):
        for name in ("epochs", "mini_batch_size", "ptx_batch_size", "kl_horizon"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)}")
        for name in ("clip_range", "value_clip_range", "kl_target"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        for name in ("vf_coef", "kl_coef", "ptx_coef", "reward_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)}")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ValueError("gamma and lam must be in [0, 1]")


def _rollout_sampling() -> SamplingArgs:
    # Plain sampling from π (temperature 1, no top-k/top-p), so that the rollouts are on-policy for the PPO ratio.
    return SamplingArgs(max_new_tokens=64, temperature=1.0, top_k=0, top_p=1.0)


@dataclass
class Config:
    policy: str
    """The SFT model to start from (a steerlm model folder, LoRA adapter folder, built-in name or HF folder)."""
    prompts: list[str] = field(default_factory=list)
    """Training prompt files: JSONL of strings, {"prompt"}, {"turns"} or records (cut after the last User turn), or
    HH-RLHF / OASST files (their prompts)."""
    reward_model: str = ""
    """Reward-model folder written by `steerlm train-rm`."""
    reward_fn: str = ""
    """Instead of a reward model: a scripted reward `module:function` taking (prompts: list[Record], answers:
    list[str]) and returning one float per answer."""
    out: str = "runs/ppo"
    """Output folder."""
    ptx_data: list[str] = field(default_factory=list)
    """Conversation records (e.g. the SFT demonstrations) for the PPO-ptx language-modelling loss."""
    eval_prompts: str = ""
    """Prompts answered greedily before and after training (samples.jsonl); default: the first training prompts."""
    samples: int = 8
    """How many such prompts."""
    max_prompts: int = 0
    """Use at most this many training prompts (0: all)."""
    template: str = "auto"
    """Template style: 'nemo', 'chat', or 'auto' (the policy's steerlm_model.json, else 'chat')."""
    overwrite: bool = False
    """Replace an existing output folder."""
    resume: bool = False
    """Continue an interrupted run from its last checkpoint."""
    train: PPOTrainArgs = field(default_factory=PPOTrainArgs)
    """Optimisation settings: train.max_steps PPO steps of train.batch_size rollouts; train.lora for LoRA."""
    ppo: PPOArgs = field(default_factory=PPOArgs)
    """PPO settings."""
    sampling: SamplingArgs = field(default_factory=_rollout_sampling)
    """Rollout sampling (keep temperature 1, top_k 0, top_p 1 for on-policy rollouts); seed is set per step."""

    def __post_init__(self):
        if self.reward_model and self.reward_fn:
            raise ValueError("give one of reward_model (a folder) and reward_fn (module:function), not both")
        if self.overwrite and self.resume:
            raise ValueError("choose one of overwrite and resume")
        if self.samples < 0 or self.max_prompts < 0:
            raise ValueError("samples and max_prompts must be >= 0")
        if self.ppo.ptx_coef > 0 and not self.ptx_data:
            raise ValueError("ppo.ptx_coef > 0 needs ptx_data (SFT or pretraining conversation records)")
        self.template = config_lib.auto_choice(self.template, "template", templates.STYLES)


# ---------------------------------------------------------------- the math of one PPO step (SPEC §6)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def token_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(rewards, kl) per answer token: r_t = -β·(log π(y_t) - log π_ref(y_t)), and the score r(x, y) added at the
    answer's last token (SPEC §6). Answers are left-aligned in the (B, T) tensors; `mask` marks real tokens."""
    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    last = mask.sum(1).long() - 1
    rows = torch.arange(len(scores), device=scores.device)
    rewards[rows, last] += scores
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(advantages, returns) by generalised advantage estimation over left-aligned answers:
    δ_t = r_t + γ·V_{t+1} - V_t (V after the last token is 0), A_t = δ_t + γλ·A_{t+1}, returns = A + V."""
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        nxt = mask[:, t + 1] if t + 1 < T else torch.zeros_like(mask[:, 0])
        next_value = values[:, t + 1] * nxt if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running * nxt
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def ppo_losses(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, values: torch.Tensor,
               old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_range: float,
               value_clip_range: float) -> dict[str, torch.Tensor]:  # fmt: skip
    """Clipped surrogate policy loss and clipped value loss (Schulman et al. 2017), token-averaged."""
    ratio = torch.exp(logp - old_logp)
    pg = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))
    v_clipped = old_values + (values - old_values).clamp(-value_clip_range, value_clip_range)
    vf = 0.5 * torch.max((values - returns) ** 2, (v_clipped - returns) ** 2)
    return {
        "policy_loss": masked_mean(pg, mask),
        "value_loss": masked_mean(vf, mask),
        "clip_frac": masked_mean(((ratio - 1).abs() > clip_range).float(), mask).detach(),
        "approx_kl": masked_mean(0.5 * (logp - old_logp) ** 2, mask).detach(),
    }


class KLController:
    """β, fixed or adaptive (Ziegler et al.): after n rollouts, β ← β·(1 + clip(KL/target - 1, ±0.2)·n/horizon)."""

    def __init__(self, value: float, target: float, horizon: int, adaptive: bool):
        self.value, self.target, self.horizon, self.adaptive = value, target, horizon, adaptive

    def update(self, kl: float, n: int) -> None:
        if self.adaptive:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n / self.horizon


# ---------------------------------------------------------------- policy, reference and value head


class ValueHead(nn.Module):
    """V(s_t): a linear read-out of the policy's last hidden state, starting at 0 everywhere."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


#: The value head beside a finished policy (safetensors: tensors only, nothing executed when read).
VALUE_HEAD = "value_head.safetensors"
#: What earlier versions wrote instead (a pickled state dict); `load_value_head` still reads it.
LEGACY_VALUE_HEAD = "value_head.pt"


def load_value_head(folder: str | Path) -> ValueHead:
    """The value head saved beside a PPO policy: `value_head.safetensors`, or an older folder's `value_head.pt`
    (read with `weights_only=True`, so it can hold tensors only). A folder with neither is a UserError."""
    folder = Path(folder)
    if (folder / VALUE_HEAD).exists():
        state = load_file(str(folder / VALUE_HEAD))
    elif (folder / LEGACY_VALUE_HEAD).exists():
        state = torch.load(folder / LEGACY_VALUE_HEAD, map_location="cpu", weights_only=True)
    else:
        raise UserError(f"no {VALUE_HEAD} (nor an older {LEGACY_VALUE_HEAD})", file=str(folder))
    head = ValueHead(state["linear.weight"].shape[1])
    head.load_state_dict(state)
    return head


@dataclass
class Batch:
    """Rollouts as tensors: sequences (prompt + answer, right-padded) and answer-aligned (B, T) views."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    """(B, T) index of the logits that predict answer token t (prompt length - 1 + t)."""
    tokens: torch.Tensor
    """(B, T) answer tokens."""
    mask: torch.Tensor
    """(B, T) 1.0 on real answer tokens."""

    def select(self, idx: torch.Tensor) -> Batch:
        return Batch(*(getattr(self, f.name)[idx] for f in dataclasses.fields(self)))


def make_batch(prompts: list[list[int]], answers: list[list[int]], pad_id: int, device) -> Batch:
    seqs = [p + a for p, a in zip(prompts, answers, strict=True)]
    T = max(len(a) for a in answers)
    positions = [[len(p) - 1 + min(t, len(a) - 1) for t in range(T)] for p, a in zip(prompts, answers, strict=True)]
    return Batch(
        pad(seqs, pad_id).to(device),
        pad([[1] * len(s) for s in seqs], 0).to(device),
        torch.tensor(positions, dtype=torch.long, device=device),
        pad(answers, pad_id).to(device),
        pad([[1] * len(a) for a in answers], 0).to(device).float(),
    )


def evaluate_tokens(model: nn.Module, batch: Batch, value_head: ValueHead | None = None, temperature: float = 1.0):
    """(log π of each answer token, entropy per position, values or None), all (B, T)."""
    # the LM head on the answer positions only, where the model takes per-row positions (no (B, L, V) tensor)
    keep = supports_logits_to_keep(model, per_row=True)
    kept = {"logits_to_keep": batch.positions} if keep else {}
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                output_hidden_states=value_head is not None, **kept)  # fmt: skip
    rows = torch.arange(batch.input_ids.shape[0], device=batch.input_ids.device)[:, None]
    logits = (out.logits if keep else out.logits[rows, batch.positions]).float()  # (B, T, V)
    if temperature != 1.0:
        logits = logits / temperature
    logprobs = F.log_softmax(logits, dim=-1)
    logp = logprobs.gather(-1, batch.tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    values = value_head(out.hidden_states[-1][rows, batch.positions]) if value_head is not None else None
    return logp, entropy, values


# ---------------------------------------------------------------- inputs


def load_reward(cfg: Config, device) -> tuple[RewardFn, str]:
    """The reward source: a reward-model folder, or a scripted `module:function`."""
    if cfg.reward_model:
        from steerlm.rm_model import load_rm

        rm = load_rm(cfg.reward_model, device=device)

        def score(prompts: list[Record], answers: list[str]) -> list[float]:
            return rm.score([preferences.with_answer(p, a) for p, a in zip(prompts, answers, strict=True)])

        return score, f"reward model {cfg.reward_model}"
    module, _, name = cfg.reward_fn.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise UserError(
            f"cannot import {cfg.reward_fn!r} ({e}); expected module:function", field="reward_fn"
        ) from None
    return fn, f"reward function {cfg.reward_fn}"


def load_policy(cfg: Config, device):
    """(policy, reference copy, tokenizer, meta): the SFT model with new LoRA adapters (the reference is then the
    same model with its adapter disabled, so the copy is None) or with all weights trainable beside a frozen copy
    of π_SFT."""
    folder = Path(cfg.policy)
    meta = models.model_meta(folder) or {}
    model, tokenizer = models.load_causal_lm(cfg.policy, device=device)
    if hasattr(model, "merge_and_unload"):  # a LoRA SFT model: its merged weights are π_SFT
        model = model.merge_and_unload()
    if cfg.train.lora.enabled:
        policy = models.apply_lora(model, cfg.train.lora)
        reference = None  # π_SFT = the same weights with the adapter disabled (peft's disable_adapter)
    else:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
        policy = model.requires_grad_(True)
    return policy.eval(), reference, tokenizer, meta


class Reference:
    """log π_ref: the frozen copy, or the LoRA policy with its adapter switched off."""

    def __init__(self, policy: nn.Module, copy_: nn.Module | None):
        self.policy, self.copy = policy, copy_

    def model(self):
        return self.copy if self.copy is not None else self.policy

    def context(self):
        return self.policy.disable_adapter() if self.copy is None else contextlib.nullcontext()


def make_generator(model, tokenizer, meta: dict, template: str) -> Generator:
    attrs = meta.get("attributes")
    schema = AttributeSchema.from_dict(attrs) if attrs else None
    conditioning = meta.get("conditioning", "attributes" if schema else "none")
    return Generator(model, tokenizer, schema=schema, template=template or meta.get("template", "chat"),
                     conditioning=conditioning)  # fmt: skip


def read_prompt_files(paths: Sequence[str]) -> list[Record]:
    prompts = []
    for path in paths:
        prompts += [preferences.prompt_record(conv) for conv, _, _ in preferences.read_prompts(path)]
    return prompts


def ptx_examples(paths: Sequence[str], tokenizer, gen: Generator, max_length: int) -> list[dict]:
    """SFT records encoded as the policy was trained (labels dropped for an unconditioned model)."""
    out = []
    for path in paths:
        for r in read_records(path):
            if gen.schema is None:
                r = Record([Turn(t.role, t.value) for t in r.conversations], r.system, r.mask, r.type, r.extra)
            enc = templates.encode(r, tokenizer, gen.template, max_length)
            if enc is not None:
                out.append(enc)
    if not out:
        raise UserError("no trainable text in the ptx data", file=str(paths[0]))
    return out


# ---------------------------------------------------------------- rollouts


def rollout(gen: Generator, prompt_ids: list[list[int]], sampling: SamplingArgs):
    """Sample one answer per prompt. Returns (answer token ids with the end-of-answer token, answer texts)."""
    eos = gen.tokenizer.eos_token_id
    stops = gen.stop_strings(sampling)
    answers, texts = [], []
    for g in gen.generate_ids(prompt_ids, sampling, batch_size=len(prompt_ids)):
        tokens = list(g.token_ids)
        raw = gen.tokenizer.decode(tokens, skip_special_tokens=False)
        if g.finish_reason == "stop" and not any(s in raw for s in stops) and eos is not None:
            # The loop leaves out the end token that stopped it (generate.Generation); it is an action the policy
            # took, so it is put back (EOS; the loop may also stop on another special token, which is rare).
            tokens.append(eos)
        if not tokens:
            tokens = [eos if eos is not None else gen.pad_id]
        answers.append(tokens)
        texts.append(g.text)
    return answers, texts


def greedy_answers(
    gen: Generator, prompts: list[Record], max_new_tokens: int, reference: Reference | None = None
) -> list[str]:
    sampling = SamplingArgs(max_new_tokens=max_new_tokens, greedy=True)
    if reference is None:
        return gen.generate(prompts, None, sampling, batch_size=8)
    ref_gen = gen
    if reference.copy is not None:
        ref_gen = Generator(reference.copy, gen.tokenizer, schema=gen.schema, template=gen.template,
                            conditioning=gen.conditioning)  # fmt: skip
    with reference.context():
        return ref_gen.generate(prompts, None, sampling, batch_size=8)


# ---------------------------------------------------------------- logging


#: (metric, label, format) of the fixed-format line.
LOGGED = (
    ("reward", "reward", "+.4f"),
    ("kl", "kl", ".4f"),
    ("entropy", "entropy", ".3f"),
    ("clip_frac", "clip", ".3f"),
    ("value_loss", "vloss", ".4f"),
    ("ptx_loss", "ptx", ".4f"),
    ("response_length", "len", ".1f"),
    ("kl_coef", "beta", ".4f"),
    ("seconds", "time", ".1f"),
)


def log_line(step: int, total: int, m: dict) -> str:
    """The fixed-format PPO progress line."""
    parts = [f"step {step}/{total}"]
    for key, label, fmt in LOGGED:
        if key in m:
            parts.append(f"{label} {m[key]:{fmt}}{'s' if key == 'seconds' else ''}")
    return " | ".join(parts)


PLOTTED = (
    ("reward", "mean reward r(x, y)"),
    ("kl", "KL(π || π_SFT) per answer"),
    ("entropy", "entropy per token"),
    ("clip_frac", "clip fraction"),
    ("value_loss", "value loss"),
    ("response_length", "answer length (tokens)"),
)


def plot_curves(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    steps = [r["step"] for r in rows]
    for ax, (key, title) in zip(axes.flat, PLOTTED, strict=True):
        ax.plot(steps, [r.get(key, float("nan")) for r in rows], marker="o", markersize=2.5)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- checkpoints


def _trainable_state(policy: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in policy.named_parameters() if p.requires_grad}


def save_checkpoint(out: Path, state: dict) -> None:
    """Write `checkpoint/state.pt` atomically (a tmp folder renamed into place; the old one removed after)."""
    tmp, final, old = out / ".checkpoint.tmp", out / train.CHECKPOINT, out / ".checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(state, tmp / CHECKPOINT_FILE)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(out: Path) -> Path | None:
    for cand in (out / train.CHECKPOINT, out / ".checkpoint.old"):
        if (cand / CHECKPOINT_FILE).exists():
            return cand / CHECKPOINT_FILE
    return None


# ---------------------------------------------------------------- the loop


def main(cfg: Config, reward_fn: RewardFn | None = None) -> dict:
    """Run PPO; `reward_fn` (for tests and scripts) replaces the configured reward source."""
    start = time.time()
    out = Path(cfg.out)
    if train.prepare_output(
        cfg.out,
        resume=cfg.resume,
        overwrite=cfg.overwrite,
        meta_name=META,
        what="PPO",
        has_checkpoint=lambda o: find_checkpoint(o) is not None,
    ):
        print(f"ppo: {out} is already complete (nothing to resume)")
        return json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    dev = models.device()
    torch.manual_seed(cfg.train.seed)
    targs, pargs = cfg.train, cfg.ppo

    # 0. models, reward source, prompts
    policy, ref_copy, tokenizer, meta = load_policy(cfg, dev)
    reference = Reference(policy, ref_copy)
    gen = make_generator(policy, tokenizer, meta, config_lib.unless_auto(cfg.template))
    hidden = models.unwrap(policy).config.hidden_size
    value_head = ValueHead(hidden).to(dev)
    if reward_fn is not None:
        source = "reward function (given)"
    elif not cfg.reward_model and not cfg.reward_fn:
        raise UserError("no reward source: give --reward_model FOLDER or --reward_fn module:function")
    else:
        reward_fn, source = load_reward(cfg, dev)
    all_prompts = read_prompt_files(cfg.prompts)
    prompt_ids, prompts, too_long = [], [], 0
    # A prompt must leave the policy's context room for the answer it is rewarded for (the shared check; counted).
    context = int(getattr(models.unwrap(policy).config, "max_position_embeddings", 0) or 0) or None
    no_room = invariants.Rows()
    for p in all_prompts:
        ids = gen.prompt_ids(p)
        if len(ids) > targs.max_length:
            too_long += 1
            continue
        if not no_room.keep(invariants.no_room(len(ids), context, cfg.sampling.max_new_tokens)):
            continue
        prompts.append(p)
        prompt_ids.append(ids)
    if cfg.max_prompts:
        prompts, prompt_ids = prompts[: cfg.max_prompts], prompt_ids[: cfg.max_prompts]
    if not prompts:
        raise UserError(f"no prompts of at most train.max_length={targs.max_length} tokens that leave "
                        f"sampling.max_new_tokens={cfg.sampling.max_new_tokens} of the policy's context ({context})",
                        field="prompts")  # fmt: skip
    eval_prompts = read_prompt_files([cfg.eval_prompts]) if cfg.eval_prompts else prompts
    eval_prompts = eval_prompts[: cfg.samples]
    ptx = ptx_examples(cfg.ptx_data, tokenizer, gen, targs.max_length) if pargs.ptx_coef > 0 else []
    per_epoch = math.ceil(len(prompts) / targs.batch_size)
    total = targs.max_steps if targs.max_steps > 0 else max(1, math.ceil(per_epoch * targs.epochs))
    mb_per_epoch = math.ceil(targs.batch_size / pargs.mini_batch_size)
    updates = total * pargs.epochs * mb_per_epoch
    print(f"ppo: policy {cfg.policy} ({'LoRA r=' + str(targs.lora.r) if targs.lora.enabled else 'all weights'}, "
          f"{gen.template} template); {source}; {len(prompts)} prompts ({too_long} longer than {targs.max_length} "
          f"tokens left out, {no_room.counts[invariants.NO_ROOM]} with no room for an answer); {total} steps x {targs.batch_size} rollouts, {pargs.epochs} epochs of "
          f"{mb_per_epoch} mini-batches; β {pargs.kl_coef}{' adaptive' if pargs.adaptive_kl else ''}"
          f"{f'; ptx {pargs.ptx_coef} on {len(ptx)} sequences' if ptx else ''}", flush=True)  # fmt: skip

    params = [p for p in policy.parameters() if p.requires_grad] + list(value_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=targs.lr, weight_decay=targs.weight_decay)
    warmup = int(targs.warmup_ratio * updates)
    if targs.schedule == "cosine":
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, updates)
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
    kl_ctl = KLController(pargs.kl_coef, pargs.kl_target, pargs.kl_horizon, pargs.adaptive_kl)

    # 1. resume, or record the SFT model's answers before training
    step = 0
    ckpt = find_checkpoint(out) if cfg.resume else None
    out.mkdir(parents=True, exist_ok=True)
    if ckpt is not None:
        state = torch.load(ckpt, map_location=dev, weights_only=False)
        named = dict(policy.named_parameters())
        with torch.no_grad():
            for n, t in state["trainable"].items():
                named[n].copy_(t)
        value_head.load_state_dict(state["value_head"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        kl_ctl.value, step = state["kl_coef"], state["step"]
        print(f"ppo: resuming from step {step}", flush=True)
    config_lib.save(cfg, out)
    trackers = tracking.start(targs.report_to, out, "ppo", dataclasses.asdict(targs))
    log = train.MetricsLog(out / train.METRICS, step if ckpt is not None else None, trackers=trackers)
    before_file = out / "samples_before.jsonl"
    if eval_prompts and not before_file.exists():
        before = greedy_answers(gen, eval_prompts, cfg.sampling.max_new_tokens, reference)
        write_jsonl(before_file, [{"answer": a, "reward": r} for a, r in
                                  zip(before, reward_fn(eval_prompts, before), strict=True)])  # fmt: skip

    # 2. PPO steps
    pad_id = gen.pad_id
    while step < total:
        t0 = time.time()
        epoch, at = divmod(step, per_epoch)
        order = train.batch_plan(len(prompts), targs.batch_size, targs.seed, epoch)[at]
        batch_prompts, batch_ids = [prompts[i] for i in order], [prompt_ids[i] for i in order]
        # 2a. rollouts (seeded by step, so a resumed run samples what the uninterrupted one would)
        sampling = dataclasses.replace(cfg.sampling, seed=targs.seed * 100_003 + step)
        answers, texts = rollout(gen, batch_ids, sampling)
        scores = torch.tensor(reward_fn(batch_prompts, texts), dtype=torch.float32, device=dev)
        if pargs.reward_clip > 0:
            scores = scores.clamp(-pargs.reward_clip, pargs.reward_clip)
        batch = make_batch(batch_ids, answers, pad_id, dev)
        # 2b. log π, log π_ref and V of the sampled tokens; per-token rewards and advantages
        with torch.no_grad():
            old_logp, entropy, old_values = evaluate_tokens(policy, batch, value_head, sampling.temperature)
            with reference.context():
                ref_logp, _, _ = evaluate_tokens(reference.model(), batch, None, sampling.temperature)
            rewards, kl = token_rewards(scores, old_logp, ref_logp, batch.mask, kl_ctl.value)
            advantages, returns = gae(rewards, old_values, batch.mask, pargs.gamma, pargs.lam)
            if pargs.whiten_advantages:
                advantages = masked_whiten(advantages, batch.mask)
        # 2c. PPO epochs over mini-batches (+ the ptx language-modelling loss)
        stats: dict[str, list[float]] = {}
        rng = random.Random(targs.seed * 7919 + step)
        n = len(answers)
        for ppo_epoch in range(pargs.epochs):
            perm = list(range(n))
            rng.shuffle(perm)
            for k in range(0, n, pargs.mini_batch_size):
                idx = torch.tensor(perm[k : k + pargs.mini_batch_size], device=dev)
                mb = batch.select(idx)
                logp, _, values = evaluate_tokens(policy, mb, value_head, sampling.temperature)
                losses = ppo_losses(logp, old_logp[idx], advantages[idx], values, old_values[idx], returns[idx],
                                    mb.mask, pargs.clip_range, pargs.value_clip_range)  # fmt: skip
                loss = losses["policy_loss"] + pargs.vf_coef * losses["value_loss"]
                if ptx:
                    update = (step * pargs.epochs + ppo_epoch) * mb_per_epoch + k // pargs.mini_batch_size
                    chosen = [ptx[(update * pargs.ptx_batch_size + j) % len(ptx)] for j in range(pargs.ptx_batch_size)]
                    # SFT's loss (SPEC §4 masks, mean per trained token), the one definition of the LM loss
                    ptx_batch = {name: t.to(dev) for name, t in collate_lm(chosen, pad_id).items()}
                    losses["ptx_loss"] = conditioning.conditioned_lm_loss(policy, ptx_batch)[0]
                    loss = loss + pargs.ptx_coef * losses["ptx_loss"]
                optimizer.zero_grad()
                loss.backward()
                if targs.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, targs.max_grad_norm)
                optimizer.step()
                scheduler.step()
                for key, v in losses.items():
                    stats.setdefault(key, []).append(float(v.detach()))
        # 2d. β update, metrics, checkpoint
        mean_kl = float(kl.sum(1).mean())
        row = {
            "step": step + 1,
            "reward": float(scores.mean()),
            "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
            "kl": mean_kl,
            "kl_coef": kl_ctl.value,
            "non_score_reward": float((-kl_ctl.value * kl).sum(1).mean()),
            "entropy": float(masked_mean(entropy, batch.mask)),
            "response_length": float(batch.mask.sum(1).mean()),
            **{k: sum(v) / len(v) for k, v in stats.items()},
            "lr": scheduler.get_last_lr()[0],
            "seconds": time.time() - t0,
        }
        kl_ctl.update(mean_kl, n)
        step += 1
        log.write(row)
        if step % targs.log_every == 0 or step == total:
            print(log_line(step, total, row), flush=True)
        if step % targs.checkpoint_every == 0 or step == total:
            save_checkpoint(out, {"step": step, "trainable": _trainable_state(policy), "kl_coef": kl_ctl.value,
                                  "value_head": value_head.state_dict(), "optimizer": optimizer.state_dict(),
                                  "scheduler": scheduler.state_dict()})  # fmt: skip

    # 3. answers after training, curves, and the policy as a standalone model folder
    log.close()
    rows = [json.loads(x) for x in (out / train.METRICS).read_text().splitlines() if x.strip()]
    plot_curves(rows, out / "curves.png")
    samples = []
    if eval_prompts:
        after = greedy_answers(gen, eval_prompts, cfg.sampling.max_new_tokens)
        after_rewards = reward_fn(eval_prompts, after)
        before_rows = [json.loads(x) for x in before_file.read_text().splitlines() if x.strip()]
        for p, b, a, r in zip(eval_prompts, before_rows, after, after_rewards, strict=True):
            samples.append({"prompt": p.conversations[-1].value, "before": b["answer"], "reward_before": b["reward"],
                            "after": a, "reward_after": r})  # fmt: skip
        write_jsonl(out / "samples.jsonl", samples)
    final = models.unwrap(policy.merge_and_unload()) if targs.lora.enabled else policy
    staging = out / ".policy.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    out_meta = {"attributes": meta.get("attributes"), "template": gen.template, "conditioning": gen.conditioning,
                "base_model": cfg.policy, "lora": False, "rlhf": "ppo"}  # fmt: skip
    models.save_model(final, tokenizer, staging, META, out_meta)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in value_head.state_dict().items()}, str(staging / VALUE_HEAD)
    )
    models.publish_into(staging, out, META)
    shutil.rmtree(out / train.CHECKPOINT, ignore_errors=True)

    def mean(xs):
        return sum(xs) / len(xs) if xs else None

    summary = {
        "steps": step,
        "first": rows[0] if rows else {},
        "last": rows[-1] if rows else {},
        "reward_first": mean([r["reward"] for r in rows[:3]]),
        "reward_last": mean([r["reward"] for r in rows[-3:]]),
        "kl_last": rows[-1]["kl"] if rows else None,
        "eval_reward_before": mean([s["reward_before"] for s in samples]),
        "eval_reward_after": mean([s["reward_after"] for s in samples]),
        "seconds": round(time.time() - start, 1),
    }
    write_json(out / "summary.json", summary)
    model_card.write(out, summary=summary)
    fmt = lambda v: "n/a" if v is None else f"{v:+.3f}"  # noqa: E731
    print(f"ppo: {step} steps in {summary['seconds']:.0f} s; mean reward {fmt(summary['reward_first'])} (first 3 "
          f"steps) -> {fmt(summary['reward_last'])} (last 3), KL {fmt(summary['kl_last'])}; greedy answers to "
          f"{len(samples)} prompts: reward {fmt(summary['eval_reward_before'])} -> "
          f"{fmt(summary['eval_reward_after'])} -> {out}", flush=True)  # fmt: skip
    sys.stdout.flush()
    return summary
