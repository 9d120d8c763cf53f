//! The coordinator on a real full disk: its state directory on a small tmpfs that a filler file
//! fills up (root only: `mount`; skipped with a notice otherwise). Agents enrol over QUIC on
//! 127.0.0.1.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;

use meshd_agent::{enrol, ClientError};
use meshd_control::api::{HealthView, TokenCreateRequest};
use meshd_control::proto::{EndpointReport, ErrorCode};
use meshd_control::state::AdminError;
use meshd_control::JoinToken;
use meshd_coordinator::{start, AdminOp, AdminReply, CoordinatorHandle, CoordinatorOptions};
use meshd_tunnel::PrivateKey;

/// A start error as `meshd coordinator` prints it (anyhow's `{:#}`: context, then causes).
fn shown(e: meshd_coordinator::StartError) -> String {
    format!("{:#}", anyhow::Error::from(e))
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A tmpfs of `size` mounted on a fresh temporary directory; unmounted on drop (also when the
/// test fails).
struct Tmpfs {
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` (after printing why) when not root.
    fn mount(test: &str, size: &str) -> Option<Tmpfs> {
        if !is_root() {
            eprintln!("skipping {test}: needs root to mount a tmpfs");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&mnt)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(Tmpfs { mnt, _dir: dir })
    }

    fn filler(&self) -> PathBuf {
        self.mnt.join("filler")
    }

    /// Fills the file system until writes fail with ENOSPC.
    fn fill(&self) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.filler())
            .unwrap();
        let chunk = vec![0u8; 64 * 1024];
        for _ in 0..100_000 {
            if let Err(e) = f.write_all(&chunk) {
                assert_eq!(e.raw_os_error(), Some(28), "ENOSPC expected: {e}");
                // The last chunk may have fitted in part: fill the rest byte-wise.
                while f.write_all(&[0]).is_ok() {}
                return;
            }
        }
        panic!("the tmpfs never filled up");
    }

    /// Gives `bytes` back (after [`Tmpfs::fill`]): a few commits fit, then the disk is full.
    fn leave(&self, bytes: u64) {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(self.filler())
            .unwrap();
        let len = f.metadata().unwrap().len();
        f.set_len(len.saturating_sub(bytes)).unwrap();
    }

    fn free(&self) {
        std::fs::remove_file(self.filler()).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a coordinator of a failed test may still hold the database open.
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

fn opts(state: &Path) -> CoordinatorOptions {
    let mut o = CoordinatorOptions::new(state);
    o.listen = "127.0.0.1:0".parse().unwrap();
    o.admin_listen = "127.0.0.1:0".parse().unwrap();
    o
}

fn entries(d: &Path) -> BTreeSet<String> {
    std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_start_on_a_full_disk_leaves_no_empty_key() {
    let Some(fs) = Tmpfs::mount("first_start_on_a_full_disk_leaves_no_empty_key", "1m") else {
        return;
    };
    let state = fs.mnt.join("state");
    fs.fill();
    let e = shown(start(opts(&state)).await.err().expect("no space"));
    let key = state.join("coordinator.key");
    assert!(e.contains(&key.display().to_string()), "{e}");
    assert!(e.contains("No space left on device"), "{e}");
    assert!(!key.exists(), "no empty key is left behind");
    assert_eq!(entries(&state), BTreeSet::new(), "no temporary file either");
    // And so the next start, with space, works.
    fs.free();
    let c = start(opts(&state)).await.unwrap();
    let m = std::fs::metadata(&key).unwrap();
    assert_eq!(m.len(), 45);
    assert_eq!(m.permissions().mode() & 0o777, 0o600);
    c.stop().await;
}

fn ep() -> EndpointReport {
    EndpointReport {
        addrs: vec![SocketAddr::from(([192, 0, 2, 1], 1))],
        listen_port: Some(51820),
        transparent: false,
    }
}

fn disk_full(r: &Result<AdminReply, AdminError>) -> bool {
    match r {
        Ok(_) => false,
        Err(AdminError::NotSaved(m)) if m.contains("disk full") => true,
        Err(e) => panic!("unexpected error {e:?}"),
    }
}

async fn tokens(c: &CoordinatorHandle) -> Vec<meshd_control::api::TokenView> {
    match c.admin(AdminOp::ListTokens).await.unwrap() {
        Ok(AdminReply::Tokens(t)) => t,
        other => panic!("{other:?}"),
    }
}

async fn hosts(c: &CoordinatorHandle) -> Vec<meshd_control::api::HostView> {
    match c.admin(AdminOp::ListHosts).await.unwrap() {
        Ok(AdminReply::Hosts(h)) => h,
        other => panic!("{other:?}"),
    }
}

async fn health(c: &CoordinatorHandle) -> HealthView {
    match c.admin(AdminOp::Health).await.unwrap() {
        Ok(AdminReply::Health(h)) => h,
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_loses_nothing_acknowledged_and_gives_no_address_twice() {
    let Some(fs) = Tmpfs::mount(
        "a_full_disk_loses_nothing_acknowledged_and_gives_no_address_twice",
        "2m",
    ) else {
        return;
    };
    let state = fs.mnt.join("state");
    let c = start(opts(&state)).await.unwrap();
    let t = JoinToken::parse(
        &c.create_token(TokenCreateRequest {
            uses: Some(1000),
            ..Default::default()
        })
        .await
        .unwrap()
        .token,
    )
    .unwrap();
    enrol(&t, "a", &PrivateKey::generate(), ep()).await.unwrap();

    fs.fill();
    fs.leave(96 * 1024);
    // Keep writing until each kind of change has been refused: whatever was acknowledged
    // must be there after the restart, whatever was refused must not.
    let (mut acked_tokens, mut refused_tokens) = (BTreeSet::new(), BTreeSet::new());
    let (mut acked_labels, mut refused_labels) = (BTreeSet::new(), BTreeSet::new());
    let (mut acked_hosts, mut refused_hosts) = (Vec::new(), BTreeSet::new());
    for i in 0..50 {
        if !refused_tokens.is_empty() && !refused_labels.is_empty() && !refused_hosts.is_empty() {
            break;
        }
        let r = c
            .admin(AdminOp::CreateToken(TokenCreateRequest {
                labels: [("n".into(), format!("{i}"))].into(),
                ..Default::default()
            }))
            .await
            .unwrap();
        if disk_full(&r) {
            refused_tokens.insert(i.to_string());
        } else {
            acked_tokens.insert(i.to_string());
        }
        let r = c
            .admin(AdminOp::Label(
                "a".into(),
                [(format!("k{i}"), "v".repeat(200))].into(),
            ))
            .await
            .unwrap();
        if disk_full(&r) {
            refused_labels.insert(format!("k{i}"));
        } else {
            acked_labels.insert(format!("k{i}"));
        }
        let name = format!("e{i}");
        match enrol(&t, &name, &PrivateKey::generate(), ep()).await {
            Ok(e) => acked_hosts.push((name, e.host.addresses)),
            Err(ClientError::Refused {
                code: ErrorCode::Internal,
                message,
            }) => {
                assert!(message.contains("disk full"), "{message}");
                refused_hosts.insert(name);
            }
            Err(e) => panic!("unexpected enrolment error {e}"),
        }
    }
    assert!(
        !refused_tokens.is_empty() && !refused_labels.is_empty() && !refused_hosts.is_empty(),
        "the full disk refused every kind of change"
    );
    eprintln!(
        "full disk: tokens {} acked / {} refused, labels {} / {}, enrolments {} / {}",
        acked_tokens.len(),
        refused_tokens.len(),
        acked_labels.len(),
        refused_labels.len(),
        acked_hosts.len(),
        refused_hosts.len()
    );
    let h = health(&c).await;
    assert!(!h.ok, "{h:?}");
    assert!(
        h.store_failure
            .as_ref()
            .is_some_and(|f| f.error.contains("disk full")),
        "{h:?}"
    );

    // Free the space, restart on the same directory.
    fs.free();
    c.stop().await;
    let c = start(opts(&state)).await.unwrap();
    assert!(health(&c).await.ok);

    let labels: BTreeSet<String> = tokens(&c)
        .await
        .into_iter()
        .filter_map(|t| t.labels.get("n").cloned())
        .collect();
    assert_eq!(
        labels, acked_tokens,
        "tokens: exactly the acknowledged ones"
    );
    let all = hosts(&c).await;
    let a = all.iter().find(|h| h.name == "a").unwrap();
    let keys: BTreeSet<String> = a.labels.keys().cloned().collect();
    assert_eq!(keys, acked_labels, "labels: exactly the acknowledged ones");
    let names: BTreeSet<&str> = all.iter().map(|h| h.name.as_str()).collect();
    let expected: BTreeSet<&str> = std::iter::once("a")
        .chain(acked_hosts.iter().map(|(n, _)| n.as_str()))
        .collect();
    assert_eq!(names, expected, "hosts: exactly the acknowledged ones");
    for (name, addrs) in &acked_hosts {
        let h = all.iter().find(|h| &h.name == name).unwrap();
        assert_eq!(&h.addresses, addrs, "{name} keeps the address it was given");
    }

    // New enrolments get addresses nobody holds (a new token: the restarted coordinator
    // listens on another port).
    let held: BTreeSet<IpAddr> = all.iter().flat_map(|h| h.addresses.clone()).collect();
    let t = JoinToken::parse(
        &c.create_token(TokenCreateRequest::default())
            .await
            .unwrap()
            .token,
    )
    .unwrap();
    for i in 0..3 {
        let e = enrol(&t, &format!("after{i}"), &PrivateKey::generate(), ep())
            .await
            .unwrap();
        for a in &e.host.addresses {
            assert!(!held.contains(a), "{a} handed out twice");
        }
    }
    c.stop().await;
}
