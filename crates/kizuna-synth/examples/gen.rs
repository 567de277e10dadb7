fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let cfg = kizuna_synth::Config {
        patients: n,
        seed: 42,
        years: 3,
        out: "/tmp/synth".into(),
        threads: 2,
        gzip: false,
    };
    let s = kizuna_synth::generate(&cfg, &|_| {}).unwrap();
    println!("{}", serde_json::to_string_pretty(&s).unwrap());
}
