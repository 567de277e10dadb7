//! People and institutions: who they are, where they live, how they are insured over time, when they die.

use crate::rng::Rng;
use crate::tables::{self, Name, CONDITIONS, PREFECTURES};

/// A calendar date.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Date {
    /// Year.
    pub y: i32,
    /// Month 1–12.
    pub m: u32,
    /// Day 1–31.
    pub d: u32,
}

impl Date {
    /// Days since 1970-01-01 (proleptic Gregorian).
    pub fn days(self) -> i64 {
        let (y, m) = if self.m <= 2 {
            (self.y as i64 - 1, self.m as i64 + 9)
        } else {
            (self.y as i64, self.m as i64 - 3)
        };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let doy = (153 * m + 2) / 5 + self.d as i64 - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    /// The date `n` days after 1970-01-01.
    pub fn from_days(n: i64) -> Date {
        let z = n + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let y = (yoe + era * 400 + if m <= 2 { 1 } else { 0 }) as i32;
        Date { y, m, d }
    }

    /// Adds days.
    pub fn plus(self, n: i64) -> Date {
        Date::from_days(self.days() + n)
    }

    /// Whole years from `self` to `other`.
    pub fn years_until(self, other: Date) -> i64 {
        let mut a = (other.y - self.y) as i64;
        if (other.m, other.d) < (self.m, self.d) {
            a -= 1;
        }
        a
    }

    /// `YYYY-MM-DD`.
    pub fn iso(self) -> String {
        format!("{:04}-{:02}-{:02}", self.y, self.m, self.d)
    }
}

/// The date the simulated history ends (fixed, so output never depends on the wall clock).
pub const REFERENCE_DATE: Date = Date {
    y: 2026,
    m: 3,
    d: 31,
};

/// Sex as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sex {
    /// male
    Male,
    /// female
    Female,
}

impl Sex {
    /// FHIR code.
    pub fn fhir(self) -> &'static str {
        match self {
            Sex::Male => "male",
            Sex::Female => "female",
        }
    }
    /// The code insurers use (1 male, 2 female).
    pub fn code(self) -> &'static str {
        match self {
            Sex::Male => "1",
            Sex::Female => "2",
        }
    }
}

/// Kinds of public health insurance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsuranceKind {
    /// 国民健康保険 (municipal).
    Kokuho,
    /// 全国健康保険協会 (協会けんぽ).
    Kyokai,
    /// 健康保険組合.
    Kumiai,
    /// 共済組合.
    Kyosai,
    /// 後期高齢者医療 (75 and over).
    KokiKoreisha,
}

impl InsuranceKind {
    /// Label for outputs.
    pub fn label(self) -> &'static str {
        match self {
            InsuranceKind::Kokuho => "国保",
            InsuranceKind::Kyokai => "協会けんぽ",
            InsuranceKind::Kumiai => "健保組合",
            InsuranceKind::Kyosai => "共済",
            InsuranceKind::KokiKoreisha => "後期高齢者医療",
        }
    }
}

/// One period of coverage.
#[derive(Debug, Clone)]
pub struct Coverage {
    /// Kind.
    pub kind: InsuranceKind,
    /// 保険者番号 (8 digits, or 6 for 国保).
    pub insurer: String,
    /// 記号.
    pub kigo: String,
    /// 番号.
    pub bango: String,
    /// 枝番 (`00` the insured person, `01`… dependants).
    pub edaban: String,
    /// First day.
    pub start: Date,
    /// Last day, if ended.
    pub end: Option<Date>,
}

impl Coverage {
    /// The JP-CLINS insured-person identifier `保険者番号:記号:番号:枝番` (R1013: the insurer number is
    /// 8 digits, so 国保's 6-digit numbers are zero-padded).
    pub fn member_id(&self) -> String {
        format!(
            "{:0>8}:{}:{}:{}",
            self.insurer, self.kigo, self.bango, self.edaban
        )
    }

    /// True when the coverage applies on a date.
    pub fn covers(&self, d: Date) -> bool {
        self.start <= d && self.end.map(|e| d <= e).unwrap_or(true)
    }
}

/// Modulus-10 check digit with weights 2,1,2,1… from the left; digits of products are summed.
pub fn check_digit(digits: &str) -> u32 {
    let mut sum = 0;
    for (i, c) in digits.chars().enumerate() {
        let d = c.to_digit(10).unwrap_or(0);
        let p = if i % 2 == 0 { d * 2 } else { d };
        sum += p / 10 + p % 10;
    }
    (10 - sum % 10) % 10
}

