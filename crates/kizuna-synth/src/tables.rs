//! Reference tables the generator draws from: names (Faker's ja_JP lists, MIT), prefectures with their
//! JIS X 0401 codes, conditions with age/sex prevalence, lab items with JLAC10 codes and value models,
//! allergens, drugs, departments and causes of death.
//!
//! Disease codes: the MEDIS 病名管理番号 master is not public. Conditions whose 管理番号 appears in the
//! public JP-CLINS examples use it; the others use codes of the form `SYN…`, which no real master
//! contains, so synthetic data can never be mistaken for a real code. ICD-10 codes are real.

use std::sync::OnceLock;

/// A prefecture: JIS X 0401 code, name, municipalities (the first is the capital), population (万人, 2020).
pub struct Prefecture {
    /// Two-digit code.
    pub code: &'static str,
    /// Name.
    pub name: &'static str,
    /// Municipalities (the capital first).
    pub cities: &'static [&'static str],
    /// Population in units of 10,000 (2020 census, rounded), used as a weight.
    pub population: u32,
}

macro_rules! pref {
    ($c:expr, $n:expr, [$($city:expr),+], $p:expr) => {
        Prefecture { code: $c, name: $n, cities: &[$($city),+], population: $p }
    };
}

/// The 47 prefectures.
pub const PREFECTURES: &[Prefecture] = &[
    pref!("01", "北海道", ["札幌市", "旭川市", "函館市"], 522),
    pref!("02", "青森県", ["青森市", "八戸市"], 124),
    pref!("03", "岩手県", ["盛岡市", "一関市"], 121),
    pref!("04", "宮城県", ["仙台市", "石巻市"], 230),
    pref!("05", "秋田県", ["秋田市", "横手市"], 96),
    pref!("06", "山形県", ["山形市", "鶴岡市"], 107),
    pref!("07", "福島県", ["福島市", "郡山市", "いわき市"], 183),
    pref!("08", "茨城県", ["水戸市", "つくば市"], 287),
    pref!("09", "栃木県", ["宇都宮市", "小山市"], 193),
    pref!("10", "群馬県", ["前橋市", "高崎市"], 194),
    pref!("11", "埼玉県", ["さいたま市", "川口市", "川越市"], 734),
    pref!("12", "千葉県", ["千葉市", "船橋市", "柏市"], 628),
    pref!(
        "13",
        "東京都",
        ["新宿区", "世田谷区", "八王子市", "千代田区"],
        1405
    ),
    pref!("14", "神奈川県", ["横浜市", "川崎市", "相模原市"], 924),
    pref!("15", "新潟県", ["新潟市", "長岡市"], 220),
    pref!("16", "富山県", ["富山市", "高岡市"], 103),
    pref!("17", "石川県", ["金沢市", "白山市"], 113),
    pref!("18", "福井県", ["福井市", "坂井市"], 77),
    pref!("19", "山梨県", ["甲府市", "甲斐市"], 81),
    pref!("20", "長野県", ["長野市", "松本市"], 205),
    pref!("21", "岐阜県", ["岐阜市", "大垣市"], 198),
    pref!("22", "静岡県", ["静岡市", "浜松市"], 363),
    pref!("23", "愛知県", ["名古屋市", "豊田市", "岡崎市"], 754),
    pref!("24", "三重県", ["津市", "四日市市"], 177),
    pref!("25", "滋賀県", ["大津市", "草津市"], 141),
    pref!("26", "京都府", ["京都市", "宇治市"], 258),
    pref!("27", "大阪府", ["大阪市", "堺市", "東大阪市"], 884),
    pref!("28", "兵庫県", ["神戸市", "姫路市", "西宮市"], 547),
    pref!("29", "奈良県", ["奈良市", "橿原市"], 132),
    pref!("30", "和歌山県", ["和歌山市", "田辺市"], 92),
    pref!("31", "鳥取県", ["鳥取市", "米子市"], 55),
    pref!("32", "島根県", ["松江市", "出雲市"], 67),
    pref!("33", "岡山県", ["岡山市", "倉敷市"], 189),
    pref!("34", "広島県", ["広島市", "福山市"], 280),
    pref!("35", "山口県", ["山口市", "下関市"], 134),
    pref!("36", "徳島県", ["徳島市", "阿南市"], 72),
    pref!("37", "香川県", ["高松市", "丸亀市"], 95),
    pref!("38", "愛媛県", ["松山市", "今治市"], 133),
    pref!("39", "高知県", ["高知市", "南国市"], 69),
    pref!("40", "福岡県", ["福岡市", "北九州市", "久留米市"], 513),
    pref!("41", "佐賀県", ["佐賀市", "唐津市"], 81),
    pref!("42", "長崎県", ["長崎市", "佐世保市"], 131),
    pref!("43", "熊本県", ["熊本市", "八代市"], 174),
    pref!("44", "大分県", ["大分市", "別府市"], 112),
    pref!("45", "宮崎県", ["宮崎市", "都城市"], 107),
    pref!("46", "鹿児島県", ["鹿児島市", "霧島市"], 159),
    pref!("47", "沖縄県", ["那覇市", "沖縄市"], 147),
];

