"""The report of the load benchmark: the targets of issue 8 and the markdown of ``load.md``."""

from __future__ import annotations

import math

from benchmarks.harness import fmt_value

TARGETS = {"saturation_vs_ceiling": 0.85, "serial_vs_batch1": 0.95, "serial_p50_delta_ms": 1.0,
           "batching_gain": 1.7, "v2_vs_npy": 0.95}


def statuses_text(counts: dict[str, int]) -> str:
    """``"200: n, 503: m"``, by status."""
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))


def _sat(closed: dict, fmt: str) -> tuple[float, str] | None:
    pts = closed.get(fmt, {})
    if not pts:
        return None
    c = max(pts, key=lambda k: pts[k]["rows_per_s"])
    return pts[c]["rows_per_s"], c


def _p99_lower(ours: dict, theirs: dict) -> bool:
    return ours["p99_ms"] is not None and (theirs["p99_ms"] is None or ours["p99_ms"] < theirs["p99_ms"])


def targets(result: dict, formats: list[str]) -> list[dict]:
    """Per body format, each target of :data:`TARGETS` that the run measured: ``{"target", "format",
    "measured" (text), "value", "met"}`` (``met`` None when not measured, e.g. LitServe skipped)."""
    out = []
    cfgs = result["configs"]
    d, b1 = cfgs.get("default", {}).get("closed", {}), cfgs.get("batch1", {}).get("closed", {})
    ceiling = result.get("ceiling", {}).get("batches", {}).get(str(result.get("ceiling", {}).get("max_batch_rows")))
    lit = result.get("litserve", {}).get("closed", {})
    for fmt in formats:
        sat = _sat(d, fmt)
        if sat and ceiling:
            v = sat[0] / ceiling["rows_per_s"]
            out.append({"target": "service at saturation >= 85% of the in-process ceiling", "format": fmt,
                        "measured": f"{v:.0%} ({sat[0]:.0f} of {ceiling['rows_per_s']:.0f} rows/s, {sat[1]} clients)",
                        "value": v, "met": v >= TARGETS["saturation_vs_ceiling"]})
        serial = result.get("serial", {}).get("formats", {}).get(fmt, {})
        if "default" in serial and "batch1" in serial:  # the alternating comparison
            a, b = serial["default"], serial["batch1"]
        elif "1" in d.get(fmt, {}) and "1" in b1.get(fmt, {}):
            a, b = d[fmt]["1"], b1[fmt]["1"]
        else:
            a = b = None
        if a and b:
            v = a["rows_per_s"] / b["rows_per_s"]
            out.append({"target": "one serial client >= 0.95x batch-1 serving", "format": fmt,
                        "measured": f"{v:.3f}x ({a['rows_per_s']:.1f} vs {b['rows_per_s']:.1f} rows/s)", "value": v,
                        "met": v >= TARGETS["serial_vs_batch1"]})
            if a["p50_ms"] is not None and b["p50_ms"] is not None:
                dv = a["p50_ms"] - b["p50_ms"]
                out.append({"target": "one serial client: p50 within 1 ms of batch-1 serving", "format": fmt,
                            "measured": f"{dv:+.2f} ms ({a['p50_ms']:.2f} vs {b['p50_ms']:.2f} ms)", "value": dv,
                            "met": dv <= TARGETS["serial_p50_delta_ms"]})
        sat1 = _sat(b1, fmt)
        if sat and sat1:
            v = sat[0] / sat1[0]
            out.append({"target": "batching at saturation >= 1.7x batch-1 serving", "format": fmt,
                        "measured": f"{v:.2f}x ({sat[0]:.0f} vs {sat1[0]:.0f} rows/s)", "value": v,
                        "met": v >= TARGETS["batching_gain"]})
        lsat = _sat(lit, fmt)
        if result.get("litserve", {}).get("skipped"):
            out.append({"target": "throughput >= LitServe's, with a lower p99", "format": fmt,
                        "measured": f"not measured: {result['litserve']['skipped']}", "value": None, "met": None})
        elif lsat and sat:
            v = sat[0] / lsat[0] if lsat[0] else math.inf
            common = sorted((c for c in lit[fmt] if c in d[fmt]), key=int)
            worse = [c for c in common if not _p99_lower(d[fmt][c], lit[fmt][c])]
            p99s = "; ".join(f"{c}: {fmt_value(d[fmt][c]['p99_ms'], 0)} vs {fmt_value(lit[fmt][c]['p99_ms'], 0)}"
                             for c in common)
            out.append({"target": "throughput >= LitServe's, with a lower p99", "format": fmt,
                        "measured": f"{v:.2f}x at saturation ({sat[0]:.0f} rows/s at {sat[1]} clients vs "
                                    f"{lsat[0]:.0f} at {lsat[1]}); p99 ms by clients, service vs LitServe: {p99s}"
                                    + (f" (not lower at {', '.join(worse)} clients)" if worse else ""),
                        "value": v, "met": v >= 1.0 and not worse})
    v2 = result.get("v2_vs_npy")
    if v2:  # issue 18: the Open Inference Protocol's binary requests against native .npy bodies
        out.append({"target": f"v2 binary >= 0.95x native npy, {v2['clients']} clients of {v2['rows']} row(s)",
                    "format": "v2", "value": v2["ratio"], "met": v2["ratio"] >= TARGETS["v2_vs_npy"],
                    "measured": f"{v2['ratio']:.3f}x ({v2['v2']['rows_per_s']:.1f} vs {v2['npy']['rows_per_s']:.1f} "
                                f"rows/s, {v2['reps']} alternations of {v2['slice_s']:g} s)"})
    return out


