"""The /v1/jobs routes: certify a whole uploaded set of images in the background.

The routes only validate and delegate: ``service.jobs.runner`` parses the upload (zip, tar or .npz),
stores the job and runs it through the engine at the lowest priority. A job is visible only to
the API key that created it; another key gets the same 404 as a job that does not exist.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from service.http.auth import Caller, require_key
from service.http.inputs import certify_question, media_type_of, read_form
from service.http.routes_smoothing import ERROR_RESPONSES, form_schema
from service.http.schemas import ErrorResponse, JobCreated, JobParams
from service.http.state import services
from service.jobs.plots import job_plot
from service.jobs.runner import results_tsv
from service.jobs.uploads import parse_upload
from service.messages import shown
from smoothing.sampling import new_seed

PLOT_MEDIA_TYPES = {"png": "image/png", "svg": "image/svg+xml"}
RECENT_JOBS = 20

router = APIRouter(prefix="/v1/jobs", dependencies=[Depends(require_key)], responses=ERROR_RESPONSES, tags=["jobs"])

TSV_MEDIA_TYPE = "text/tab-separated-values"
JOB_FILE = "a .zip or .tar(.gz) of images, or an .npz with `images` and optional `labels`"
JOB_FORM_DOC = {
    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form_schema(JobParams, JOB_FILE)}}}
}


def job_not_found(job_id: str) -> HTTPException:
    return HTTPException(404, f"no job {shown(job_id)} (it does not exist, or another API key created it)")


@router.post(
    "",
    status_code=202,
    response_model=JobCreated,
    summary="Start certifying a set of images",
    description="Upload a zip or tar of images, or an .npz holding `images` (N,H,W), (N,H,W,C) or (N,C,H,W) and "
    "optional `labels`; every image is certified with n0, n and α in the given mode (as /v1/certify). "
    "Answers 202 with the job's id and URLs.",
    openapi_extra=JOB_FORM_DOC,
)
async def create_job(request: Request, caller: Caller) -> JSONResponse:
    svc = services(request)
    settings = svc.settings
    if media_type_of(request) != "multipart/form-data":
        raise HTTPException(415, "send the image set as multipart/form-data in the field 'file'")
    params, filename, data = await read_form(request, JobParams)
    loaded = svc.engine.model(params.model or svc.default_model)
    question = certify_question(params, loaded.manifest.sigma, settings)
    seed = new_seed() if params.seed is None else params.seed
    parsed = await asyncio.to_thread(
        parse_upload,
        filename,
        data,
        input_shape=loaded.manifest.input_shape,
        max_images=settings.max_job_images,
        max_pixels=settings.max_image_pixels,
        max_total_bytes=settings.max_job_bytes,
        budget=svc.uploads,
    )
    try:
        job_id = await svc.jobs.create(
            caller,
            parsed,
            loaded.manifest.id,
            question.n0,
            question.n,
            question.alpha,
            seed,
            mode=params.mode,
            radius=params.radius,
            tolerance=params.tolerance,
        )
    except ValueError as e:  # inputs that parse_upload let through but the runner refuses
        raise HTTPException(422, str(e)) from None
    status_url = f"/v1/jobs/{job_id}"
    created = JobCreated(id=job_id, status_url=status_url, results_url=f"{status_url}/results")
    return JSONResponse(created.model_dump(), status_code=202, headers={"Location": status_url})


@router.get(
    "",
    summary="The caller's recent jobs, newest first",
    description="The statuses (as GET /v1/jobs/{id} gives them) of the newest jobs created with the caller's API key "
    "(without authentication: every job).",
)
async def list_jobs(
    request: Request,
    caller: Caller,
    limit: Annotated[int, Query(ge=1, le=100, description="most jobs listed")] = RECENT_JOBS,
) -> dict[str, Any]:
    return {"jobs": await services(request).jobs.recent(caller, limit)}


@router.get("/{job_id}", summary="A job's state and progress (done/total, abstentions, estimated seconds left)")
async def job_status(request: Request, job_id: str, caller: Caller) -> dict[str, Any]:
    status = await services(request).jobs.status(job_id, caller)
    if status is None:
        raise job_not_found(job_id)
    return {"id": job_id, **status}


@router.get(
    "/{job_id}/results",
    summary="A job's per-image certificates so far, as JSON or as the paper's TSV",
    description="TSV columns: idx, label (-1 when the upload had no labels), predict (-1 = abstained), radius "
    "(ℓ2, [0, 1] pixel space at the model's input resolution), correct, time (seconds).",
    response_model=None,
    responses={
        200: {
            "description": "format=json: the rows as JSON; format=tsv: the paper's log format",
            "content": {
                "application/json": {"schema": {"type": "object"}},
                TSV_MEDIA_TYPE: {"schema": {"type": "string"}},
            },
        }
    },
)
async def job_results(
    request: Request,
    job_id: str,
    caller: Caller,
    format: Annotated[Literal["json", "tsv"], Query(description="json or tsv")] = "json",
) -> dict[str, Any] | PlainTextResponse:
    jobs = services(request).jobs
    status = await jobs.status(job_id, caller)
    if status is None:
        raise job_not_found(job_id)
    rows = await jobs.results(job_id, caller)
    if format == "tsv":
        return PlainTextResponse(results_tsv(rows), media_type=TSV_MEDIA_TYPE)
    return {"id": job_id, "state": status["state"], "results": rows}


@router.get(
    "/{job_id}/plot.{image_format}",
    summary="A job's plot: certified accuracy against radius (labels known) or the histogram of radii",
    description="Drawn by the offline `analyze` code (training.plots) from the results so far: with labels, the "
    "approximate certified accuracy at each ℓ2 radius; without, the histogram of the certified radii and how many "
    "images abstained. 409 while the job has no result yet.",
    response_class=Response,
    responses={
        200: {"content": {media: {} for media in PLOT_MEDIA_TYPES.values()}, "description": "the plot"},
        409: {"model": ErrorResponse, "description": "the job has no result yet"},
    },
)
async def job_plot_image(
    request: Request, job_id: str, image_format: Literal["png", "svg"], caller: Caller
) -> Response:
    jobs = services(request).jobs
    status = await jobs.status(job_id, caller)
    if status is None:
        raise job_not_found(job_id)
    rows = await jobs.results(job_id, caller) or []
    if not rows:
        raise HTTPException(409, f"job {job_id!r} has no result to plot yet (state {status['state']})")
    image = await asyncio.to_thread(job_plot, status, rows, image_format)
    # The plot changes while the job runs: never serve a stale one from a cache.
    return Response(image, media_type=PLOT_MEDIA_TYPES[image_format], headers={"Cache-Control": "no-store"})


@router.delete("/{job_id}", summary="Cancel a job (finished images keep their results)")
async def cancel_job(request: Request, job_id: str, caller: Caller) -> dict[str, Any]:
    jobs = services(request).jobs
    if await jobs.status(job_id, caller) is None:
        raise job_not_found(job_id)
    await jobs.cancel(job_id, caller)
    status = await jobs.status(job_id, caller) or {}
    # A job that had already finished keeps its state: say whether this call cancelled anything.
    return {"id": job_id, "cancelled": status.get("state") == "cancelled", **status}