/// Population weights of the prefectures.
pub fn prefecture_weights() -> &'static [f64] {
    static W: OnceLock<Vec<f64>> = OnceLock::new();
    W.get_or_init(|| PREFECTURES.iter().map(|p| p.population as f64).collect())
}

/// A name with its reading.
#[derive(Debug, Clone)]
pub struct Name {
    /// Kanji.
    pub kanji: String,
    /// Katakana reading.
    pub kana: String,
}

/// Family names with weights, male and female given names.
pub struct Names {
    /// Family names.
    pub family: Vec<Name>,
    /// Their weights (frequency).
    pub family_weights: Vec<f64>,
    /// Male given names.
    pub male: Vec<Name>,
    /// Female given names.
    pub female: Vec<Name>,
}

/// The vendored name lists.
pub fn names() -> &'static Names {
    static N: OnceLock<Names> = OnceLock::new();
    N.get_or_init(|| {
        let mut n = Names {
            family: Vec::new(),
            family_weights: Vec::new(),
            male: Vec::new(),
            female: Vec::new(),
        };
        let mut rdr = csv::Reader::from_reader(include_str!("../data/names.csv").as_bytes());
        for r in rdr.records().filter_map(Result::ok) {
            let name = Name {
                kanji: r.get(1).unwrap_or("").to_string(),
                kana: r.get(2).unwrap_or("").to_string(),
            };
            match r.get(0) {
                Some("family") => {
                    n.family_weights
                        .push(r.get(3).and_then(|w| w.parse().ok()).unwrap_or(1.0));
                    n.family.push(name);
                }
                Some("male") => n.male.push(name),
                Some("female") => n.female.push(name),
                _ => {}
            }
        }
        n
    })
}

/// A condition the generator can give someone.
pub struct Condition {
    /// 病名管理番号 (real where public examples show it, else `SYN…`).
    pub medis: &'static str,
    /// Japanese name.
    pub name: &'static str,
    /// ICD-10.
    pub icd10: &'static str,
    /// Chronic (stays active) or acute (resolves).
    pub chronic: bool,
    /// Prevalence for men by age band (0–19, 20–39, 40–49, 50–59, 60–69, 70–79, 80+).
    pub male: [f64; 7],
    /// Prevalence for women by the same bands.
    pub female: [f64; 7],
    /// Consent category of the sharing service: 1 = 傷病名・手術・感染症 (always 1 for conditions).
    pub cancer: bool,
}

/// Age band index for prevalence tables.
pub fn age_band(age: i64) -> usize {
    match age {
        ..=19 => 0,
        20..=39 => 1,
        40..=49 => 2,
        50..=59 => 3,
        60..=69 => 4,
        70..=79 => 5,
        _ => 6,
    }
}

