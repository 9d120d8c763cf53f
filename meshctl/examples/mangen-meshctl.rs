//! Writes meshctl's man pages (section 1: a user command) from its clap definition:
//! `cargo run -p meshctl --example mangen-meshctl -- OUTDIR` gives meshctl.1, meshctl-token.1,
//! meshctl-token-create.1, … (scripts/package.sh puts them in the .deb).

// The binary's own CLI definition (and the value parsers it names), so the pages cannot
// drift from `meshctl --help`.
#[allow(dead_code)]
#[path = "../src/cli.rs"]
mod cli;
#[path = "../../packaging/mangen.rs"]
mod mangen;
#[allow(dead_code)]
#[path = "../src/parse.rs"]
mod parse;

/// What `meshctl --version` prints (the same as meshctl/src/main.rs: build.rs sets the commit).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("MESHD_GIT_COMMIT"),
    ")"
);

fn main() -> anyhow::Result<()> {
    mangen::main(<cli::Cli as clap::CommandFactory>::command(), "1")
}
