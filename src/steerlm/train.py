"""The training loop every stage shares (APM, SFT, reward model), driven by the stage's loss function.

Runs through accelerate, so the same code trains on one CPU, one GPU, or data-parallel under `torchrun` /
`accelerate launch` (DDP, FSDP or DeepSpeed by accelerate config). It owns what must mean the same everywhere:
the batch order, the optimiser and schedule, the metrics line (loss, lr, tokens/s), validation and best-checkpoint
selection, and resumable checkpoints (a killed run continues from the last checkpoint, with no batch repeated or
skipped).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from steerlm import tracking
from steerlm.config import TrainArgs
from steerlm.data.collate import n_tokens
from steerlm.errors import UserError

CHECKPOINT = "checkpoint"
METRICS = "metrics.jsonl"


def cpu_has_fast_bf16() -> bool:
    """True when this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX tiles). Elsewhere oneDNN emulates bf16 and
    is slower than fp32: on an AVX2-only EPYC a 1024x1024 bf16 matmul ran at 0.9 GFLOP/s against 76 in fp32, and a
    Linear forward+backward under CPU autocast 15x slower (docs/performance.md)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_precision(precision: str, cuda: bool | None = None) -> tuple[str, str]:
    """('fp32' | 'bf16' | 'fp16', why) for a `TrainArgs.precision` on this machine (`cuda`: default, whether CUDA is
    present). 'auto' takes bf16 only where it pays: CUDA with bf16 support, or a CPU with AVX512-BF16/AMX
    (`cpu_has_fast_bf16`); fp32 elsewhere. Errors (UserError, field train.precision): fp16 without CUDA (CPU autocast
    has no fp16 loss scaling), bf16 on a CUDA device without it."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    where = f"CUDA {torch.cuda.get_device_name()}" if cuda else f"CPU ({torch.backends.cpu.get_cpu_capability()})"
    if precision == "fp16" and not cuda:
        raise UserError("fp16 mixed precision needs a CUDA device; use bf16 or fp32 on a CPU", field="train.precision")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError(f"{where} has no bf16; use fp16 or fp32", field="train.precision")
    if precision != "auto":
        return precision, f"asked for, on {where}"
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")  # `accelerate launch --mixed_precision X`
    if launched in ("bf16", "fp16"):
        chosen = resolve_precision(launched, cuda)[0]  # fp16 on a CPU is the same error as when asked for
        return chosen, f"auto: accelerate launch --mixed_precision {launched}, on {where}"
    if cuda:
        if torch.cuda.is_bf16_supported():
            return "bf16", f"auto: {where} supports bf16"
        return "fp32", f"auto: {where} has no bf16"
    if cpu_has_fast_bf16():
        return "bf16", f"auto: {where} has AVX512-BF16/AMX"
    return "fp32", f"auto: {where} has no AVX512-BF16 or AMX, where bf16 is emulated and slower than fp32"


def make_accelerator(grad_accum: int = 1, precision: str = "fp32") -> Accelerator:
    """CPU unless CUDA is present, with `precision` (a `TrainArgs.precision`) as accelerate's mixed precision: bf16 or
    fp16 autocast of the forward pass with fp32 master weights. Prints what it chose and why. Under torchrun on CPU
    each process must say `cpu=True` explicitly, or accelerate treats every process as a lone one (ENVIRONMENT.md)."""
    chosen, why = resolve_precision(precision)
    mixed = "no" if chosen == "fp32" else chosen
    if AcceleratorState._shared_state.get("_mixed_precision", mixed) != mixed:
        # accelerate keeps one mixed precision per process and refuses another; a later stage of the same process
        # (the pipeline, tests) may train in another precision. The process group (PartialState) is kept.
        AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=grad_accum,
                              mixed_precision=mixed)  # fmt: skip
    accelerator.print(f"precision: {chosen} ({why})")
    return accelerator


def accelerator_for(args: TrainArgs) -> Accelerator:
    """`make_accelerator` for these settings; `args.precision` 'auto' is replaced by what it chose, so the config a
    stage saves records the precision it trained in."""
    accelerator = make_accelerator(args.grad_accum, args.precision)
    args.precision = precision_of(accelerator)
    return accelerator


def precision_of(accelerator: Accelerator) -> str:
    """'fp32', 'bf16' or 'fp16': the mixed precision an accelerator trains in."""
    return {"no": "fp32"}.get(accelerator.mixed_precision, accelerator.mixed_precision)


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def batch_plan(n: int, batch_size: int, seed: int, epoch: int, groups: list | None = None) -> list[list[int]]:
    """Deterministic shuffled batches of example indices for one epoch (same plan when a run resumes).

    With `groups` (one key per example, e.g. the OASST parent message), members of a group stay adjacent and a group
    no larger than a batch is never split across two: groups are packed into batches first-fit in shuffled order
    (so some batches may hold fewer than `batch_size` examples), and sibling replies to one prompt land in the same
    batch."""
    rng = random.Random(seed * 1_000_003 + epoch)
    if groups is None:
        order = list(range(n))
        rng.shuffle(order)
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    buckets: dict = {}
    for i, g in enumerate(groups):
        buckets.setdefault(g, []).append(i)
    keys = list(buckets)
    rng.shuffle(keys)
    batches: list[list[int]] = []
    open_batches: list[list[int]] = []  # batches with room left, oldest first
    for k in keys:
        members = buckets[k]
        for part in (members[i : i + batch_size] for i in range(0, len(members), batch_size)):
            target = next((b for b in open_batches if len(b) + len(part) <= batch_size), None)
            if target is None:
                target = []
                batches.append(target)
                open_batches.append(target)
            target.extend(part)
            if len(target) == batch_size:
                open_batches.remove(target)
    return batches


def make_optimizer(model: torch.nn.Module, args: TrainArgs) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no weight decay on biases and norms (standard for transformers); a top-level
    `head` module (a new regression or reward output) at `args.head_lr` when that is set."""
    groups: dict[tuple[float, float], list] = {}
    head_found = False
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay = 0.0 if p.ndim < 2 or "norm" in name.lower() else args.weight_decay
            in_head = args.head_lr > 0 and name.startswith("head.")
            head_found |= in_head
            groups.setdefault((args.head_lr if in_head else args.lr, decay), []).append(p)
    if args.head_lr > 0 and not head_found:  # an SFT model has no head: the setting would silently do nothing
        raise UserError("this model has no trainable `head` for head_lr to apply to", field="train.head_lr")
    return torch.optim.AdamW(
        [{"params": ps, "lr": lr, "weight_decay": decay} for (lr, decay), ps in groups.items()], lr=args.lr
    )


