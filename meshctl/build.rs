//! Puts the git commit into meshctl's version string, exactly as meshd's build script does
//! (the same code: meshd/git_commit.rs; its docs are in meshd/build.rs).

include!("../meshd/git_commit.rs");
