"""Interactive steerable chat in the terminal (or driven through a pipe).

    steerlm chat --model runs/x/sft/best --attr humor=8
    printf 'Tell me a joke\\n/set humor=9\\nAnother one\\n/quit\\n' | steerlm chat --model runs/x/sft/best --greedy

Each line you type is a user turn; the answer streams back, conditioned on the current attributes (unspecified
ones take the model's defaults). The whole conversation is the context of the next answer; when it no longer fits
the model's context, the oldest exchanges are left out. Commands:

    /set humor=8 [quality=5 ...]   change attribute levels (also `/set humor=8,quality=5`)
    /show                          print the current attribute string and system text
    /reset                         forget the conversation (attributes and system text stay)
    /system TEXT                   set the system text (`/system` alone restores the default)
    /help                          list the commands
    /quit                          leave (end of input does too)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from steerlm import config as config_lib
from steerlm.attributes import parse_assignment
from steerlm.data import templates
from steerlm.data.records import ASSISTANT, DEFAULT_SYSTEM, USER, Record, Turn
from steerlm.errors import UserError
from steerlm.generator import CommandSampling, Generator, SamplingArgs, load_generator, read_attributes, sampling_from

HELP = """commands: /set name=level ... | /show | /reset | /system TEXT | /help | /quit"""


@dataclass(kw_only=True)
class Config(CommandSampling):
    model: str
    """Model: a steerlm output folder (e.g. runs/x/sft/best), a LoRA adapter folder, a built-in name or HF folder."""
    attr: list[str] = field(default_factory=list)
    """Starting attribute levels as name=level, repeatable (--attr humor=8); over --attrs_file."""
    attrs_file: str = ""
    """YAML or JSON file with a mapping of starting attribute levels."""
    system: str | None = None
    """System text (default: NeMo's SteerLM system prompt)."""
    template: str = "auto"
    """Template style: 'nemo', 'chat', or 'auto' (the model's steerlm_model.json, else 'chat')."""
    dtype: str = "fp32"
    """Model dtype: 'fp32', 'bf16', 'fp16' or 'auto' (the checkpoint's own)."""

    def __post_init__(self):
        super().__post_init__()
        self.dtype = config_lib.dtype_choice(self.dtype)
        self.template = config_lib.auto_choice(self.template, "template", templates.STYLES)


@dataclass
class Session:
    generator: Generator
    sampling: SamplingArgs
    levels: dict[str, int] = field(default_factory=dict)
    """Requested levels (the rest take the defaults)."""
    system: str = DEFAULT_SYSTEM
    history: list[Turn] = field(default_factory=list)

    def attribute_string(self) -> str | None:
        return self.generator.attribute_string(self.levels)


def context_limit(generator: Generator) -> int:
    limit = getattr(generator.model.config, "max_position_embeddings", None) or generator.tokenizer.model_max_length
    return int(min(limit, 1_000_000))


def answer(session: Session, text: str, out=sys.stdout) -> str:
    """Stream the answer to `text` to `out` and add the exchange to the history."""
    gen = session.generator
    label = session.attribute_string()
    history = list(session.history)
    record = Record(history + [Turn(USER, text)], session.system)
    budget = context_limit(gen) - session.sampling.max_new_tokens
    while len(history) >= 2 and len(gen.prompt_ids(record, session.levels)) > budget:
        history = history[2:]  # leave out the oldest exchange
        record = Record(history + [Turn(USER, text)], session.system)
    pieces = []
    for piece in gen.stream(record, session.levels, session.sampling):
        pieces.append(piece)
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    reply = "".join(pieces)
    session.history = history + [Turn(USER, text), Turn(ASSISTANT, reply, label)]
    return reply


def command(session: Session, line: str, out=sys.stdout) -> bool:
    """Run a /command; returns False to quit. Mistakes are reported and the session goes on."""
    name, _, arg = line[1:].partition(" ")
    arg = arg.strip()
    if name in ("quit", "exit", "q"):
        return False
    if name == "set":
        if session.generator.schema is None:
            raise UserError("this model is not attribute-conditioned; /set has no effect")
        pairs = [p for chunk in arg.split() for p in chunk.split(",") if p]
        if not pairs:
            raise UserError("usage: /set name=level [name=level ...]")
        levels = dict(session.levels)
        for p in pairs:
            key, level = parse_assignment(p)
            levels[key] = level
        session.generator.resolve_attributes(levels)  # checks names and ranges before anything changes
        session.levels = levels
        print(f"attributes: {session.attribute_string()}", file=out)
    elif name == "show":
        shown = session.attribute_string()
        print(f"attributes: {shown if shown is not None else '(model is not attribute-conditioned)'}", file=out)
        print(f"system: {session.system}", file=out)
        print(f"history: {len(session.history) // 2} exchange(s)", file=out)
    elif name == "reset":
        session.history = []
        print("conversation cleared", file=out)
    elif name == "system":
        session.system = arg or DEFAULT_SYSTEM
        print(f"system: {session.system}", file=out)
    elif name == "help":
        print(HELP, file=out)
    else:
        raise UserError(f"unknown command /{name}; {HELP}")
    return True


def repl(session: Session, stdin=None, out=None, err=None) -> int:
    """Read lines until /quit or end of input; returns the number of answers given."""
    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    interactive = stdin.isatty() and out.isatty()
    answers = 0
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        try:
            if line.startswith("/"):
                if not command(session, line.strip(), out):
                    break
            else:
                answer(session, line, out)
                answers += 1
        except UserError as e:
            print(f"error: {e}", file=err)
    return answers


def main(cfg: Config) -> int:
    levels = read_attributes(cfg.attrs_file, cfg.attr)
    gen = load_generator(cfg)
    session = Session(gen, sampling_from(cfg, gen), system=cfg.system if cfg.system is not None else DEFAULT_SYSTEM)
    if levels and gen.schema is None:
        print(f"note: {cfg.model} is not attribute-conditioned; the attributes are ignored", file=sys.stderr)
    elif levels:
        gen.resolve_attributes(levels)
        session.levels = levels
    if sys.stdin.isatty():
        shown = session.attribute_string()
        print(f"steerlm chat: {cfg.model}" + (f" | attributes {shown}" if shown else "") + f"\n{HELP}")
    repl(session)
    return 0
