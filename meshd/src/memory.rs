//! Giving back the code pages that start-up touched.
//!
//! Start-up runs a lot of code once (argument parsing, TOML and serde, netlink set-up, TUN
//! creation, tracing) and the kernel maps it in 64 KiB windows around each fault
//! (`fault_around_bytes`), so a daemon that idles in a few hundred KiB of code keeps several
//! MiB of its binary resident. Once start-up is over, `release_startup_code` unmaps the
//! executable's clean read-only pages from this process (`MADV_DONTNEED`): they stay in the
//! page cache, and whatever runs again faults back in (a minor fault, no I/O).
//!
//! Only mappings of the executable that are not writable and hold no private (copy-on-write)
//! page are touched: dropping a relocated RELRO page would bring back the file's
//! unrelocated bytes. Code and constant data are never written, so they are always safe.

use std::io;

/// What `release_startup_code` gave back.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Released {
    pub mappings: usize,
    pub resident_kib: u64,
}

/// One mapping from `/proc/self/smaps` that may be released.
#[derive(Debug, PartialEq, Eq)]
struct Candidate {
    start: usize,
    end: usize,
    resident_kib: u64,
}

/// Releases the executable's clean read-only pages (see the module docs). Errors reading
/// `/proc` or from `madvise` are returned; nothing is lost by not releasing.
pub fn release_startup_code() -> io::Result<Released> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut released = Released::default();
    for c in candidates(&smaps, &exe.to_string_lossy()) {
        // SAFETY: the range is a whole mapping of our own executable that is neither
        // writable nor holds a private page: its contents are the file's, which the next
        // access faults back in unchanged.
        let r = unsafe {
            libc::madvise(
                c.start as *mut libc::c_void,
                c.end - c.start,
                libc::MADV_DONTNEED,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        released.mappings += 1;
        released.resident_kib += c.resident_kib;
    }
    Ok(released)
}

/// `release_startup_code`, logged: called once the daemon is up.
pub fn release_startup_code_logged() {
    match release_startup_code() {
        Ok(r) => tracing::debug!(
            mappings = r.mappings,
            resident_kib = r.resident_kib,
            "released start-up code pages"
        ),
        Err(e) => tracing::debug!(error = %e, "releasing start-up code pages"),
    }
}

/// The mappings of `exe` in `smaps` text that are read-only and hold no anonymous (private,
/// copy-on-write) page.
fn candidates(smaps: &str, exe: &str) -> Vec<Candidate> {
    let mut out = Vec::new();
    // (range, eligible so far, resident KiB) of the mapping being read.
    let mut cur: Option<(usize, usize, bool, u64)> = None;
    let finish = |cur: Option<(usize, usize, bool, u64)>, out: &mut Vec<Candidate>| {
        if let Some((start, end, true, resident_kib)) = cur {
            out.push(Candidate {
                start,
                end,
                resident_kib,
            });
        }
    };
    for line in smaps.lines() {
        if let Some((range, rest)) = header(line) {
            finish(cur.take(), &mut out);
            let mut fields = rest.split_whitespace();
            let perms = fields.next().unwrap_or("");
            let path = fields.nth(3).unwrap_or("");
            let eligible = path == exe && perms.starts_with('r') && !perms.contains('w');
            cur = Some((range.0, range.1, eligible, 0));
            continue;
        }
        let Some(c) = cur.as_mut() else { continue };
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let kib = value
            .trim()
            .strip_suffix("kB")
            .and_then(|v| v.trim().parse::<u64>().ok());
        match (key, kib) {
            ("Rss", Some(k)) => c.3 = k,
            // Copy-on-write pages count as anonymous. (Private_Dirty would also count page
            // cache pages not yet written back, such as a freshly built binary's.)
            ("Anonymous", Some(k)) if k > 0 => c.2 = false,
            _ => {}
        }
    }
    finish(cur, &mut out);
    out
}

/// Parses a mapping header line (`start-end perms offset dev inode path`).
fn header(line: &str) -> Option<((usize, usize), &str)> {
    let (range, rest) = line.split_once(' ')?;
    let (a, b) = range.split_once('-')?;
    let start = usize::from_str_radix(a, 16).ok()?;
    let end = usize::from_str_radix(b, 16).ok()?;
    (end > start).then_some(((start, end), rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
5597a0000000-5597a0042000 r--p 00000000 fe:01 1234 /usr/bin/meshd
Rss:                 264 kB
Anonymous:             0 kB
Private_Dirty:         0 kB
5597a0042000-5597a01fd000 r-xp 00042000 fe:01 1234 /usr/bin/meshd
Size:               7000 kB
Rss:                4344 kB
Anonymous:             0 kB
Private_Dirty:         0 kB
5597a0acb000-5597a0b00000 r--p 00a89000 fe:01 1234 /usr/bin/meshd
Rss:                 212 kB
Anonymous:           212 kB
Private_Dirty:       212 kB
5597a0b00000-5597a0b07000 rw-p 00abe000 fe:01 1234 /usr/bin/meshd
Rss:                  28 kB
Anonymous:             8 kB
7f9b8a95a000-7f9b8aab0000 r-xp 00026000 fe:01 99 /usr/lib/x86_64-linux-gnu/libc.so.6
Rss:                1112 kB
Anonymous:             0 kB
7ffeb9a7e000-7ffeb9a9f000 rw-p 00000000 00:00 0                          [stack]
Rss:                  68 kB
";

    #[test]
    fn only_clean_read_only_mappings_of_the_executable() {
        let c = candidates(SMAPS, "/usr/bin/meshd");
        assert_eq!(
            c,
            vec![
                Candidate {
                    start: 0x5597a0000000,
                    end: 0x5597a0042000,
                    resident_kib: 264
                },
                Candidate {
                    start: 0x5597a0042000,
                    end: 0x5597a01fd000,
                    resident_kib: 4344
                },
            ]
        );
        assert!(candidates(SMAPS, "/usr/bin/other").is_empty());
    }

    #[test]
    fn garbage_is_ignored() {
        assert!(candidates("not smaps\n\n-\nzz-yy r-xp\nRss: x kB\n", "zz").is_empty());
    }

    fn resident_code_kib() -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let exe = std::fs::read_link("/proc/self/exe").expect("exe");
        candidates(&smaps, &exe.to_string_lossy())
            .iter()
            .map(|c| c.resident_kib)
            .sum()
    }

    #[test]
    fn releasing_gives_back_resident_code_and_keeps_running() {
        let before = resident_code_kib();
        let released = release_startup_code().expect("release");
        assert!(released.mappings > 0);
        assert!(released.resident_kib > 0);
        // What runs next (this test, the harness) faults back in, a fraction of the rest.
        let after = resident_code_kib();
        assert!(
            after < before,
            "{after} KiB resident after, {before} before"
        );
        assert_eq!(
            header("1000-2000 r-xp 0 0:0 1 /x").map(|h| h.0),
            Some((0x1000, 0x2000))
        );
    }
}
