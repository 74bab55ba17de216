//! The module graph of a crate's `src/`, read from its `use crate::...`,
//! `use super::...` and inline `crate::...` paths, and the import circles
//! in it. `cargo xtask test` fails on any circle: a layer that imports a
//! layer that imports it back is no layer.
//!
//! A text scan rather than a parser: tests (`#[cfg(test)]` to the end of a
//! file) and comments are left out, paths resolve to the longest module
//! they name, and a module using its own ancestors (their re-exports) is
//! not an edge.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use anyhow::Context as _;

/// Module path ("agent::run"; "" for the crate root) -> modules it uses.
pub type Graph = BTreeMap<String, BTreeSet<String>>;

/// Reads every `.rs` file under `src` into its module's source text.
pub fn read_crate(src: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path
                .strip_prefix(src)
                .expect("under src")
                .with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts.last().is_some_and(|p| p == "mod") {
                parts.pop();
            }
            if parts == ["lib"] || parts == ["main"] {
                parts.clear();
            }
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            out.insert(parts.join("::"), text);
        }
    }
    Ok(out)
}

/// The graph of `sources` (as [`read_crate`] returns them).
pub fn graph(sources: &BTreeMap<String, String>) -> Graph {
    let names: BTreeSet<&str> = sources.keys().map(String::as_str).collect();
    let resolve = |path: &str| -> Option<String> {
        let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
        (0..=parts.len())
            .rev()
            .map(|i| parts[..i].join("::"))
            .find(|c| names.contains(c.as_str()))
    };
    let mut g = Graph::new();
    for (module, text) in sources {
        let code = strip_comments(match text.find("#[cfg(test)]") {
            Some(i) => &text[..i],
            None => text,
        });
        let parent = module.rsplit_once("::").map_or("", |(p, _)| p);
        let mut paths = Vec::new();
        for (kind, tree) in use_trees(&code) {
            let base = if kind == "super" { parent } else { "" };
            for leaf in expand(&tree) {
                paths.push(format!("{base}::{leaf}"));
            }
        }
        paths.extend(inline_crate_paths(&code));
        let edges = g.entry(module.clone()).or_default();
        for p in paths {
            let Some(target) = resolve(&p) else { continue };
            let ancestor = target.is_empty() || module.starts_with(&format!("{target}::"));
            if target != *module && !ancestor {
                edges.insert(target);
            }
        }
    }
    g
}

/// Groups of modules that import each other, directly or around a circle.
pub fn circles(g: &Graph) -> Vec<Vec<String>> {
    // Two modules are in one circle when each reaches the other.
    let reach = |from: &str| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_string()];
        while let Some(m) = todo.pop() {
            for n in g.get(&m).into_iter().flatten() {
                if seen.insert(n.clone()) {
                    todo.push(n.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&String, BTreeSet<String>> = g.keys().map(|m| (m, reach(m))).collect();
    let mut placed = BTreeSet::new();
    let mut out = Vec::new();
    for m in g.keys() {
        if placed.contains(m) || !reaches[m].contains(m) {
            continue;
        }
        let circle: Vec<String> = reaches[m]
            .iter()
            .filter(|n| reaches.get(n).is_some_and(|r| r.contains(m)))
            .cloned()
            .collect();
        placed.extend(circle.iter().cloned());
        out.push(circle);
    }
    out
}

fn strip_comments(code: &str) -> String {
    code.lines()
        .map(|l| match l.find("//") {
            // Not inside a string such as "http://...".
            Some(i) if l[..i].matches('"').count() % 2 == 0 => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `use crate::{a, b::c};` and `use super::x;`: (root, tree) pairs.
fn use_trees(code: &str) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("use ") {
        let before = rest[..i].chars().last();
        rest = &rest[i + 4..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let Some(end) = rest.find(';') else { break };
        let stmt = rest[..end].trim();
        for kind in ["crate", "super"] {
            if let Some(tree) = stmt.strip_prefix(kind).and_then(|t| t.strip_prefix("::")) {
                out.push((kind, tree.to_string()));
            }
        }
    }
    out
}

/// `a::{b, c::{d, e as f}}` -> `a::b`, `a::c::d`, `a::c::e`.
fn expand(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        // `x as y` names x.
        return vec![tree.split_whitespace().next().unwrap_or("").to_string()];
    };
    let prefix = tree[..open].trim();
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let (mut items, mut depth, mut cur) = (Vec::new(), 0, String::new());
    for ch in inner.chars() {
        match ch {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(ch);
    }
    items.push(cur);
    items
        .iter()
        .filter(|i| !i.trim().is_empty())
        .flat_map(|i| expand(i))
        .map(|leaf| format!("{prefix}{leaf}"))
        .collect()
}

/// `crate::a::b` written inline, outside `use`.
fn inline_crate_paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().last();
        rest = &rest[i + 7..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let path: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        out.push(path);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(files: &[(&str, &str)]) -> BTreeMap<String, String> {
        files
            .iter()
            .map(|(m, t)| (m.to_string(), t.to_string()))
            .collect()
    }

    #[test]
    fn use_trees_inline_paths_and_super_become_edges() {
        let g = graph(&sources(&[
            ("", "pub mod a; pub mod b; pub mod c;"),
            (
                "a",
                "use crate::{b::{self, X}, c as cee};\nfn f() { crate::c::g(); }",
            ),
            ("b", "pub mod inner;"),
            ("b::inner", "use super::super::c;\n// use crate::a;\n"),
            ("c", "#[cfg(test)]\nmod tests { use crate::a; }"),
        ]));
        assert_eq!(g["a"], BTreeSet::from(["b".to_string(), "c".to_string()]));
        // `super` from b::inner is b; `super::super::c` resolves no further
        // than b, an ancestor, so no edge; the comment is not read.
        assert!(g["b::inner"].is_empty(), "{:?}", g["b::inner"]);
        // Tests are not part of the layering.
        assert!(g["c"].is_empty());
        assert!(circles(&g).is_empty());
    }

    #[test]
    fn a_circle_is_found_with_all_its_members() {
        let g = graph(&sources(&[
            ("", ""),
            ("cli", "use crate::run::main;"),
            ("run", "use crate::agent::go;"),
            ("agent", "use crate::cli::Failure;"),
            ("leaf", ""),
        ]));
        assert_eq!(
            circles(&g),
            vec![vec!["agent".to_string(), "cli".into(), "run".into()]]
        );
    }

    /// The layering rule, on this workspace's agent crate.
    #[test]
    fn mesh_trace_has_no_import_circles() {
        let src = crate::workspace_root().join("mesh-trace/src");
        let g = graph(&read_crate(&src).unwrap());
        assert!(g.len() > 40, "read only {} modules", g.len());
        assert!(
            g["commands::run"].contains("agent::settings"),
            "{:?}",
            g["commands::run"]
        );
        assert_eq!(circles(&g), Vec::<Vec<String>>::new());
    }
}
