//! Puts the git commit into the version string: sets `MESHD_GIT_COMMIT` for the crate to
//! `abc1234`, `abc1234-dirty` (tracked files changed), or `unknown` (no git, no .git: a
//! source tarball). `MESHD_GIT_COMMIT` in the build's environment wins (packagers).
//!
//! The code is in git_commit.rs, which meshctl/build.rs includes too.
//!
//! It reruns when HEAD moves (the HEAD file, the branch's ref, packed-refs) and when this
//! package's sources change — not on every change anywhere in the tree, which would rebuild
//! the crate on every edit elsewhere. (Not on the index either: `git status` rewrites it, and
//! so would make every build rerun this; the status call below takes no optional locks so it
//! does not write it.) So a
//! `-dirty` seen in a local build may lag behind edits in other crates; CI and packages build
//! from a clean checkout, where it is exact.

include!("git_commit.rs");
