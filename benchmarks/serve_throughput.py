"""Throughput of `steerlm serve`: N chat requests from 1 client, then from C concurrent clients.

    python benchmarks/serve_throughput.py                                          # tiny-lm, quick
    python benchmarks/serve_throughput.py --model smollm2-135m-instruct --requests 32 --max_tokens 32

Starts the server in a subprocess on a free loopback port, waits for /health, warms up, then sends the same N
requests (fixed prompts, `min_tokens = max_tokens` so that every answer has exactly max_tokens tokens and both
phases decode the same amount) sequentially and from C threads. Prints aggregate completion tokens/s, p50/p99
request latency per phase, the concurrent/sequential throughput ratio (dynamic batching's gain; the target on CPU
with SmolLM2 is >= 4x at C = 16) and the server's mean batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

PROMPTS = [
    "What is the capital of France?", "Write a haiku about autumn.", "How do I sort a list in Python?",
    "Explain photosynthesis to a child.", "Give me three tips for better sleep.", "What causes the seasons?",
    "Tell me a joke about computers.", "Summarise the plot of Romeo and Juliet.", "Why is the sky blue?",
    "How does a bicycle stay upright?", "Suggest a name for a coffee shop.", "What is a prime number?",
    "Describe the taste of a lemon.", "How do vaccines work?", "Write a limerick about a cat.",
    "What should I pack for a weekend hike?",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], p: float) -> float:
    data = sorted(values)
    return data[min(len(data) - 1, max(0, round(p / 100 * len(data) + 0.5) - 1))]


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "steerlm.cli", "serve", "--model", args.model, "--port", str(port),
           "--max_batch_size", str(args.max_batch_size), "--max_queue", str(max(256, args.requests)),
           "--log_level", "warning"] + (["--threads", str(args.threads)] if args.threads else [])  # fmt: skip
    env = {**os.environ, "STEERLM_API_KEY": ""}
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                return proc
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start in time")


def run_phase(url: str, model: str, args, clients: int) -> dict:
    latencies: list[float] = []
    tokens = 0
    lock = threading.Lock()
    session = threading.local()

    def one(i: int) -> None:
        nonlocal tokens
        if not hasattr(session, "s"):
            session.s = requests.Session()
        body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": args.max_tokens, "min_tokens": args.max_tokens, "temperature": 0.7, "seed": i}  # fmt: skip
        start = time.perf_counter()
        r = session.s.post(url + "/v1/chat/completions", json=body, timeout=600)
        elapsed = time.perf_counter() - start
        r.raise_for_status()
        with lock:
            latencies.append(elapsed)
            tokens += r.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(args.requests)))
    wall = time.perf_counter() - start
    return {"clients": clients, "requests": args.requests, "wall_s": round(wall, 2), "completion_tokens": tokens,
            "tokens_per_s": round(tokens / wall, 2), "latency_p50_s": round(statistics.median(latencies), 3),
            "latency_p99_s": round(percentile(latencies, 99), 3)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-lm", help="model to serve (default tiny-lm; smollm2-135m-instruct)")
    parser.add_argument("--requests", type=int, default=32, help="requests per phase")
    parser.add_argument("--max_tokens", type=int, default=32, help="tokens per answer")
    parser.add_argument("--concurrency", type=int, default=16, help="clients in the concurrent phase")
    parser.add_argument("--max_batch_size", type=int, default=16, help="the server's --max_batch_size")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="the server's torch threads (default 1: measures batching, not threading; 0: torch's)",
    )
    parser.add_argument("--startup_timeout", type=float, default=600, help="seconds to wait for the server")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args, port)
    try:
        model = requests.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        warm = argparse.Namespace(**{**vars(args), "requests": 2, "max_tokens": 4})
        run_phase(url, model, warm, 1)
        sequential = run_phase(url, model, args, 1)
        concurrent = run_phase(url, model, args, args.concurrency)
        server = requests.get(url + "/metrics?format=json", timeout=10).json()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    ratio = concurrent["tokens_per_s"] / sequential["tokens_per_s"]
    result = {"model": args.model, "max_tokens": args.max_tokens, "sequential": sequential,
              "concurrent": concurrent, "throughput_ratio": round(ratio, 2),
              "server_mean_batch_size": server["mean_batch_size"], "server_max_batch_size": server["max_batch_size"],
              "server_threads": args.threads or "default", "cpu_count": os.cpu_count(),
              "load_average": os.getloadavg()}  # fmt: skip
    print(f"\nserve throughput: {args.model}, {args.requests} requests x {args.max_tokens} tokens")
    print(f"{'clients':>8} {'wall s':>8} {'tokens/s':>9} {'p50 s':>7} {'p99 s':>7}")
    for phase in (sequential, concurrent):
        print(f"{phase['clients']:>8} {phase['wall_s']:>8} {phase['tokens_per_s']:>9} {phase['latency_p50_s']:>7} "
              f"{phase['latency_p99_s']:>7}")  # fmt: skip
    print(f"server threads {args.threads or 'default'}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")  # fmt: skip
    print(f"concurrent/sequential throughput: {ratio:.2f}x (server mean batch {server['mean_batch_size']}, "
          f"max {server['max_batch_size']})")  # fmt: skip
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
