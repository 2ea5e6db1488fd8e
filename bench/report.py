"""BENCHMARKS.md from the results files: one section per device, headline ratios first.

The report is generated: edit ``bench/findings.md`` (where the time goes, written after
profiling) rather than the report; it is included under every run's sections.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FINDINGS = Path(__file__).resolve().parent / "findings.md"
# The statistical studies (training/studies) write their sections here; the report includes them after speed.
STUDIES = Path(__file__).resolve().parents[1] / "results" / "sample-efficiency"
SAMPLE_EFFICIENCY = STUDIES / "report.md"  # python -m training.studies.sample_efficiency
BOUND_STUDY = STUDIES / "bounds.md"  # python -m training.studies.bound_sim
POOL = Path(__file__).resolve().parent / "results"
NOISE_SECTION = Path(__file__).resolve().parent / "results" / "noise_ab.md"  # python -m bench.noise_ab
LAUNCH_SECTION = Path(__file__).resolve().parent / "results" / "launches.md"  # python -m bench.launches
# python -m training.studies.n0_sim: the radius decision's defaults (issue 16)
N0_STUDY = STUDIES / "n0-decision.md"
POOL_SECTIONS = (  # issue 17: python -m bench.executors, python -m bench.workers, and the paper estimate
    POOL / "executors" / "report.md",
    POOL / "workers" / "report.md",
    POOL / "workers" / "scaling.md",
)


def num(value: float | None, digits: int = 0) -> str:
    """A number with thousands separators, or '—'."""
    return "—" if value is None else f"{value:,.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def verdict(met: bool | None) -> str:
    return {True: "met", False: "**missed**", None: ""}[met]


def run_kind(r: dict[str, Any]) -> str:
    if r["quick"]:
        return "quick (smoke test: sizes too small to mean anything)"
    return "brief (full sizes, short windows)" if r.get("brief") else "full"


def machine_section(r: dict[str, Any]) -> list[str]:
    m, model, s = r["machine"], r["model"], r["settings"]
    rows = [
        ["date (UTC)", m["date_utc"]],
        [
            "CPU",
            f"{m['cpu_model']}, {m['cpu_cores']} cores ({m['cpu_cores_usable']} usable), "
            f"bf16 flags: {', '.join(m['cpu_bf16_flags']) or 'none'}",
        ],
        ["memory", f"{m['memory_gib']} GiB"],
        ["load average at start", ", ".join(str(v) for v in m["load_average_at_start"])],
        ["device", m["device"] if m["device"] == "cpu" else f"{m['device']} ({m['device_name']}, CUDA {m['cuda']})"],
        [
            "software",
            f"Python {m['python']}, torch {m['torch']}, {m['torch_threads']} intra-op threads "
            f"({m['torch_interop_threads']} inter-op)",
        ],
        ["commit", str(m["git_commit"])],
        [
            "model",
            f"{model['id']} ({model['architecture']}, {model['dataset']}, input "
            f"{'×'.join(map(str, model['input_shape']))}, σ = {model['sigma']})",
        ],
        [
            "requests",
            f"CERTIFY n0 = {s['n0']}, n = {num(s['certify_n'])}; PREDICT n = {s['predict_n']}; "
            f"α = {s['alpha']}; images: {r.get('images', '?')}",
        ],
        [
            "run",
            f"{run_kind(r)}, {num(r.get('total_seconds'))} s",
        ],
    ]
    return table(["", ""], rows)


def headline_section(r: dict[str, Any]) -> list[str]:
    rows = []
    for h in r["headlines"]:
        value = "—" if h["value"] is None else f"{h['value']:.3g}{(' ' + h['unit']) if h['unit'] else ''}"
        rows.append([h["name"], value, h["target"], verdict(h["met"])])
    return table(["figure", "value", "target", ""], rows)


def limit_section(r: dict[str, Any]) -> list[str]:
    lim = r["limit"]
    used = lim["model_as_measured"]
    lines = [
        f"L = **{num(lim['samples_per_s'])} samples/s** (noise + forward + argmax, inference mode): batch "
        f"{used['batch_size']}, {'channels-last' if used['channels_last'] else 'contiguous'}, BatchNorm folded, "
        f"{used['precision']}.",
        "",
        "From the paper's loop to L, each step added to the previous one:",
        "",
    ]
    first = lim["ladder"][0]["samples_per_s"]
    lines += table(
        ["setting", "samples/s", "× paper loop"],
        [[s["step"], num(s["samples_per_s"]), f"{s['samples_per_s'] / first:.2f}"] for s in lim["ladder"]],
    )
    sweep = lim["batch_sweep"]
    batches = sorted({int(b) for t in sweep.values() for b in t})
    lines += ["", "Batch-size sweep (samples/s, BatchNorm folded):", ""]
    rows = [[fmt] + [num(t.get(str(b))) for b in batches] for fmt, t in sweep.items()]
    if lim.get("reduced_precision_batch_sweep"):
        reduced = lim["reduced_precision_batch_sweep"]
        fmt = "channels_last" if used["channels_last"] else "contiguous"
        rows.append([f"{fmt}, {used['precision']}"] + [num(reduced.get(str(b))) for b in batches])
    lines += table(["memory format"] + [str(b) for b in batches], rows)
    best = lim["sweep_best"]
    lines += [
        "",
        f"L runs at batch {used['batch_size']}, "
        f"{'channels-last' if used['channels_last'] else 'contiguous'} (the format the service's tuner "
        f"`prepare_for_inference` picked); this second sweep's best was batch "
        f"{best['batch_size']}, {best['memory_format'].replace('_', '-')} ({num(best['samples_per_s'])}).",
    ]
    plans = r.get("service_plans")
    if plans:  # what the service's own executors ran, as it left them in its tuning cache
        runs = "; ".join(
            f"on {p['device']} with {p['threads']} thread{'s' if p['threads'] != 1 else ''}: batches of "
            f"{p['batch_size']} samples, and of {p['interactive_batch_size']} for a second after any `/v1/predict`"
            for p in plans
        )
        lines += [
            "",
            f"The service's executors tuned their own plans ({runs}); the interactive size is the smallest batch "
            "within 15 % of the best throughput (`smoothing.tuning.NEAR_BEST`), so that a prediction waits less "
            "for the batch in flight, and the throughput size is where run-time refinement left it.",
        ]
    elif "service_batch_size" in used:
        lines += [
            "",
            f"The service ran batches of {used['service_batch_size']} samples, and of "
            f"{used['service_interactive_batch_size']} for a second after any `/v1/predict` arrived (the smallest "
            "batch near the best, so that a prediction waits less for the batch in flight).",
        ]
    fold = lim["bn_folding"]
    lines += [
        "",
        f"BatchNorm folding at the best batch: {num(fold['folded_samples_per_s'])} samples/s folded, "
        f"{num(fold['unfolded_samples_per_s'])} unfolded.",
    ]
    for p in lim["precisions"]:
        text = (
            f"{p['dtype']} autocast: {num(p['samples_per_s'])} samples/s = {p['ratio_to_float32']:.2f}× float32; "
            f"{'used' if p['used'] else 'not used'} ({p.get('reason', '')})."
        )
        check = p.get("radius_check")
        if check:
            same, spread = check["max_radius_difference_same_seed"], check["max_radius_difference_between_seeds"]
            text += (
                f" Radii on {check['images']} images (n = {num(check['n'])}, same seeds): max |Δr| = "
                f"{same:.4f} vs {spread:.4f} between two float32 seeds; "
                f"{'within' if check['passed'] else 'beyond'} sampling error."
            )
        lines += ["", text]
    return lines


def library_section(r: dict[str, Any]) -> list[str]:
    lib = r["library"]
    return [
        f"`smoothing.core.certify` (n0 = {lib['n0']}, n = {num(lib['n'])}, batch {lib['batch_size']}): "
        f"{num(lib['samples_per_s'])} samples/s over {lib['certifications']} certifications; median round "
        f"**{lib['fraction_of_limit']:.3f} L** (rounds: "
        + ", ".join(f"{row['fraction_of_limit']:.3f}" for row in lib["rounds"])
        + f"; each against the L windows around it, L ≈ {num(lib['limit_samples_per_s'])}; "
        f"{lib['abstentions']} abstentions, mean radius {lib['mean_radius']:.3f}).",
    ]


def service_section(r: dict[str, Any]) -> list[str]:
    svc = r["service"]
    float32 = "fraction_of_float32_limit" in svc["loads"][0]
    rows = []
    for load in svc["loads"]:
        lat = load["latency"]
        rows.append(
            [
                str(load["clients"]),
                num(load["samples_per_s"]),
                num(load["limit_samples_per_s"]),
                f"**{load['fraction_of_limit']:.3f}**",
            ]
            + ([f"{load['fraction_of_float32_limit']:.3f}"] if float32 else [])
            + [
                f"{load['window_s']:.0f}",
                str(load["certifications_finished_in_window"]),
                num(lat["p50_ms"]),
                num(lat["p99_ms"]),
                ", ".join(f"{k}: {v}" for k, v in load["errors"].items()) or "none",
            ]
        )
    lines = [
        f"K closed-loop clients over HTTP, each certifying a new image after the other (n0 = {svc['n0']}, "
        f"n = {num(svc['n'])}); samples/s from the service's `certserve_noise_samples_total` over the window.",
        "",
    ]
    if "service_devices" in r:
        lines += [
            f"The service ran with `CERTSERVE_DEVICES={r['service_devices']}`, as `make run` does (on a CPU: one "
            "one-thread executor per core, see Executors on one CPU below); L and the library compute in one "
            "process on every core, so on a CPU the service may exceed L.",
            "",
        ]
    if float32:
        lines += [
            f"L uses {r['limit']['model_as_measured']['precision']}, and so does the service (started with "
            "CERTSERVE_PRECISION set to it); its fraction of L in float32 is given too.",
            "",
        ]
    return lines + table(
        ["K", "samples/s", "L (around)", "÷ L"]
        + (["÷ L float32"] if float32 else [])
        + ["window s", "certs done", "p50 ms", "p99 ms", "errors"],
        rows,
    )


def memory_section(r: dict[str, Any]) -> list[str]:
    mem = r["memory"]
    series = ", ".join(f"{rss:.0f}" for _, rss in mem["rss_series"])
    return [
        f"Service process under K = {mem['clients']} for {mem['duration_s']:.0f} s: peak RSS (VmHWM) "
        f"**{num(mem['peak_mib'])} MiB**; RSS {num(mem['start_mib'])} → {num(mem['end_mib'])} MiB, fitted slope "
        f"{mem['slope_mib_per_min']:+.2f} MiB/min → {'flat' if mem['flat'] else '**growing**'} ({mem['flat_rule']}).",
        "",
        f"RSS samples (MiB): {series}",
    ]


def latency_section(r: dict[str, Any]) -> list[str]:
    lat = r["latency"]
    idle, sat = lat["idle"], lat["saturated"]
    saturating = f"{sat['certify_clients']} certify clients saturating the device"
    lines = []
    if lat.get("predict_client") == "bench.loadgen":
        lines += [
            "Predictions go out through `bench.loadgen` (encoded before the clock, on connections of their own); the "
            "saturating certifications through httpx.",
            "",
        ]
    lines += table(
        ["/v1/predict, n = 100", "requests", "p50 ms", "p99 ms"],
        [
            ["idle", str(idle["count"]), num(idle["p50_ms"], 1), num(idle["p99_ms"], 1)],
            [
                f"{saturating} ({sat['device_fraction_of_limit']:.2f} L)",
                str(sat["predict"]["count"]),
                num(sat["predict"]["p50_ms"], 1),
                num(sat["predict"]["p99_ms"], 1),
            ],
        ],
    )
    lines += [
        "",
        f"p99 saturated ÷ idle = **{lat['p99_saturated_over_idle']:.2f}** (p50: {lat['p50_saturated_over_idle']:.2f}).",
        "",
        "Closed-loop predict clients (throughput against latency):",
        "",
    ]
    lines += table(
        ["clients", "predicts/s", "samples/s", "p50 ms", "p99 ms", "errors"],
        [
            [
                str(p["clients"]),
                num(p["predicts_per_s"], 1),
                num(p["samples_per_s"]),
                num(p["p50_ms"], 1),
                num(p["p99_ms"], 1),
                ", ".join(f"{k}: {v}" for k, v in p["errors"].items()) or "none",
            ]
            for p in lat["sweep"]
        ],
    )
    lines += ["", f"Knee: **{lat['knee_clients']} clients** ({lat['knee_rule']})."]
    return lines


def mixed_section(r: dict[str, Any]) -> list[str]:
    mix = r["mixed_load"]
    load = mix["load"]
    spans = mix["makespans_s"]
    lines = [
        f"{load['predicts']} predicts (n = {load['predict_n']}) and certifications with n = "
        f"{', '.join(num(n) for n in load['certify_ns'])} (n0 = {load['n0']}), arriving at random within "
        f"{load['arrival_span_s']:g} s: {num(load['samples'])} samples in all. The paper server "
        "(`bench.paper_server`: FastAPI on uvicorn as the service, one endpoint per mode) serves them one at a time "
        "in arrival order, each in batches of 1,000 through the model as loaded. Both servers get the same JSON "
        "bodies from `bench.loadgen` (requests encoded before the clock, one keep-alive connection per request in "
        "flight).",
        "",
        f"Each side served the load {mix['rounds']} times, alternating; the table shows each side's median "
        f"round (makespans: paper server {', '.join(f'{s:.1f}' for s in spans['paper_server'])} s; service "
        f"{', '.join(f'{s:.1f}' for s in spans['service'])} s).",
        "",
    ]
    rows = []
    for name, run in (("paper server", mix["paper_server"]), ("service", mix["service"])):
        p, c = run["predict_latency"], run["certify_latency"]
        rows.append(
            [
                name,
                f"{run['makespan_s']:.1f}",
                num(run["samples_per_s"]),
                num(p["p50_ms"]),
                num(p["p99_ms"]),
                num(c["p50_ms"]),
                num(c["max_ms"]),
                ", ".join(f"{k}: {v}" for k, v in run["errors"].items()) or "none",
            ]
        )
    header = ["", "makespan s", "samples/s", "predict p50 ms", "predict p99 ms", "certify p50 ms", "certify max ms"]
    lines += table([*header, "errors"], rows)
    pairs = ", ".join(
        f"{num(lim)} ÷ {num(loop)}"
        for lim, loop in zip(mix["limit_samples_per_s"], mix["paper_loop_samples_per_s"], strict=True)
    )
    lines += [
        "",
        f"Speed-up: **{mix['throughput_speedup']:.2f}×** total throughput, against an attainable "
        f"**{mix['attainable_speedup']:.2f}×**: **{mix['fraction_of_attainable']:.2f}** of it. The attainable "
        "speed-up is the median of L ÷ the paper loop's raw rate (model as loaded, batch 1,000), each pair measured "
        f"in process one after the other, before the rounds and after each: {pairs} samples/s. Predict latency "
        f"{mix['predict_p50_speedup']:.1f}× lower at p50, {mix['predict_p99_speedup']:.1f}× at p99.",
    ]
    cost = r.get("client_cost")
    if cost:
        lines += [
            "",
            f"Client CPU per request (`time.process_time`, {cost['concurrency']} connections, "
            f"{num(cost['requests_per_round'])} requests per round, median of {len(cost['rounds_ms']['httpx'])} "
            f"alternating rounds, `POST {cost['path']}` of the paper server with a predict's body): "
            f"`bench.loadgen` **{cost['loadgen_cpu_ms_per_request']:.3f} ms**, httpx "
            f"**{cost['httpx_cpu_ms_per_request']:.3f} ms**.",
        ]
    return lines


def cache_section(r: dict[str, Any]) -> list[str]:
    rows = []
    for name, c in r["cache"].items():
        if "unavailable" in c:
            rows.append([name, f"not measured: {c['unavailable']}", "", "", ""])
            continue
        rep = c["repeats"]
        rows.append(
            [
                f"{name}" + (f" ({c['url']})" if "url" in c else ""),
                str(rep["count"]),
                num(rep["p50_ms"], 2),
                num(rep["p99_ms"], 2),
                str(c["repeats_not_cached"]),
            ]
        )
    return [
        "One image certified once from server randomness (n = "
        f"{num(r['settings']['cache_n'])}), then asked for again and again; latency of the repeats at the client, "
        "sent one after another on one connection of their own (`bench.loadgen`).",
        "",
    ] + table(["cache", "repeats", "p50 ms", "p99 ms", "not cached"], rows)


SECTIONS = [
    ("Headlines", headline_section),
    ("Machine and settings", machine_section),
    ("The limit L", limit_section),
    ("Library", library_section),
    ("Service under K concurrent certify clients", service_section),
    ("Memory", memory_section),
    ("Predict latency under load", latency_section),
    ("Mixed load: the service against the paper's loop behind HTTP", mixed_section),
    ("Certificate cache", cache_section),
]


def render(runs: list[dict[str, Any]]) -> str:
    """The whole report for ``runs`` (one results dict per device)."""
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m bench` (results in `bench/results/<device>.json`); do not edit by hand — the "
        "analysis lives in `bench/findings.md`. Every headline figure is a ratio of two numbers measured in the "
        "same run (L is re-measured right before and after each part and compared with their mean), so a noisy "
        "machine still gives stable answers.",
        "",
        "Rerun: `python -m bench` (add `--device cuda` on a GPU); `python -m bench --quick` is the smoke test.",
    ]
    for r in runs:
        m = r["machine"]
        where = f"CPU: {m['cpu_model']}, {m['cpu_cores']} cores" if m["device"] == "cpu" else m["device_name"]
        lines += ["", f"## {where} — {r['model']['id']} ({m['date_utc'][:10]})"]
        if r["quick"]:
            lines += [
                "",
                "> Quick run (the test suite's smoke test): sizes and windows too small for the numbers to "
                "mean anything.",
            ]
        for title, section in SECTIONS:
            lines += ["", f"### {title}", "", *section(r)]
    for section in (NOISE_SECTION, LAUNCH_SECTION, *POOL_SECTIONS):
        if section.exists():
            lines += ["", section.read_text().strip()]
    if FINDINGS.exists():
        lines += ["", "## Where the time goes", "", FINDINGS.read_text().strip()]
    for study in (SAMPLE_EFFICIENCY, BOUND_STUDY, N0_STUDY):
        if study.exists():
            lines += ["", study.read_text().strip()]
    return "\n".join(lines) + "\n"


def write_report(current: Path, report: Path) -> None:
    """Render ``current`` and every other results file in its folder of the same kind (quick or full)."""
    first = json.loads(current.read_text())
    others = []
    for path in sorted(current.parent.glob("*.json")):
        if path.resolve() != current.resolve():
            other = json.loads(path.read_text())
            if other.get("quick") == first["quick"] and other.get("schema") == first.get("schema"):
                others.append(other)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(render([first, *others]))
