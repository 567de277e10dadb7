#!/usr/bin/env bash
# Runs every fuzz target for a while (default 600 s each) with cargo-fuzz on the nightly toolchain,
# seeding the corpora from the repository's own examples. Not part of CI. A crash leaves its input
# in fuzz/artifacts/<target>/; turn it into a regression test in the crate it belongs to.
#
#   bash bench/fuzz.sh [SECONDS] [TARGET...]
#
# Needs: rustup toolchain nightly, `cargo install cargo-fuzz`.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-600}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(json_validate xml_parse fhirpath search_query member_id)
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${HOME}/.cache/kizuna-fuzz-target}"

seed() {
  local t=$1 dir=fuzz/corpus/$1
  mkdir -p "$dir"
  [ -n "$(ls -A "$dir" 2>/dev/null)" ] && return
  case "$t" in
    json_validate)
      find crates/kizuna-fhir/data/examples -name '*.json' | head -200 | while read -r f; do
        cp "$f" "$dir/$(basename "$f")"; done ;;
    xml_parse)
      # Small FHIR XML resources; the fuzzer grows them.
      printf '<Patient xmlns="http://hl7.org/fhir"><id value="p1"/><gender value="male"/><birthDate value="1970-01-01"/></Patient>' > "$dir/patient.xml"
      printf '<Observation xmlns="http://hl7.org/fhir"><status value="final"/><code><coding><system value="urn:oid:1.2.392.200119.4.504"/><code value="3F050000002327101"/></coding></code><valueQuantity><value value="5.6"/><unit value="%%"/></valueQuantity></Observation>' > "$dir/observation.xml" ;;
    fhirpath)
      grep -o '<expression[^>]*>[^<]*</expression>' crates/kizuna-fhir/data/fhirpath/tests-fhir-r4.xml \
        | sed -e 's/<[^>]*>//g' -e 's/&lt;/</g' -e 's/&gt;/>/g' -e "s/&apos;/'/g" -e 's/&quot;/"/g' -e 's/&amp;/\&/g' \
        | awk -v d="$dir" '{ f = sprintf("%s/e%05d", d, NR); printf "%s", $0 > f; close(f) }' ;;
    search_query)
      n=0
      for q in 'name=yamada' 'birthdate=ge1970-01-01&gender=female' 'code=http://loinc.org|1234-5&_sort=-date' \
               'subject.identifier=urn:oid:1.2|9&_count=5' '_has:Observation:subject:code=x' \
               'value-quantity=gt5.4|http://unitsofmeasure.org|mg' 'code-value-quantity=a$lt3' \
               '_lastUpdated=lt2026&_total=accurate' 'identifier:of-type=http://x|MR|123' 'subject:Patient.name:contains=ab'; do
        n=$((n + 1)); printf '\001%s' "$q" > "$dir/q$n"; done ;;
    member_id)
      printf '06138010:記号:番号:01' > "$dir/a"; printf '138010::１２３:' > "$dir/b"; printf '39131015:1-2:345:00' > "$dir/c" ;;
  esac
}

# -O: optimised, with debug assertions (cargo-fuzz's default); the same build for every target.
cargo +nightly fuzz build --fuzz-dir fuzz -O
found=0
for t in "${targets[@]}"; do
  seed "$t"
  echo "== $t (${secs} s)"
  # A finding ends this target's run, not the others'.
  if cargo +nightly fuzz run --fuzz-dir fuzz -O "$t" "fuzz/corpus/$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 \
    > "fuzz/last-$t.log" 2>&1; then
    grep -E '^stat::number_of_executed_units|^stat::peak_rss_mb|^#[0-9]+.*DONE' "fuzz/last-$t.log" || true
  else
    found=1
    echo "!! $t: finding — see fuzz/last-$t.log and fuzz/artifacts/$t/"
    grep -E 'panicked|ERROR|timeout|Test unit written' "fuzz/last-$t.log" | head -n 5 || true
  fi
done
exit "$found"
