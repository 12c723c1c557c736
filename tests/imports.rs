//! `.ci/imports`, the structure check CI runs, on trees made to break it: a circle it must
//! see through a string continued over lines, a `use` inside a string it must not take for
//! an import, and a leaf module that imports.

use std::path::Path;
use std::process::Command;

/// Runs the checker on a tree of `files` (path, text); its exit code and output.
fn check(files: &[(&str, &str)]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    for (path, text) in files {
        let path = dir.path().join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/imports");
    let out = Command::new(script)
        .args(["--src", dir.path().to_str().unwrap()])
        .output()
        .expect("python3 runs .ci/imports");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

const LIB: &str = "pub mod a;\npub mod b;\npub mod metrics;\npub mod config;\npub mod error;\n";

#[test]
fn a_circle_behind_a_string_continued_over_lines_is_found() {
    let (code, out) = check(&[
        ("lib.rs", LIB),
        (
            "a.rs",
            "pub fn text() -> &'static str {\n    \"one line \\\n     and the next\"\n}\n\
             pub fn of_b() -> u8 { crate::b::B }\npub const NAME: &str = \"a\";\n",
        ),
        (
            "b.rs",
            "pub const B: u8 = 1;\npub fn of_a() -> &'static str { super::a::text() }\n",
        ),
        ("metrics.rs", ""),
        ("config.rs", ""),
        ("error.rs", ""),
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("circle: a <-> b"), "{out}");
}

#[test]
fn a_use_inside_a_string_or_a_comment_is_no_import() {
    let (code, out) = check(&[
        ("lib.rs", LIB),
        (
            "a.rs",
            "/// Says `use crate::b;`.\npub fn text() -> &'static str {\n    \"use crate::b; \\\n     \\\"crate::b::B\\\"\"\n}\n\
             pub const Q: char = '\"';\npub fn raw() -> &'static str { r#\"use crate::b;\"# }\n\
             // crate::b::B\n/* crate::b::B */\n",
        ),
        ("b.rs", "pub fn of_a() -> &'static str { crate::a::text() }\n"),
        ("metrics.rs", ""),
        ("config.rs", ""),
        ("error.rs", ""),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("b        -> a"), "{out}");
    assert!(out.contains("a        -> -"), "{out}");
}

#[test]
fn a_leaf_that_imports_is_refused() {
    let (code, out) = check(&[
        ("lib.rs", LIB),
        ("a.rs", ""),
        ("b.rs", ""),
        ("metrics.rs", "use crate::a;\n"),
        ("config.rs", ""),
        ("error.rs", ""),
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("metrics.rs imports ['a']"), "{out}");
}

#[test]
fn the_bridge_has_no_circle() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/imports");
    let out = Command::new(script).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("imports: 0 problem(s)"), "{text}");
}

/// The README's Code map against the tree: every file of `src/` named (or its folder), and
/// every name there a file or folder that exists.
#[test]
fn the_code_map_names_every_source_file_and_nothing_else() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let map = readme
        .split("## Code map")
        .nth(1)
        .and_then(|rest| rest.split("```").nth(1))
        .expect("README.md has a Code map block");
    let named: Vec<&str> = map
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|path| path.starts_with("src/"))
        .collect();
    for path in &named {
        assert!(
            root.join(path).exists(),
            "the Code map names {path}, which does not exist"
        );
    }
    let mut files = Vec::new();
    let mut dirs = vec![root.join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(
                    path.strip_prefix(root)
                        .unwrap()
                        .to_str()
                        .unwrap()
                        .to_owned(),
                );
            }
        }
    }
    let missing: Vec<&String> = files
        .iter()
        .filter(|file| {
            !named
                .iter()
                .any(|n| n == file || (n.ends_with('/') && file.starts_with(n)))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "files the Code map does not name: {missing:?}"
    );
}
