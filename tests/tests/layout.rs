//! The shape of `operator/src` and `sensor/src`: no file imports a file that (directly or
//! not) imports it back, and no file holds more than 800 lines of non-test code.
//!
//! A file's imports are every `crate::`, `super::` and `self::` path in its code (use trees
//! expanded; comments and the trailing `#[cfg(test)]` part left out) resolved to the file
//! of the deepest module the path names, plus the files of the modules it declares
//! (`mod x;`). So a `mod.rs` that declares its children may not be imported back by them:
//! children import each other, and the folder's `mod.rs` is only its index.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

const MAX_CODE_LINES: usize = 800;

/// The crates whose sources are checked.
const CRATES: [&str; 2] = ["operator", "sensor"];

fn src(krate: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(krate)
        .join("src")
}

/// Every `.rs` file under `dir` with its module path (`lib.rs`: [], `a/mod.rs` and `a.rs`:
/// [a], `a/b.rs`: [a, b]). `main.rs` is another crate (it imports the library by name);
/// `tests.rs` files are test modules (`#[cfg(test)] mod tests;`), not code.
fn modules(dir: &Path, prefix: &[String], out: &mut BTreeMap<Vec<String>, PathBuf>) {
    for entry in fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if path.is_dir() {
            let mut inner = prefix.to_vec();
            inner.push(name);
            modules(&path, &inner, out);
        } else if let Some(stem) = name.strip_suffix(".rs") {
            let mut module = prefix.to_vec();
            match stem {
                "lib" | "mod" => {}
                "main" if prefix.is_empty() => continue,
                "tests" => continue,
                _ => module.push(stem.to_owned()),
            }
            out.insert(module, path);
        }
    }
}

/// The file's code before its first `#[cfg(test)]` line, without comments.
fn code(text: &str) -> String {
    text.lines()
        .take_while(|line| line.trim() != "#[cfg(test)]")
        .filter(|line| !line.trim_start().starts_with("//"))
        .map(|line| line.split(" // ").next().unwrap_or(line))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `code` with `super::` inside inline modules (`mod x { .. }`, one level deep) written as
/// `self::`: the inline module's parent is the file's own module.
fn flatten_inline_modules(code: &str) -> String {
    let mut depth = 0usize;
    let mut inline: Vec<usize> = Vec::new();
    let mut out = Vec::new();
    for line in code.lines() {
        let trimmed = line.trim();
        let opens = (trimmed.starts_with("mod ") || trimmed.starts_with("pub mod "))
            && trimmed.ends_with('{');
        out.push(if inline.is_empty() {
            line.to_owned()
        } else {
            line.replace("super::", "self::")
        });
        if opens {
            inline.push(depth);
        }
        depth += line.matches('{').count();
        depth = depth.saturating_sub(line.matches('}').count());
        while inline.last().is_some_and(|open| depth <= *open) {
            inline.pop();
        }
    }
    out.join("\n")
}

fn code_lines(text: &str) -> usize {
    text.lines()
        .take_while(|line| line.trim() != "#[cfg(test)]")
        .count()
}

/// A use tree without whitespace and renames (`a as b` is `a`).
fn compact(tree: &str) -> String {
    let mut out = String::new();
    let mut words = tree.split_whitespace();
    while let Some(word) = words.next() {
        if word == "as" {
            let renamed = words.next().unwrap_or_default();
            out.extend(
                renamed
                    .chars()
                    .filter(|c| !(c.is_alphanumeric() || *c == '_')),
            );
        } else {
            out.push_str(word);
        }
    }
    out
}

/// Expands one use tree (`a::{b, c::{d, self}}`, compacted) into its paths.
fn expand(tree: &str) -> Vec<String> {
    let Some(open) = tree.find('{') else {
        return vec![tree.trim_end_matches("::self").to_owned()];
    };
    let prefix = &tree[..open];
    let inner = &tree[open + 1..tree.len() - 1];
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter(|part| !part.is_empty())
        .flat_map(|part| {
            expand(part)
                .into_iter()
                .map(move |path| match path.as_str() {
                    "self" => prefix.trim_end_matches("::").to_owned(),
                    _ => format!("{prefix}{path}"),
                })
        })
        .collect()
}

/// Every module path `code` names, from `use` trees and paths in expressions and types.
fn paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("use ") {
        let before = rest[..at].chars().last();
        rest = &rest[at + 4..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(end) = rest.find(';') {
            out.extend(expand(&compact(&rest[..end])));
        }
    }
    let bytes = code.as_bytes();
    for root in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(found) = code[from..].find(root) {
            let start = from + found;
            from = start + root.len();
            if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
                continue;
            }
            if code[from..].starts_with('{') {
                continue; // a use tree: expanded above
            }
            let end = code[start..]
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .map_or(code.len(), |n| start + n);
            out.push(code[start..end].trim_end_matches(':').to_owned());
        }
    }
    out
}

/// What the crate root re-exports (`pub use error::{Error, Result};` in lib.rs): each name
/// with the module it comes from, so `crate::Result` leads to `error`, not to the root.
fn reexports(lib: &str) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for line in code(lib).lines() {
        let Some(tree) = line.trim().strip_prefix("pub use ") else {
            continue;
        };
        for path in expand(&compact(tree.trim_end_matches(';'))) {
            if let Some((module, name)) = path.rsplit_once("::") {
                let module = module.split("::").map(str::to_owned).collect();
                out.insert(name.to_owned(), module);
            }
        }
    }
    out
}