fn insurer_number(kind: InsuranceKind, pref: &str, rng: &mut Rng) -> String {
    let body = match kind {
        InsuranceKind::Kokuho => format!("{pref}{:03}", rng.below(900) + 100),
        InsuranceKind::Kyokai => format!("01{pref}{:03}", rng.below(20)),
        InsuranceKind::Kumiai => format!("06{pref}{:03}", rng.below(900) + 100),
        InsuranceKind::Kyosai => format!(
            "{}{pref}{:03}",
            rng.pick(&["31", "32", "33", "34"]),
            rng.below(50) + 1
        ),
        InsuranceKind::KokiKoreisha => format!("39{pref}{:03}", rng.below(20) + 1),
    };
    format!("{body}{}", check_digit(&body))
}

/// A cause of death as the death form records it.
#[derive(Debug, Clone)]
pub struct Death {
    /// Date.
    pub date: Date,
    /// Hour and minute.
    pub time: (u32, u32),
    /// Underlying cause (ICD-10) and its name.
    pub cause: (&'static str, &'static str),
    /// Place type (death form): 病院, 診療所, 介護医療院・介護老人保健施設, 助産所, 老人ホーム, 自宅, その他.
    pub place: &'static str,
    /// Manner: 病死及び自然死, 不慮の外因死, …
    pub manner: &'static str,
}

/// Places of death (death-form categories), weighted by repetition.
const DEATH_PLACES: &[&str] = &[
    "病院",
    "病院",
    "病院",
    "自宅",
    "老人ホーム",
    "介護医療院・介護老人保健施設",
    "診療所",
];

/// A synthetic person.
#[derive(Debug, Clone)]
pub struct Person {
    /// Position in the run.
    pub index: u64,
    /// Stable id (`P00000001`), the ground truth for linkage.
    pub id: String,
    /// Sex.
    pub sex: Sex,
    /// Birth date.
    pub birth: Date,
    /// Family name.
    pub family: Name,
    /// Given name.
    pub given: Name,
    /// Prefecture index into [`PREFECTURES`].
    pub pref: usize,
    /// Municipality.
    pub city: &'static str,
    /// Postal code (synthetic: right shape, not a real mapping).
    pub postal: String,
    /// Phone number (synthetic).
    pub phone: String,
    /// Insurance over the simulated window, in time order.
    pub coverage: Vec<Coverage>,
    /// Death, if within the window.
    pub death: Option<Death>,
    /// Conditions: index into [`CONDITIONS`] and onset date.
    pub conditions: Vec<(usize, Date)>,
}

impl Person {
    /// Age on a date.
    pub fn age_on(&self, d: Date) -> i64 {
        self.birth.years_until(d)
    }

    /// The last day the person is alive in the window.
    pub fn last_day(&self) -> Date {
        self.death
            .as_ref()
            .map(|d| d.date)
            .unwrap_or(REFERENCE_DATE)
    }

    /// The coverage on a date.
    pub fn coverage_on(&self, d: Date) -> Option<&Coverage> {
        self.coverage.iter().find(|c| c.covers(d))
    }

    /// Whether the person has a condition (by ICD-10).
    pub fn has(&self, icd10: &str) -> bool {
        self.conditions
            .iter()
            .any(|(i, _)| CONDITIONS[*i].icd10 == icd10)
    }
}

/// Age weights by 5-year band (Japan, 2020, millions).
const AGE_BANDS: [f64; 20] = [
    4.0, 4.3, 4.4, 4.5, 5.0, 5.0, 5.4, 6.0, 6.8, 7.8, 7.1, 6.3, 6.0, 7.3, 7.3, 5.6, 4.6, 3.2, 1.6,
    0.5,
];

fn member_numbers(rng: &mut Rng) -> (String, String) {
    let kigo = format!("{}", rng.range(1, 99_999));
    let bango = format!("{}", rng.range(1, 9_999_999));
    (kigo, bango)
}

