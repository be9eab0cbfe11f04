"""Helpers for the server tests: a tiny steerable model folder, a tiny APM folder, and a live server in a thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from steerlm import models

ATTRIBUTES = {"names": ["quality", "toxicity", "humor", "creativity"], "levels": 10}


def steerable_tiny(folder: Path) -> Path:
    """The tiny random LM saved as a steerlm SFT output (NeMo template, 4 attributes). Its output head is untied and
    random: with tied embeddings a random model just repeats its last token, whatever the context, which would make
    every comparison of answers trivially pass."""
    model, tokenizer = models.tiny_causal_lm(0)
    model.config.tie_word_embeddings = False
    rng = torch.Generator().manual_seed(0)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(model.lm_head.weight.shape, generator=rng) * 2)
    meta = {"attributes": ATTRIBUTES, "template": "nemo", "conditioning": "attributes", "base_model": "tiny-lm",
            "lora": False}  # fmt: skip
    return models.save_model(model, tokenizer, folder, "steerlm_model.json", meta)


def tiny_apm(folder: Path) -> Path:
    """An untrained regression APM on the tiny encoder, saved as `steerlm train-apm` saves one."""
    from safetensors.torch import save_file

    from steerlm import apm_model, heads

    backbone, tokenizer = models.tiny_encoder(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        head = heads.HeadModel(backbone, len(ATTRIBUTES["names"]), "mean").head
    meta = {"kind": "regression", "attributes": ATTRIBUTES, "template": None, "backbone": "encoder",
            "pooling": "mean", "max_length": 128, "base_model": "tiny-encoder", "lora": False, "head": apm_model.HEAD}  # fmt: skip
    models.save_model(backbone, tokenizer, folder, apm_model.META, meta)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(folder / apm_model.HEAD))
    return folder


@dataclass
class Live:
    url: str
    app: object

    @property
    def service(self):
        return self.app.app.state.service


@contextlib.contextmanager
def running(cfg, generator=None, apm=None):
    """Run the app with uvicorn in a thread on a free loopback port; yields a `Live`."""
    import uvicorn

    from steerlm.serve import create_app

    app = create_app(cfg, generator=generator, apm=apm)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield Live(f"http://127.0.0.1:{port}", app)
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
