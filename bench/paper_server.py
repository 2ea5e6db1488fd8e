"""The paper's loop behind the service's HTTP stack: what a user of Cohen et al.'s code would deploy.

``python -m bench.paper_server --model-dir D --model ID --device cpu --port P`` serves one model
with FastAPI on uvicorn, as the service does, and one endpoint per mode:

- ``POST /predict``, ``POST /certify``: the service's JSON body (``image_base64``, ``seed``, ``n``,
  ``n0``, ``alpha``; other keys ignored). Requests are served one at a time in arrival order
  (first in, first out, one compute thread), each through the model as loaded, in batches of 1,000,
  denormal floats kept: ``bench.baseline.paper_answer``. The answer is the decision as JSON.
- ``POST /noop``: reads the body and answers ``{}`` (the load generators' CPU cost is measured on it).
- ``GET /healthz``: 200 once the model is loaded.

Threads mirror the service's (bench.compute_thread): the compute thread uses every core, the
event loop one, so that the HTTP stack and the forward passes share the CPU as they do there.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch
import uvicorn
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict

from bench.baseline import paper_answer
from bench.compute_thread import on_compute_thread, start_compute_thread, submit_to_compute_thread
from models.registry import load_model
from service.decoding import decode_base64, decode_image

log = logging.getLogger("bench.paper_server")


class PaperRequest(BaseModel):
    """The service's JSON body, as far as the paper's loop reads it."""

    model_config = ConfigDict(extra="ignore")

    image_base64: str
    seed: int
    n: int
    n0: int = 0
    alpha: float = 0.001


def create_paper_app(model_dir: Path, model_id: str, device: torch.device) -> FastAPI:
    """The FIFO app serving ``model_id`` from ``model_dir`` on ``device``; call ``start_compute_thread`` first."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Loaded on the compute thread, which also keeps denormal floats for the rest of its life (the paper's loop).
        app.state.model, app.state.manifest = on_compute_thread(load_model, model_dir, model_id, device)
        on_compute_thread(torch.set_flush_denormal, False)
        log.info("paper loop serving %s on %s", model_id, device)
        yield
        on_compute_thread(torch.set_flush_denormal, True)  # the benchmark's setting everywhere else

    app = FastAPI(title="paper loop (FIFO)", lifespan=lifespan)

    async def answer(request: Request, body: PaperRequest, kind: Literal["predict", "certify"]) -> dict[str, Any]:
        state = request.app.state
        shape = state.manifest.input_shape
        image = decode_base64(body.image_base64)
        x = decode_image(image, input_shape=shape, max_pixels=shape[1] * shape[2], resize=False)
        future = submit_to_compute_thread(
            paper_answer,
            state.model,
            state.manifest,
            x.to(device),
            kind=kind,
            n0=body.n0,
            n=body.n,
            seed=body.seed,
            alpha=body.alpha,
        )
        return asdict(await asyncio.wrap_future(future))

    @app.post("/predict")
    async def predict(request: Request, body: PaperRequest) -> dict[str, Any]:
        return await answer(request, body, "predict")

    @app.post("/certify")
    async def certify(request: Request, body: PaperRequest) -> dict[str, Any]:
        return await answer(request, body, "certify")

    @app.post("/noop")
    async def noop(request: Request) -> dict[str, Any]:
        await request.body()
        return {}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.paper_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start_compute_thread()
    app = create_paper_app(args.model_dir, args.model, torch.device(args.device))
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