/// Generates person `index` of a run with `seed`, over `years` ending at [`REFERENCE_DATE`].
pub fn person(seed: u64, index: u64, years: u32) -> Person {
    let mut rng = Rng::new(seed, index);
    let sex = if rng.chance(0.486) {
        Sex::Male
    } else {
        Sex::Female
    };
    let band = rng.weighted(&AGE_BANDS);
    let age = band as i64 * 5 + rng.below(5) as i64;
    let birth = REFERENCE_DATE.plus(-(age * 365 + age / 4) - rng.below(365) as i64);
    let names = tables::names();
    let family = names.family[rng.weighted(&names.family_weights)].clone();
    let given = match sex {
        Sex::Male => rng.pick(&names.male).clone(),
        Sex::Female => rng.pick(&names.female).clone(),
    };
    let pref = rng.weighted(tables::prefecture_weights());
    let p = &PREFECTURES[pref];
    let city = *rng.pick(p.cities);
    let postal = format!("{:03}-{:04}", rng.below(999) + 1, rng.below(10_000));
    let phone = format!(
        "0{}-{:04}-{:04}",
        rng.range(3, 99),
        rng.below(10_000),
        rng.below(10_000)
    );
    let window_start = REFERENCE_DATE.plus(-(years as i64) * 365);

    // Death within the window: yearly hazard grows exponentially with age.
    let mut death = None;
    let mut y = window_start;
    while y < REFERENCE_DATE {
        let a = birth.years_until(y);
        let h = (-10.5 + 0.095 * a as f64).exp() * if sex == Sex::Female { 0.6 } else { 1.0 };
        if rng.chance(h.min(0.5)) {
            let date = y.plus(rng.below(365) as i64).min(REFERENCE_DATE);
            let weights: Vec<f64> = tables::DEATH_CAUSES.iter().map(|c| c.2).collect();
            let c = &tables::DEATH_CAUSES[rng.weighted(&weights)];
            let external = c.0.starts_with('V') || c.0.starts_with('X');
            death = Some(Death {
                date,
                time: (rng.below(24) as u32, rng.below(60) as u32),
                cause: (c.0, c.1),
                place: if external {
                    "その他"
                } else {
                    DEATH_PLACES[rng.below(DEATH_PLACES.len() as u64) as usize]
                },
                manner: if external {
                    "不慮の外因死"
                } else {
                    "病死及び自然死"
                },
            });
            break;
        }
        y = y.plus(365);
    }
    let end = death.as_ref().map(|d| d.date).unwrap_or(REFERENCE_DATE);

    // Insurance: one coverage at a time across the window; job changes and retirement switch insurer,
    // 75th birthday moves everyone to 後期高齢者医療 of their prefecture.
    let mut coverage: Vec<Coverage> = Vec::new();
    let employed = rng.chance(if sex == Sex::Male { 0.78 } else { 0.62 });
    let retire_age = rng.range(60, 66);
    let pick_kind = |rng: &mut Rng, age: i64| -> InsuranceKind {
        if age >= 75 {
            InsuranceKind::KokiKoreisha
        } else if (22..retire_age).contains(&age) && employed {
            match rng.weighted(&[0.58, 0.30, 0.12]) {
                0 => InsuranceKind::Kyokai,
                1 => InsuranceKind::Kumiai,
                _ => InsuranceKind::Kyosai,
            }
        } else if age < 22 && rng.chance(0.7) {
            // Children are dependants on a parent's employer insurance.
            if rng.chance(0.65) {
                InsuranceKind::Kyokai
            } else {
                InsuranceKind::Kumiai
            }
        } else {
            InsuranceKind::Kokuho
        }
    };
    let mut day = window_start.max(birth);
    let mut current = pick_kind(&mut rng, birth.years_until(day));
    let new_cov = |rng: &mut Rng, kind: InsuranceKind, start: Date, age: i64| -> Coverage {
        let (kigo, bango) = member_numbers(rng);
        Coverage {
            kind,
            insurer: insurer_number(kind, p.code, rng),
            kigo,
            bango,
            edaban: if age < 22 && kind != InsuranceKind::Kokuho {
                format!("{:02}", rng.range(1, 4))
            } else {
                "00".into()
            },
            start,
            end: None,
        }
    };
    coverage.push(new_cov(&mut rng, current, day, birth.years_until(day)));
    while day < end {
        let next = day.plus(30);
        let age = birth.years_until(next);
        let turned_75 = age >= 75 && current != InsuranceKind::KokiKoreisha;
        let retired = age >= retire_age
            && matches!(
                current,
                InsuranceKind::Kyokai | InsuranceKind::Kumiai | InsuranceKind::Kyosai
            )
            && age >= 22;
        let started_work = age == 22 && employed && current == InsuranceKind::Kokuho;
        let job_change = matches!(
            current,
            InsuranceKind::Kyokai | InsuranceKind::Kumiai | InsuranceKind::Kyosai
        ) && rng.chance(0.05 / 12.0);
        if turned_75 || retired || started_work || job_change {
            let kind = pick_kind(&mut rng, age);
            if let Some(last) = coverage.last_mut() {
                last.end = Some(next.plus(-1));
            }
            coverage.push(new_cov(&mut rng, kind, next, age));
            current = kind;
        }
        day = next;
    }
    if let (Some(last), Some(d)) = (coverage.last_mut(), &death) {
        last.end = Some(d.date);
    }

    // Conditions by prevalence at the end of the window; onset some time before.
    let mut conditions = Vec::new();
    let age_end = birth.years_until(end);
    for (i, c) in CONDITIONS.iter().enumerate() {
        let prev = match sex {
            Sex::Male => c.male[tables::age_band(age_end)],
            Sex::Female => c.female[tables::age_band(age_end)],
        };
        if rng.chance(prev) {
            let back = if c.chronic {
                rng.below(365 * 8) as i64
            } else {
                rng.below(365 * years.max(1) as u64) as i64
            };
            conditions.push((i, end.plus(-back).max(birth.plus(30))));
        }
    }
    Person {
        index,
        id: format!("P{:08}", index + 1),
        sex,
        birth,
        family,
        given,
        pref,
        city,
        postal,
        phone,
        coverage,
        death,
        conditions,
    }
}

