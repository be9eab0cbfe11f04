"""PPO (InstructGPT step 3, SPEC §6): the per-token KL reward, GAE and the clipped losses by hand; PPO on a tiny model
raising a scripted reward; PPO-ptx; LoRA; resume; and `steerlm rlhf --preset tiny` end to end with stage skipping."""

from __future__ import annotations

import json
import math

import pytest
import torch

from steerlm import cli, config, ppo
from steerlm.errors import UserError
from steerlm.generator import Generator

pytestmark = pytest.mark.usefixtures("one_thread", "private_cache")


PROMPTS = ["What is the capital of France?", "Tell me a joke.", "How do I sort a list in Python?",
           "Write a poem about the sea.", "Thank you for your help.", "Explain it step by step.", "Say hello.",
           "Can you write a short poem?"]  # fmt: skip


def newlines(prompts, answers):
    """A scripted reward for one particular token: newlines per answer. (The random tiny LM is nearly uniform over
    its ~400 tokens, so the tests sample at temperature 0.2, where a newline is common enough to be learned from in a
    few steps; the PPO ratio uses the same temperature.)"""
    return [a.count("\n") / 4 for a in answers]


def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return str(path)


def make_cfg(tmp_path, name, **over):
    values = {"policy": "tiny-lm", "prompts": [prompts_file(tmp_path)], "out": str(tmp_path / name), "samples": 0,
              "train": {"max_steps": 2, "lr": 3e-3, "batch_size": 8, "seed": 3},
              "ppo": {"epochs": 2, "mini_batch_size": 4},
              "sampling": {"max_new_tokens": 8, "temperature": 0.2}}  # fmt: skip
    for key, value in over.items():
        config.set_dotted(values, key, value)
    return config.build(ppo.Config, values)


def rows(folder):
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- the math, by hand


def test_token_rewards_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = ppo.token_rewards(torch.tensor([1.0, 2.0]), logp, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, -1.0], [0.0, 1.0, 0.0]]))
    # -β·KL at every token; the score is added at each answer's own last token
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 0.1 + 1.0], [0.0, -0.1 + 2.0, 0.0]]))


def test_gae_by_hand():
    rewards = torch.tensor([[-0.05, 0.0, 1.1], [0.0, 1.9, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.4], [0.1, 0.3, 9.9]])  # 9.9 sits on padding and must not leak in
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 0: δ2 = 1.1 - 0.4 = 0.7; δ1 = 0 + 0.4 - 0.2 = 0.2, A1 = 0.2 + 0.95·0.7;
    #        δ0 = -0.05 + 0.2 - 0.5 = -0.35, A0 = δ0 + 0.95·A1
    a1 = 0.2 + 0.95 * 0.7
    a0 = -0.35 + 0.95 * a1
    # row 1 ends at t = 1: δ1 = 1.9 - 0.3 = 1.6 (V after the end is 0); δ0 = 0.3 - 0.1, A0 = 0.2 + 0.95·1.6
    expected = torch.tensor([[a0, a1, 0.7], [0.2 + 0.95 * 1.6, 1.6, 0.0]])
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, (expected + values) * mask)
    assert ret[0, 0].item() == pytest.approx(0.97175, abs=1e-5)


def test_clipped_losses_by_hand():
    mask = torch.ones(1, 2)
    old = torch.log(torch.tensor([[0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.75, 0.25]]))  # ratios 1.5 and 0.5
    adv = torch.tensor([[1.0, -1.0]])
    out = ppo.ppo_losses(new, old, adv, torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]),
                         torch.tensor([[2.0, 0.0]]), mask, clip_range=0.2, value_clip_range=0.2)  # fmt: skip
    # token 0: max(-1·1.5, -1·1.2) = -1.2; token 1: max(1·0.5, 1·0.8) = 0.8 (the pessimistic bound)
    assert out["policy_loss"].item() == pytest.approx((-1.2 + 0.8) / 2)
    assert out["clip_frac"].item() == 1.0
    # value 1.0 moved 1.0 from 0.0, clipped to 0.2: max((1-2)², (0.2-2)²) = 3.24; token 1 is exact
    assert out["value_loss"].item() == pytest.approx(0.5 * 3.24 / 2)


def test_adaptive_kl_controller():
    fixed = ppo.KLController(0.1, target=6.0, horizon=100, adaptive=False)
    fixed.update(60.0, 10)
    assert fixed.value == 0.1
    ctl = ppo.KLController(0.1, target=6.0, horizon=100, adaptive=True)
    ctl.update(60.0, 10)  # far above target: the error is clipped at +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    ctl.update(3.0, 10)  # half the target: error -0.5 clipped to -0.2
    assert ctl.value == pytest.approx(0.1 * 1.02 * 0.98)