/// The file a path seen in module `here` leads to: its deepest module that has a file.
fn resolve(
    path: &str,
    here: &[String],
    files: &BTreeMap<Vec<String>, PathBuf>,
    reexported: &BTreeMap<String, Vec<String>>,
) -> Option<Vec<String>> {
    if let Some(name) = path.strip_prefix("crate::")
        && let Some(module) = reexported.get(name.split("::").next().unwrap_or_default())
        && files.contains_key(module)
    {
        return Some(module.clone());
    }
    let mut segments = path.split("::");
    // `self` of a.rs or a/mod.rs is [a]; `super` of both is [].
    let mut module: Vec<String> = match segments.next()? {
        "crate" => Vec::new(),
        "self" => here.to_vec(),
        "super" => here[..here.len().saturating_sub(1)].to_vec(),
        _ => return None,
    };
    for segment in segments {
        match segment {
            "super" => {
                module.pop();
            }
            "self" | "" => {}
            name => {
                let mut deeper = module.clone();
                deeper.push(name.to_owned());
                if !files.contains_key(&deeper) {
                    break;
                }
                module = deeper;
            }
        }
    }
    Some(module)
}

fn graph(krate: &str) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let mut files = BTreeMap::new();
    modules(&src(krate), &[], &mut files);
    let lib = fs::read_to_string(src(krate).join("lib.rs")).expect("read lib.rs");
    let reexported = reexports(&lib);
    let mut graph = BTreeMap::new();
    for (module, path) in &files {
        let text = fs::read_to_string(path).expect("read");
        let code = flatten_inline_modules(&code(&text));
        let mut edges = BTreeSet::new();
        for line in code.lines() {
            let line = line.trim();
            let declared = line
                .strip_prefix("pub mod ")
                .or_else(|| line.strip_prefix("mod "))
                .and_then(|rest| rest.strip_suffix(';'));
            if let Some(child) = declared {
                let mut target = module.clone();
                target.push(child.to_owned());
                edges.insert(target);
            }
        }
        for path in paths(&code) {
            if let Some(target) = resolve(&path, module, &files, &reexported) {
                edges.insert(target);
            }
        }
        edges.remove(module);
        graph.insert(module.clone(), edges);
    }
    graph
}

fn name(module: &[String]) -> String {
    if module.is_empty() {
        "lib".to_owned()
    } else {
        module.join("/")
    }
}

/// A chain of imports from `from` back to `from`, if there is one.
fn cycle_through(
    from: &Vec<String>,
    graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
) -> Option<Vec<String>> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![(from.clone(), vec![name(from)])];
    while let Some((at, chain)) = stack.pop() {
        for next in graph.get(&at).into_iter().flatten() {
            if next == from {
                let mut chain = chain.clone();
                chain.push(name(from));
                return Some(chain);
            }
            if seen.insert(next.clone()) {
                let mut longer = chain.clone();
                longer.push(name(next));
                stack.push((next.clone(), longer));
            }
        }
    }
    None
}

#[test]
fn no_source_file_imports_a_file_that_imports_it_back() {
    for krate in CRATES {
        let graph = graph(krate);
        assert!(
            graph.len() > 20,
            "{krate}: found only {} files",
            graph.len()
        );
        for (module, imports) in &graph {
            let imports: Vec<String> = imports.iter().map(|m| name(m)).collect();
            eprintln!("{krate} {}: {}", name(module), imports.join(" "));
        }
        let cycles: Vec<String> = graph
            .keys()
            .filter_map(|module| cycle_through(module, &graph))
            .map(|chain| chain.join(" -> "))
            .collect();
        assert!(
            cycles.is_empty(),
            "{krate}: import circles:\n{}",
            cycles.join("\n")
        );
    }
}

#[test]
fn no_source_file_holds_more_than_800_lines_of_non_test_code() {
    for krate in CRATES {
        let mut files = BTreeMap::new();
        modules(&src(krate), &[], &mut files);
        let main = src(krate).join("main.rs");
        let long: Vec<String> = files
            .values()
            .chain([&main])
            .filter_map(|path| {
                let lines = code_lines(&fs::read_to_string(path).expect("read"));
                (lines > MAX_CODE_LINES).then(|| format!("{}: {lines}", path.display()))
            })
            .collect();
        assert!(long.is_empty(), "over {MAX_CODE_LINES} lines: {long:?}");
    }
}

#[test]
fn the_checker_finds_a_circle_through_super_and_use_trees() {
    let paths = paths("use super::{a::{b as z, c}, self};\nlet x = crate::d::e(1);");
    let paths: BTreeSet<&str> = paths.iter().map(String::as_str).collect();
    assert_eq!(
        paths,
        BTreeSet::from(["super::a::b", "super::a::c", "super", "crate::d::e"])
    );
    let mut graph = BTreeMap::new();
    let (a, b) = (vec!["a".to_owned()], vec!["b".to_owned()]);
    graph.insert(a.clone(), BTreeSet::from([b.clone()]));
    graph.insert(b.clone(), BTreeSet::from([a.clone()]));
    assert_eq!(
        cycle_through(&a, &graph),
        Some(vec!["a".into(), "b".into(), "a".into()])
    );
}