/// Conditions with rough Japanese age/sex prevalence (national survey orders of magnitude).
pub const CONDITIONS: &[Condition] = &[
    Condition {
        medis: "20061593",
        name: "高血圧症",
        icd10: "I10",
        chronic: true,
        male: [0.0, 0.03, 0.18, 0.33, 0.48, 0.62, 0.70],
        female: [0.0, 0.01, 0.08, 0.20, 0.35, 0.55, 0.68],
        cancer: false,
    },
    Condition {
        medis: "SYN00001",
        name: "２型糖尿病",
        icd10: "E11.9",
        chronic: true,
        male: [0.0, 0.01, 0.06, 0.12, 0.18, 0.22, 0.20],
        female: [0.0, 0.005, 0.02, 0.05, 0.09, 0.13, 0.13],
        cancer: false,
    },
    Condition {
        medis: "SYN00002",
        name: "脂質異常症",
        icd10: "E78.5",
        chronic: true,
        male: [0.0, 0.04, 0.15, 0.22, 0.26, 0.25, 0.20],
        female: [0.0, 0.02, 0.08, 0.22, 0.33, 0.35, 0.28],
        cancer: false,
    },
    Condition {
        medis: "SYN00003",
        name: "慢性腎臓病",
        icd10: "N18.9",
        chronic: true,
        male: [0.0, 0.005, 0.02, 0.05, 0.10, 0.20, 0.30],
        female: [0.0, 0.005, 0.015, 0.04, 0.08, 0.17, 0.28],
        cancer: false,
    },
    Condition {
        medis: "20058911",
        name: "狭心症",
        icd10: "I20.9",
        chronic: true,
        male: [0.0, 0.001, 0.005, 0.015, 0.03, 0.06, 0.08],
        female: [0.0, 0.0005, 0.002, 0.006, 0.015, 0.035, 0.06],
        cancer: false,
    },
    Condition {
        medis: "20054178",
        name: "胃癌",
        icd10: "C16.9",
        chronic: true,
        male: [0.0, 0.0002, 0.001, 0.003, 0.008, 0.015, 0.02],
        female: [0.0, 0.0002, 0.0006, 0.0015, 0.003, 0.006, 0.008],
        cancer: true,
    },
    Condition {
        medis: "SYN00004",
        name: "大腸癌",
        icd10: "C18.9",
        chronic: true,
        male: [0.0, 0.0002, 0.001, 0.003, 0.007, 0.012, 0.015],
        female: [0.0, 0.0002, 0.0008, 0.002, 0.004, 0.008, 0.011],
        cancer: true,
    },
    Condition {
        medis: "SYN00005",
        name: "肺癌",
        icd10: "C34.9",
        chronic: true,
        male: [0.0, 0.0001, 0.0005, 0.002, 0.006, 0.012, 0.014],
        female: [0.0, 0.0001, 0.0004, 0.001, 0.0025, 0.005, 0.006],
        cancer: true,
    },
    Condition {
        medis: "SYN00006",
        name: "乳癌",
        icd10: "C50.9",
        chronic: true,
        male: [0.0; 7],
        female: [0.0, 0.002, 0.008, 0.012, 0.012, 0.010, 0.008],
        cancer: true,
    },
    Condition {
        medis: "20064049",
        name: "十二指腸潰瘍",
        icd10: "K26.9",
        chronic: false,
        male: [0.002, 0.01, 0.012, 0.012, 0.01, 0.01, 0.01],
        female: [0.001, 0.005, 0.006, 0.006, 0.006, 0.007, 0.008],
        cancer: false,
    },
    Condition {
        medis: "20080427",
        name: "前腕骨折",
        icd10: "S52.80",
        chronic: false,
        male: [0.01, 0.004, 0.003, 0.003, 0.003, 0.004, 0.006],
        female: [0.006, 0.002, 0.003, 0.006, 0.010, 0.015, 0.02],
        cancer: false,
    },
    Condition {
        medis: "SYN00007",
        name: "気管支喘息",
        icd10: "J45.9",
        chronic: true,
        male: [0.06, 0.04, 0.035, 0.035, 0.04, 0.05, 0.06],
        female: [0.05, 0.045, 0.045, 0.045, 0.05, 0.06, 0.06],
        cancer: false,
    },
    Condition {
        medis: "SYN00008",
        name: "アレルギー性鼻炎",
        icd10: "J30.4",
        chronic: true,
        male: [0.15, 0.2, 0.18, 0.15, 0.1, 0.06, 0.04],
        female: [0.14, 0.22, 0.2, 0.16, 0.11, 0.07, 0.05],
        cancer: false,
    },
];

