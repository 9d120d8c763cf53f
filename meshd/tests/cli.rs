//! The command line: key tools interoperate with `wg`, and bad input gets clear errors.

mod common;

use std::io::Write as _;
use std::net::UdpSocket;
use std::os::unix::fs::PermissionsExt as _;
use std::process::{Command, Stdio};

use common::*;
use meshd_lab::Lab;

fn run_with_stdin(prog: &str, args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

#[test]
fn genkey_and_pubkey_match_wg() {
    let (ok, key, _) = run_with_stdin(meshd_bin(), &["genkey"], "");
    assert!(ok);
    let (ok, ours, _) = run_with_stdin(meshd_bin(), &["pubkey"], &key);
    assert!(ok);
    let (ok, theirs, _) = run_with_stdin("wg", &["pubkey"], &key);
    assert!(ok);
    assert_eq!(ours, theirs);
    let (ok, _, err) = run_with_stdin(meshd_bin(), &["pubkey"], "not-a-key");
    assert!(!ok);
    assert!(err.contains("base64"), "{err}");
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("meshd-cli-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn config_errors_name_file_line_and_field() {
    let d = temp_dir("badcfg");
    let path = d.join("meshd.toml");
    std::fs::write(
        &path,
        "[interface]\nname = \"mesh0\"\nprivate_key_file = \"k\"\naddress = \"100.64.0.1/24\"\n\n[[peer]]\nname = \"db1\"\npublic_key = \"AAAA\"\nallowed_ips = [\"100.64.0.2/32\"]\n",
    )
    .unwrap();
    let out = Command::new(meshd_bin())
        .args(["check-config"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&format!("{}:8:", path.display())), "{err}");
    assert!(err.contains("peer[0].public_key"), "{err}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn open_state_dir_is_refused() {
    let d = temp_dir("dirperm");
    let key = meshd_tunnel::PrivateKey::generate();
    std::fs::write(d.join("host.key"), key.to_base64()).unwrap();
    std::fs::set_permissions(d.join("host.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(
        d.join("meshd.toml"),
        "[interface]\nname = \"mesh0\"\nprivate_key_file = \"host.key\"\naddress = \"100.64.0.1/24\"\n",
    )
    .unwrap();
    let state = d.join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    // In a throwaway network namespace when root, and killed if it starts after all: a
    // regression must not bring up an interface on this machine.
    let root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    let mut cmd = if root {
        let mut c = Command::new("unshare");
        c.arg("-n").arg(meshd_bin());
        c
    } else {
        Command::new(meshd_bin())
    };
    let mut child = cmd
        .args(["up", "--state-dir"])
        .arg(&state)
        .arg("--config")
        .arg(d.join("meshd.toml"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            let _ = child.wait();
            panic!("meshd started on a state directory others may read");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("run `chmod 700 {}`", state.display())),
        "{err}"
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn readable_key_file_is_refused() {
    let d = temp_dir("keyperm");
    let key = meshd_tunnel::PrivateKey::generate();
    std::fs::write(d.join("host.key"), key.to_base64()).unwrap();
    std::fs::set_permissions(d.join("host.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(
        d.join("meshd.toml"),
        "[interface]\nname = \"mesh0\"\nprivate_key_file = \"host.key\"\naddress = \"100.64.0.1/24\"\n",
    )
    .unwrap();
    let out = Command::new(meshd_bin())
        .args(["up", "--state-dir"])
        .arg(d.join("state"))
        .arg("--config")
        .arg(d.join("meshd.toml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("chmod 600"), "{err}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn port_in_use_and_missing_capability_are_explained() {
    meshd_lab::require_root!();
    let lab = Lab::new("cli-errors", 1).unwrap();
    let node = Node::new(&lab, 0);
    node.write_config(&lab, &[], "");
    let host = lab.host(0);
    let up = |prefix: &[&str]| {
        let mut args: Vec<String> = prefix.iter().map(|s| s.to_string()).collect();
        args.push(meshd_bin().into());
        args.extend(["up", "--config"].map(String::from));
        args.push(node.config_path().display().to_string());
        args.push("--state-dir".into());
        args.push(node.dir.join("state").display().to_string());
        let (prog, rest) = args.split_first().unwrap();
        host.exec(prog, rest).unwrap()
    };

    // Another socket holds the port.
    let holder = in_netns(host.netns(), || UdpSocket::bind("[::]:51820").unwrap());
    let out = up(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("51820 is already in use"), "{err}");
    drop(holder);

    // Root without CAP_NET_ADMIN cannot create the TUN.
    let out = up(&[
        "setpriv",
        "--bounding-set=-net_admin",
        "--inh-caps=-net_admin",
        "--",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("CAP_NET_ADMIN"), "{err}");
}

/// `NAME 0.1.0 (abc1234)`, `(abc1234-dirty)` or `(unknown)`: the commit is the checkout's
/// HEAD when git can tell.
fn check_version_line(name: &str, line: &str) {
    let rest = line
        .strip_prefix(&format!("{name} {} (", env!("CARGO_PKG_VERSION")))
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{line:?} is not `{name} VERSION (COMMIT)`"));
    if rest == "unknown" {
        return;
    }
    let commit = rest.strip_suffix("-dirty").unwrap_or(rest);
    assert!(
        commit.len() >= 7 && commit.bytes().all(|b| b.is_ascii_hexdigit()),
        "{line:?}"
    );
    let head = Command::new("git")
        .args(["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success());
    if let Some(out) = head {
        let head = String::from_utf8_lossy(&out.stdout);
        assert!(head.starts_with(commit), "{line:?} is not HEAD {head}");
    }
}

#[test]
fn version_names_the_commit() {
    let out = Command::new(meshd_bin()).arg("--version").output().unwrap();
    assert!(out.status.success());
    check_version_line("meshd", String::from_utf8_lossy(&out.stdout).trim());
}

#[test]
fn version_format_check_rejects_others() {
    for bad in [
        "meshd 0.1.0",
        "meshd 0.1.0 (xyz)",
        "meshd 9.9.9 (abcdef0)",
        "meshd 0.1.0 (abc)",
    ] {
        let r = std::panic::catch_unwind(|| check_version_line("meshd", bad));
        assert!(r.is_err(), "{bad} accepted");
    }
    check_version_line(
        "meshd",
        &format!("meshd {} (unknown)", env!("CARGO_PKG_VERSION")),
    );
}