# ---------------------------------------------------------------- PPO on a tiny model


def test_ppo_raises_a_scripted_reward_with_finite_kl(tmp_path):
    # On-policy rollouts (top_p 1): at lr 1e-3 x 20 steps the reward rose from ~0.3 to ~1.75 for each of 5 seeds
    # tried; 6 steps at 3e-3 were seed-dependent (the tiny policy collapses either way).
    cfg = make_cfg(tmp_path, "ppo", samples=2, **{"train.max_steps": 20, "train.lr": 1e-3})
    summary = ppo.main(cfg, reward_fn=newlines)
    out = tmp_path / "ppo"
    log = rows(out)
    assert [r["step"] for r in log] == list(range(1, 21))
    for key in ("reward", "kl", "entropy", "clip_frac", "value_loss", "policy_loss", "response_length", "kl_coef"):
        assert all(key in r for r in log)
    assert log[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the first rollouts come from π = π_SFT
    first, last = sum(r["reward"] for r in log[:3]) / 3, sum(r["reward"] for r in log[-3:]) / 3
    assert last > first + 0.3 and summary["reward_last"] > summary["reward_first"]
    assert all(math.isfinite(r["kl"]) and abs(r["kl"]) < 50 for r in log)  # finite
    assert (out / "curves.png").stat().st_size > 1000
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and {"prompt", "before", "after", "reward_before", "reward_after"} <= set(samples[0])
    gen = Generator.load(str(out))  # a standalone model folder with steerlm_model.json
    assert gen.template == "chat" and gen.conditioning == "none"
    assert not (out / "checkpoint").exists()


def test_ptx_changes_the_update(tmp_path):
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"conversations": [{"from": "User", "value": "Say hello."},
                                                 {"from": "Assistant", "value": "Hello there!"}]}) + "\n")  # fmt: skip
    # the plain run goes through the command line, with the scripted reward named as module:function
    args = ["ppo", "--policy", "tiny-lm", "--prompts", prompts_file(tmp_path), "--out", str(tmp_path / "plain"),
            "--reward-fn", "test_ppo:newlines", "--samples", "0", "--train.max_steps", "1", "--train.lr", "0.003",
            "--train.seed", "3", "--ppo.epochs", "2", "--ppo.mini_batch_size", "4", "--sampling.max_new_tokens", "8",
            "--sampling.temperature", "0.2"]  # fmt: skip
    assert cli.run(args) == 0
    plain = json.loads((tmp_path / "plain" / "summary.json").read_text())
    mixed = ppo.main(make_cfg(tmp_path, "ptx", **{"train.max_steps": 1, "ppo.ptx_coef": 1.0},
                              ptx_data=[str(sft)]), reward_fn=newlines)  # fmt: skip
    assert "ptx_loss" in mixed["last"] and "ptx_loss" not in plain["last"]
    assert mixed["last"]["reward"] == plain["last"]["reward"]  # same rollouts ...
    a = Generator.load(str(tmp_path / "plain")).model.state_dict()
    b = Generator.load(str(tmp_path / "ptx")).model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # ... different update


def test_lora_trains_only_the_adapter_and_resumes(tmp_path):
    over = {"train.max_steps": 3, "train.batch_size": 4, "train.checkpoint_every": 1, "train.lora": {"r": 4},
            "ppo.mini_batch_size": 2}  # fmt: skip
    ppo.main(make_cfg(tmp_path, "ref", **over), reward_fn=newlines)

    calls = {"n": 0}

    def killed_at_third_step(prompts, answers):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return newlines(prompts, answers)

    with pytest.raises(KeyboardInterrupt):
        ppo.main(make_cfg(tmp_path, "run", **over), reward_fn=killed_at_third_step)
    assert (tmp_path / "run" / "checkpoint" / "state.pt").exists()
    state = torch.load(tmp_path / "run" / "checkpoint" / "state.pt", weights_only=False)
    assert state["step"] == 2 and state["trainable"] and all("lora_" in n for n in state["trainable"])
    ppo.main(make_cfg(tmp_path, "run", resume=True, **over), reward_fn=newlines)
    ref, run = rows(tmp_path / "ref"), rows(tmp_path / "run")
    assert [r["step"] for r in run] == [1, 2, 3]
    for a, b in zip(ref, run, strict=True):
        assert a["reward"] == pytest.approx(b["reward"]) and a["kl"] == pytest.approx(b["kl"], abs=1e-5)
    meta = json.loads((tmp_path / "run" / "steerlm_model.json").read_text())
    assert meta["lora"] is False  # the adapter is merged into a standalone policy