def markdown(result: dict) -> str:
    """``load.md`` of a run's result (what ``load.json`` holds)."""
    m, s = result["machine"], result["settings"]
    g = result["git"]
    dirty = f" (working tree with uncommitted changes: {', '.join(g['changed_files'])})" if g["dirty"] else ""
    L = [f"# Load benchmark ({'quick' if s['quick'] else 'full'} mode)", "",
         f"- Date: {result['date']}; command: `{result['command']}`; commit `{g['commit'][:12]}`{dirty}",
         f"- Machine: {m['cpu']}, {m['cpu_count']} cores; torch {m['torch']}, uvicorn {m['uvicorn']} "
         f"({m['uvicorn_loop_http']}), fastapi {m['fastapi']}, LitServe {m['litserve'] or 'not installed'}",
         f"- Pinning: {s['pinning']}; {s['threads']} torch thread(s) (GGA_TORCH_THREADS)",
         f"- Load average at start / end: {', '.join(f'{v:.2f}' for v in m['loadavg_start'])} / "
         f"{', '.join(f'{v:.2f}' for v in m['loadavg_end'])}" + (f". **{s['note']}**" if s.get("note") else ""),
         f"- Requests: {s['rows']} MNIST test image(s) per request, bodies {', '.join(s['formats'])}; service "
         "settings are the defaults except GGA_TORCH_THREADS, GGA_LOG_LEVEL=warning (no access log) and a fresh "
         "GGA_ARTIFACT_DIR (the bundled detector)"
         + (f", GGA_STRATEGY={s['strategy']}" if s["strategy"] != "service default" else "")
         + "; `batch1` adds GGA_MAX_BATCH_ROWS=1",
         f"- Durations: closed loop {s['warmup_s']} s warm-up + {s['closed_s']} s per point; open loop "
         f"{s['open_s']} s of arrivals + up to {s['drain_s']} s drain per point; goodput = rows answered 200 "
         f"within {s['slo_ms']:.0f} ms per second of arrivals",
         "- Server CPU: CPU time of the server's process tree per second of the point (100% = one core busy); "
         "other load on its core: busy time of the server's core(s) not spent by the server (other processes "
         "of a shared machine; the comparison is clean where it is near 0%)", ""]
    ceil = result.get("ceiling")
    if ceil:
        runs = ceil["runs"]
        L += ["## In-process ceiling (`detector.score`, same core and threads, the service's strategy)", "",
              f"Strategy {ceil['strategy']}; {len(runs)} run(s) of {s['ceiling_s']} s per batch size (before the "
              "load and right after the default service's closed-loop sweep); the mean is the ceiling.", "",
              "| batch rows | rows/s (mean) | ms per batch | rows/s per run |", "|---|---|---|---|"]
        for b, r in ceil["batches"].items():
            per = ", ".join(f"{run['batches'][b]['rows_per_s']:.1f}" for run in runs)
            L.append(f"| {b} | {r['rows_per_s']:.1f} | {r['ms_per_batch']:.1f} | {per} |")
        L.append("")
    co = result.get("client_overhead")
    if co:
        L += ["## Load client overhead (`GET /healthz` on the default service)", "",
              "| clients | requests/s | p50 ms | p99 ms | client CPU µs/request | client CPU | server CPU | "
              "other load on its core |", "|---|---|---|---|---|---|---|---|"]
        for c, r in co.items():
            L.append(f"| {c} | {r['requests_per_s']:,.0f} | {fmt_value(r['p50_ms'], 2)} | "
                     f"{fmt_value(r['p99_ms'], 2)} | "
                     f"{fmt_value(r['client_cpu_us_per_request'], 0)} | {r['client_cpu_util']:.0%} | "
                     f"{r['server_cpu_util']:.0%} | {r['other_cpu_on_server_cores']:.0%} |")
        L.append("")
    serial = result.get("serial")
    if serial:
        L += ["## One serial client, default vs batch-1 (alternating slices)", "",
              f"{serial['reps']} alternations (ABBA order) of {serial['slice_s']} s per configuration and body, "
              "pooled.", "", "| body | server | rows/s | p50 ms | p99 ms | requests | rows/s per slice | other load "
              "on its core (max) |", "|---|---|---|---|---|---|---|---|"]
        for fmt, res in serial["formats"].items():
            for lab, r in res.items():
                per = ", ".join(f"{v:.0f}" for v in r["rows_per_s_per_slice"])
                L.append(f"| {fmt} | {lab} | {r['rows_per_s']:.1f} | {fmt_value(r['p50_ms'], 2)} | "
                         f"{fmt_value(r['p99_ms'], 2)} "
                         f"| {r['requests']} | {per} | {r['other_cpu_on_server_cores_max']:.0%} |")
        L.append("")
    L += ["## Closed loop (fixed concurrency)", "",
          "| server | body | clients | rows/s | p50 ms | p99 ms | mean batch rows | server CPU | other load on its "
          "core | client CPU | statuses |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = [(lab, cfg["closed"]) for lab, cfg in result["configs"].items()]
    if result.get("litserve", {}).get("closed"):
        rows.append(("litserve", result["litserve"]["closed"]))
    for lab, closed in rows:
        for fmt, pts in closed.items():
            for c, r in pts.items():
                L.append(f"| {lab} | {fmt} | {c} | {r['rows_per_s']:.1f} | {fmt_value(r['p50_ms'], 1)} | "
                         f"{fmt_value(r['p99_ms'], 1)} | {fmt_value(r.get('mean_batch_rows'), 1)} | "
                         f"{r['server_cpu_util']:.0%} "
                         f"| {r['other_cpu_on_server_cores']:.0%} | {r['client_cpu_util']:.0%} | "
                         f"{statuses_text(r['statuses'])} |")
    L.append("")
    if any(cfg["open"] for cfg in result["configs"].values()):
        L += ["## Open loop (Poisson arrivals; latency from the scheduled arrival)", "",
              "| server | body | × capacity | offered req/s | sent | 200 | 503 | 504 | other | unanswered | "
              "200 rows/s | goodput rows/s | p50 / p99 ms (200) | p50 / p99 ms (503) | p50 / p99 ms (504) | "
              "client lag p99 ms | server CPU | other load on its core |", "|" + "---|" * 18]
        for lab, cfg in result["configs"].items():
            for fmt, pts in cfg["open"].items():
                for r in pts:
                    st, lat = r["statuses"], r["latency_by_status"]
                    other = sum(v for k, v in st.items() if k not in ("200", "503", "504", "-1"))

                    def pp(code: str, lat=lat) -> str:
                        v = lat.get(code)
                        return f"{fmt_value(v['p50_ms'], 0)} / {fmt_value(v['p99_ms'], 0)}" if v else "–"
                    L.append(f"| {lab} | {fmt} | {r['multiple']} | {r['rate_per_s']:.0f} | {r['sent']} | "
                             f"{st.get('200', 0)} | {st.get('503', 0)} | {st.get('504', 0)} | {other} | "
                             f"{st.get('-1', 0)} | {r['ok_rows_per_s']:.0f} | {r['goodput_rows_per_s']:.0f} | "
                             f"{pp('200')} | {pp('503')} | {pp('504')} | {fmt_value(r['send_lag_p99_ms'], 1)} | "
                             f"{r['server_cpu_util']:.0%} | {r['other_cpu_on_server_cores']:.0%} |")
        L.append("")
    lit = result.get("litserve", {})
    if lit.get("skipped"):
        L += [f"LitServe: skipped ({lit['skipped']}).", ""]
    elif lit:
        L += [f"LitServe {lit['version']}: one API server process and one inference worker, max_batch_size "
              f"{lit['max_batch_size']}, batch_timeout {lit['batch_timeout_ms']} ms, fast_queue "
              f"{lit['fast_queue']}; the LitAPI decodes with the service's decoders, calls the same detector's "
              "`score` and returns the service's response rows.", ""]
    L += ["## Targets (issue 8)", "", "| target | body | measured | met |", "|---|---|---|---|"]
    for t in result["targets"]:
        met = "–" if t["met"] is None else "yes" if t["met"] else "**no**"
        L.append(f"| {t['target']} | {t['format']} | {t['measured']} | {met} |")
    L.append("")
    return "\n".join(L)