/// Index of a condition by ICD-10.
pub fn condition_index(icd10: &str) -> Option<usize> {
    CONDITIONS.iter().position(|c| c.icd10 == icd10)
}

/// A lab item with a value model: normal(mean, sd), decimals, and shifts for conditions.
pub struct LabItem {
    /// JLAC10 item group (the JP-CLINS identifying string, also the coding display).
    pub group: &'static str,
    /// Japanese name (for the local code display).
    pub ja: &'static str,
    /// UCUM-ish unit as the sharing service shows it.
    pub unit: &'static str,
    /// Mean in the healthy population.
    pub mean: f64,
    /// Standard deviation.
    pub sd: f64,
    /// Decimal places reported.
    pub decimals: usize,
    /// (ICD-10, mean shift) for conditions that move this value.
    pub shifts: &'static [(&'static str, f64)],
    /// The lowest value reported.
    pub floor: f64,
}

/// Core lab items (a subset of the 43) with value models correlated with conditions.
pub const LAB_ITEMS: &[LabItem] = &[
    LabItem {
        group: "TP",
        ja: "総蛋白",
        unit: "g/dL",
        mean: 7.1,
        sd: 0.4,
        decimals: 1,
        shifts: &[("N18.9", -0.3)],
        floor: 4.0,
    },
    LabItem {
        group: "ALB",
        ja: "アルブミン",
        unit: "g/dL",
        mean: 4.3,
        sd: 0.3,
        decimals: 1,
        shifts: &[("N18.9", -0.4), ("C16.9", -0.5)],
        floor: 1.5,
    },
    LabItem {
        group: "AST",
        ja: "AST",
        unit: "U/L",
        mean: 22.0,
        sd: 6.0,
        decimals: 0,
        shifts: &[],
        floor: 8.0,
    },
    LabItem {
        group: "ALT",
        ja: "ALT",
        unit: "U/L",
        mean: 20.0,
        sd: 9.0,
        decimals: 0,
        shifts: &[("E11.9", 8.0)],
        floor: 5.0,
    },
    LabItem {
        group: "GGT",
        ja: "γ-GT",
        unit: "U/L",
        mean: 30.0,
        sd: 18.0,
        decimals: 0,
        shifts: &[],
        floor: 8.0,
    },
    LabItem {
        group: "Cre",
        ja: "クレアチニン",
        unit: "mg/dL",
        mean: 0.8,
        sd: 0.15,
        decimals: 2,
        shifts: &[("N18.9", 0.9)],
        floor: 0.3,
    },
    LabItem {
        group: "UA",
        ja: "尿酸",
        unit: "mg/dL",
        mean: 5.3,
        sd: 1.2,
        decimals: 1,
        shifts: &[("N18.9", 1.2)],
        floor: 1.5,
    },
    LabItem {
        group: "BUN",
        ja: "尿素窒素",
        unit: "mg/dL",
        mean: 14.0,
        sd: 3.5,
        decimals: 1,
        shifts: &[("N18.9", 12.0)],
        floor: 4.0,
    },
    LabItem {
        group: "BG",
        ja: "血糖",
        unit: "mg/dL",
        mean: 95.0,
        sd: 11.0,
        decimals: 0,
        shifts: &[("E11.9", 55.0)],
        floor: 55.0,
    },
    LabItem {
        group: "HbA1c-NGSP",
        ja: "HbA1c",
        unit: "%",
        mean: 5.5,
        sd: 0.35,
        decimals: 1,
        shifts: &[("E11.9", 2.0)],
        floor: 4.0,
    },
    LabItem {
        group: "TG",
        ja: "中性脂肪",
        unit: "mg/dL",
        mean: 105.0,
        sd: 45.0,
        decimals: 0,
        shifts: &[("E78.5", 80.0), ("E11.9", 40.0)],
        floor: 30.0,
    },
    LabItem {
        group: "HDL-C",
        ja: "HDLコレステロール",
        unit: "mg/dL",
        mean: 60.0,
        sd: 14.0,
        decimals: 0,
        shifts: &[("E78.5", -12.0)],
        floor: 20.0,
    },
    LabItem {
        group: "LDL-C",
        ja: "LDLコレステロール",
        unit: "mg/dL",
        mean: 112.0,
        sd: 26.0,
        decimals: 0,
        shifts: &[("E78.5", 45.0)],
        floor: 40.0,
    },
    LabItem {
        group: "WBC",
        ja: "白血球数",
        unit: "10*3/uL",
        mean: 6.0,
        sd: 1.5,
        decimals: 1,
        shifts: &[],
        floor: 2.0,
    },
    LabItem {
        group: "Hb",
        ja: "ヘモグロビン",
        unit: "g/dL",
        mean: 13.6,
        sd: 1.3,
        decimals: 1,
        shifts: &[("N18.9", -1.5), ("C16.9", -2.0)],
        floor: 6.0,
    },
    LabItem {
        group: "PLT",
        ja: "血小板数",
        unit: "10*4/uL",
        mean: 25.0,
        sd: 6.0,
        decimals: 1,
        shifts: &[],
        floor: 5.0,
    },
    LabItem {
        group: "Na",
        ja: "ナトリウム",
        unit: "mmol/L",
        mean: 140.0,
        sd: 2.0,
        decimals: 0,
        shifts: &[],
        floor: 120.0,
    },
    LabItem {
        group: "K",
        ja: "カリウム",
        unit: "mmol/L",
        mean: 4.2,
        sd: 0.35,
        decimals: 1,
        shifts: &[("N18.9", 0.5)],
        floor: 2.5,
    },
    LabItem {
        group: "CRP",
        ja: "CRP",
        unit: "mg/dL",
        mean: 0.08,
        sd: 0.1,
        decimals: 2,
        shifts: &[],
        floor: 0.01,
    },
];

