"""models.py: tiny models built offline, tokenizer, LoRA, save/load round trips, name resolution, SmolLM2 smoke run."""

from __future__ import annotations

import json
import random
import threading
import time

import pytest
import torch

from steerlm import models
from steerlm.config import LoraArgs
from steerlm.data import templates
from steerlm.data.records import ASSISTANT, TEXT_TO_VALUE, USER, Record, Turn
from steerlm.errors import UserError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private model cache, so tests neither read nor write the user's."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("STEERLM_CACHE", str(folder))
    return folder


def logits(model, tokenizer, text="Hello there, <extra_id_1>User\nHi"):
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------- tiny models


def test_device_is_cuda_or_cpu():
    assert models.device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_tiny_models_are_deterministic_by_seed():
    (a, ta), (b, tb), (c, _) = models.tiny_causal_lm(0), models.tiny_causal_lm(0), models.tiny_causal_lm(1)
    assert same_weights(a, b) and not same_weights(a, c)
    assert ta.get_vocab() == tb.get_vocab()
    (e, te), (f, tf), (g, _) = models.tiny_encoder(0), models.tiny_encoder(0), models.tiny_encoder(1)
    assert same_weights(e, f) and not same_weights(e, g)
    assert te.get_vocab() == tf.get_vocab()


def test_tiny_build_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    models.tiny_causal_lm(5)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_forward_shapes():
    model, tok = models.tiny_causal_lm()
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert model.config.num_attention_heads == 4 and not model.training
    tok.padding_side = "left"
    batch = tok(["Hello world", "a"], padding=True, return_tensors="pt", add_special_tokens=False)
    out = model(**batch)
    assert out.logits.shape == (2, batch["input_ids"].shape[1], len(tok))
    assert batch["input_ids"][1, 0] == tok.pad_token_id

    encoder, etok = models.tiny_encoder()
    batch = etok(["Hello world", "a"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, 0] == etok.cls_token_id
    out = encoder(**batch)
    assert out.last_hidden_state.shape == (2, batch["input_ids"].shape[1], 64)


# ---------------------------------------------------------------- tokenizer


def _random_texts(n=50, seed=0):
    rng = random.Random(seed)
    pools = [
        "abc XYZ 019 \n\t  .,;:!?'\"<>|_-",
        "äöüßéèçñ€£¥§°µ",
        "中文日本語한국어",
        "🤖🚀👍🏽✨",
        "\x00\x01\x7f\u200b\ufeff",
    ]
    texts = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(0, 40)):
            pool = rng.choice(pools)
            chars.append(rng.choice(pool) if rng.random() < 0.9 else chr(rng.randint(0x20, 0x2FFFF)))
        texts.append("".join(c for c in chars if not 0xD800 <= ord(c) <= 0xDFFF))
    return texts


@pytest.mark.parametrize("make", [models.tiny_causal_lm, models.tiny_encoder])
def test_tiny_tokenizer_round_trips_any_utf8(make):
    _, tok = make()
    fixed = ["", " ", "  two  spaces ", "Hello, world!", "<extra_id_1>User\n", "<|im_end|> inside text", "a\r\nb"]
    for text in fixed + _random_texts():
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text, text


def test_tiny_tokenizer_specials_and_chat_template():
    _, tok = models.tiny_causal_lm()
    ids = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    assert None not in ids and len(ids) == 3
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>"
    assert len(tok("<|im_end|>", add_special_tokens=False)["input_ids"]) == 1
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    messages.append({"role": "assistant", "content": "Hello."})
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text.endswith("<|im_start|>assistant\nHello.<|im_end|>\n")


@pytest.mark.parametrize("style", templates.STYLES)
def test_both_template_styles_work_with_tiny_tokenizer(style):
    _, tok = models.tiny_causal_lm()
    record = Record([Turn(USER, "What is 2+2?"), Turn(ASSISTANT, "4, of course.", "quality:9,toxicity:0")])
    ex = templates.encode(record, tok, style)
    assert len(ex["input_ids"]) == len(ex["labels"])
    trained = [i for i, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != templates.IGNORE_INDEX]
    assert "4, of course." in tok.decode(trained)
    assert tok.decode(ex["input_ids"]) == templates.render(record, style, tok)
    prompt = templates.inference_prompt(Record(record.conversations[:1]), "quality:9", style, tok)
    assert "quality:9" in prompt
    assert templates.encode(record.with_type(TEXT_TO_VALUE), tok, style) is not None


