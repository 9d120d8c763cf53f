//! Writes meshd's man pages (section 8: a daemon and its administration commands) from its
//! clap definition: `cargo run -p meshd --example mangen-meshd -- OUTDIR` gives meshd.8,
//! meshd-up.8, meshd-coordinator.8, … (scripts/package.sh puts them in the .deb).

// The binary's own CLI, so the pages cannot drift from `meshd --help`; its `main` and the
// handlers are not called here.
#[allow(dead_code)]
#[path = "../src/main.rs"]
mod cli;
#[path = "../../packaging/mangen.rs"]
mod mangen;

fn main() -> anyhow::Result<()> {
    mangen::main(<cli::Cli as clap::CommandFactory>::command(), "8")
}
