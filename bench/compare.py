#!/usr/bin/env python3
"""Side-by-side benchmarks of kizuna and its peers, on the same data in one run, alternating.

    python3 bench/compare.py [--runs 5] [--only fhirpath,validate,server] [--resources 20000]
                             [--hfs-bin PATH] [--postgres URL]

What it compares (docs/benchmarks.md explains each):
  fhirpath  kizuna vs fhirpath.js (npm `fhirpath`) and fhirpathpy (PyPI): pass rate on the HL7 R4
            suite, graded here by one set of rules for all, and evaluations per second.
  validate  kizuna (structure only) vs fhir.resources (PyPI, pydantic, R4B models): agreement and
            resources per second on the same R4 resources, parsed from text.
  server    kizuna vs Helios FHIR Server (hfs), both on SQLite, and kizuna on PostgreSQL when
            --postgres is given: transaction ingest, read and search latency, result counts,
            $export throughput and peak memory, via `kizuna bench fhir`.

Peers are installed outside the repository (KIZUNA_PEERS, default ~/.cache/kizuna-peers): npm and
pip fetch pinned versions; hfs is built once with
    cargo install helios-hfs --locked --root ~/.cache/helios     (about an hour on 2 cores)
Each engine runs --runs times, the order rotated every run; the table gives medians and ratios.
Writes docs/benchmarks.json (every run's figures) and docs/benchmarks.md.
"""
import argparse
import datetime
import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = Path(os.environ.get("KIZUNA_PEERS", Path.home() / ".cache" / "kizuna-peers"))
FHIRPATH_JS = "5.2.2"
FHIRPATHPY = "2.2.4"
FHIR_RESOURCES = "8.3.0"


def sh(cmd, **kw):
    print("  $", " ".join(str(c) for c in cmd), file=sys.stderr)
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def kizuna_bin():
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    sh(["cargo", "build", "--release", "-q", "-p", "kizuna"], cwd=ROOT)
    return target / "release" / "kizuna"


def setup_node():
    node = PEERS / "node"
    mod = node / "node_modules" / "fhirpath" / "package.json"
    if not mod.exists() or json.loads(mod.read_text())["version"] != FHIRPATH_JS:
        node.mkdir(parents=True, exist_ok=True)
        if not (node / "package.json").exists():
            (node / "package.json").write_text('{"name": "kizuna-peers", "private": true}\n')
        sh(["npm", "install", "--silent", f"fhirpath@{FHIRPATH_JS}"], cwd=node)
    return node / "node_modules"


def setup_python():
    venv = PEERS / "venv"
    py = venv / "bin" / "python"
    if not py.exists():
        sh([sys.executable, "-m", "venv", venv])
    sh([py, "-m", "pip", "install", "-q", f"fhirpathpy=={FHIRPATHPY}", f"fhir.resources=={FHIR_RESOURCES}"])
    return py