/// A hospital or clinic.
#[derive(Debug, Clone)]
pub struct Institution {
    /// 10-digit institution number (prefecture, 1 = 医科, 郡市区 2, 4, check digit).
    pub number: String,
    /// Name.
    pub name: String,
    /// Prefecture index.
    pub pref: usize,
    /// Hospital (with beds, DPC) or clinic.
    pub hospital: bool,
}

/// The institutions of a run: per prefecture, hospitals and clinics in proportion to population.
pub fn institutions(seed: u64) -> Vec<Institution> {
    let mut rng = Rng::new(seed, u64::MAX);
    let mut out = Vec::new();
    for (pi, p) in PREFECTURES.iter().enumerate() {
        let hospitals = (p.population / 60).max(2);
        let clinics = (p.population / 15).max(6);
        for k in 0..(hospitals + clinics) {
            let hospital = k < hospitals;
            let body = format!(
                "{:02}{:04}",
                rng.below(90) + 1,
                1000 + k * 7 + rng.below(7) as u32
            );
            let number = format!("{}1{}{}", p.code, body, check_digit(&body));
            let city = rng.pick(p.cities);
            let name = if hospital {
                format!("{city}第{}病院", k + 1)
            } else {
                format!(
                    "{city}{}クリニック",
                    tables::names().family[rng.below(50) as usize].kanji
                )
            };
            out.push(Institution {
                number,
                name,
                pref: pi,
                hospital,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_round_trip_and_count_years() {
        for n in [-1000, 0, 1, 59, 60, 365 * 30, 20_000] {
            assert_eq!(Date::from_days(n).days(), n);
        }
        assert_eq!(
            Date {
                y: 2024,
                m: 2,
                d: 29
            }
            .plus(1),
            Date {
                y: 2024,
                m: 3,
                d: 1
            }
        );
        assert_eq!(
            Date {
                y: 1950,
                m: 4,
                d: 1
            }
            .years_until(Date {
                y: 2025,
                m: 3,
                d: 31
            }),
            74
        );
        assert_eq!(
            Date {
                y: 1950,
                m: 4,
                d: 1
            }
            .years_until(Date {
                y: 2025,
                m: 4,
                d: 1
            }),
            75
        );
    }

    #[test]
    fn insurance_follows_the_life_course() {
        let mut seen_75 = 0;
        for i in 0..3000 {
            let p = person(1, i, 5);
            // Coverage is continuous and ordered.
            for w in p.coverage.windows(2) {
                assert_eq!(w[0].end.map(|e| e.plus(1)), Some(w[1].start), "{}", p.id);
            }
            for c in &p.coverage {
                let n = c.insurer.len();
                assert!(n == 6 || n == 8, "{}", c.insurer);
                let (body, check) = c.insurer.split_at(n - 1);
                assert_eq!(check.parse::<u32>().ok(), Some(check_digit(body)));
                if c.kind == InsuranceKind::KokiKoreisha {
                    assert!(p.age_on(c.start) >= 75);
                    assert!(c.insurer.starts_with("39"));
                }
            }
            if p.age_on(p.last_day()) >= 76 {
                seen_75 += 1;
                assert_eq!(
                    p.coverage_on(p.last_day()).map(|c| c.kind),
                    Some(InsuranceKind::KokiKoreisha)
                );
            }
        }
        assert!(seen_75 > 100);
    }

    #[test]
    fn institution_numbers_are_valid() {
        let is = institutions(9);
        assert!(is.len() > 500);
        for i in &is {
            assert_eq!(i.number.len(), 10);
            assert!(i.number.chars().all(|c| c.is_ascii_digit()));
            assert_eq!(&i.number[2..3], "1");
            let body = &i.number[3..9];
            assert_eq!(i.number[9..].parse::<u32>().ok(), Some(check_digit(body)));
        }
        let mut nums: Vec<&str> = is.iter().map(|i| i.number.as_str()).collect();
        nums.sort_unstable();
        nums.dedup();
        assert_eq!(nums.len(), is.len(), "institution numbers are unique");
    }
}
