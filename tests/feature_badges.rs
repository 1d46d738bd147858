//! Every public item behind a cargo feature says so on docs.rs: its
//! `#[cfg(feature = "x")]` comes with
//! `#[cfg_attr(docsrs, doc(cfg(feature = "x")))]`. (Items inside a gated
//! module inherit the module's badge.)

use std::fs;
use std::path::Path;

/// The public items gated by a feature that lack the docs.rs attribute, as
/// `file:line`.
fn unbadged(source: &str, file: &str) -> Vec<String> {
    let lines: Vec<&str> = source.lines().map(str::trim).collect();
    let mut missing = Vec::new();
    for (at, line) in lines.iter().enumerate() {
        let Some(feature) = line
            .strip_prefix("#[cfg(feature = \"")
            .and_then(|rest| rest.strip_suffix("\")]"))
        else {
            continue;
        };
        // The attributes (and doc comments) up to the item they gate.
        let mut badge = false;
        let mut item = None;
        for next in &lines[at + 1..] {
            if next.starts_with("#[") || next.starts_with("///") {
                badge |= *next == format!("#[cfg_attr(docsrs, doc(cfg(feature = \"{feature}\")))]");
                continue;
            }
            item = Some(*next);
            break;
        }
        let public =
            item.is_some_and(|item| item.starts_with("pub ") || item.starts_with("pub mod"));
        // Doc comments may come before the cfg; look back over them too.
        let before = lines[..at]
            .iter()
            .rev()
            .take_while(|l| l.starts_with("#[") || l.starts_with("///"));
        for previous in before {
            badge |= *previous == format!("#[cfg_attr(docsrs, doc(cfg(feature = \"{feature}\")))]");
        }
        if public && !badge {
            missing.push(format!("{file}:{}", at + 1));
        }
    }
    missing
}

fn walk(dir: &Path, missing: &mut Vec<String>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            walk(&path, missing);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let source = fs::read_to_string(&path).unwrap();
            missing.extend(unbadged(&source, &path.display().to_string()));
        }
    }
}

#[test]
fn every_gated_public_item_carries_its_docs_rs_badge() {
    let mut missing = Vec::new();
    walk(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut missing,
    );
    assert!(missing.is_empty(), "no doc(cfg) badge: {missing:?}");
}

#[test]
fn the_check_finds_an_item_without_its_badge() {
    let without = "#[cfg(feature = \"redis\")]\npub fn store() {}\n";
    assert_eq!(unbadged(without, "x.rs"), ["x.rs:1"]);
    let with = "/// Doc.\n#[cfg(feature = \"redis\")]\n#[cfg_attr(docsrs, doc(cfg(feature = \"redis\")))]\npub fn store() {}\n";
    assert!(unbadged(with, "x.rs").is_empty());
    let private = "#[cfg(feature = \"redis\")]\npub(crate) fn store() {}\n";
    assert!(unbadged(private, "x.rs").is_empty());
}
