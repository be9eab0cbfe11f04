import json

import pytest
import torch

from steerlm.config import TrainArgs
from steerlm.errors import UserError
from steerlm.train import batch_plan, count_steps, fit, make_optimizer

X = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
Y = X @ torch.tensor([1.0, -2.0, 0.5])
EXAMPLES = [{"x": X[i], "y": Y[i]} for i in range(40)]


def collate(batch):
    return {"x": torch.stack([e["x"] for e in batch]), "y": torch.stack([e["y"] for e in batch])}


def evaluate(model):
    return {"val_loss": float(((model(X).squeeze(-1) - Y) ** 2).mean())}


def make_loss(fail_at=None):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        if fail_at is not None and calls["n"] == fail_at:
            raise KeyboardInterrupt  # a kill in the middle of training
        return ((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean(), {}

    return loss_fn


def fresh_model():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 1)


ARGS = TrainArgs(epochs=3, lr=0.3, weight_decay=0.0, batch_size=4, log_every=1, checkpoint_every=4, warmup_ratio=0.0)


def test_batch_plan_is_deterministic_and_keeps_groups_together():
    assert batch_plan(10, 3, 1, 0) == batch_plan(10, 3, 1, 0) != batch_plan(10, 3, 1, 1)
    assert sorted(i for b in batch_plan(10, 3, 1, 0) for i in b) == list(range(10))
    groups = ["a", "b", "a", "c", "b", "a"]
    flat = [i for b in batch_plan(6, 6, 3, 0, groups) for i in b]
    for g in "abc":
        pos = [flat.index(i) for i, k in enumerate(groups) if k == g]
        assert max(pos) - min(pos) == len(pos) - 1
    assert count_steps(10, TrainArgs(epochs=2, grad_accum=2)) == (5, 10)


def test_fit_learns_keeps_best_and_logs(tmp_path):
    saved = []
    model = fresh_model()
    summary = fit(model, EXAMPLES, collate, make_loss(), ARGS, tmp_path, evaluate=evaluate,
                  save_best=lambda m, metrics: saved.append(metrics["val_loss"]))  # fmt: skip
    assert summary["steps"] == 30 and summary["best"] == min(saved)
    assert saved == sorted(saved, reverse=True)  # saved only on improvement
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0] / 10 and saved[-1] < saved[0] / 2
    assert all(k in rows[0] for k in ("step", "epoch", "loss", "lr"))


def test_bf16_training_leaves_a_model_that_computes_as_its_saved_weights(tmp_path):
    # accelerate's mixed precision wraps `forward` in autocast in place; after `fit` the caller's model must compute
    # in its own dtype, as the folder it saved does when loaded (seen on a CPU with AMX: bf16 predictions in memory)
    model = fresh_model()
    fit(model, EXAMPLES, collate, make_loss(), TrainArgs(max_steps=2, batch_size=4, precision="bf16"), tmp_path)
    reloaded = fresh_model()
    reloaded.load_state_dict(model.state_dict())
    x = torch.randn(5, 3)
    assert torch.equal(model(x), reloaded(x))


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    reference = fresh_model()
    fit(reference, EXAMPLES, collate, make_loss(), ARGS, tmp_path / "ref", evaluate=evaluate)

    model = fresh_model()
    with pytest.raises(KeyboardInterrupt):
        fit(model, EXAMPLES, collate, make_loss(fail_at=15), ARGS, tmp_path / "run", evaluate=evaluate)
    resumed = fresh_model()  # a new process: weights come from the checkpoint only
    summary = fit(resumed, EXAMPLES, collate, make_loss(), ARGS, tmp_path / "run", evaluate=evaluate, resume=True)
    assert summary["steps"] == 30
    for a, b in zip(reference.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [s for s, r in zip(steps, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines(), strict=True)
                   if '"loss"' in r]  # fmt: skip
    assert train_steps == list(range(1, 31))  # no step logged twice, none missing


def test_head_lr_applies_to_the_head_and_needs_one():
    model = torch.nn.ModuleDict({"body": torch.nn.Linear(4, 4), "head": torch.nn.Linear(4, 2)})
    opt = make_optimizer(model, TrainArgs(lr=1e-4, head_lr=1e-2))
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert {lrs[id(p)] for p in model["head"].parameters()} == {1e-2}
    assert {lrs[id(p)] for p in model["body"].parameters()} == {1e-4}
    with pytest.raises(UserError, match="train.head_lr: this model has no trainable `head`"):
        make_optimizer(torch.nn.ModuleDict({"body": torch.nn.Linear(4, 4)}), TrainArgs(head_lr=1e-2))
