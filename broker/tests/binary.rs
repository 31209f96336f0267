//! Builds the `sigil-broker` binary for the end-to-end tests in `tests/` (a binary is built for
//! integration tests only of its own package) and checks that it explains itself.
#![allow(clippy::unwrap_used, reason = "test code")]

#[test]
fn the_binary_explains_itself() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sigil-broker"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for word in ["run", "check-policy", "schema"] {
        assert!(text.contains(word), "{word} in {text}");
    }
}
