//! Holder datasets for secondary use, keyed as each holder keys them — never by the service's person id:
//! claims (医科, DPC, 調剤 receipts) and 特定健診 results by insurer number and 記号・番号; death records by
//! kana name, sex and birth date; long-term care (介護保険) by the municipality's insured number. Linkage
//! noise is added the way it occurs (kana variants and typos, missing parts, insurer changes); the
//! ground-truth file says which person each record belongs to.

use crate::population::{Date, Person};
use crate::rng::Rng;

/// Kana the way another system may write it: voiced-consonant and small-kana variants, occasional typos.
pub fn kana_variant(s: &str, rng: &mut Rng) -> String {
    let mut out = s.to_string();
    if rng.chance(0.04) {
        out = out
            .replace('ヅ', "ズ")
            .replace('ヂ', "ジ")
            .replace('ヴ', "ブ");
    }
    if rng.chance(0.02) {
        out = out
            .replace('ョ', "ヨ")
            .replace('ュ', "ユ")
            .replace('ャ', "ヤ")
            .replace('ッ', "ツ");
    }
    if rng.chance(0.01) && out.chars().count() > 2 {
        // One character slips to its neighbour in the syllabary.
        let chars: Vec<char> = out.chars().collect();
        let i = rng.below(chars.len() as u64) as usize;
        let c = chars[i];
        let n = if ('ァ'..='ヶ').contains(&c) {
            char::from_u32(c as u32 + 2).unwrap_or(c)
        } else {
            c
        };
        out = chars
            .iter()
            .enumerate()
            .map(|(j, x)| if j == i { n } else { *x })
            .collect();
    }
    out
}

fn maybe_missing_day(d: Date, rng: &mut Rng) -> String {
    if rng.chance(0.005) {
        format!("{:04}-{:02}", d.y, d.m)
    } else {
        d.iso()
    }
}

/// CSV rows produced for one person, per dataset, plus ground-truth rows.
#[derive(Default)]
pub struct HolderRows {
    /// claims.csv rows.
    pub claims: Vec<Vec<String>>,
    /// checkups.csv rows.
    pub checkups: Vec<Vec<String>>,
    /// deaths.csv rows.
    pub deaths: Vec<Vec<String>>,
    /// ltc.csv rows.
    pub ltc: Vec<Vec<String>>,
    /// ground_truth.csv rows: dataset, record id, person id.
    pub truth: Vec<Vec<String>>,
}

/// Header of claims.csv.
pub const CLAIMS_HEADER: &[&str] = &[
    "receipt_id",
    "receipt_type",
    "month",
    "insurer_no",
    "kigo",
    "bango",
    "edaban",
    "sex",
    "birth_date",
    "institution_no",
    "diagnoses_icd10",
    "procedures",
    "drugs_yj",
    "points",
];
/// Header of checkups.csv.
pub const CHECKUPS_HEADER: &[&str] = &[
    "checkup_id",
    "date",
    "insurer_no",
    "kigo",
    "bango",
    "sex",
    "birth_date",
    "height_cm",
    "weight_kg",
    "bmi",
    "waist_cm",
    "sbp",
    "dbp",
    "hba1c",
    "ldl",
    "hdl",
    "tg",
    "ast",
    "alt",
    "ggt",
];
/// Header of deaths.csv (the fields of the death form the seeds list).
pub const DEATHS_HEADER: &[&str] = &[
    "death_id",
    "family_kana",
    "given_kana",
    "sex",
    "birth_date",
    "death_datetime",
    "place_type",
    "underlying_cause_icd10",
    "underlying_cause",
    "manner",
    "prefecture_code",
    "municipality",
];
/// Header of ltc.csv.
pub const LTC_HEADER: &[&str] = &[
    "ltc_record_id",
    "year",
    "municipality",
    "ltc_insured_no",
    "family_kana",
    "given_kana",
    "sex",
    "birth_date",
    "care_level",
    "service",
];