def count_steps(n_batches: int, args: TrainArgs, num_processes: int = 1) -> tuple[int, int]:
    """(optimiser steps per epoch, total optimiser steps)."""
    per_epoch = max(1, math.ceil(math.ceil(n_batches / num_processes) / args.grad_accum))
    total = args.max_steps if args.max_steps > 0 else max(1, math.ceil(per_epoch * args.epochs))
    return per_epoch, total


def log_line(step: int, total: int, metrics: dict) -> str:
    """The one fixed-format progress line every stage prints."""
    parts = [f"step {step}/{total}"]
    for key, fmt in (("epoch", ".2f"), ("loss", ".4f"), ("val_loss", ".4f"), ("lr", ".2e"), ("tok_s", ".0f")):
        if key in metrics:
            parts.append(f"{key} {metrics[key]:{fmt}}")
    return " | ".join(parts)


class MetricsLog:
    """Append-only JSONL of metrics; on resume, lines after the checkpoint's step are dropped (no duplicates). Each
    row also goes to the experiment trackers given (`tracking.start`; TensorBoard, W&B)."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool = True,
                 trackers: tracking.Trackers | None = None):  # fmt: skip
        self.path, self.enabled = path, enabled
        self.trackers = trackers if enabled else None
        if not enabled:
            return
        kept = []
        if resume_step is not None and path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step]
        path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.trackers is not None:
                self.trackers.log(row)

    def close(self) -> None:
        """End the trackers' runs (flushes TensorBoard's event file, finishes the W&B run)."""
        if self.trackers is not None:
            self.trackers.finish()


def _save_checkpoint(accelerator: Accelerator, out: Path, state: dict) -> None:
    # save_state writes model, optimiser, scheduler and every process's RNG; a tmp folder renamed into place means a
    # kill during saving leaves the previous checkpoint intact.
    tmp, final, old = out / f".{CHECKPOINT}.tmp", out / CHECKPOINT, out / f".{CHECKPOINT}.old"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _find_checkpoint(out: Path) -> Path | None:
    for cand in (out / CHECKPOINT, out / f".{CHECKPOINT}.old"):
        if (cand / "trainer_state.json").exists():
            return cand
    return None


def has_checkpoint(out: str | Path) -> bool:
    return _find_checkpoint(Path(out)) is not None


def fit(
    model: torch.nn.Module,
    train_examples: list,
    collate: Callable[[list], dict],
    loss_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]],
    args: TrainArgs,
    out: str | Path,
    *,
    evaluate: Callable[[torch.nn.Module], dict] | None = None,
    save_best: Callable[[torch.nn.Module, dict], None] | None = None,
    metric: str = "val_loss",
    higher_is_better: bool = False,
    resume: bool = False,
    groups: list | None = None,
    desc: str = "train",
    accelerator: Accelerator | None = None,
) -> dict:
    """Train `model` on `train_examples` with `loss_fn(model, batch) -> (loss, metrics)`.

    `evaluate(model) -> metrics` runs at each epoch end (and every `args.eval_every` steps); when `metrics[metric]`
    improves, `save_best(model, metrics)` is called on the main process with the unwrapped model. Returns a summary.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = accelerator or accelerator_for(args)
    set_seed(args.seed)
    plan0 = batch_plan(len(train_examples), args.batch_size, args.seed, 0, groups)
    steps_per_epoch, total_steps = count_steps(len(plan0), args, accelerator.num_processes)
    optimizer = make_optimizer(model, args)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(args.warmup_ratio * total_steps), total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    # 1. resume: restore weights, optimiser, schedule and RNG, and where in the epoch we were
    state = {"step": 0, "epoch": 0, "micro_batch": 0, "best": None, "best_step": None}
    ckpt = _find_checkpoint(out) if resume else None
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        state = json.loads((ckpt / "trainer_state.json").read_text())
        accelerator.print(f"{desc}: resuming from step {state['step']} (epoch {state['epoch']})")
    trackers = (tracking.start(args.report_to, out, desc, dataclasses.asdict(args))
                if accelerator.is_main_process else None)  # fmt: skip
    log = MetricsLog(out / METRICS, state["step"] if ckpt is not None else None, accelerator.is_main_process, trackers)

    def run_eval() -> dict:
        if evaluate is None:
            return {}
        model.eval()
        with torch.no_grad():
            m = evaluate(accelerator.unwrap_model(model))
        model.train()
        state["eval_step"] = state["step"]
        value = m.get(metric)
        better = value is not None and (
            state["best"] is None or (value > state["best"] if higher_is_better else value < state["best"])
        )
        if better:
            state["best"], state["best_step"] = value, state["step"]
            if save_best is not None and accelerator.is_main_process:
                save_best(accelerator.unwrap_model(model), m)
            accelerator.wait_for_everyone()
        log.write({"step": state["step"], **m, "best": state["best"]})
        accelerator.print(log_line(state["step"], total_steps, m))
        return m

    # 2. train: micro-batches through accelerate (gradient accumulation, DDP sharding), fixed-format log lines
    model.train()
    bar = tqdm(total=total_steps, initial=state["step"], desc=desc, disable=not accelerator.is_main_process)
    start, tokens, window_loss, window_n, last_eval = time.time(), 0, 0.0, 0, {}
    while state["step"] < total_steps:
        plan = batch_plan(len(train_examples), args.batch_size, args.seed, state["epoch"], groups)
        loader = accelerator.prepare(DataLoader(train_examples, batch_sampler=plan, collate_fn=collate))
        skipped = state["micro_batch"]
        for batch in accelerator.skip_first_batches(loader, skipped) if skipped else loader:
            with accelerator.accumulate(model):
                loss, extra = loss_fn(model, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            state["micro_batch"] += 1
            window_loss += loss.detach().float().item()
            window_n += 1
            tokens += n_tokens(batch) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            state["step"] += 1
            bar.update(1)
            if state["step"] % args.log_every == 0 or state["step"] == total_steps:
                elapsed = time.time() - start
                row = {"step": state["step"], "epoch": state["epoch"] + state["micro_batch"] / max(1, len(loader)),
                       "loss": window_loss / window_n, "lr": scheduler.get_last_lr()[0],
                       "tok_s": tokens / elapsed if elapsed else 0.0, **extra}  # fmt: skip
                row = {k: (v.item() if torch.is_tensor(v) else v) for k, v in row.items()}
                log.write(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                window_loss, window_n = 0.0, 0
            if args.eval_every and state["step"] % args.eval_every == 0:
                last_eval = run_eval()
            if state["step"] % args.checkpoint_every == 0:
                _save_checkpoint(accelerator, out, state)
            if state["step"] >= total_steps:
                break
        else:  # the epoch ran to its end
            state["epoch"] += 1
            state["micro_batch"] = 0
            last_eval = run_eval()
            _save_checkpoint(accelerator, out, state)
            continue
        break
    bar.close()
    if evaluate is not None and state.get("eval_step") != state["step"]:
        last_eval = run_eval()
    _save_checkpoint(accelerator, out, state)
    log.close()
    # accelerate's mixed precision patched `model.forward` with autocast in place; take it off, so that the caller's
    # model computes as the saved folder does when it is loaded again (fp32 masters, no autocast)
    accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    summary = {"steps": state["step"], "epochs": round(state["step"] / steps_per_epoch, 2), "best": state["best"], "best_step": state["best_step"],
               "seconds": round(time.time() - start, 1), "precision": precision_of(accelerator),
               **{f"last_{k}": v for k, v in last_eval.items()}}  # fmt: skip
    return summary


def prepare_output(out: str | Path, *, resume: bool, overwrite: bool, meta_name: str, what: str,
                   has_checkpoint: Callable[[Path], bool] = has_checkpoint, owned: tuple[str, ...] = ()) -> bool:  # fmt: skip
    """Check a training stage's output folder before it starts; True when a finished model is already there and
    `resume` was asked (nothing left to do). An existing folder needs `resume` or `overwrite`, and `overwrite` only
    removes a folder that this kind of stage wrote (`what` names it in the error). `meta_name` is the path, relative
    to `out`, of the file that marks a finished model; `owned` lists other names that only such a stage writes."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError("exists and is not a folder", file=str(out))
    if not out.exists() or not any(out.iterdir()):
        return False
    if resume:
        if has_checkpoint(out):
            return False
        if (out / meta_name).exists():
            return True
        raise UserError("nothing to resume: no checkpoint in this folder", file=str(out))
    if not overwrite:
        raise UserError("output folder exists; pass --overwrite to replace it or --resume to continue", file=str(out))
    if not any((out / n).exists() for n in (meta_name, *owned, "config.yaml", CHECKPOINT, METRICS)):
        raise UserError(f"refusing to overwrite a folder that is not a {what} output", file=str(out))
    shutil.rmtree(out)
    return False
