//! Every item of `spec/spiffe.md` section 7 (Federation) that Sigil covers is named in at least
//! one test (`F-8` in a comment or message, `f8_` in a test name), as sections 1 to 5 are in
//! sigil-core (`core/tests/spec_coverage.rs`): deleting the last test of an item fails here.
#![allow(clippy::unwrap_used, clippy::panic, reason = "test code")]

use std::path::Path;

/// Items covered, each named in one of [`TEST_FILES`].
const COVERED: &[&str] = &[
    "F-1", "F-2", "F-3", "F-5", "F-6", "F-7", "F-8", "F-9", "F-10", "F-11", "F-12", "F-13", "F-14",
];

/// Items not tested, and why.
const ELSEWHERE: &[(&str, &str)] = &[(
    "F-4",
    "rustls with its safe defaults (TLS 1.2 and 1.3, AEAD suites only) on both sides: \
     stricter than Mozilla intermediate, nothing of ours to test",
)];

/// The test code of federation, relative to the workspace root.
const TEST_FILES: &[&str] = &[
    "tests/tests/federation.rs",
    "server/src/service/federation_tests.rs",
    "server/src/federation_client.rs",
];

#[test]
fn every_covered_item_of_section_7_is_named_in_a_test() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let code: String = TEST_FILES
        .iter()
        .map(|f| std::fs::read_to_string(root.join(f)).unwrap())
        .collect();
    let named = |item: &str| {
        let snake = format!("{}_", item.to_lowercase().replace('-', ""));
        let found = |needle: &str| {
            code.match_indices(needle)
                .any(|(i, _)| !code[i + needle.len()..].starts_with(|c: char| c.is_ascii_digit()))
        };
        found(item) || found(&snake)
    };
    let missing: Vec<_> = COVERED.iter().filter(|item| !named(item)).collect();
    assert!(missing.is_empty(), "not named in any test: {missing:?}");
    // Every item of the section is either covered or explained.
    let spec = std::fs::read_to_string(root.join("../shared/spec/spiffe.md")).ok();
    if let Some(spec) = spec {
        let section = spec
            .split("## 7.")
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .unwrap();
        for line in section.lines().filter(|l| l.starts_with("| F-")) {
            let item = line[2..].split(' ').next().unwrap();
            assert!(
                COVERED.contains(&item) || ELSEWHERE.iter().any(|(i, _)| *i == item),
                "{item} is neither covered nor explained"
            );
        }
    }
}
