//! `docs/cli.md` cannot drift from the command line: every command of `sigil-server` (walked
//! from clap's command tree, the source of `--help`) has a section whose heading names it, whose
//! text includes its help summary and every one of its flags, and that shows an example of it;
//! and every command the page names exists.
#![allow(clippy::panic, reason = "test code")]

use std::collections::BTreeMap;

use clap::CommandFactory as _;
use sigil_server::cli::Cli;

/// A command of the tree: its summary (the first line of its help) and long flags.
#[derive(Debug)]
struct Documented {
    about: String,
    flags: Vec<String>,
    leaf: bool,
}

fn commands() -> BTreeMap<String, Documented> {
    fn walk(command: &clap::Command, path: &str, out: &mut BTreeMap<String, Documented>) {
        for sub in command.get_subcommands().filter(|s| s.get_name() != "help") {
            let path = format!("{path} {}", sub.get_name());
            let flags = sub
                .get_arguments()
                .filter_map(|a| a.get_long())
                .filter(|l| !matches!(*l, "help" | "version"))
                .map(|l| format!("--{l}"))
                .collect();
            let about = sub.get_about().map(ToString::to_string).unwrap_or_default();
            let leaf = !sub.has_subcommands();
            out.insert(path.clone(), Documented { about, flags, leaf });
            walk(sub, &path, out);
        }
    }
    let mut out = BTreeMap::new();
    walk(&Cli::command(), "sigil-server", &mut out);
    out
}

/// The sections of the page whose heading names a command in backticks, by command.
fn sections(page: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in page.lines() {
        if line.starts_with('#') {
            if let Some((name, text)) = current.take() {
                out.insert(name, text);
            }
            // `#` is the page title; commands are `##` (groups) and `###` (their commands).
            if let Some(name) = line
                .strip_prefix("##")
                .and_then(|l| l.split('`').nth(1))
                .filter(|n| n.starts_with("sigil-server"))
            {
                assert!(
                    !out.contains_key(name),
                    "docs/cli.md: two sections for `{name}`"
                );
                current = Some((name.to_owned(), String::new()));
            }
            continue;
        }
        if let Some((_, text)) = &mut current {
            text.push_str(line);
            text.push('\n');
        }
    }
    if let Some((name, text)) = current {
        out.insert(name, text);
    }
    out
}

fn page() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/cli.md");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

#[test]
fn cli_docs_cover_every_command_and_flag() {
    let commands = commands();
    assert!(
        commands.contains_key("sigil-server entry create"),
        "{commands:?}"
    );
    let sections = sections(&page());
    let mut problems = Vec::new();
    for (path, command) in &commands {
        let Some(text) = sections.get(path) else {
            problems.push(format!("no section headed `{path}`"));
            continue;
        };
        if command.about.is_empty() {
            problems.push(format!("`{path}` has no help summary"));
        } else if !text.contains(&command.about) {
            problems.push(format!(
                "the section of `{path}` does not include its help summary {:?}",
                command.about
            ));
        }
        for flag in &command.flags {
            let mentioned = text.match_indices(flag.as_str()).any(|(i, _)| {
                !text[i + flag.len()..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '-')
            });
            if !mentioned {
                problems.push(format!("the section of `{path}` does not mention {flag}"));
            }
        }
        if command.leaf && !text.contains(&format!("$ {path}")) {
            problems.push(format!(
                "the section of `{path}` has no example (`$ {path} ...`)"
            ));
        }
    }
    for name in sections.keys() {
        if !commands.contains_key(name) {
            problems.push(format!(
                "docs/cli.md documents `{name}`, which is not a command"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "docs/cli.md is out of step with --help:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn cli_help_runs_for_every_command() {
    // clap's own consistency checks (conflicting ids, bad defaults) run on the whole tree.
    Cli::command().debug_assert();
}