/// A JLAC10 code for a lab item group (serum first, as the examples use).
pub fn jlac10_code(group: &str) -> Option<&'static str> {
    static CODES: OnceLock<Vec<(String, String)>> = OnceLock::new();
    let codes = CODES.get_or_init(|| {
        let mut out: Vec<(String, String)> = Vec::new();
        let text = include_str!("../../kizuna-fhir/data/jlac/clins_v1.10_JLAC10_corelabo.csv");
        let mut rdr = csv::Reader::from_reader(text.as_bytes());
        for r in rdr.records().filter_map(Result::ok) {
            let (g, code) = (r.get(0).unwrap_or(""), r.get(1).unwrap_or(""));
            if !out.iter().any(|(x, _)| x == g) {
                out.push((g.to_string(), code.to_string()));
            }
        }
        out
    });
    codes
        .iter()
        .find(|(g, _)| g == group)
        .map(|(_, c)| c.as_str())
}

/// An allergen: J-FAGY food/drug codes where the public examples show them.
pub struct Allergen {
    /// Code.
    pub code: &'static str,
    /// Code system.
    pub system: &'static str,
    /// Display.
    pub display: &'static str,
    /// Category: `food`, `medication`, `environment`.
    pub category: &'static str,
    /// Share of allergy records.
    pub weight: f64,
}

/// Allergens (codes from the public JP-CLINS examples).
pub const ALLERGENS: &[Allergen] = &[
    Allergen {
        code: "J9FC11310000",
        system: "http://jpfhir.jp/fhir/core/CodeSystem/JP_JfagyFoodAllergen_CS",
        display: "さば",
        category: "food",
        weight: 3.0,
    },
    Allergen {
        code: "J9FA32540000",
        system: "http://jpfhir.jp/fhir/core/CodeSystem/JP_JfagyFoodAllergen_CS",
        display: "キウイフルーツ",
        category: "food",
        weight: 2.0,
    },
];