# ---------------------------------------------------------------- steerlm rlhf end to end


def test_rlhf_tiny_preset_end_to_end_and_skips_finished_stages(tmp_path, oasst_file, hh_file, capsys):
    out = tmp_path / "rlhf"
    args = ["rlhf", "--preset", "tiny", "--out", str(out), "--data.oasst", str(oasst_file), "--data.hh", str(hh_file),
            "--data.max_trees", "12", "--data.max_pairs", "24", "--sft.train.max_steps", "2",
            "--ppo.train.max_steps", "2"]  # fmt: skip
    assert cli.run(args) == 0
    for stage in ("data", "sft", "rm", "ppo"):
        assert (out / stage / "done.json").exists()
    for name in ("train.jsonl", "val.jsonl", "prompts_train.jsonl", "oasst_train.jsonl", "hh_val.jsonl"):
        assert (out / "data" / name).stat().st_size > 0
    assert (out / "sft" / "best" / "steerlm_model.json").exists() and (out / "rm" / "steerlm_rm.json").exists()
    assert json.loads((out / "sft" / "best" / "steerlm_model.json").read_text())["conditioning"] == "none"
    assert (out / "ppo" / "curves.png").exists() and (out / "ppo" / "samples.jsonl").exists()
    first = capsys.readouterr().out
    assert "rlhf summary" in first and "held-out pair accuracy" in first

    assert cli.run(args) == 0  # nothing changed: every stage is skipped
    again = capsys.readouterr().out
    assert again.count("up to date, skipped") == 4

    assert cli.run(args + ["--ppo.ppo.kl_coef", "0.1"]) == 0  # a PPO setting changed: only PPO reruns
    third = capsys.readouterr().out
    assert third.count("up to date, skipped") == 3 and "[ppo] running" in third


def test_prompts_with_no_room_for_an_answer_are_left_out_and_counted(tmp_path, capsys):
    # tiny-lm's context is 2048 tokens: this prompt fits train.max_length but leaves fewer than max_new_tokens
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in [*PROMPTS, "sea " * 1020]))  # ~2040 tokens
    cfg = make_cfg(tmp_path, "ppo", prompts=[str(path)], **{"train.max_steps": 1, "train.max_length": 4096})
    ppo.main(cfg, reward_fn=newlines)
    assert f"{len(PROMPTS)} prompts (0 longer than 4096 tokens left out, 1 with no room for an answer)" in (
        capsys.readouterr().out)  # fmt: skip


def test_the_value_head_is_saved_as_safetensors_and_old_pickles_still_load(tmp_path):
    ppo.main(make_cfg(tmp_path, "ppo", **{"train.max_steps": 1, "ppo.epochs": 1}), reward_fn=newlines)
    out = tmp_path / "ppo"
    assert (out / ppo.VALUE_HEAD).exists() and not (out / ppo.LEGACY_VALUE_HEAD).exists()
    head = ppo.load_value_head(out)
    assert head.linear.weight.abs().sum() > 0  # trained (it starts at zero)
    old = tmp_path / "old"  # a folder as earlier versions wrote it: a pickled state dict
    old.mkdir()
    torch.save(head.state_dict(), old / ppo.LEGACY_VALUE_HEAD)
    again = ppo.load_value_head(old)
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), again.state_dict().values(), strict=True))
    with pytest.raises(UserError, match="value_head.safetensors"):
        ppo.load_value_head(tmp_path)


def test_answer_logits_on_the_answer_positions_equal_the_whole_sequence_ones(monkeypatch):
    from steerlm import models

    model, tok = models.tiny_causal_lm()
    model.eval()
    head = ppo.ValueHead(model.config.hidden_size)
    batch = ppo.make_batch([[5, 6, 7, 8], [9, 10]], [[11, 12, 13], [14, 15, 16, 17, 18]], tok.pad_token_id, "cpu")
    with torch.no_grad():
        kept = ppo.evaluate_tokens(model, batch, head, temperature=0.7)
        monkeypatch.setattr(ppo, "supports_logits_to_keep", lambda model, per_row=False: False)
        full = ppo.evaluate_tokens(model, batch, head, temperature=0.7)
    assert kept[0].shape == (2, 5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(kept, full, strict=True))