def version_of(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "?"


def rotated(names, r):
    """The engines in run r's order: each takes every position in turn."""
    names = list(names)
    k = r % len(names)
    return names[k:] + names[:k]


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# ---------------------------------------------------------------- FHIRPath grading (one rule set)

def expected_text(ty, text):
    if ty in ("date", "dateTime"):
        return text.lstrip("@")
    if ty == "time":
        return text.lstrip("@").lstrip("T")
    if text.startswith("@T"):
        return text[2:]
    return text.lstrip("@") if text.startswith("@") else text


def as_number(x):
    try:
        return Decimal(str(x))
    except (InvalidOperation, ValueError):
        return None


def instant(text):
    """A date-time with seconds and a time zone as a point in time, else None."""
    try:
        t = datetime.datetime.fromisoformat(text.lstrip("@").replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo is not None and "T" in text else None


def same(got, ty, want):
    """One result value against one expected output, by the same rules for every engine. Lenient
    where a language cannot say what the suite writes: a JSON number is compared by value (a
    JavaScript number has no trailing zeros), and date-times with a time zone as instants (the same
    moment written in another zone passes)."""
    if isinstance(got, bool):
        return ("true" if got else "false") == want
    if ty in ("integer", "decimal") or isinstance(got, (int, float)):
        a, b = as_number(got), as_number(want)
        if a is not None and b is not None:
            return a == b
    if isinstance(got, dict):
        return False
    text = str(got)
    if ty in ("date", "dateTime", "time"):
        text = expected_text(ty, text)
    if text == want:
        return True
    a, b = instant(text), instant(want)
    return a is not None and b is not None and a == b


def grade(cases, results):
    by_id = {r["id"]: r for r in results}
    passed = 0
    failed = []
    for c in cases:
        r = by_id.get(c["id"], {"error": "no result"})
        if c["invalid"] is not None:
            ok = "error" in r
        elif "error" in r:
            ok = False
        else:
            got = r["result"]
            if c["predicate"]:
                got = [len(got) > 0]
            want = c["outputs"]
            ok = len(got) == len(want) and all(
                same(g, w["type"], expected_text(w["type"], w["text"] or "")) for g, w in zip(got, want))
        passed += ok
        if not ok:
            failed.append(c["id"])
    return passed, failed


def bench_fhirpath(args, kz, node_modules, py, work):
    cases_file = work / "fhirpath-cases.json"
    sh([kz, "bench", "fhirpath", "--write-cases", cases_file], cwd=ROOT)
    cases = json.loads(cases_file.read_text())["cases"]
    engines = {
        "kizuna": lambda out: sh([kz, "bench", "fhirpath", "--cases", cases_file, "--seconds", args.seconds,
                                  "--out", out], cwd=ROOT, stdout=subprocess.DEVNULL),
        "fhirpath.js": lambda out: sh(["node", ROOT / "bench/peers/fhirpath_js.mjs", cases_file, args.seconds, out],
                                      env={**os.environ, "NODE_PATH": str(node_modules)},
                                      stdout=subprocess.DEVNULL),
        "fhirpathpy": lambda out: sh([py, ROOT / "bench/peers/fhirpath_py.py", cases_file, args.seconds, out],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    }
    runs = {e: [] for e in engines}
    for r in range(args.runs):
        for e in rotated(engines, r):
            out = work / f"fhirpath-{e}-{r}.json"
            engines[e](out)
            runs[e].append(json.loads(out.read_text()))
    summary = {}
    for e, rs in runs.items():
        passed, failed = grade(cases, rs[0]["results"])
        summary[e] = {
            "version": rs[0]["version"],
            "passed": passed,
            "cases": len(cases),
            "failed_ids": failed,
            "expressions_timed": rs[0]["throughput"]["expressions"],
            "parse_and_evaluate_per_s": [x["throughput"]["parse_and_evaluate"]["per_s"] for x in rs],
            "evaluate_only_per_s": [x["throughput"]["evaluate_only"]["per_s"] for x in rs],
        }
    return summary


def bench_validate(args, kz, py, work):
    res = work / "validate-resources.ndjson"
    sh([kz, "bench", "validate", "--write-resources", res, "--people", args.people], cwd=ROOT)
    engines = {
        "kizuna": lambda out: sh([kz, "bench", "validate", "--resources", res, "--seconds", args.seconds,
                                  "--out", out], cwd=ROOT, stdout=subprocess.DEVNULL),
        "fhir.resources": lambda out: sh([py, ROOT / "bench/peers/validate_py.py", res, args.seconds, out],
                                         stdout=subprocess.DEVNULL),
    }
    runs = {e: [] for e in engines}
    for r in range(args.runs):
        for e in rotated(engines, r):
            out = work / f"validate-{e}-{r}.json"
            engines[e](out)
            runs[e].append(json.loads(out.read_text()))
    verdicts = {e: [x["valid"] for x in rs[0]["results"]] for e, rs in runs.items()}
    k, p = verdicts["kizuna"], verdicts["fhir.resources"]
    disagree = [i for i, (a, b) in enumerate(zip(k, p)) if a != b]
    summary = {e: {
        "version": rs[0]["version"],
        "mode": rs[0]["mode"],
        "resources": rs[0]["throughput"]["resources"],
        "invalid": sum(1 for v in verdicts[e] if not v),
        "per_s": [x["throughput"]["per_s"] for x in rs],
    } for e, rs in runs.items()}
    summary["disagreements"] = [{
        "index": i,
        "kizuna": runs["kizuna"][0]["results"][i],
        "fhir.resources": runs["fhir.resources"][0]["results"][i],
    } for i in disagree[:20]]
    summary["disagreement_count"] = len(disagree)
    return summary


# ---------------------------------------------------------------- FHIR servers

def hfs_data_dir(work):
    """The R4 search parameters and the Patient compartment, from the repository's own copies, where
    hfs looks for them (without them hfs answers chained and _has searches wrongly)."""
    d = work / "hfs-data"
    d.mkdir(exist_ok=True)
    src = ROOT / "crates/kizuna-fhir/data"
    with gzip.open(src / "search-parameters.json.gz", "rb") as f:
        (d / "search-parameters-r4.json").write_bytes(f.read())
    with gzip.open(src / "compartmentdefinition-patient.json.gz", "rb") as f:
        comp = json.loads(f.read())
    bundle = {"resourceType": "Bundle", "type": "collection",
              "entry": [{"fullUrl": "http://hl7.org/fhir/CompartmentDefinition/patient", "resource": comp}]}
    (d / "compartment-definitions-r4.json").write_text(json.dumps(bundle))
    return d


def bench_server(args, kz, work):
    targets = {"kizuna (SQLite)": ["--server", "kizuna"]}
    hfs = Path(args.hfs_bin) if args.hfs_bin else None
    if hfs and hfs.exists():
        targets["hfs (SQLite)"] = ["--server", "hfs", "--hfs-bin", hfs, "--hfs-data", hfs_data_dir(work)]
    else:
        print(f"hfs not found ({hfs}); build it with: cargo install helios-hfs --locked --root ~/.cache/helios",
              file=sys.stderr)
    if args.postgres:
        targets["kizuna (PostgreSQL)"] = ["--server", "kizuna", "--database", args.postgres]
    runs = {t: [] for t in targets}
    for r in range(args.runs):
        for t in rotated(targets, r):
            out = work / f"server-{t.split()[0]}-{'pg' if 'Postgre' in t else 'sqlite'}-{r}.json"
            if args.postgres and "PostgreSQL" in t:
                reset_postgres(args.postgres)
            sh([kz, "bench", "fhir", "--resources", args.resources, "--samples", args.samples,
                "--out", out, *targets[t]], cwd=ROOT, stdout=subprocess.DEVNULL)
            runs[t].append(json.loads(out.read_text()))
    return runs, ({"hfs": version_of([hfs, "--version"])} if hfs and hfs.exists() else {})


def reset_postgres(url):
    """A fresh database for every run, so each starts empty like the SQLite ones."""
    sh(["psql", url, "-q", "-c", "DROP SCHEMA public CASCADE; CREATE SCHEMA public;"],
       stdout=subprocess.DEVNULL)


def server_summary(runs):
    out = {}
    for t, rs in runs.items():
        s = {
            "ingest_resources_per_s": [r["ingest"]["resources_per_s"] for r in rs],
            "failed_bundles": [r["ingest"]["failed_bundles"] for r in rs],
            "read_p50_ms": [r["read"]["p50_ms"] for r in rs],
            "read_p99_ms": [r["read"]["p99_ms"] for r in rs],
            "search": {},
            "export": [r["export"] for r in rs],
        }
        for r in rs:
            for q in r["search"]:
                e = s["search"].setdefault(q["query"], {"p50_ms": [], "p99_ms": [], "mean_matches": [],
                                                        "mean_total": [], "errors": [], "first_error": None})
                e["mean_total"].append(q.get("mean_total"))
                e["p50_ms"].append(q["p50_ms"] if q["n"] else None)
                e["p99_ms"].append(q["p99_ms"] if q["n"] else None)
                e["mean_matches"].append(q.get("mean_matches"))
                e["errors"].append(q.get("errors", 0))
                e["first_error"] = e["first_error"] or q.get("first_error")
        out[t] = s
    return out


# ---------------------------------------------------------------- report

def md(text):
    """Text for a markdown table cell."""
    return text.replace("|", "\\|")


def fmt(x, nd=1):
    if x is None:
        return "—"
    if x >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{nd}f}"


def ratio(a, b, higher_better=True):
    if a is None or b is None or a == 0 or b == 0:
        return "—"
    r = a / b if higher_better else b / a
    return f"{r:.2f}×"


def write_report(summary, path_md):
    m = summary["machine"]
    lines = [
        "# kizuna と他実装の比較 / Side-by-side benchmarks",
        "",
        "<!-- Written by bench/compare.py; edit the script, not this file. -->",
        "",
        f"測定日 / measured: {summary['date']} · machine: {m['cores']} cores, {m['cpu']}, {m['memory_gib']} GiB, "
        f"{m['os']} · runs per engine: {summary['runs']} (order rotated each run; medians below) · "
        f"{m.get('rustc', '?')}, node {m.get('node', '?')}, Python {m.get('python', '?')}",
        "",
        "再現 / reproduce:",
        "",
        "```sh",
        summary["command"],
        "```",
        "",
        "Ratios are kizuna ÷ peer for throughput and peer ÷ kizuna for latency and memory: above 1× kizuna "
        "is ahead, below 1× it trails.",
        "",
    ]
    fp = summary.get("fhirpath")
    if fp:
        k = fp["kizuna"]
        lines += [
            "## FHIRPath",
            "",
            f"HL7 FHIRPath R4 suite ({k['cases']} cases, inputs converted to JSON once by kizuna; every engine "
            "graded by the same rules in bench/compare.py: booleans and text compared exactly, numbers by "
            "value, dates without the `@`, date-times with a time zone as instants; an expected error "
            "passes on any error). Throughput: the "
            f"{k['expressions_timed']} cases that have an input and should succeed, evaluated in a loop.",
            "",
            "| engine | version | suite passed | parse+evaluate /s | ratio | evaluate only /s | ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        kp, ke = median(k["parse_and_evaluate_per_s"]), median(k["evaluate_only_per_s"])
        for e, s in fp.items():
            pe, eo = median(s["parse_and_evaluate_per_s"]), median(s["evaluate_only_per_s"])
            lines.append(
                f"| {e} | {s['version']} | {s['passed']}/{s['cases']} ({100 * s['passed'] / s['cases']:.1f} %) "
                f"| {fmt(pe)} | {'' if e == 'kizuna' else ratio(kp, pe)} | {fmt(eo)} | "
                f"{'' if e == 'kizuna' else ratio(ke, eo)} |")
        lines.append("")
    va = summary.get("validate")
    if va:
        k, p = va["kizuna"], va["fhir.resources"]
        lines += [
            "## 構造検証 / Structural validation",
            "",
            f"{k['resources']:,} R4 resources (JP-CLINS examples and synthetic records, `meta.profile` removed), "
            "each parsed from its JSON text and validated for structure only: kizuna's validator with "
            "bindings and invariants off (`Validator::structure_only`) and fhir.resources' pydantic models "
            "(R4B, the release nearest R4 that it ships). One thread each.",
            "",
            "| engine | version | invalid found | resources/s | ratio |",
            "|---|---|---|---|---|",
            f"| kizuna | {k['version']} | {k['invalid']} | {fmt(median(k['per_s']))} | |",
            f"| fhir.resources | {p['version']} | {p['invalid']} | {fmt(median(p['per_s']))} | "
            f"{ratio(median(k['per_s']), median(p['per_s']))} |",
            "",
            f"Verdicts differ on {va['disagreement_count']} resource(s)"
            + (" (listed in docs/benchmarks.json)." if va["disagreement_count"] else "."),
            "",
        ]
    sv = summary.get("server")
    if sv:
        names = list(sv)
        base = names[0]
        peer = next((n for n in names if n.startswith("hfs")), None)
        ours = [n for n in names if n != peer] if peer else []
        lines += [
            "## FHIR サーバー / FHIR server",
            "",
            f"`kizuna bench fhir --resources {summary['resources']} --samples {summary['samples']}` against each "
            "server: synthetic JP-CLINS data (Patient, Condition, Observation, AllergyIntolerance, "
            "Encounter, Organization …) loaded as transaction Bundles by 4 clients, then reads and searches "
            "about the same people and codes on every server (so result counts can be compared), then "
            "a system `$export` in a freshly started process. "
            + (f"hfs: {summary['versions'].get('hfs', '?')}, given the R4 search parameters and the Patient "
               "compartment." if "hfs (SQLite)" in sv else ""),
            "",
            "| measure | " + " | ".join(names) + " | " + " | ".join(f"{n} vs {peer}" for n in ours) + " |",
            "|---|" + "---|" * (len(names) + len(ours)),
        ]

        def row(label, get, higher_better, nd=1):
            vals = {n: get(sv[n]) for n in names}
            lines.append(f"| {label} | " + " | ".join(fmt(vals[n], nd) for n in names) + " | "
                         + " | ".join(ratio(vals[n], vals.get(peer), higher_better) for n in ours) + " |")

        row("ingest, resources/s", lambda s: median(s["ingest_resources_per_s"]), True, 0)
        row("failed bundles (all runs)", lambda s: float(sum(s["failed_bundles"])), False, 0)
        row("read p50, ms", lambda s: median(s["read_p50_ms"]), False, 2)
        row("read p99, ms", lambda s: median(s["read_p99_ms"]), False, 2)
        for q in sv[base]["search"]:
            row(f"`{md(q)}` p50, ms", lambda s, q=q: median(s["search"].get(q, {}).get("p50_ms", [])), False, 2)
        for q in sv[base]["search"]:
            row(f"`{md(q)}` p99, ms", lambda s, q=q: median(s["search"].get(q, {}).get("p99_ms", [])), False, 2)

        def exp(s, key):
            return median([e.get(key) for e in s["export"] if isinstance(e, dict) and "error" not in e])

        row("$export, resources/s", lambda s: exp(s, "resources_per_s"), True, 0)
        row("$export peak RSS, MiB", lambda s: exp(s, "server_peak_rss_mib"), False, 0)
        lines += ["", "Search answers, to check that the servers agree: mean matches on the first page, and the mean "
                  "`total` where the server gave one (errors counted over all samples):", "",
                  "| query | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for q in sv[base]["search"]:
            cells = []
            for n in names:
                e = sv[n]["search"].get(q)
                if not e:
                    cells.append("—")
                    continue
                mm = median(e["mean_matches"])
                mt = median(e.get("mean_total", []))
                errs = sum(e["errors"])
                cells.append(f"{fmt(mm, 2)}" + (f" / total {fmt(mt, 1)}" if mt is not None and "_total" in q else "")
                             + (f" ({errs} errors: {str(e['first_error'])[:60]})" if errs else ""))
            lines.append(f"| `{md(q)}` | " + " | ".join(cells) + " |")
        for n in names:
            errs = [e["error"] for e in sv[n]["export"] if isinstance(e, dict) and "error" in e]
            if errs:
                lines.append(f"\n{n} `$export` failed: {errs[0]}")
        lines.append("")
    if summary.get("notes"):
        lines += ["## 読み方 / Reading the figures", "", summary["notes"], ""]
    path_md.write_text("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", default="fhirpath,validate,server")
    ap.add_argument("--seconds", default="3", help="timed seconds per FHIRPath/validation measurement")
    ap.add_argument("--people", default="100", help="synthetic people in the validation set")
    ap.add_argument("--resources", default="20000", help="resources loaded into each server")
    ap.add_argument("--samples", default="100", help="repetitions of each read and search")
    ap.add_argument("--hfs-bin", default=str(Path.home() / ".cache/helios/bin/hfs"))
    ap.add_argument("--postgres", help="also measure kizuna on this PostgreSQL database (emptied per run)")
    ap.add_argument("--work", default=str(ROOT / "kizuna-data/bench/compare"))
    ap.add_argument("--notes", help="a markdown file whose text is appended as 'Reading the figures'")
    ap.add_argument("--report-only", action="store_true",
                    help="only rewrite docs/benchmarks.md from docs/benchmarks.json")
    args = ap.parse_args()
    if args.report_only:
        summary = json.loads((ROOT / "docs/benchmarks.json").read_text())
        if args.notes:
            summary["notes"] = Path(args.notes).read_text()
            (ROOT / "docs/benchmarks.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
        write_report(summary, ROOT / "docs/benchmarks.md")
        return
    only = set(args.only.split(","))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    kz = kizuna_bin()
    summary_path = ROOT / "docs/benchmarks.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary.update({
        "date": datetime.date.today().isoformat(),
        "runs": args.runs,
        "resources": args.resources,
        "samples": args.samples,
        "command": "python3 bench/compare.py " + " ".join(sys.argv[1:]),
        "machine": {
            "cores": os.cpu_count(),
            "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
                        platform.processor()),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "os": f"{platform.system()} {platform.release()}",
            "rustc": version_of(["rustc", "--version"]),
            "node": version_of(["node", "--version"]),
            "python": platform.python_version(),
        },
    })
    summary.setdefault("versions", {})
    if "fhirpath" in only or "validate" in only:
        py = setup_python()
    if "fhirpath" in only:
        summary["fhirpath"] = bench_fhirpath(args, kz, setup_node(), py, work)
    if "validate" in only:
        summary["validate"] = bench_validate(args, kz, py, work)
    if "server" in only:
        runs, versions = bench_server(args, kz, work)
        summary["versions"].update(versions)
        summary["server"] = server_summary(runs)
    if args.notes:
        summary["notes"] = Path(args.notes).read_text()
    summary_path.write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    write_report(summary, ROOT / "docs/benchmarks.md")
    print(f"wrote {summary_path} and docs/benchmarks.md", file=sys.stderr)


if __name__ == "__main__":
    main()
