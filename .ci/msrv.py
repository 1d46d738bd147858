#!/usr/bin/env python3
"""Checks the minimum supported Rust that Cargo.toml and README state.

The rule: every crate the library builds with (normal and build
dependencies, as Cargo.lock resolves them) declares a `rust-version` at or
under ours: 1.85 for the library and feature `metrics`, 1.88 with `reqwest`
or `redis`. Clippy's `incompatible_msrv` lint, in the clippy step, covers our own
use of std. When the toolchain itself is installed, the library is also
built with it; when it is not, this says so (rustup cannot fetch one here).
"""

import json
import shutil
import subprocess
import sys

# The features each floor covers: `reqwest` (url -> idna -> ICU 2 in
# Cargo.lock) and `redis` (redis-rs 1.x) raise the floor to 1.88.
FLOORS = [("1.85", "metrics"), ("1.88", "metrics,reqwest,redis")]


def version(text):
    parts = [int(p) for p in text.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def too_new(features, floor):
    meta = json.loads(
        subprocess.check_output(
            ["cargo", "metadata", "--format-version", "1", "--locked", "--features", features]
        )
    )
    packages = {p["id"]: p for p in meta["packages"]}
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    root = meta["resolve"]["root"]
    declared = packages[root]["rust_version"]
    seen, stack, found = set(), [root], []
    while stack:
        node = nodes[stack.pop()]
        for dep in node["deps"]:
            kinds = {k["kind"] for k in dep["dep_kinds"]}
            if kinds <= {"dev"} or dep["pkg"] in seen:
                continue
            seen.add(dep["pkg"])
            stack.append(dep["pkg"])
            needs = packages[dep["pkg"]].get("rust_version")
            if needs and version(needs) > version(floor):
                found.append(f'{packages[dep["pkg"]]["name"]} {packages[dep["pkg"]]["version"]} needs {needs}')
    return declared, len(seen), found


def main():
    failed = False
    for floor, features in FLOORS:
        declared, count, found = too_new(features, floor)
        if floor == FLOORS[0][0] and declared != floor:
            print(f"Cargo.toml declares rust-version {declared}, this check {floor}")
            failed = True
        if found:
            failed = True
            print(f"features {features}: dependencies newer than Rust {floor}:")
            for line in found:
                print(f"  {line}")
        else:
            print(f"features {features}: all {count} dependencies declare Rust {floor} or older")
        installed = subprocess.run(
            ["rustup", "run", floor, "rustc", "--version"], capture_output=True
        ) if shutil.which("rustup") else None
        if installed is not None and installed.returncode == 0:
            print(f"building the library with Rust {floor}")
            built = subprocess.run(
                ["cargo", f"+{floor}", "check", "--lib", "--locked", "--features", features],
                env=None,
            )
            failed |= built.returncode != 0
        else:
            print(f"Rust {floor} is not installed here: the library was not built with it")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
