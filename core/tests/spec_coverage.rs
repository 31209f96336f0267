//! Every numbered item of `spec/spiffe.md` sections 1 to 5 that sigil-core covers is named in at
//! least one of its tests (as `XV-2` in a case name or `xv_2_` in a test name). This keeps the
//! mapping from spec to tests from eroding: deleting the last test of an item fails here.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::path::{Path, PathBuf};

/// Items sigil-core covers, each of which must be named in a test.
const COVERED: &[&str] = &[
    // 1. SPIFFE ID
    "ID-1", "ID-2", "ID-3", "ID-4", "ID-5", "ID-6", "ID-7", "ID-8", "ID-9", "ID-10", "ID-11",
    "ID-12", "ID-13", "ID-14", "ID-15", "ID-16", "ID-17", "ID-18", "ID-19", "ID-20", "ID-22",
    // 2. Bundles
    "B-1", "B-2", "B-3", "B-4", "B-5", "B-6", "B-7", "B-9", "B-10", "B-12", "BX-1", "BX-2", "BJ-1",
    "BJ-2", // 3. X509-SVID
    "X-1", "X-2", "X-3", "XL-1", "XL-2", "XL-3", "XL-4", "XL-5", "XL-6", "XL-7", "XL-8", "XL-9",
    "XC-1", "XC-3", "XC-4", "XC-7", "XV-1", "XV-2", "XV-3", "XV-4", "XV-5", "XV-6", "XV-7", "XV-8",
    // 4. JWT-SVID
    "J-1", "J-2", "J-3", "J-4", "J-5", "J-6", "J-7", "J-8", "J-9", "J-10",
    // 5. Workload Endpoint: the address format
    "WE-8", "WE-9", "WE-10", "WE-11",
];

/// Items of sections 1 to 5 that are not sigil-core's, and where they belong. Listed so that
/// the split is explicit; not checked here.
const ELSEWHERE: &[(&str, &str)] = &[
    ("ID-21", "documentation only (lib.rs docs, README)"),
    (
        "SV-1",
        "server CA: authorities carry the trust domain's root ID",
    ),
    (
        "SV-2",
        "server CA: the ID and key lie in the signed certificate",
    ),
    ("SV-3", "server: only X.509 and JWT SVIDs are issued"),
    ("B-8", "server: publishes no extra JWK parameters"),
    (
        "B-11",
        "server: each authority key used in one trust domain",
    ),
    ("XC-2", "optional (pathLenConstraint allowed)"),
    ("XC-5", "optional (URI name constraints)"),
    ("XC-6", "optional (EKU on CAs)"),
    (
        "XV-9",
        "reference-behaviour note, realised by XV-2..XV-6 checks",
    ),
    ("J-11", "transport (Workload API / agent)"),
    ("J-12", "transport (Workload API / agent)"),
    ("WE-1", "agent Workload API"),
    ("WE-2", "agent Workload API"),
    ("WE-3", "agent Workload API"),
    ("WE-4", "agent Workload API"),
    ("WE-5", "agent Workload API"),
    ("WE-6", "agent Workload API"),
    ("WE-7", "agent Workload API"),
    ("WE-12", "agent Workload API"),
];

/// The test code of sigil-core: the inline `mod tests` part of each source file, every file of a
/// `tests.rs` submodule (`src/jwt/tests.rs` and the files under `src/jwt/tests/`), and `tests/`.
fn test_code() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut code = String::new();
    for dir in ["src", "tests"] {
        let mut files = Vec::new();
        rust_files(&root.join(dir), &mut files);
        for path in files {
            if path.ends_with("spec_coverage.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let in_test_module = path
                .strip_prefix(root.join(dir))
                .unwrap()
                .iter()
                .any(|part| part == "tests" || part == "tests.rs");
            let tests = match (dir, text.find("mod tests {")) {
                ("tests", _) => &text[..],
                _ if in_test_module => &text[..],
                (_, Some(start)) => &text[start..],
                (_, None) => "",
            };
            code.push_str(tests);
            code.push('\n');
        }
    }
    code
}

/// Every `.rs` file under `dir`, at any depth.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// True when `item` (e.g. `XV-2`) or its snake-case form (`xv_2`) occurs, not followed by a digit.
fn names(code: &str, item: &str) -> bool {
    let snake = item.to_ascii_lowercase().replace('-', "_");
    [item.to_owned(), snake].iter().any(|needle| {
        code.match_indices(needle.as_str()).any(|(at, m)| {
            let before = code[..at].chars().next_back();
            let after = code[at + m.len()..].chars().next();
            !before.is_some_and(|c| c.is_ascii_alphanumeric())
                && !after.is_some_and(|c| c.is_ascii_digit())
        })
    })
}

#[test]
fn every_covered_spec_item_is_named_in_a_test() {
    let code = test_code();
    let missing: Vec<_> = COVERED.iter().filter(|item| !names(&code, item)).collect();
    assert!(
        missing.is_empty(),
        "spec items with no test naming them: {missing:?}"
    );
}

#[test]
fn the_split_lists_every_item_of_sections_1_to_5_once() {
    let mut all: Vec<&str> = COVERED.to_vec();
    all.extend(ELSEWHERE.iter().map(|(item, _)| *item));
    let mut sorted = all.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), all.len(), "an item is listed twice");
    let expected: usize = 22 + 3 + 12 + 4 + 3 + 9 + 7 + 9 + 12 + 12;
    assert_eq!(
        all.len(),
        expected,
        "sections 1-5 have {expected} numbered items"
    );
}

#[test]
fn the_matcher_respects_word_boundaries() {
    assert!(names("(\"ID-1 http scheme\"", "ID-1"));
    assert!(!names("(\"ID-10 ipv4\"", "ID-1"));
    assert!(names("fn xv_2_leaf_ca()", "XV-2"));
    assert!(!names("fn xv_21_x()", "XV-2"));
    assert!(!names("(\"BJ-1 kid\"", "J-1"));
}
