"""fhirpathpy (PyPI) on the shared FHIRPath case file; writes results in the shape
`kizuna bench fhirpath` writes, for bench/compare.py to grade and compare.

    python bench/peers/fhirpath_py.py CASES.json SECONDS OUT.json
"""
import json
import sys
import time
from importlib.metadata import version

from fhirpathpy import compile as fp_compile
from fhirpathpy import evaluate
from fhirpathpy.models import models


def as_json(v):
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, dict):
        return {"complex": True}
    return str(v)


def main():
    cases_file, seconds, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    with open(cases_file, encoding="utf-8") as f:
        file = json.load(f)
    inputs = file["inputs"]
    model = models["r4"]
    results = []
    for c in file["cases"]:
        res = inputs.get(c["input"]) if c["input"] else []
        try:
            r = evaluate(res, c["expression"], {}, model)
            results.append({"id": c["id"], "result": [as_json(x) for x in r]})
        except Exception as e:  # any failure is the engine's answer
            results.append({"id": c["id"], "error": str(e)[:300]})
    work = [c for c in file["cases"] if c["invalid"] is None and c["input"]]

    def timed(compiled):
        fns = []
        for c in work:
            try:
                fns.append(fp_compile(c["expression"], model))
            except Exception:
                fns.append(None)
        start = time.perf_counter()
        n = 0
        while time.perf_counter() - start < seconds or n == 0:
            for i, c in enumerate(work):
                try:
                    if compiled:
                        if fns[i] is not None:
                            fns[i](inputs[c["input"]], {})
                    else:
                        evaluate(inputs[c["input"]], c["expression"], {}, model)
                except Exception:
                    pass
                n += 1
        s = time.perf_counter() - start
        return {"evaluations": n, "seconds": s, "per_s": n / s}

    pe = timed(False)
    eo = timed(True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"engine": "fhirpathpy", "version": version("fhirpathpy"), "results": results,
                   "throughput": {"expressions": len(work), "parse_and_evaluate": pe, "evaluate_only": eo}}, f)


if __name__ == "__main__":
    main()
