"""``certserve-client``: the command line on top of ``Client``.

    certserve-client certify digit.png --radius 0.5 --mode adaptive
    certserve-client job submit images.zip --n 10000 --wait
    certserve-client job results ID --format tsv > log.tsv

The server is ``--url`` (or CERTSERVE_URL), the key ``--api-key`` (or CERTSERVE_API_KEY).
Answers go to stdout (one summary line, or the whole answer with ``--json``), progress bars and
errors to stderr. The exit status tells a script what happened (EXIT_* below, in ``--help``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel

from certserve_client.client import DEFAULT_URL, Client
from certserve_client.errors import CertserveError, RequestRejected, SignatureError
from certserve_client.models import Certificate, Prediction

EXIT_OK = 0  # the answer is a label (certify: certified; with --radius: certified at that radius); job done
EXIT_ABSTAINED = 1  # PREDICT or CERTIFY abstained
EXIT_USAGE = 2  # bad command line (argparse's own status)
EXIT_NOT_CERTIFIED = 3  # certify --radius: a label, but not certified at that radius
EXIT_REJECTED = 4  # the server refused the request (4xx: key, unknown model or job, bad input, too large)
EXIT_UNAVAILABLE = 5  # no answer: unreachable, 503 after the retries, 504 deadline, 5xx
EXIT_JOB_UNFINISHED = 6  # job wait: the job failed or was cancelled
EXIT_BAD_SIGNATURE = 7  # certify --verify: the signature is missing or does not verify

EXIT_CODES = f"""exit status:
  {EXIT_OK}  ok: a label (certify: certified, at --radius if given); job done
  {EXIT_ABSTAINED}  abstained
  {EXIT_USAGE}  usage error
  {EXIT_NOT_CERTIFIED}  certify --radius: not certified at that radius
  {EXIT_REJECTED}  the server refused the request (4xx)
  {EXIT_UNAVAILABLE}  server unavailable (unreachable, 503 after retries, 504, 5xx)
  {EXIT_JOB_UNFINISHED}  job failed or was cancelled
  {EXIT_BAD_SIGNATURE}  certify --verify: bad or missing signature"""


def emit(value: Any, as_json: bool, summary: str) -> None:
    if as_json:
        body = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        print(json.dumps(body, indent=2))
    else:
        print(summary)


def label_text(answer: Prediction | Certificate) -> str:
    return f"label {answer.label} ({answer.class_name})"


def run_predict(client: Client, args: argparse.Namespace) -> int:
    answer = client.predict(
        args.image,
        model=args.model,
        n=args.n,
        alpha=args.alpha,
        seed=args.seed,
        resize=args.resize,
        priority=args.priority,
        timeout_s=args.timeout_s,
    )
    if answer.abstained:
        summary = f"abstained (p-value {answer.p_value:.3g} > α = {answer.alpha:g}; counts {answer.counts})"
    else:
        summary = f"{label_text(answer)}, p-value {answer.p_value:.3g}, n = {answer.n}, model {answer.model}"
    emit(answer, args.json, summary)
    return EXIT_ABSTAINED if answer.abstained else EXIT_OK


def run_certify(client: Client, args: argparse.Namespace) -> int:
    answer = client.certify(
        args.image,
        model=args.model,
        mode=args.mode,
        n0=args.n0,
        n=args.n,
        alpha=args.alpha,
        radius=args.radius,
        tolerance=args.tolerance,
        seed=args.seed,
        resize=args.resize,
        priority=args.priority,
        timeout_s=args.timeout_s,
        verify=args.verify,
    )
    facts = f"p_A ≥ {answer.p_a_lower:.4f}, {answer.samples} samples ({answer.mode}), model {answer.model}"
    if answer.abstained:
        emit(answer, args.json, f"abstained ({facts})")
        return EXIT_ABSTAINED
    radius = f"{label_text(answer)}, radius {answer.radius:.4f}"
    if answer.certified_at_radius is False:
        emit(answer, args.json, f"not certified at radius {answer.target_radius:g}: {radius} ({facts})")
        return EXIT_NOT_CERTIFIED
    emit(answer, args.json, f"certified: {radius} ({facts})")
    return EXIT_OK


def run_models(client: Client, args: argparse.Namespace) -> int:
    models = client.models()
    lines = [f"{m.id}\tσ={m.sigma:g}\t{m.dataset}\t{m.architecture}\t{list(m.input_shape)}\t{m.device}" for m in models]
    emit([m.model_dump(mode="json") for m in models], args.json, "\n".join(lines))
    return EXIT_OK


def job_summary(status: Any) -> str:
    line = f"job {status.id}: {status.state}, {status.done}/{status.total} images, {status.abstentions} abstained"
    return line + (f" ({status.error})" if status.error else "")


def finished_status(client: Client, job_id: str, args: argparse.Namespace) -> int:
    status = client.wait(job_id, progress=not args.no_progress, poll_s=args.poll)
    emit(status, args.json, job_summary(status))
    return EXIT_OK if status.state == "done" else EXIT_JOB_UNFINISHED


def run_job_submit(client: Client, args: argparse.Namespace) -> int:
    created = client.submit_job(
        args.file,
        model=args.model,
        n0=args.n0,
        n=args.n,
        alpha=args.alpha,
        seed=args.seed,
        mode=args.mode,
        radius=args.radius,
        tolerance=args.tolerance,
    )
    if not args.wait:
        emit(created, args.json, created.id)
        return EXIT_OK
    print(created.id, file=sys.stderr)
    return finished_status(client, created.id, args)


def run_job_status(client: Client, args: argparse.Namespace) -> int:
    status = client.job(args.id)
    emit(status, args.json, job_summary(status))
    return EXIT_OK


def run_job_wait(client: Client, args: argparse.Namespace) -> int:
    return finished_status(client, args.id, args)


def run_job_results(client: Client, args: argparse.Namespace) -> int:
    if args.format == "tsv":
        sys.stdout.write(client.results(args.id, "tsv"))
    else:
        print(json.dumps(client.results(args.id).model_dump(mode="json"), indent=2))
    return EXIT_OK


def run_job_cancel(client: Client, args: argparse.Namespace) -> int:
    status = client.cancel(args.id)
    emit(status, args.json, job_summary(status))
    return EXIT_OK


def add_sampling_options(parser: argparse.ArgumentParser, *, n0: bool) -> None:
    parser.add_argument("--model", help="model id (default: the server's first)")
    if n0:
        parser.add_argument("--n0", type=int, help="selection samples (server default 100)")
    parser.add_argument("--n", type=int, help="noise samples (server default)")
    parser.add_argument("--alpha", type=float, help="failure probability α (server default 0.001)")
    parser.add_argument("--seed", type=int, help="noise seed (default: the server draws one)")


def add_control_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resize", action="store_true", help="resample to the model's height/width")
    parser.add_argument("--priority", choices=("interactive", "batch"), help="batch: queued with the batch jobs")
    parser.add_argument("--timeout-s", type=float, help="the server's deadline for this request (only shortens it)")


def add_mode_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=("fixed", "adaptive"), help="fixed n (default) or adaptive (at most n)")
    parser.add_argument("--radius", type=float, help="decide whether it is certified at this ℓ2 radius")
    parser.add_argument("--tolerance", type=float, help="adaptive: stop once the radius cannot grow by more")


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(
        prog="certserve-client",
        description="Certified predictions from a certserve server.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    main.add_argument("--url", default=os.environ.get("CERTSERVE_URL", DEFAULT_URL), help="server (CERTSERVE_URL)")
    main.add_argument("--api-key", default=os.environ.get("CERTSERVE_API_KEY"), help="API key (CERTSERVE_API_KEY)")
    main.add_argument("--timeout", type=float, default=330.0, help="seconds to wait for one answer")
    main.add_argument("--json", action="store_true", help="print whole answers as JSON")
    commands = main.add_subparsers(dest="command", required=True, metavar="command")

    predict = commands.add_parser("predict", help="PREDICT: a label or an abstention", epilog=EXIT_CODES)
    predict.add_argument("image", help="an image file (PNG, JPEG, ...)")
    add_sampling_options(predict, n0=False)
    add_control_options(predict)
    predict.set_defaults(run=run_predict)

    certify = commands.add_parser("certify", help="CERTIFY: a label with a certified ℓ2 radius", epilog=EXIT_CODES)
    certify.add_argument("image", help="an image file (PNG, JPEG, ...)")
    add_sampling_options(certify, n0=True)
    add_mode_options(certify)
    add_control_options(certify)
    certify.add_argument("--verify", action="store_true", help="check the server's signature on the certificate")
    certify.set_defaults(run=run_certify)

    models = commands.add_parser("models", help="the loaded models")
    models.set_defaults(run=run_models)

    job = commands.add_parser("job", help="batch jobs: submit, status, wait, results, cancel")
    jobs = job.add_subparsers(dest="job_command", required=True, metavar="job-command")
    submit = jobs.add_parser("submit", help="certify a .zip/.tar of images or an .npz", epilog=EXIT_CODES)
    submit.add_argument("file")
    add_sampling_options(submit, n0=True)
    add_mode_options(submit)
    submit.add_argument("--wait", action="store_true", help="wait for the job (progress bar on stderr)")
    for name, run, text in (
        ("status", run_job_status, "a job's state and progress"),
        ("wait", run_job_wait, "wait until a job is finished (progress bar on stderr)"),
        ("results", run_job_results, "a job's rows so far"),
        ("cancel", run_job_cancel, "cancel a job"),
    ):
        sub = jobs.add_parser(name, help=text, epilog=EXIT_CODES)
        sub.add_argument("id", help="the job id (put -- before an id that begins with -)")
        sub.set_defaults(run=run)
        if name == "results":
            sub.add_argument("--format", choices=("json", "tsv"), default="json", help="JSON rows or the paper's TSV")
    submit.set_defaults(run=run_job_submit)
    for sub in (submit, jobs.choices["wait"]):
        sub.add_argument("--no-progress", action="store_true", help="no progress bar")
        sub.add_argument("--poll", type=float, default=0.5, help="seconds between status checks")
    return main


def exit_status(error: CertserveError) -> int:
    if isinstance(error, SignatureError):
        return EXIT_BAD_SIGNATURE
    if isinstance(error, RequestRejected):
        return EXIT_REJECTED
    return EXIT_UNAVAILABLE  # ServerUnavailable: unreachable, 503 after the retries, 504, 5xx


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    run: Callable[[Client, argparse.Namespace], int] = args.run
    try:
        with Client(args.url, api_key=args.api_key, timeout=args.timeout) as client:
            return run(client, args)
    except CertserveError as error:
        print(f"certserve-client: {error}", file=sys.stderr)
        return exit_status(error)
    except OSError as error:  # an input file that cannot be read
        print(f"certserve-client: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
