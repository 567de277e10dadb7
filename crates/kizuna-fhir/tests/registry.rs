//! The package registry: canonical URLs with and without version, packages, load time shape.

use kizuna_fhir::package::read_package_tgz;
use kizuna_fhir::Registry;

#[test]
fn resolves_canonicals_with_and_without_version() {
    let r = Registry::builtin();
    let url = "http://jpfhir.jp/fhir/clins/StructureDefinition/JP_Bundle_CLINS";
    assert!(r.resolve(url).is_some());
    assert!(r.resolve(&format!("{url}|1.10.0")).is_some());
    // An unknown version falls back to the loaded one (examples claim `|1`).
    assert!(r.resolve(&format!("{url}|1")).is_some());
    assert!(r.resolve("http://example.org/nothing").is_none());
    assert!(r.structure_definition("Patient").is_some());
    let names: Vec<_> = r.packages().iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "hl7.fhir.r4.core",
            "jp-core.r4",
            "jp-eCSCLINS.r4",
            "jp-eCheckupReport.r4"
        ]
    );
    assert!(r.definitions_of("SearchParameter").count() > 1000);
}

#[test]
fn damaged_packages_are_errors_not_panics() {
    assert!(read_package_tgz(b"not a tarball").is_err());
    assert!(read_package_tgz(&[0x1f, 0x8b, 0x08, 0, 0, 0]).is_err());
}
