// fhirpath.js (npm `fhirpath`) on the shared FHIRPath case file; writes results in the shape
// `kizuna bench fhirpath` writes, for bench/compare.py to grade and compare.
//   node bench/peers/fhirpath_js.mjs CASES.json SECONDS OUT.json   (NODE_PATH must reach `fhirpath`)
import { createRequire } from 'node:module';
import { readFileSync, writeFileSync } from 'node:fs';

const require = createRequire(process.env.NODE_PATH ? process.env.NODE_PATH + '/' : import.meta.url);
const fhirpath = require('fhirpath');
const r4 = require('fhirpath/fhir-context/r4');
const version = require('fhirpath/package.json').version;

// trace() and warnings print to the console; a benchmark should not time the terminal.
console.log = () => {};
console.warn = () => {};

const [casesFile, secondsArg, out] = process.argv.slice(2);
const file = JSON.parse(readFileSync(casesFile, 'utf8'));
const budgetMs = Number(secondsArg || 3) * 1000;
const inputOf = (c) => (c.input ? file.inputs[c.input] : undefined);

function asJson(v) {
  if (v === null || v === undefined) return null;
  if (typeof v === 'boolean' || typeof v === 'number' || typeof v === 'string') return v;
  if (typeof v === 'object' && 'value' in v && 'unit' in v && Object.keys(v).length <= 3) {
    return `${v.value} '${v.unit}'`;
  }
  if (typeof v === 'object' && typeof v.toString === 'function' && v.toString !== Object.prototype.toString) {
    return v.toString();
  }
  return { complex: true };
}

const results = file.cases.map((c) => {
  const input = inputOf(c);
  try {
    const r = fhirpath.evaluate(input === undefined ? [] : input, c.expression, null, r4);
    return { id: c.id, result: (Array.isArray(r) ? r : [r]).map(asJson) };
  } catch (e) {
    return { id: c.id, error: String(e && e.message ? e.message : e).slice(0, 300) };
  }
});

const work = file.cases.filter((c) => c.invalid == null && c.input);
function timed(compiled) {
  const fns = work.map((c) => {
    try { return fhirpath.compile(c.expression, r4); } catch (e) { return null; }
  });
  const start = performance.now();
  let n = 0;
  while (performance.now() - start < budgetMs || n === 0) {
    for (let i = 0; i < work.length; i++) {
      const c = work[i];
      try {
        if (compiled) { if (fns[i]) fns[i](file.inputs[c.input]); }
        else fhirpath.evaluate(file.inputs[c.input], c.expression, null, r4);
      } catch (e) { /* an error is an answer; it still counts as an evaluation */ }
      n++;
    }
  }
  const seconds = (performance.now() - start) / 1000;
  return { evaluations: n, seconds, per_s: n / seconds };
}
const parseAndEvaluate = timed(false);
const evaluateOnly = timed(true);
writeFileSync(out, JSON.stringify({
  engine: 'fhirpath.js', version, results,
  throughput: { expressions: work.length, parse_and_evaluate: parseAndEvaluate, evaluate_only: evaluateOnly },
}));
