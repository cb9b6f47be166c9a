"""A frontend worker's group on the scheduler's side (server/workers.py): `WorkerEndpoint` cuts it
into runs by what the model's batcher takes (`InferenceService.group_rows`, given the group's rows)
and answers each run with one `gok` frame. Driven here through a real repository, service and
onnxruntime session, with a recording link in place of the socket to the worker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import model_builders as mb
import numpy as np
from test_batch_cost import ADD_SUB, drive

from server import ipc
from server.repository import Repository
from server.service import InferenceService
from server.types import InferRequest, Tensor
from server.workers import WorkerEndpoint


class RecordingLink:
    """What the scheduler sends back to the worker, in order."""

    def __init__(self) -> None:
        self.sent: list[ipc.Message] = []

    def send(self, message: ipc.Message) -> None:
        self.sent.append(message)


def one_row(value: float) -> InferRequest:
    return InferRequest("plus", "", [Tensor("INPUT", "FP32", (1, 4), np.full((1, 4), value, np.float32))], [],
                        f"c{value:g}")


async def answers(link: RecordingLink, ids: int) -> list[ipc.Message]:
    """The frames sent until every one of `ids` worker request ids is answered (10 s at most)."""
    async def wait() -> None:
        while sum(len(m[2][1]) if m[0] == "gok" else 1 for m in link.sent) < ids:
            await asyncio.sleep(0.001)
    await asyncio.wait_for(wait(), 10)
    return link.sent


def test_a_group_that_heads_the_next_batch_is_one_run_and_one_behind_others_is_cut(tmp_path: Path):
    """27 one-row requests in a frame, with the learned size at 63-64 and the grain at 16: alone, they
    head the next batch and are one run (one `gok`); behind a request of the same frame, they are
    cut at the grain (16 + 11). Either way each member gets its own rows."""
    mb.write_config(tmp_path / "plus", 'name: "plus"\nbackend: "onnxruntime"\nmax_batch_size: 64\n'
                    'input [{ name: "INPUT" data_type: TYPE_FP32 dims: [4] }]\n'
                    'output [{ name: "OUTPUT" data_type: TYPE_FP32 dims: [4] }]\ndynamic_batching { }\n')
    (tmp_path / "plus" / "1").mkdir()
    mb.add_constant(tmp_path / "plus" / "1" / "model.onnx", 0.5)

    async def main() -> None:
        repository = Repository((tmp_path,))
        await repository.load("plus")
        try:
            service = InferenceService(repository)
            service.accepting = True  # start-up loading is done (app.py)
            endpoint = WorkerEndpoint(service, rest=lambda r: None, grpc_methods={},
                                      error_status=lambda e: (500, str(e)))
            link = RecordingLink()
            endpoint.link = link
            curve = repository.get("plus").scheduler.curve
            for ahead, runs in ((False, [27]), (True, [16, 11])):
                link.sent.clear()
                drive(curve, ADD_SUB, 600)  # the curve as a model that is cheaper per row in larger batches
                assert curve.size() in (63, 64) and curve.grain() == 16
                members = [(100 + k, one_row(k)) for k in range(27)]
                frame: list[ipc.Message] = [("group", 1, ipc.pack_group(members))]
                if ahead:
                    frame.insert(0, ("infer", 99, ipc.pack_request(one_row(-1))))
                endpoint.on_messages(frame)
                sent = await answers(link, 27 + ahead)
                assert [len(m[2][1]) for m in sent if m[0] == "gok"] == runs, sent
                rows = {}
                for kind, rid, payload in sent:
                    if kind == "gok":
                        for mrid, response in ipc.split_group(ipc.unpack_response(payload[0]), payload[1]):
                            rows[mrid] = response.outputs[0].data
                    else:
                        assert kind == "ok" and rid == 99, (kind, rid, payload)
                assert sorted(rows) == [100 + k for k in range(27)]
                for k in range(27):
                    np.testing.assert_array_equal(rows[100 + k], np.full((1, 4), k + 0.5, np.float32))
        finally:
            await repository.close()

    asyncio.run(main())
