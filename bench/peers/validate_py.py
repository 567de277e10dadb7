"""fhir.resources (PyPI; pydantic models, FHIR R4B, the release closest to R4 it ships) on the
shared NDJSON resource set: parses and validates each resource from its text, records valid or
invalid, then times the whole set. Same output shape as `kizuna bench validate`.

    python bench/peers/validate_py.py RESOURCES.ndjson SECONDS OUT.json
"""
import json
import sys
import time
from importlib.metadata import version

from fhir.resources.R4B import get_fhir_model_class


def check(line):
    rt = json.loads(line).get("resourceType", "")
    cls = get_fhir_model_class(rt)
    return cls.model_validate_json(line)


def main():
    path, seconds, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    with open(path, encoding="utf-8") as f:
        lines = [l for l in f.read().splitlines() if l.strip()]
    results = []
    for line in lines:
        rid = json.loads(line).get("id")
        try:
            check(line)
            results.append({"id": rid, "valid": True, "errors": []})
        except Exception as e:  # a validation error, or an unknown resource type
            results.append({"id": rid, "valid": False, "errors": [str(e)[:300]]})
    start = time.perf_counter()
    n = 0
    while time.perf_counter() - start < seconds or n == 0:
        for line in lines:
            try:
                check(line)
            except Exception:
                pass
            n += 1
    s = time.perf_counter() - start
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"engine": "fhir.resources", "version": version("fhir.resources"),
                   "mode": "pydantic model validation (R4B models)", "results": results,
                   "throughput": {"resources": len(lines), "validations": n, "seconds": s, "per_s": n / s}}, f)


if __name__ == "__main__":
    main()
