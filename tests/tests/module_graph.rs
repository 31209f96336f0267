//! The module graphs of `sigil-server` and `sigil-agent` have no cycles.
//!
//! Reads every `.rs` file under `server/src` and `agent/src`, takes the top-level module it
//! belongs to (`server/src/service/sessions.rs` is `service`), and draws an edge to every other
//! top-level module it names through a `crate::` path (in `use` lines, grouped `use crate::{..}`
//! lists and qualified paths alike; comments and doc comments are skipped). A cycle fails the
//! test and is printed module by module. The layout each crate promises is written at the top
//! of its `lib.rs`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_path_buf()
}

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

/// The top-level module of a file under `src`, or `None` for the crate roots.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).unwrap();
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.trim_end_matches(".rs");
    (!matches!(name, "lib" | "main")).then(|| name.to_owned())
}

/// The top-level modules a line of code names through `crate::`.
fn named_modules(line: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find("crate::") {
        let preceded_by_ident = rest[..at]
            .chars()
            .last()
            .is_some_and(|c| c.is_alphanumeric() || c == '_');
        rest = &rest[at + "crate::".len()..];
        if preceded_by_ident {
            continue; // `sigil_crate::`, `$crate::` in a macro of another crate, ...
        }
        if let Some(group) = rest.strip_prefix('{') {
            let group = group.replace('\n', " ");
            let group = group.as_str();
            // `crate::{a, b::c, d::{e, f}}`: the first segment of each top-level item.
            let mut depth = 0usize;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && (c.is_alphanumeric() || c == '_') => {
                        let ident: String = group[i..]
                            .chars()
                            .take_while(|c| c.is_alphanumeric() || *c == '_')
                            .collect();
                        names.push(ident);
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            let ident: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !ident.is_empty() {
                names.push(ident);
            }
        }
    }
    names
}

/// The graph of a crate's top-level modules: who names whom.
fn graph_of(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(src, f)).collect();
    let mut graph: Graph = modules
        .iter()
        .map(|m| (m.clone(), BTreeSet::new()))
        .collect();
    for file in &files {
        let Some(from) = module_of(src, file) else {
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        // The code without comments, as one string, so that a grouped `use crate::{..}` over
        // several lines is read whole.
        let code: String = text
            .lines()
            .map(str::trim_start)
            .filter(|line| !line.starts_with("//"))
            .map(|line| line.split(" //").next().unwrap_or(line))
            .collect::<Vec<_>>()
            .join("\n");
        for to in named_modules(&code) {
            if to != from && modules.contains(&to) {
                graph.get_mut(&from).unwrap().insert(to);
            }
        }
    }
    graph
}

/// A cycle, as the modules along it (first repeated at the end), if there is one.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Unvisited,
        OnStack,
        Done,
    }
    fn visit(
        node: &str,
        graph: &Graph,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        marks.insert(node.to_owned(), Mark::OnStack);
        stack.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            match marks.get(next).copied().unwrap_or(Mark::Unvisited) {
                Mark::OnStack => {
                    let start = stack.iter().position(|n| n == next).unwrap();
                    let mut cycle = stack[start..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Mark::Unvisited => {
                    if let Some(cycle) = visit(next, graph, marks, stack) {
                        return Some(cycle);
                    }
                }
                Mark::Done => {}
            }
        }
        stack.pop();
        marks.insert(node.to_owned(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        if marks.get(node).copied().unwrap_or(Mark::Unvisited) == Mark::Unvisited {
            let mut stack = Vec::new();
            if let Some(cycle) = visit(node, graph, &mut marks, &mut stack) {
                return Some(cycle);
            }
        }
    }
    None
}

fn check(crate_dir: &str, expected_edges: &[(&str, &str)]) {
    let src = workspace_root().join(crate_dir).join("src");
    let graph = graph_of(&src);
    // The reader must see the edges the layout is built on, or it would pass on anything.
    for (from, to) in expected_edges {
        assert!(
            graph.get(*from).is_some_and(|tos| tos.contains(*to)),
            "{crate_dir}: expected {from} -> {to}; the graph read is {graph:#?}"
        );
    }
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "{crate_dir}/src has an import cycle: {}\n(see the layout at the top of {crate_dir}/src/lib.rs)",
            cycle.join(" -> ")
        );
    }
}

#[test]
fn the_server_modules_have_no_cycle() {
    check(
        "server",
        &[
            ("api", "service"),
            ("service", "store"),
            ("service", "audit"),
            ("store", "audit"),
            ("ca", "policy"),
            ("server", "api"),
        ],
    );
}

#[test]
fn the_agent_modules_have_no_cycle() {
    check(
        "agent",
        &[
            ("workload_api", "manager"),
            ("workload_api", "cache"),
            ("manager", "cache"),
            ("manager", "node"),
            ("agent", "workload_api"),
        ],
    );
}

#[test]
fn the_reader_finds_paths_in_every_form_and_the_search_finds_cycles() {
    assert_eq!(named_modules("use crate::store::Store;"), ["store"]);
    assert_eq!(
        named_modules("use crate::{audit::{A, B}, policy, store::X};"),
        ["audit", "policy", "store"]
    );
    assert_eq!(
        named_modules("let x = crate::ca::hex(&y); sigil_crate::no::match"),
        ["ca"]
    );
    let graph = |edges: &[(&str, &str)]| -> Graph {
        let mut g = Graph::new();
        for (a, b) in edges {
            g.entry((*a).to_owned())
                .or_default()
                .insert((*b).to_owned());
            g.entry((*b).to_owned()).or_default();
        }
        g
    };
    assert_eq!(find_cycle(&graph(&[("a", "b"), ("b", "c")])), None);
    assert_eq!(
        find_cycle(&graph(&[("a", "b"), ("b", "c"), ("c", "a")])),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
}
