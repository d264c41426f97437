//! The import-cycle check of `cargo xtask lint`: in each crate, the graph of
//! modules (one per file) and the modules each one names through
//! `use crate::…`, `use super::…` or an inline `crate::…` / `super::…` path;
//! a strongly connected component of more than one module is a cycle.
//!
//! A child naming its parent (`super::Thing` from a submodule) is how Rust
//! modules share their parent's items and is not counted. Test modules
//! (`tests.rs`, and whatever follows `#[cfg(test)] mod tests`) are left out.
//! A text scan rather than a parse: the tree's `use` forms are plain, and
//! the check must run before anything is built.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

use anyhow::{Context, Result, bail};

/// Fails naming every cycle among `src`'s modules.
pub fn check(src: &Path) -> Result<()> {
    let modules = modules(src)?;
    let names: BTreeSet<String> = modules.keys().cloned().collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, text) in &modules {
        let parent = module.rsplit_once("::").map_or("", |(p, _)| p);
        for path in paths(text, module, parent) {
            if let Some(target) = resolve(&names, &path)
                && target != *module
                && !module.starts_with(&format!("{target}::"))
            {
                edges.entry(module.clone()).or_default().insert(target);
            }
        }
    }
    let cycles = components(&names, &edges);
    if cycles.is_empty() {
        return Ok(());
    }
    let text: Vec<String> = cycles.iter().map(|c| c.join(" <-> ")).collect();
    bail!("import cycles in {}: {}", src.display(), text.join("; "))
}

/// Module path (`a::b`, the crate root "") -> its source without comments
/// and tests.
fn modules(src: &Path) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src)?.with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(
                parts.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                parts.pop();
            }
            if parts.last().is_some_and(|p| p == "tests") {
                continue;
            }
            let text = fs::read_to_string(&path)?;
            let text = text
                .split("#[cfg(test)]\nmod tests")
                .next()
                .unwrap_or_default();
            let text: String = text
                .lines()
                .map(|l| l.split("//").next().unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n");
            out.insert(parts.join("::"), text);
        }
    }
    Ok(out)
}

/// Every path `text` (module `module`, parent `parent`) names from the crate
/// root: `use` trees expanded, inline `crate::`/`super::` paths.
fn paths(text: &str, module: &str, parent: &str) -> Vec<String> {
    let mut out = Vec::new();
    for stmt in text.split(';') {
        let stmt = stmt.trim();
        let Some(tree) = stmt
            .strip_prefix("pub use ")
            .or_else(|| stmt.strip_prefix("use "))
            .or_else(|| stmt.split_once("\nuse ").map(|(_, t)| t))
        else {
            continue;
        };
        // `x as y` becomes `x@y` before the spaces go.
        let tree = tree.split_whitespace().collect::<Vec<_>>().join(" ");
        let tree: String = tree.replace(" as ", "@").split_whitespace().collect();
        for (root, base) in [("crate", ""), ("super", parent), ("self", module)] {
            if let Some(rest) = tree.strip_prefix(root) {
                expand(base, rest.trim_start_matches(':'), &mut out);
            }
        }
    }
    for (root, base) in [("crate::", ""), ("super::", parent)] {
        for (i, _) in text.match_indices(root) {
            let before = text[..i].chars().last();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let rest: String = text[i + root.len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            out.push(join(base, rest.trim_end_matches(':')));
        }
    }
    out
}

fn join(base: &str, rest: &str) -> String {
    match (base.is_empty(), rest.is_empty()) {
        (true, _) => rest.to_string(),
        (_, true) => base.to_string(),
        _ => format!("{base}::{rest}"),
    }
}

/// A `use` tree (`a::{b, c::{d}}`, no spaces) under `base`.
fn expand(base: &str, tree: &str, out: &mut Vec<String>) {
    if let Some(inner) = tree.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
        let mut depth = 0;
        let mut start = 0;
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand(base, &inner[start..i], out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        expand(base, &inner[start..], out);
        return;
    }
    if let Some(i) = tree.find("::{") {
        expand(&join(base, &tree[..i]), &tree[i + 2..], out);
        return;
    }
    let item = tree.split('@').next().unwrap_or_default();
    if item.is_empty() || item == "self" {
        out.push(base.to_string());
    } else {
        out.push(join(base, item));
    }
}

/// The longest module that prefixes `path`.
fn resolve(names: &BTreeSet<String>, path: &str) -> Option<String> {
    let segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    (1..=segs.len())
        .rev()
        .map(|n| segs[..n].join("::"))
        .find(|m| names.contains(m))
}

/// Strongly connected components with more than one module (Tarjan).
fn components(
    names: &BTreeSet<String>,
    edges: &BTreeMap<String, BTreeSet<String>>,
) -> Vec<Vec<String>> {
    struct T<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        let i = t.index.len();
        t.index.insert(v, i);
        t.low.insert(v, i);
        t.stack.push(v);
        t.on.insert(v);
        let next: Vec<&'a str> = t
            .edges
            .get(v)
            .map(|s| s.iter().map(String::as_str).collect())
            .unwrap_or_default();
        for w in next {
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in names {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crate_of(files: &[(&str, &str)]) -> tempdir::Dir {
        let dir = tempdir::Dir::new();
        for (name, text) in files {
            let path = dir.0.join(name);
            fs::create_dir_all(path.parent().expect("parent")).expect("dir");
            fs::write(path, text).expect("write");
        }
        dir
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                let n = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0);
                let p = std::env::temp_dir().join(format!("cycles-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&p).expect("temp dir");
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn finds_a_cycle_through_use_trees_and_inline_paths() {
        let dir = crate_of(&[
            ("lib.rs", "mod a;\nmod b;\nmod c;\n"),
            ("a.rs", "use crate::{b::{self, X as Base}, c};\n"),
            ("b.rs", "fn f() { crate::c::g(); }\n"),
            ("c.rs", "use super::a::Y;\n"),
        ]);
        let err = check(&dir.0).expect_err("a cycle");
        assert!(err.to_string().contains("a <-> b <-> c"), "{err}");
    }

    #[test]
    fn children_naming_their_parent_and_tests_are_not_cycles() {
        let dir = crate_of(&[
            ("lib.rs", "mod d;\n"),
            (
                "d/mod.rs",
                "mod e;\nuse e::Z;\n#[cfg(test)]\nmod tests {\n use crate::x::y;\n}\n",
            ),
            ("d/e.rs", "use super::Thing; // crate::d::e\n"),
            ("d/tests.rs", "use crate::d::e;\n"),
        ]);
        check(&dir.0).expect("no cycle");
    }
}