/// A drug: YJ code, name, and the condition it treats.
pub struct Drug {
    /// YJ code.
    pub yj: &'static str,
    /// Name.
    pub name: &'static str,
    /// ICD-10 it is prescribed for (`*` for any).
    pub for_icd10: &'static str,
}

/// Drugs from the public examples' YJ codes.
pub const DRUGS: &[Drug] = &[
    Drug {
        yj: "2171022F6276",
        name: "アムロジピンＯＤ錠１０ｍｇ",
        for_icd10: "I10",
    },
    Drug {
        yj: "1141007F1063",
        name: "カロナール錠３００",
        for_icd10: "*",
    },
    Drug {
        yj: "2233002F1280",
        name: "カルボシステイン錠２５０ｍｇ「サワイ」",
        for_icd10: "J45.9",
    },
    Drug {
        yj: "2316009F1022",
        name: "ミヤＢＭ錠",
        for_icd10: "K26.9",
    },
    Drug {
        yj: "2456001F1310",
        name: "プレドニン錠５ｍｇ",
        for_icd10: "J45.9",
    },
    Drug {
        yj: "1190027F1022",
        name: "デエビゴ錠２．５ｍｇ",
        for_icd10: "*",
    },
];

/// Clinical departments (SS-MIX2 codes as in the examples).
pub const DEPARTMENTS: &[(&str, &str)] = &[
    ("01", "内科"),
    ("08", "循環器科"),
    ("10", "外科"),
    ("13", "整形外科"),
    ("15", "皮膚科"),
    ("30", "小児科"),
];

/// Causes of death (ICD-10) with rough weights at old age.
pub const DEATH_CAUSES: &[(&str, &str, f64)] = &[
    ("C34.9", "肺の悪性新生物", 8.0),
    ("C16.9", "胃の悪性新生物", 4.0),
    ("C18.9", "結腸の悪性新生物", 4.0),
    ("I21.9", "急性心筋梗塞", 5.0),
    ("I50.9", "心不全", 10.0),
    ("I63.9", "脳梗塞", 6.0),
    ("J18.9", "肺炎", 5.0),
    ("J69.0", "誤嚥性肺炎", 4.0),
    ("R54", "老衰", 11.0),
    ("N18.9", "腎不全", 2.0),
    ("V89.2", "交通事故", 0.5),
    ("X59", "不慮の事故", 2.0),
];

/// The 5 infection items of the sharing service (qualitative results), with rough positivity rates.
pub const INFECTIONS: &[(&str, &str, f64)] = &[
    ("STS-QLRESULT", "梅毒STS(定性)", 0.004),
    ("TP-RESULT", "梅毒TP抗体(定性)", 0.006),
    ("HBs-AG-RESULT", "HBs抗原(定性)", 0.008),
    ("HCV-AB-RESULT", "HCV抗体(定性)", 0.012),
    ("HIV-1P2-AB-RESULT", "HIV-1+2抗体(定性)", 0.0002),
];

/// The JLAC10 code of an infection item group.
pub fn jlac10_infection_code(group: &str) -> Option<&'static str> {
    static CODES: OnceLock<Vec<(String, String)>> = OnceLock::new();
    let codes = CODES.get_or_init(|| {
        let mut out: Vec<(String, String)> = Vec::new();
        let text = include_str!("../../kizuna-fhir/data/jlac/clins_v1.10_JLAC10_infectionlabo.csv");
        let mut rdr = csv::Reader::from_reader(text.as_bytes());
        for r in rdr.records().filter_map(Result::ok) {
            let (g, code) = (r.get(0).unwrap_or(""), r.get(1).unwrap_or(""));
            if !out.iter().any(|(x, _)| x == g) {
                out.push((g.to_string(), code.to_string()));
            }
        }
        out
    });
    codes
        .iter()
        .find(|(g, _)| g == group)
        .map(|(_, c)| c.as_str())
}
