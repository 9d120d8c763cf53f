//! Packet capture with tcpdump inside a host namespace.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{LabError, Result};
use crate::pcap::{parse_pcap, Pcap};
use crate::proc::{Cmd, ProcHandle, Signal};
use crate::{wait_for, Host};

/// How long [`Capture`] waits for tcpdump to report that it is listening.
pub const CAPTURE_START_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `tcpdump -w` in a host namespace; [`Capture::stop`] returns the pcap bytes.
///
/// Dropping a capture without stopping it interrupts tcpdump; the lab reaps it.
#[derive(Debug)]
pub struct Capture {
    proc: ProcHandle,
    file: PathBuf,
    stopped: bool,
}

impl Capture {
    /// Starts tcpdump on `iface` in `host`'s namespace and waits until it is listening.
    pub(crate) fn start(host: &Host, iface: &str, bpf_filter: &str) -> Result<Capture> {
        let seq = host.lab.next_seq();
        let safe_iface: String = iface
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let file = host
            .lab
            .dir
            .join(format!("{}-cap{seq}-{safe_iface}.pcap", host.name()));
        let mut cmd = Cmd::new("tcpdump");
        cmd.args([
            "-i",
            iface,
            "-n",
            "-U",
            "--immediate-mode",
            "-Z",
            "root",
            "-w",
        ])
        .arg(&file)
        .label(format!("tcpdump-{safe_iface}"));
        if !bpf_filter.trim().is_empty() {
            cmd.arg(bpf_filter);
        }
        let proc = host.spawn(&cmd)?;
        let mut exited = None;
        let ready = wait_for(CAPTURE_START_TIMEOUT, Duration::from_millis(10), || {
            if proc.stderr().is_ok_and(|e| e.contains("listening on")) {
                return true;
            }
            match proc.try_wait() {
                Ok(Some(status)) => {
                    exited = Some(status);
                    true
                }
                _ => false,
            }
        });
        if let Some(status) = exited {
            return Err(LabError::CommandFailed {
                cmd: proc.command_line().to_owned(),
                status,
                stderr: proc.stderr().unwrap_or_default().trim().to_owned(),
            });
        }
        if !ready {
            let _reaped_by_lab = proc.kill(Signal::Kill);
            return Err(LabError::Timeout {
                what: format!("{} to start listening", proc.command_line()),
                after: CAPTURE_START_TIMEOUT,
            });
        }
        Ok(Capture {
            proc,
            file,
            stopped: false,
        })
    }

    /// The pcap file being written.
    pub fn path(&self) -> &Path {
        &self.file
    }

    /// The tcpdump process.
    pub fn process(&self) -> &ProcHandle {
        &self.proc
    }

    /// The bytes written so far (tcpdump runs with `-U`, so whole packets are flushed).
    pub fn snapshot(&self) -> Result<Vec<u8>> {
        std::fs::read(&self.file)
            .map_err(|e| LabError::io(format!("read {}", self.file.display()), e))
    }

    /// Parses what has been written so far.
    pub fn snapshot_parsed(&self) -> Result<Pcap> {
        let bytes = self.snapshot()?;
        Ok(parse_pcap(&bytes).unwrap_or(Pcap {
            linktype: 0,
            packets: Vec::new(),
        }))
    }

    /// Waits up to `timeout` until at least `n` packets have been written; returns whether so.
    pub fn wait_for_packets(&self, n: usize, timeout: Duration) -> bool {
        wait_for(timeout, Duration::from_millis(10), || {
            self.snapshot_parsed().is_ok_and(|p| p.packets.len() >= n)
        })
    }

    /// Interrupts tcpdump (SIGINT, SIGKILL after 5 s), waits for it and returns the pcap bytes.
    pub fn stop(mut self) -> Result<Vec<u8>> {
        self.stopped = true;
        self.proc.kill(Signal::Int)?;
        if self.proc.wait_timeout(Duration::from_secs(5))?.is_none() {
            self.proc.kill(Signal::Kill)?;
            self.proc.wait_timeout(Duration::from_secs(5))?;
        }
        self.snapshot()
    }

    /// Like [`Capture::stop`] but parses the result.
    pub fn stop_parsed(self) -> Result<Pcap> {
        let bytes = self.stop()?;
        Ok(parse_pcap(&bytes)?)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if !self.stopped {
            let _lab_reaps_it = self.proc.kill(Signal::Int);
        }
    }
}
