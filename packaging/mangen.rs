//! Renders one man page per command and subcommand from a clap definition: `NAME.SECTION`
//! for the top command, `NAME-SUB.SECTION` (and `NAME-SUB-SUBSUB.SECTION`) for the others,
//! as `git`'s pages are laid out. Included by meshd/examples/mangen-meshd.rs and
//! meshctl/examples/mangen-meshctl.rs (one file, so the two packages' pages look alike).

use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// Parses `OUTDIR` from the arguments and writes the pages of `cmd` there, in `section`.
pub fn main(cmd: clap::Command, section: &str) -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        anyhow::bail!("usage: mangen-meshd OUTDIR (or mangen-meshctl OUTDIR)");
    };
    let out = PathBuf::from(out);
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    for page in write_all(cmd, section, &out)? {
        println!("{}", page.display());
    }
    Ok(())
}

/// Writes the pages of `cmd` and of its visible subcommands (not `help`) into `out`; returns
/// their paths.
pub fn write_all(cmd: clap::Command, section: &str, out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut cmd = cmd.disable_help_subcommand(true);
    // Gives subcommands their display names (`meshd-up`), which name their pages.
    cmd.build();
    let mut written = Vec::new();
    write(cmd, section, out, &mut written)?;
    Ok(written)
}

fn write(
    cmd: clap::Command,
    section: &str,
    out: &Path,
    written: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned() {
        write(sub, section, out, written)?;
    }
    let man = clap_mangen::Man::new(cmd)
        .section(section)
        .manual("meshd manual");
    let path = man
        .generate_to(out)
        .with_context(|| format!("writing {} in {}", man.get_filename(), out.display()))?;
    written.push(path);
    Ok(())
}
