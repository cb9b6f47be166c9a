#!/usr/bin/env python3
"""What carrying a request and its response over the worker link costs (server/ipc.py), per request:
pickling the InferRequest/InferResponse objects (numpy arrays inside) against the tuples of plain
values and raw bytes that the link sends. 32 add_sub requests per frame, as under load.

    python loadtests/bench_ipc.py
"""

from __future__ import annotations

import pickle
import sys
import timeit
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server import ipc  # noqa: E402
from server.types import InferRequest, InferResponse, Tensor  # noqa: E402

N = 32


def requests() -> list[InferRequest]:
    out = []
    for i in range(N):
        a = np.full((1, 16), i, np.int32)
        out.append(InferRequest("add_sub", "", [Tensor("INPUT0", "INT32", (1, 16), a),
                                                Tensor("INPUT1", "INT32", (1, 16), a.copy())], []))
    return out


def responses() -> list[InferResponse]:
    return [InferResponse("add_sub", "1", [Tensor(n, "INT32", (1, 16), np.full((1, 16), i, np.int32))
                                           for n in ("OUTPUT0", "OUTPUT1")]) for i in range(N)]


def per_request_us(fn, rounds: int = 500) -> float:
    return min(timeit.repeat(fn, number=rounds, repeat=3)) / rounds / N * 1e6


def main() -> None:
    reqs, resps = requests(), responses()
    frame = pickle.HIGHEST_PROTOCOL
    objects = {
        "request out": lambda: pickle.dumps(reqs, frame),
        "request in": (lambda d: lambda: pickle.loads(d))(pickle.dumps(reqs, frame)),
        "response out": lambda: pickle.dumps(resps, frame),
        "response in": (lambda d: lambda: pickle.loads(d))(pickle.dumps(resps, frame)),
    }
    tuples = {
        "request out": lambda: pickle.dumps([ipc.pack_request(r) for r in reqs], frame),
        "request in": (lambda d: lambda: [ipc.unpack_request(p) for p in pickle.loads(d)])(
            pickle.dumps([ipc.pack_request(r) for r in reqs], frame)),
        "response out": lambda: pickle.dumps([ipc.pack_response(r) for r in resps], frame),
        "response in": (lambda d: lambda: [ipc.unpack_response(p) for p in pickle.loads(d)])(
            pickle.dumps([ipc.pack_response(r) for r in resps], frame)),
    }
    print("| step (us per request) | pickled objects | packed tuples (the link) |")
    print("|---|---|---|")
    total = [0.0, 0.0]
    for step in objects:
        a, b = per_request_us(objects[step]), per_request_us(tuples[step])
        total[0] += a
        total[1] += b
        print(f"| {step} | {a:.1f} | {b:.1f} |")
    print(f"| all four | {total[0]:.1f} | {total[1]:.1f} |")


if __name__ == "__main__":
    main()