impl HolderRows {
    /// Generates a person's holder records.
    pub fn for_person(
        p: &Person,
        visits: &[(Date, String, Vec<&'static str>, Vec<&'static str>)],
        years: u32,
        seed: u64,
    ) -> HolderRows {
        let mut rng = Rng::new(seed ^ 0x484F_4C44, p.index);
        let mut h = HolderRows::default();
        // Claims: one 医科 receipt per visit month at the institution, 調剤 for prescriptions.
        for (n, (date, inst, icd, drugs)) in visits.iter().enumerate() {
            let Some(cov) = p.coverage_on(*date) else {
                continue;
            };
            let id = format!("R{}-{}", p.index, n);
            let points = 250 + rng.below(900) + if drugs.is_empty() { 0 } else { 120 };
            h.claims.push(vec![
                id.clone(),
                "医科".into(),
                format!("{:04}{:02}", date.y, date.m),
                cov.insurer.clone(),
                cov.kigo.clone(),
                cov.bango.clone(),
                cov.edaban.clone(),
                p.sex.code().into(),
                maybe_missing_day(p.birth, &mut rng),
                inst.clone(),
                icd.join(" "),
                "再診料 外来管理加算".into(),
                String::new(),
                points.to_string(),
            ]);
            h.truth.push(vec!["claims".into(), id, p.id.clone()]);
            if !drugs.is_empty() {
                let id = format!("R{}-{}P", p.index, n);
                h.claims.push(vec![
                    id.clone(),
                    "調剤".into(),
                    format!("{:04}{:02}", date.y, date.m),
                    cov.insurer.clone(),
                    cov.kigo.clone(),
                    cov.bango.clone(),
                    cov.edaban.clone(),
                    p.sex.code().into(),
                    p.birth.iso(),
                    String::new(),
                    String::new(),
                    "調剤基本料 薬剤調製料".into(),
                    drugs.join(" "),
                    (180 + rng.below(600)).to_string(),
                ]);
                h.truth.push(vec!["claims".into(), id, p.id.clone()]);
            }
        }
        // A DPC stay for cancer.
        if p.conditions
            .iter()
            .any(|(i, _)| crate::tables::CONDITIONS[*i].cancer)
        {
            if let Some((d, inst, icd, _)) = visits.first() {
                if let Some(cov) = p.coverage_on(*d) {
                    let id = format!("R{}-DPC", p.index);
                    h.claims.push(vec![
                        id.clone(),
                        "DPC".into(),
                        format!("{:04}{:02}", d.y, d.m),
                        cov.insurer.clone(),
                        cov.kigo.clone(),
                        cov.bango.clone(),
                        cov.edaban.clone(),
                        p.sex.code().into(),
                        p.birth.iso(),
                        inst.clone(),
                        icd.join(" "),
                        "入院基本料 手術".into(),
                        String::new(),
                        (30_000 + rng.below(90_000)).to_string(),
                    ]);
                    h.truth.push(vec!["claims".into(), id, p.id.clone()]);
                }
            }
        }
        // 特定健診: ages 40–74, about half take it each year.
        let start = crate::population::REFERENCE_DATE.plus(-(years as i64) * 365);
        for y in 0..years {
            let d = start.plus(y as i64 * 365 + 120 + rng.below(150) as i64);
            if d > p.last_day() {
                break;
            }
            let age = p.age_on(d);
            if !(40..=74).contains(&age) || !rng.chance(0.55) {
                continue;
            }
            let Some(cov) = p.coverage_on(d) else {
                continue;
            };
            let male = p.sex == crate::population::Sex::Male;
            let height = rng.normal(if male { 169.0 } else { 156.0 }, 6.0);
            let bmi = rng
                .normal(
                    if p.has("E11.9") || p.has("E78.5") {
                        25.5
                    } else {
                        22.8
                    },
                    3.0,
                )
                .max(15.0);
            let weight = bmi * (height / 100.0).powi(2);
            let sbp = rng.normal(if p.has("I10") { 142.0 } else { 122.0 }, 12.0);
            let hba1c = rng.normal(if p.has("E11.9") { 7.3 } else { 5.5 }, 0.4);
            let id = format!("C{}-{}", p.index, y);
            h.checkups.push(vec![
                id.clone(),
                d.iso(),
                cov.insurer.clone(),
                cov.kigo.clone(),
                cov.bango.clone(),
                p.sex.code().into(),
                maybe_missing_day(p.birth, &mut rng),
                format!("{height:.1}"),
                format!("{weight:.1}"),
                format!("{bmi:.1}"),
                format!(
                    "{:.1}",
                    rng.normal(if male { 85.0 } else { 80.0 }, 8.0) + (bmi - 22.8) * 2.0
                ),
                format!("{sbp:.0}"),
                format!("{:.0}", sbp * 0.62 + rng.normal(0.0, 6.0)),
                format!("{hba1c:.1}"),
                format!(
                    "{:.0}",
                    rng.normal(if p.has("E78.5") { 155.0 } else { 115.0 }, 25.0)
                ),
                format!("{:.0}", rng.normal(60.0, 14.0)),
                format!(
                    "{:.0}",
                    rng.normal(if p.has("E78.5") { 180.0 } else { 105.0 }, 45.0)
                        .max(30.0)
                ),
                format!("{:.0}", rng.normal(22.0, 6.0).max(8.0)),
                format!("{:.0}", rng.normal(20.0, 9.0).max(5.0)),
                format!("{:.0}", rng.normal(30.0, 18.0).max(8.0)),
            ]);
            h.truth.push(vec!["checkups".into(), id, p.id.clone()]);
        }
        // Death record (人口動態調査 死亡票): identified only by name, sex, birth date, place.
        if let Some(d) = &p.death {
            let id = format!("D{}", p.index);
            h.deaths.push(vec![
                id.clone(),
                kana_variant(&p.family.kana, &mut rng),
                kana_variant(&p.given.kana, &mut rng),
                if rng.chance(0.003) {
                    String::new()
                } else {
                    p.sex.code().into()
                },
                maybe_missing_day(p.birth, &mut rng),
                format!("{}T{:02}:{:02}", d.date.iso(), d.time.0, d.time.1),
                d.place.into(),
                d.cause.0.into(),
                d.cause.1.into(),
                d.manner.into(),
                crate::tables::PREFECTURES[p.pref].code.into(),
                p.city.into(),
            ]);
            h.truth.push(vec!["deaths".into(), id, p.id.clone()]);
        }
        // Long-term care (介護保険): municipalities key it by their own insured number.
        let age = p.age_on(p.last_day());
        let p_cert = match age {
            ..=64 => 0.003,
            65..=74 => 0.03,
            75..=84 => 0.18,
            _ => 0.55,
        };
        if rng.chance(p_cert) {
            let ltc_no = format!("{:010}", rng.below(10_000_000_000));
            let mut level = rng.range(0, 6);
            let last = p.last_day();
            for y in 0..years {
                let d = start.plus(y as i64 * 365 + 200);
                if d > last || p.age_on(d) < 40 {
                    continue;
                }
                let labels = [
                    "要支援1",
                    "要支援2",
                    "要介護1",
                    "要介護2",
                    "要介護3",
                    "要介護4",
                    "要介護5",
                ];
                let service = if level >= 5 {
                    "施設サービス"
                } else if level >= 2 {
                    *rng.pick(&["訪問介護", "通所介護", "短期入所"])
                } else {
                    "介護予防サービス"
                };
                let id = format!("L{}-{}", p.index, y);
                h.ltc.push(vec![
                    id.clone(),
                    d.y.to_string(),
                    p.city.into(),
                    ltc_no.clone(),
                    kana_variant(&p.family.kana, &mut rng),
                    kana_variant(&p.given.kana, &mut rng),
                    p.sex.code().into(),
                    p.birth.iso(),
                    labels[level as usize].into(),
                    service.into(),
                ]);
                h.truth.push(vec!["ltc".into(), id, p.id.clone()]);
                if rng.chance(0.3) {
                    level = (level + 1).min(6);
                }
            }
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kana_variants_are_plausible() {
        let mut rng = Rng::new(1, 1);
        let mut changed = 0;
        for _ in 0..10_000 {
            let v = kana_variant("スズキ", &mut rng);
            assert_eq!(v.chars().count(), 3);
            if v != "スズキ" {
                changed += 1;
            }
        }
        assert!(changed > 0 && changed < 500, "{changed}");
    }
}
