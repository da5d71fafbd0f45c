#!/usr/bin/env python3
"""Load test of an OpenAI-compatible chat completions server (`dpo2d serve`).

Sends REQUESTS requests of MAX_TOKENS tokens each, CONCURRENCY at a time,
while STALLED connections stay open without ever finishing a request (as slow
or broken clients do), and prints how many were answered, the latency
percentiles and the completion tokens per second over the whole run, as one
JSON line.

    scripts/load_serve.py --url http://127.0.0.1:8000/v1 --requests 128 --concurrency 64 --max-tokens 12 --stalled 40

With --schema every request asks for structured outputs with a judge-like
JSON schema (a list of three ratings 0-4 with a short evaluation each), to
measure what constrained decoding costs against the same requests without it.

Standard library only.
"""

import argparse
import http.client
import json
import socket
import statistics
import threading
import time
import urllib.parse


def one_request(url, body, timeout):
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    start = time.monotonic()
    try:
        conn.request("POST", u.path.rstrip("/") + "/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        latency = time.monotonic() - start
        if resp.status != 200:
            return None, latency, f"HTTP {resp.status}: {data[:200]!r}"
        tokens = json.loads(data)["usage"]["completion_tokens"]
        return tokens, latency, None
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not raised
        return None, time.monotonic() - start, str(e)
    finally:
        conn.close()


RATINGS = {
    "type": "object",
    "properties": {"ratings": {"type": "array", "minItems": 3, "maxItems": 3, "items": {
        "type": "object",
        "properties": {"id": {"type": "integer", "enum": [1, 2, 3]}, "evaluation": {"type": "string"},
                       "rating": {"type": "integer", "enum": [0, 1, 2, 3, 4]}},
        "required": ["id", "evaluation", "rating"], "additionalProperties": False}}},
    "required": ["ratings"], "additionalProperties": False,
}


def stall(url, n):
    """Opens n connections that send half a request and then nothing."""
    u = urllib.parse.urlsplit(url)
    socks = []
    for _ in range(n):
        s = socket.create_connection((u.hostname, u.port))
        s.sendall(b"POST " + u.path.encode() + b"/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
        socks.append(s)
    return socks


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default="dpo2d")
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--stalled", type=int, default=40)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--schema", action="store_true", help="ask for a judge-like JSON schema (structured outputs)")
    a = ap.parse_args()

    stalled = stall(a.url, a.stalled)
    results = []
    lock = threading.Lock()
    queue = list(range(a.requests))

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                i = queue.pop()
            body = {
                "model": a.model,
                "messages": [{"role": "user", "content": f"Question {i}: name a colour and a fruit."}],
                "max_tokens": a.max_tokens,
                "temperature": 0.7,
                "seed": i,
            }
            if a.schema:
                body["response_format"] = {"type": "json_schema", "json_schema": {"name": "ratings", "strict": True, "schema": RATINGS}}
            r = one_request(a.url, body, a.timeout)
            with lock:
                results.append(r)

    start = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(a.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    for s in stalled:
        s.close()

    ok = [r for r in results if r[0] is not None]
    lat = sorted(r[1] for r in ok)
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")  # noqa: E731
    errors = [r[2] for r in results if r[2]]
    print(json.dumps({
        "requests": a.requests, "answered": len(ok), "failed": len(errors), "first_error": errors[0] if errors else None,
        "concurrency": a.concurrency, "max_tokens": a.max_tokens, "stalled": a.stalled, "schema": a.schema,
        "p50_s": round(pct(0.50), 2), "p90_s": round(pct(0.90), 2), "p99_s": round(pct(0.99), 2),
        "mean_s": round(statistics.mean(lat), 2) if lat else None,
        "completion_tokens": sum(r[0] for r in ok), "wall_s": round(wall, 1),
        "tokens_per_s": round(sum(r[0] for r in ok) / wall, 1),
    }))


if __name__ == "__main__":
    main()