# ---------------------------------------------------------------- LoRA


def test_apply_lora_trains_only_adapters():
    model, _ = models.tiny_causal_lm()
    assert models.apply_lora(model, LoraArgs(r=0)) is model
    peft_model = models.apply_lora(model, LoraArgs(r=4, alpha=8))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= adapted
    assert not any("lm_head" in n for n in trainable)  # 'all-linear' leaves the output head alone


def test_apply_lora_named_modules_and_errors():
    model, _ = models.tiny_causal_lm()
    peft_model = models.apply_lora(model, LoraArgs(r=2, target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(("q_proj" in n or "v_proj" in n) and "lora_" in n for n in trainable)
    with pytest.raises(UserError, match="target_modules"):
        models.apply_lora(models.tiny_causal_lm()[0], LoraArgs(r=2, target_modules=["no_such_module"]))
    with pytest.raises(UserError, match="all-linear"):
        models.apply_lora(models.tiny_causal_lm()[0], LoraArgs(r=2, target_modules=["all-linear", "q_proj"]))


def test_apply_lora_on_encoder():
    encoder, _ = models.tiny_encoder()
    peft_model = models.apply_lora(encoder, LoraArgs(r=2))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


# ---------------------------------------------------------------- save / load


def test_save_load_round_trip(cache, tmp_path):
    model, tok = models.tiny_causal_lm(3)
    folder = tmp_path / "out" / "sft"
    meta = {"template": "nemo", "conditioning": "attributes", "lora": False}
    assert models.save_model(model, tok, folder, "steerlm_model.json", meta) == folder
    assert models.read_meta(folder, "steerlm_model.json") == meta
    loaded, ltok = models.load_causal_lm(str(folder))
    assert torch.equal(logits(model, tok), logits(loaded, ltok))
    assert ltok.get_vocab() == tok.get_vocab() and ltok.chat_template == tok.chat_template
    assert (ltok.bos_token, ltok.eos_token, ltok.pad_token) == (tok.bos_token, tok.eos_token, tok.pad_token)

    # Saving again replaces the folder whole and leaves no temporary folders behind.
    other, _ = models.tiny_causal_lm(4)
    models.save_model(other, tok, folder)
    assert not (folder / "steerlm_model.json").exists()
    assert [p.name for p in folder.parent.iterdir()] == ["sft"]
    reloaded, _ = models.load_causal_lm(str(folder))
    assert same_weights(reloaded, other)


def test_save_model_failure_keeps_previous_folder(tmp_path):
    model, tok = models.tiny_causal_lm()
    folder = tmp_path / "m"
    models.save_model(model, tok, folder, "steerlm_model.json", {"x": 1})

    class Broken(torch.nn.Module):
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        models.save_model(Broken(), tok, folder)
    assert models.read_meta(folder, "steerlm_model.json") == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_lora_adapter_round_trip(cache, tmp_path, monkeypatch):
    import peft.utils.save_and_load

    def no_hub(*args, **kwargs):
        raise AssertionError("saving an adapter must not look its base up on the hub")

    monkeypatch.setattr(peft.utils.save_and_load, "check_file_exists_on_hf_hub", no_hub)
    model, tok = models.tiny_causal_lm(0)  # the built-in `tiny-lm`: the adapter names it as its base
    peft_model = models.apply_lora(model, LoraArgs(r=4, alpha=8))
    with torch.no_grad():  # lora_B starts at zero; make the adapter actually change the output
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    peft_model.eval()
    folder = tmp_path / "adapter"
    models.save_model(peft_model, tok, folder, "steerlm_model.json", {"base_model": "tiny-lm", "lora": True})
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-lm"
    assert not (folder / "config.json").exists()
    loaded, ltok = models.load_causal_lm(str(folder))
    assert type(loaded).__name__.startswith("PeftModel")
    assert not any(p.requires_grad for p in loaded.parameters())
    expected = logits(peft_model, tok)
    with peft_model.disable_adapter():
        assert not torch.allclose(expected, logits(peft_model, tok))
    assert torch.allclose(expected, logits(loaded, ltok), atol=1e-6)
    trainable, _ = models.load_causal_lm(str(folder), lora_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())
    assert models.load_tokenizer(str(folder)).get_vocab() == tok.get_vocab()


def test_builtin_tiny_models_are_cached_and_match_code(cache):
    model, tok = models.load_causal_lm("tiny-lm")
    code_model, code_tok = models.tiny_causal_lm(0)
    assert torch.equal(logits(model, tok), logits(code_model, code_tok))
    assert model.name_or_path == "tiny-lm" and tok.chat_template
    folder = models.builtin_folder("tiny-lm")
    assert folder.parent == cache and (folder / "model.safetensors").exists()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    models.load_causal_lm("tiny-lm", dtype="bf16")
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # built once, then only read
    encoder, etok = models.load_encoder("tiny-encoder")
    assert same_weights(encoder, models.tiny_encoder(0)[0]) and etok.pad_token == "[PAD]"
    backbone, _ = models.load_encoder("tiny-lm")  # a causal LM's decoder stack, for APMs with a causal backbone
    assert type(backbone).__name__ == "LlamaModel"


def test_dtype_and_device_arguments(cache):
    model, _ = models.load_causal_lm("tiny-lm", dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    assert models.resolve_dtype(None) == torch.float32 and models.resolve_dtype("fp16") == torch.float16
    with pytest.raises(UserError, match="dtype"):
        models.resolve_dtype("int3")


def test_cache_is_built_once_under_concurrency(cache):
    calls = []

    def build(out):
        calls.append(1)
        time.sleep(0.3)
        (out / "done.txt").write_text("ok")

    results = []
    threads = [
        threading.Thread(target=lambda: results.append(models._cached_folder("x", build, "test"))) for _ in "ab"
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and (results[0] / "done.txt").exists()

    def failing(out):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        models._cached_folder("y", failing, "test")
    assert not (cache / "y").exists() and not list(cache.glob(".y.*.tmp"))


# ---------------------------------------------------------------- names and meta errors


def test_read_meta_errors(tmp_path):
    with pytest.raises(UserError, match="is not a steerlm APM folder: missing steerlm_apm.json"):
        models.read_meta(tmp_path, "steerlm_apm.json")
    with pytest.raises(UserError, match="no such folder"):
        models.read_meta(tmp_path / "nope", "steerlm_model.json")
    (tmp_path / "steerlm_rm.json").write_text("{not json")
    with pytest.raises(UserError, match="malformed JSON"):
        models.read_meta(tmp_path, "steerlm_rm.json")


def test_model_meta_is_optional_but_never_silently_malformed(tmp_path):
    # a registry name and a plain Hugging Face folder have no steerlm meta; a steerlm folder's is read as it is
    assert models.model_meta("smollm2-135m-instruct") is None
    assert models.model_meta(tmp_path) is None
    (tmp_path / "steerlm_model.json").write_text('{"template": "chat"}')
    assert models.model_meta(str(tmp_path)) == {"template": "chat"}
    (tmp_path / "steerlm_model.json").write_text("[1]")
    with pytest.raises(UserError, match="expected a JSON object") as e:
        models.model_meta(tmp_path)
    assert "steerlm_model.json" in str(e.value)


def test_unknown_names_are_user_errors(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ["not a model name!", "./missing/folder", str(tmp_path / "missing"), "missing.gguf"]:
        with pytest.raises(UserError, match="built-in names are"):
            models.load_causal_lm(name)
    with pytest.raises(UserError, match="hub failed"):
        models.load_causal_lm("no-such-org/no-such-model-xyz")
    with pytest.raises(UserError, match="hub failed"):
        models.load_tokenizer("no-such-model-xyz")
    with pytest.raises(UserError, match="is an encoder"):
        models.load_causal_lm("minilm-l6")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match="is a file"):
        models.load_causal_lm(str(tmp_path / "notes.txt"))
    with pytest.raises(UserError, match="not a model folder"):
        models.load_encoder(str(tmp_path))


# ---------------------------------------------------------------- real models


@pytest.mark.slow
def test_minilm_loads_offline():
    model, tok = models.load_encoder("minilm-l6")
    assert type(model).__name__ == "BertModel" and tok.pad_token is not None
    out = model(**tok(["The capital of France is Paris."], return_tensors="pt"))
    assert out.last_hidden_state.shape[-1] == 384


@pytest.mark.slow
@pytest.mark.smoke
def test_smollm2_answers_offline(monkeypatch):
    """The real SmolLM2-135M-Instruct from the packaged GGUF (converted once into the user's cache), greedy."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    model, tok = models.load_causal_lm("smollm2-135m-instruct")
    assert tok.chat_template and tok.pad_token is not None and tok.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    batch = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**batch.to(model.device), max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert time.perf_counter() - start < 90
