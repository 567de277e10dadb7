//! # kizuna-synth
//!
//! A synthetic Japanese population for tests, benchmarks and demos: people with names in kanji and kana,
//! addresses, insurance histories and deaths; their clinical data as JP-CLINS submissions; and the
//! datasets insurers and registries hold about them, keyed the way those holders key them, with linkage
//! noise and a ground-truth file.
//!
//! Deterministic: the same seed gives byte-identical output whatever the thread count, because every
//! person has an independent random stream and chunks are written in order. Streaming: memory is bounded
//! by the chunk size, not the population.

pub mod clinical;
pub mod documents;
pub mod eligibility;
pub mod holder;
pub mod population;
pub mod rng;
pub mod tables;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use clinical::BundleKind;
use holder::HolderRows;
use population::{Date, Institution, Person, REFERENCE_DATE};
use rng::Rng;

/// Why generation failed.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// Writing output failed.
    #[error("出力できません / cannot write output: {0}")]
    Io(#[from] std::io::Error),
    /// CSV writing failed.
    #[error("CSV エラー / CSV error: {0}")]
    Csv(#[from] csv::Error),
    /// JSON writing failed.
    #[error("JSON エラー / JSON error: {0}")]
    Json(#[from] serde_json::Error),
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct Config {
    /// Number of people.
    pub patients: u64,
    /// Seed.
    pub seed: u64,
    /// Years of history ending at [`REFERENCE_DATE`].
    pub years: u32,
    /// Output directory.
    pub out: PathBuf,
    /// Worker threads (output does not depend on it).
    pub threads: usize,
    /// Write the FHIR NDJSON gzipped (`.ndjson.gz`): about a tenth of the size, for large populations.
    pub gzip: bool,
}

/// Counts reported at the end.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// People.
    pub people: u64,
    /// Deaths in the window.
    pub deaths: u64,
    /// Insurance periods (a change of insurer starts a new one).
    pub coverage_periods: u64,
    /// JP_Bundle_CLINS submissions by kind (and standalone MedicationRequests).
    pub bundles: BTreeMap<String, u64>,
    /// FHIR resources inside the bundles (Patient entries included).
    pub resources: u64,
    /// Conditions by ICD-10.
    pub conditions: BTreeMap<String, u64>,
    /// Holder records by dataset.
    pub holder_records: BTreeMap<String, u64>,
    /// Institutions.
    pub institutions: u64,
    /// Seconds taken.
    pub seconds: f64,
}

/// Everything generated for one person.
pub struct PersonOutput {
    /// The person.
    pub person: Person,
    /// Submissions (kind, bundle as one JSON line), serialised in the generating thread.
    pub bundles: Vec<(BundleKind, String)>,
    /// Resources inside them.
    pub resources: u64,
    /// Holder records.
    pub holder: HolderRows,
}

fn care_sites<'a>(
    p: &Person,
    institutions: &'a [Institution],
    rng: &mut Rng,
) -> (&'a Institution, &'a Institution) {
    let local: Vec<&Institution> = institutions.iter().filter(|i| i.pref == p.pref).collect();
    let clinics: Vec<&&Institution> = local.iter().filter(|i| !i.hospital).collect();
    let hospitals: Vec<&&Institution> = local.iter().filter(|i| i.hospital).collect();
    let clinic = if clinics.is_empty() {
        local[0]
    } else {
        **rng.pick(&clinics)
    };
    let hospital = if hospitals.is_empty() {
        local[0]
    } else {
        **rng.pick(&hospitals)
    };
    (clinic, hospital)
}

/// Generates person `index`: the person, their JP-CLINS submissions and holder records.
pub fn person_output(
    seed: u64,
    index: u64,
    years: u32,
    institutions: &[Institution],
) -> PersonOutput {
    let p = population::person(seed, index, years);
    let mut rng = Rng::new(seed ^ 0x434C_494E, index);
    let (clinic, hospital) = care_sites(&p, institutions, &mut rng);
    let window_start = REFERENCE_DATE.plus(-(years as i64) * 365);
    let last = p.last_day();
    let mut bundles = Vec::new();
    let mut visits: Vec<(Date, String, Vec<&'static str>, Vec<&'static str>)> = Vec::new();
    let pat_url = |rng: &mut Rng| format!("urn:uuid:{}", rng.uuid());

    // Conditions: one submission per institution, at the first visit in the window.
    let mut by_site: BTreeMap<String, Vec<(usize, Date)>> = BTreeMap::new();
    for (ci, onset) in &p.conditions {
        let c = &tables::CONDITIONS[*ci];
        let site = if c.cancer || c.icd10.starts_with('S') {
            hospital
        } else {
            clinic
        };
        by_site
            .entry(site.number.clone())
            .or_default()
            .push((*ci, *onset));
    }
    for (site_no, conds) in &by_site {
        let Some(site) = institutions.iter().find(|i| &i.number == site_no) else {
            continue;
        };
        let first = conds
            .iter()
            .map(|(_, o)| *o)
            .min()
            .unwrap_or(window_start)
            .max(window_start)
            .plus(rng.below(30) as i64);
        if first > last {
            continue;
        }
        let url = pat_url(&mut rng);
        let resources: Vec<serde_json::Value> = conds
            .iter()
            .filter(|(_, onset)| *onset <= last)
            .map(|(ci, onset)| {
                clinical::condition(&p, *ci, *onset, site, first.max(*onset), &url, &mut rng)
            })
            .collect();
        if resources.is_empty() {
            continue;
        }
        let patient = clinical::patient(&p, site, first, &mut rng);
        bundles.push((
            BundleKind::Condition,
            clinical::bundle(
                BundleKind::Condition,
                site,
                patient,
                &url,
                resources,
                first,
                &mut rng,
            ),
        ));
    }

    // Allergies: about 8 % have one recorded.
    if rng.chance(0.08) {
        let ai = rng.weighted(
            &tables::ALLERGENS
                .iter()
                .map(|a| a.weight)
                .collect::<Vec<_>>(),
        );
        let d = window_start.plus(rng.below(365 * years.max(1) as u64) as i64);
        if d <= last && d >= p.birth {
            let url = pat_url(&mut rng);
            let r = clinical::allergy(&p, ai, clinic, d, &url, &mut rng);
            let patient = clinical::patient(&p, clinic, d, &mut rng);
            bundles.push((
                BundleKind::AllergyIntolerance,
                clinical::bundle(
                    BundleKind::AllergyIntolerance,
                    clinic,
                    patient,
                    &url,
                    vec![r],
                    d,
                    &mut rng,
                ),
            ));
        }
    }

    // Visits: chronic patients every ~3 months, others occasionally; labs and prescriptions at visits.
    let chronic = p.conditions.iter().any(|(i, _)| {
        tables::CONDITIONS[*i].chronic && !tables::CONDITIONS[*i].icd10.starts_with('J')
    });
    let interval = if chronic { 90 } else { 365 };
    let mut day = window_start
        .max(p.birth)
        .plus(rng.below(interval as u64) as i64);
    let mut seq = 0u64;
    while day <= last {
        let attend = chronic || rng.chance(0.35);
        if attend && p.age_on(day) >= 3 {
            let icd: Vec<&'static str> = p
                .conditions
                .iter()
                .filter(|(_, o)| *o <= day)
                .map(|(i, _)| tables::CONDITIONS[*i].icd10)
                .collect();
            // Lab panel.
            let mut items: Vec<usize> = Vec::new();
            for (li, item) in tables::LAB_ITEMS.iter().enumerate() {
                let relevant = item.shifts.iter().any(|(c, _)| icd.contains(c));
                if relevant || rng.chance(0.2) {
                    items.push(li);
                }
            }
            if !items.is_empty() {
                let url = pat_url(&mut rng);
                let enc = format!("enc-{}", day.days());
                let obs: Vec<serde_json::Value> = items
                    .iter()
                    .enumerate()
                    .map(|(k, li)| {
                        let v = clinical::lab_value(&p, *li, &mut rng);
                        clinical::lab(&p, *li, v, clinic, day, &url, &enc, k as u64)
                    })
                    .collect();
                let patient = clinical::patient(&p, clinic, day, &mut rng);
                bundles.push((
                    BundleKind::Observation,
                    clinical::bundle(
                        BundleKind::Observation,
                        clinic,
                        patient,
                        &url,
                        obs,
                        day,
                        &mut rng,
                    ),
                ));
            }
            // Prescriptions for treated conditions.
            let mut drugs: Vec<usize> = tables::DRUGS
                .iter()
                .enumerate()
                .filter(|(_, d)| icd.contains(&d.for_icd10))
                .map(|(i, _)| i)
                .collect();
            if drugs.is_empty() && rng.chance(0.15) {
                drugs.push(1);
            }
            for d in &drugs {
                seq += 1;
                bundles.push((
                    BundleKind::MedicationRequest,
                    clinical::prescription(&p, *d, clinic, day, seq),
                ));
            }
            visits.push((
                day,
                clinic.number.clone(),
                icd,
                drugs.iter().map(|d| tables::DRUGS[*d].yj).collect(),
            ));
        }
        day = day.plus(interval + rng.below(30) as i64 - 15);
    }
    // Infection screening (before procedures, at first visits): the 5 items, about 15 % of people.
    if rng.chance(0.15) {
        let d = window_start.plus(rng.below(365 * years.max(1) as u64) as i64);
        if d <= last && d >= p.birth.plus(365) {
            let url = pat_url(&mut rng);
            let enc = format!("enc-inf-{}", d.days());
            let lts = rng.chance(0.5);
            let obs: Vec<serde_json::Value> = (0..tables::INFECTIONS.len())
                .map(|ii| {
                    let positive = rng.chance(tables::INFECTIONS[ii].2);
                    clinical::infection(&p, ii, positive, hospital, d, &url, &enc, ii as u64, lts)
                })
                .collect();
            let patient = clinical::patient(&p, hospital, d, &mut rng);
            bundles.push((
                BundleKind::Observation,
                clinical::bundle(
                    BundleKind::Observation,
                    hospital,
                    patient,
                    &url,
                    obs,
                    d,
                    &mut rng,
                ),
            ));
        }
    }
    // A 診療情報提供書 to a hospital for conditions a clinic refers on.
    let referable = p.conditions.iter().find(|(i, _)| {
        let c = &tables::CONDITIONS[*i];
        c.cancer || matches!(c.icd10, "I20.9" | "N18.9")
    });
    if let Some((_, onset)) = referable {
        let d = onset.max(&window_start).plus(10 + rng.below(20) as i64);
        if d <= last && rng.chance(0.6) && clinic.number != hospital.number {
            bundles.push((
                BundleKind::Referral,
                documents::referral(&p, clinic, hospital, d, &mut rng),
            ));
        }
    }
    // A hospital stay for cancer or a fracture ends with a 退院時サマリー.
    let admitted = p.conditions.iter().find(|(i, _)| {
        let c = &tables::CONDITIONS[*i];
        c.cancer || c.icd10.starts_with('S')
    });
    if let Some((_, onset)) = admitted {
        let admit = onset.max(&window_start).plus(20 + rng.below(30) as i64);
        let discharge = admit.plus(5 + rng.below(25) as i64);
        if discharge <= last {
            bundles.push((
                BundleKind::Discharge,
                documents::discharge_summary(&p, hospital, admit, discharge, &mut rng),
            ));
        }
    }
    // 特定健診 (ages 40–74): a 健診結果報告書 for the insurer and the patient, about half each year.
    for y in 0..years {
        let d = window_start.plus(y as i64 * 365 + 100 + rng.below(200) as i64);
        if d > last || !(40..=74).contains(&p.age_on(d)) || !rng.chance(0.5) {
            continue;
        }
        if let Some(doc) = documents::checkup(&p, clinic, d, &mut rng) {
            bundles.push((BundleKind::Checkup, doc));
        }
    }
    let holder = HolderRows::for_person(&p, &visits, years, seed);
    let resources = bundles
        .iter()
        .map(|(_, b)| {
            b.get("entry")
                .and_then(|e| e.as_array())
                .map(|a| a.len() as u64)
                .unwrap_or(1)
        })
        .sum();
    let bundles = bundles
        .into_iter()
        .map(|(k, b)| (k, serde_json::to_string(&b).unwrap_or_default()))
        .collect();
    PersonOutput {
        person: p,
        bundles,
        holder,
        resources,
    }
}

/// One submission of every kind for person `index` (an allergy even if the person's draw had none),
/// for tests that need many valid instances of each kind.
pub fn sample_submissions(
    seed: u64,
    index: u64,
    years: u32,
    institutions: &[Institution],
) -> Vec<(BundleKind, serde_json::Value)> {
    let p = population::person(seed, index, years);
    let mut rng = Rng::new(seed ^ 0x5341_4D50, index);
    let (clinic, _) = care_sites(&p, institutions, &mut rng);
    let window_start = REFERENCE_DATE.plus(-(years as i64) * 365);
    let day = p
        .last_day()
        .plus(-(rng.below(300) as i64))
        .max(p.birth.plus(400))
        .max(window_start)
        .min(p.last_day());
    let mut out = Vec::new();
    let url = format!("urn:uuid:{}", rng.uuid());
    let conds: Vec<serde_json::Value> = p
        .conditions
        .iter()
        .map(|(ci, onset)| {
            clinical::condition(&p, *ci, *onset, clinic, day.max(*onset), &url, &mut rng)
        })
        .collect();
    if !conds.is_empty() {
        let patient = clinical::patient(&p, clinic, day, &mut rng);
        out.push((
            BundleKind::Condition,
            clinical::bundle(
                BundleKind::Condition,
                clinic,
                patient,
                &url,
                conds,
                day,
                &mut rng,
            ),
        ));
    }
    let ai = rng.below(tables::ALLERGENS.len() as u64) as usize;
    let url = format!("urn:uuid:{}", rng.uuid());
    let a = clinical::allergy(&p, ai, clinic, day, &url, &mut rng);
    let patient = clinical::patient(&p, clinic, day, &mut rng);
    out.push((
        BundleKind::AllergyIntolerance,
        clinical::bundle(
            BundleKind::AllergyIntolerance,
            clinic,
            patient,
            &url,
            vec![a],
            day,
            &mut rng,
        ),
    ));
    let url = format!("urn:uuid:{}", rng.uuid());
    let enc = format!("enc-{}", day.days());
    let items: Vec<usize> = (0..tables::LAB_ITEMS.len())
        .filter(|_| rng.chance(0.3))
        .collect();
    let mut obs = Vec::with_capacity(items.len() + tables::INFECTIONS.len());
    for (k, li) in items.into_iter().enumerate() {
        let v = clinical::lab_value(&p, li, &mut rng);
        obs.push(clinical::lab(&p, li, v, clinic, day, &url, &enc, k as u64));
    }
    // Every sampled panel also carries the 5 infection items (sometimes positive, sometimes LTS).
    let lts = rng.chance(0.5);
    for ii in 0..tables::INFECTIONS.len() {
        let positive = rng.chance(0.2);
        obs.push(clinical::infection(
            &p, ii, positive, clinic, day, &url, &enc, ii as u64, lts,
        ));
    }
    if !obs.is_empty() {
        let patient = clinical::patient(&p, clinic, day, &mut rng);
        out.push((
            BundleKind::Observation,
            clinical::bundle(
                BundleKind::Observation,
                clinic,
                patient,
                &url,
                obs,
                day,
                &mut rng,
            ),
        ));
    }
    let d = rng.below(tables::DRUGS.len() as u64) as usize;
    out.push((
        BundleKind::MedicationRequest,
        clinical::prescription(&p, d, clinic, day, 1),
    ));
    let (_, hospital) = care_sites(&p, institutions, &mut rng);
    if hospital.number != clinic.number {
        out.push((
            BundleKind::Referral,
            documents::referral(&p, clinic, hospital, day, &mut rng),
        ));
    }
    if let Some(doc) = documents::checkup(&p, clinic, day, &mut rng) {
        out.push((BundleKind::Checkup, doc));
    }
    out.push((
        BundleKind::Discharge,
        documents::discharge_summary(&p, hospital, day.plus(-10), day, &mut rng),
    ));
    out
}

/// Output files of a run.
struct Writers {
    bundles: BTreeMap<&'static str, Box<dyn Write + Send>>,
    people: csv::Writer<File>,
    coverage: csv::Writer<File>,
    claims: csv::Writer<File>,
    checkups: csv::Writer<File>,
    deaths: csv::Writer<File>,
    ltc: csv::Writer<File>,
    truth: csv::Writer<File>,
}

fn csv_writer(path: &Path, header: &[&str]) -> Result<csv::Writer<File>, SynthError> {
    let mut w = csv::WriterBuilder::new()
        .terminator(csv::Terminator::CRLF)
        .from_path(path)?;
    w.write_record(header)?;
    Ok(w)
}

impl Writers {
    fn create(out: &Path, gzip: bool) -> Result<Writers, SynthError> {
        std::fs::create_dir_all(out.join("fhir"))?;
        std::fs::create_dir_all(out.join("holder"))?;
        let mut bundles = BTreeMap::new();
        for k in BundleKind::ALL {
            let mut name = k.file_name();
            let w: Box<dyn Write + Send> = if gzip {
                name.push_str(".gz");
                Box::new(flate2::write::GzEncoder::new(
                    BufWriter::new(File::create(out.join("fhir").join(name))?),
                    flate2::Compression::fast(),
                ))
            } else {
                Box::new(BufWriter::new(File::create(out.join("fhir").join(name))?))
            };
            bundles.insert(k.code(), w);
        }
        Ok(Writers {
            bundles,
            people: csv_writer(
                &out.join("people.csv"),
                &[
                    "person_id",
                    "sex",
                    "birth_date",
                    "family_kanji",
                    "given_kanji",
                    "family_kana",
                    "given_kana",
                    "prefecture_code",
                    "municipality",
                    "postal_code",
                    "death_date",
                ],
            )?,
            coverage: csv_writer(
                &out.join("coverage.csv"),
                &[
                    "person_id",
                    "kind",
                    "insurer_no",
                    "kigo",
                    "bango",
                    "edaban",
                    "member_id",
                    "start",
                    "end",
                ],
            )?,
            claims: csv_writer(&out.join("holder/claims.csv"), holder::CLAIMS_HEADER)?,
            checkups: csv_writer(&out.join("holder/checkups.csv"), holder::CHECKUPS_HEADER)?,
            deaths: csv_writer(&out.join("holder/deaths.csv"), holder::DEATHS_HEADER)?,
            ltc: csv_writer(&out.join("holder/ltc.csv"), holder::LTC_HEADER)?,
            truth: csv_writer(
                &out.join("holder/ground_truth.csv"),
                &["dataset", "record_id", "person_id"],
            )?,
        })
    }

    fn write(&mut self, o: &PersonOutput, s: &mut Summary) -> Result<(), SynthError> {
        let p = &o.person;
        for (kind, b) in &o.bundles {
            if let Some(w) = self.bundles.get_mut(kind.code()) {
                w.write_all(b.as_bytes())?;
                w.write_all(b"\n")?;
            }
            *s.bundles.entry(kind.code().to_string()).or_default() += 1;
        }
        s.resources += o.resources;
        let pref = &tables::PREFECTURES[p.pref];
        self.people.write_record([
            p.id.as_str(),
            p.sex.fhir(),
            &p.birth.iso(),
            &p.family.kanji,
            &p.given.kanji,
            &p.family.kana,
            &p.given.kana,
            pref.code,
            p.city,
            &p.postal,
            &p.death.as_ref().map(|d| d.date.iso()).unwrap_or_default(),
        ])?;
        for c in &p.coverage {
            self.coverage.write_record([
                p.id.as_str(),
                c.kind.label(),
                &c.insurer,
                &c.kigo,
                &c.bango,
                &c.edaban,
                &c.member_id(),
                &c.start.iso(),
                &c.end.map(|e| e.iso()).unwrap_or_default(),
            ])?;
        }
        for r in &o.holder.claims {
            self.claims.write_record(r)?;
        }
        for r in &o.holder.checkups {
            self.checkups.write_record(r)?;
        }
        for r in &o.holder.deaths {
            self.deaths.write_record(r)?;
        }
        for r in &o.holder.ltc {
            self.ltc.write_record(r)?;
        }
        for r in &o.holder.truth {
            self.truth.write_record(r)?;
        }
        s.people += 1;
        s.deaths += p.death.is_some() as u64;
        s.coverage_periods += p.coverage.len() as u64;
        for (ci, _) in &p.conditions {
            *s.conditions
                .entry(tables::CONDITIONS[*ci].icd10.to_string())
                .or_default() += 1;
        }
        for (name, n) in [
            ("claims", o.holder.claims.len()),
            ("checkups", o.holder.checkups.len()),
            ("deaths", o.holder.deaths.len()),
            ("ltc", o.holder.ltc.len()),
        ] {
            *s.holder_records.entry(name.to_string()).or_default() += n as u64;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<(), SynthError> {
        for w in self.bundles.values_mut() {
            w.flush()?;
        }
        // Dropping a GzEncoder writes its trailer.
        self.bundles.clear();
        for w in [
            &mut self.people,
            &mut self.coverage,
            &mut self.claims,
            &mut self.checkups,
            &mut self.deaths,
            &mut self.ltc,
            &mut self.truth,
        ] {
            w.flush()?;
        }
        Ok(())
    }
}

/// People generated per chunk: bounds memory, and chunks are written in order.
const CHUNK: u64 = 256;

/// Generates a population into `cfg.out`, calling `progress` with the number of people done.
pub fn generate(cfg: &Config, progress: &(dyn Fn(u64) + Sync)) -> Result<Summary, SynthError> {
    let started = std::time::Instant::now();
    let institutions = population::institutions(cfg.seed);
    let mut w = Writers::create(&cfg.out, cfg.gzip)?;
    let mut inst = csv_writer(
        &cfg.out.join("institutions.csv"),
        &["institution_no", "name", "prefecture_code", "kind"],
    )?;
    for i in &institutions {
        inst.write_record([
            i.number.as_str(),
            &i.name,
            tables::PREFECTURES[i.pref].code,
            if i.hospital { "hospital" } else { "clinic" },
        ])?;
    }
    inst.flush()?;
    let mut summary = Summary {
        institutions: institutions.len() as u64,
        ..Summary::default()
    };
    let chunks = cfg.patients.div_ceil(CHUNK);
    let threads = cfg.threads.max(1) as u64;
    let done = AtomicU64::new(0);
    // Generate `threads` chunks at a time in parallel, write them in order.
    let mut next = 0u64;
    while next < chunks {
        let batch: Vec<u64> = (next..(next + threads).min(chunks)).collect();
        let results: Vec<Vec<PersonOutput>> = std::thread::scope(|s| {
            let handles: Vec<_> = batch
                .iter()
                .map(|&c| {
                    let institutions = &institutions;
                    let done = &done;
                    s.spawn(move || {
                        let lo = c * CHUNK;
                        let hi = ((c + 1) * CHUNK).min(cfg.patients);
                        let out: Vec<PersonOutput> = (lo..hi)
                            .map(|i| person_output(cfg.seed, i, cfg.years, institutions))
                            .collect();
                        progress(done.fetch_add(hi - lo, Ordering::Relaxed) + (hi - lo));
                        out
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_default())
                .collect()
        });
        for chunk in results {
            for o in &chunk {
                w.write(o, &mut summary)?;
            }
        }
        next += threads;
    }
    w.finish()?;
    summary.seconds = started.elapsed().as_secs_f64();
    let mut f = File::create(cfg.out.join("summary.json"))?;
    // The summary's timing varies run to run; it is kept out of the deterministic data files.
    serde_json::to_writer_pretty(&mut f, &summary)?;
    Ok(summary)
}
