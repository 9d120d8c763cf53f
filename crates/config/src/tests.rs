use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;

use super::*;

const FILE: &str = "/etc/meshd/meshd.toml";
/// `wg pubkey` of a known private key (see meshd-tunnel's key tests).
const K1: &str = "AO2fJUVWS3wyUg1ZUSgCU/qk5PT5sEVaPLMGGNlGhmA=";

fn key(n: u8) -> String {
    PrivateKey::from_bytes([n; 32]).public_key().to_base64()
}

fn parse(text: &str) -> Config {
    match Config::parse(text, FILE) {
        Ok(c) => c,
        Err(e) => panic!("expected valid config, got: {e}"),
    }
}

fn err(text: &str) -> ConfigError {
    match Config::parse(text, FILE) {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e,
    }
}

/// Asserts the message starts with `FILE:line:col: field: ` and contains `needle`.
fn assert_msg(e: &ConfigError, line_col: &str, field: &str, needle: &str) {
    let msg = e.to_string();
    let prefix = format!("{FILE}:{line_col}: {field}: ");
    assert!(
        msg.starts_with(&prefix),
        "message {msg:?} should start with {prefix:?}"
    );
    assert!(
        msg.contains(needle),
        "message {msg:?} should contain {needle:?}"
    );
}

const MINIMAL: &str = r#"[interface]
name = "mesh0"
private_key_file = "host.key"
address = "100.64.0.1/10"
"#;

fn with_peers(peers: &str) -> String {
    format!("{MINIMAL}{peers}")
}

#[test]
fn full_example() {
    let text = format!(
        r#"# meshd config
[interface]
name = "mesh0"
private_key_file = "/etc/meshd/host.key"
listen_port = 51821
address = ["100.64.0.1/10", "fd7a:6d65:7368::1/48"]
mtu = 1400
mode = "transparent"
fwmark = 0x4d5348

[[peer]]
name = "db1"
public_key = "{K1}"
endpoint = "198.18.0.2:51820"
allowed_ips = ["100.64.0.2/32", "fd7a:6d65:7368::2/128"]
persistent_keepalive = 25
preshared_key = "{psk}"

[[peer]]
name = "web1"
public_key = "{k2}"
endpoint = "web1.example.net:51820"
allowed_ips = "100.64.0.3/32"
"#,
        psk = key(9),
        k2 = key(2),
    );
    let c = parse(&text);
    assert_eq!(c.path, Path::new(FILE));
    let i = &c.interface;
    assert_eq!(i.name, "mesh0");
    assert_eq!(i.private_key_file, Path::new("/etc/meshd/host.key"));
    assert_eq!(i.listen_port, 51821);
    assert_eq!(
        i.addresses,
        vec![
            "100.64.0.1/10".parse::<IpNet>().unwrap(),
            "fd7a:6d65:7368::1/48".parse().unwrap()
        ]
    );
    assert_eq!(i.mtu, 1400);
    assert_eq!(i.mode, Mode::Transparent);
    assert_eq!(i.fwmark, Some(0x4d5348));

    assert_eq!(c.peers.len(), 2);
    let p = &c.peers[0];
    assert_eq!(p.name, "db1");
    assert_eq!(p.public_key.to_base64(), K1);
    assert_eq!(p.endpoint.as_deref(), Some("198.18.0.2:51820"));
    assert_eq!(p.allowed_ips.len(), 2);
    assert_eq!(p.persistent_keepalive, Some(25));
    assert_eq!(
        p.preshared_key,
        Some(*PrivateKey::from_bytes([9; 32]).public_key().as_bytes())
    );
    let expected: SocketAddr = "198.18.0.2:51820".parse().unwrap();
    assert_eq!(p.resolve_endpoint().unwrap().unwrap(), expected);

    let q = &c.peers[1];
    assert_eq!(q.name, "web1");
    assert_eq!(
        q.allowed_ips,
        vec!["100.64.0.3/32".parse::<IpNet>().unwrap()]
    );
    assert_eq!(q.persistent_keepalive, None);
    assert_eq!(q.preshared_key, None);
}

#[test]
fn defaults() {
    let c = parse(MINIMAL);
    let i = &c.interface;
    assert_eq!(i.listen_port, DEFAULT_LISTEN_PORT);
    assert_eq!(i.listen_port, 51820);
    assert_eq!(i.mtu, 1420);
    assert_eq!(i.mode, Mode::Overlay);
    assert_eq!(i.fwmark, None);
    assert!(c.peers.is_empty());
    // Relative key file is relative to the config file's directory.
    assert_eq!(i.private_key_file, Path::new("/etc/meshd/host.key"));

    let c = parse(&with_peers(&format!(
        "[[peer]]\nname = \"a\"\npublic_key = \"{K1}\"\n"
    )));
    let p = &c.peers[0];
    assert!(p.allowed_ips.is_empty());
    assert_eq!(p.endpoint, None);
    assert!(p.resolve_endpoint().is_none());
    assert_eq!(p.persistent_keepalive, None);
    assert_eq!(p.preshared_key, None);
}

#[test]
fn listen_port_zero_and_fwmark_zero() {
    let c = parse(&MINIMAL.replace(
        "[interface]\n",
        "[interface]\nlisten_port = 0\nfwmark = 0\n",
    ));
    assert_eq!(c.interface.listen_port, 0);
    assert_eq!(c.interface.fwmark, None);
}

#[test]
fn key_file_relative_to_relative_config() {
    let c = Config::parse(MINIMAL, "meshd.toml").unwrap();
    assert_eq!(c.interface.private_key_file, Path::new("host.key"));
    let c = Config::parse(MINIMAL, "conf/meshd.toml").unwrap();
    assert_eq!(c.interface.private_key_file, Path::new("conf/host.key"));
}

#[test]
fn v4_and_v6_addresses() {
    let c = parse(&MINIMAL.replace(
        "address = \"100.64.0.1/10\"",
        "address = [\"100.64.0.1/10\", \"fd00::1/64\", \"10.0.0.1/8\"]",
    ));
    let a = &c.interface.addresses;
    assert_eq!(a.len(), 3);
    assert!(matches!(a[0], IpNet::V4(_)));
    assert!(matches!(a[1], IpNet::V6(_)));
    assert_eq!(a[1].to_string(), "fd00::1/64");

    let c = parse(&MINIMAL.replace("100.64.0.1/10", "fd00::1/64"));
    assert_eq!(
        c.interface.addresses,
        vec!["fd00::1/64".parse::<IpNet>().unwrap()]
    );
}

#[test]
fn ipv6_needs_mtu_1280() {
    let text = MINIMAL.replace(
        "address = \"100.64.0.1/10\"",
        "address = [\"100.64.0.1/10\", \"fd00::1/64\"]\nmtu = 1000",
    );
    let e = err(&text);
    assert_msg(&e, "5:7", "interface.mtu", "below 1280");
    assert!(e.to_string().contains("fd00::1/64"));
    // The same MTU is fine with IPv4 only.
    let c = parse(&MINIMAL.replace("[interface]\n", "[interface]\nmtu = 1000\n"));
    assert_eq!(c.interface.mtu, 1000);
}

#[test]
fn syntax_error() {
    let e = err("[interface]\nname = \"mesh0\nmtu = 1\n");
    assert!(matches!(e, ConfigError::Syntax { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.starts_with(&format!("{FILE}:2:")), "{msg}");
    assert!(msg.contains("TOML syntax error"), "{msg}");
    // The message is one line: no snippet of the file.
    assert!(!msg.contains('\n'), "{msg}");
}

#[test]
fn bad_public_key() {
    let text = with_peers("\n[[peer]]\nname = \"db1\"\n\npublic_key = \"AAAA\"\n");
    // Line 9, value starts at column 14.
    let e = err(&text);
    assert!(matches!(e, ConfigError::Field { .. }), "{e:?}");
    assert_msg(
        &e,
        "9:14",
        "peer[0].public_key",
        "key must decode to 32 bytes, got 3",
    );
}

#[test]
fn bad_preshared_key() {
    let text = with_peers(&format!(
        "[[peer]]\nname = \"a\"\npublic_key = \"{K1}\"\npreshared_key = \"!!\"\n"
    ));
    assert_msg(
        &err(&text),
        "8:17",
        "peer[0].preshared_key",
        "not valid base64",
    );
}

#[test]
fn unknown_fields() {
    let e = err(&MINIMAL.replace("name = ", "nmae = "));
    assert!(matches!(e, ConfigError::Field { .. }), "{e:?}");
    assert_msg(&e, "2:1", "interface.nmae", "unknown field `nmae`");

    let text = with_peers(&format!(
        "[[peer]]\nname = \"a\"\npublic_key = \"{K1}\"\nkeepalive = 5\n"
    ));
    assert_msg(
        &err(&text),
        "8:1",
        "peer[0].keepalive",
        "unknown field `keepalive`",
    );

    let text = format!("rules = []\n{MINIMAL}");
    assert_msg(&err(&text), "1:1", "rules", "unknown field `rules`");

    let text = format!("{MINIMAL}[extra]\n");
    assert_msg(&err(&text), "5:2", "extra", "unknown field `extra`");
}

#[test]
fn missing_fields() {
    let e = err(&MINIMAL.replace("name = \"mesh0\"\n", ""));
    assert!(
        e.to_string().contains("interface: missing field `name`"),
        "{e}"
    );
    assert!(e.to_string().starts_with(&format!("{FILE}:1:")), "{e}");

    let e = err("");
    assert!(
        e.to_string()
            .contains("(top level): missing field `interface`"),
        "{e}"
    );

    let e = err(&with_peers("[[peer]]\nname = \"a\"\n"));
    assert!(
        e.to_string()
            .contains("peer[0]: missing field `public_key`"),
        "{e}"
    );
}

#[test]
fn wrong_types() {
    let e = err(&MINIMAL.replace("[interface]\n", "[interface]\nlisten_port = 70000\n"));
    assert_msg(&e, "2:15", "interface.listen_port", "70000");

    let e = err(&MINIMAL.replace("[interface]\n", "[interface]\nmtu = \"big\"\n"));
    assert_msg(&e, "2:7", "interface.mtu", "invalid type");

    let e = err(&MINIMAL.replace("[interface]\n", "[interface]\nmode = \"tunnel\"\n"));
    assert_msg(&e, "2:8", "interface.mode", "unknown variant `tunnel`");

    // A single [peer] table instead of [[peer]] gets a hint.
    let e = err(&with_peers(&format!(
        "[peer]\nname = \"a\"\npublic_key = \"{K1}\"\n"
    )));
    let msg = e.to_string();
    assert!(msg.contains(": peer: "), "{msg}");
    assert!(msg.contains("[[peer]]"), "{msg}");
}

#[test]
fn bad_addresses() {
    let e = err(&MINIMAL.replace("100.64.0.1/10", "100.64.0.300/10"));
    assert_msg(&e, "4:11", "interface.address", "100.64.0.300/10");

    let e = err(&MINIMAL.replace("100.64.0.1/10", "100.64.0.1"));
    assert_msg(&e, "4:11", "interface.address", "needs a prefix length");

    let e = err(&MINIMAL.replace(
        "address = \"100.64.0.1/10\"",
        "address = [\"100.64.0.1/10\", \"nope\"]",
    ));
    assert_msg(&e, "4:29", "interface.address[1]", "\"nope\"");

    let text = with_peers(&format!(
        "[[peer]]\nname = \"a\"\npublic_key = \"{K1}\"\nallowed_ips = [\"10.0.0.0/33\"]\n"
    ));
    assert_msg(&err(&text), "8:16", "peer[0].allowed_ips[0]", "10.0.0.0/33");
}

#[test]
fn no_address() {
    let e = err(&MINIMAL.replace("\"100.64.0.1/10\"", "[]"));
    assert!(
        matches!(
            e,
            ConfigError::Invalid {
                reason: Invalid::NoAddress,
                ..
            }
        ),
        "{e:?}"
    );
    assert_msg(&e, "4:11", "interface.address", "at least one address");

    let e = err(&MINIMAL.replace("address = \"100.64.0.1/10\"\n", ""));
    assert!(e.to_string().contains("missing field `address`"), "{e}");
}

#[test]
fn mtu_range() {
    for (mtu, ok) in [(575, false), (576, true), (9000, true), (9001, false)] {
        let text = MINIMAL.replace("[interface]\n", &format!("[interface]\nmtu = {mtu}\n"));
        match Config::parse(&text, FILE) {
            Ok(c) => {
                assert!(ok, "mtu {mtu} accepted");
                assert_eq!(c.interface.mtu, mtu);
            }
            Err(e) => {
                assert!(!ok, "mtu {mtu} refused: {e}");
                assert_msg(&e, "2:7", "interface.mtu", "out of range 576..=9000");
            }
        }
    }
}

#[test]
fn interface_names() {
    for good in ["mesh0", "a", "wg-mesh_1.2", "fifteen_chars_x"] {
        assert_eq!(parse(&MINIMAL.replace("mesh0", good)).interface.name, good);
    }
    for bad in [
        "",
        "sixteen_chars_xx",
        "a/b",
        "a b",
        "a\\tb",
        "a:1",
        ".",
        "..",
    ] {
        let e = err(&MINIMAL.replace("mesh0", bad));
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    reason: Invalid::InterfaceName { .. },
                    ..
                }
            ),
            "{bad:?}: {e:?}"
        );
        assert_msg(&e, "2:8", "interface.name", "is not valid");
    }
}

#[test]
fn empty_key_file_path() {
    let e = err(&MINIMAL.replace("\"host.key\"", "\"\""));
    assert_msg(
        &e,
        "3:20",
        "interface.private_key_file",
        "must not be empty",
    );
}

#[test]
fn duplicate_peer_name() {
    let text = with_peers(&format!(
        "[[peer]]\nname = \"db1\"\npublic_key = \"{K1}\"\n[[peer]]\nname = \"db1\"\npublic_key = \"{}\"\n",
        key(2)
    ));
    let e = err(&text);
    assert_msg(
        &e,
        "9:8",
        "peer[1].name",
        "already used by peer[0] (line 6)",
    );
}

#[test]
fn empty_peer_name() {
    let text = with_peers(&format!("[[peer]]\nname = \"\"\npublic_key = \"{K1}\"\n"));
    assert_msg(&err(&text), "6:8", "peer[0].name", "must not be empty");
}

#[test]
fn duplicate_public_key() {
    let text = with_peers(&format!(
        "[[peer]]\nname = \"a\"\npublic_key = \"{K1}\"\n[[peer]]\nname = \"b\"\npublic_key = \"{K1}\"\n"
    ));
    assert_msg(
        &err(&text),
        "10:14",
        "peer[1].public_key",
        "already used by peer[0] (line 7)",
    );
}

#[test]
fn duplicate_allowed_ips() {
    // Identical prefixes (after clearing host bits) in two peers.
    let text = with_peers(&format!(
        "[[peer]]\nname = \"a\"\npublic_key = \"{K1}\"\nallowed_ips = [\"10.1.0.0/16\"]\n\
         [[peer]]\nname = \"b\"\npublic_key = \"{}\"\nallowed_ips = [\"192.168.0.0/24\", \"10.1.2.3/16\"]\n",
        key(2)
    ));
    let e = err(&text);
    assert_msg(
        &e,
        "12:34",
        "peer[1].allowed_ips[1]",
        "10.1.0.0/16 is already listed at peer[0].allowed_ips[0] (line 8)",
    );

    // Overlapping but different prefixes are fine: longest prefix wins.
    let text = with_peers(&format!(
        "[[peer]]\nname = \"a\"\npublic_key = \"{K1}\"\nallowed_ips = \"10.1.0.0/16\"\n\
         [[peer]]\nname = \"b\"\npublic_key = \"{}\"\nallowed_ips = [\"10.1.2.0/24\"]\n",
        key(2)
    ));
    assert_eq!(parse(&text).peers.len(), 2);

    // Within one peer, and as a single string.
    let text = with_peers(&format!(
        "[[peer]]\nname = \"a\"\npublic_key = \"{K1}\"\nallowed_ips = [\"fd00::/64\", \"fd00::/64\"]\n"
    ));
    assert_msg(
        &err(&text),
        "8:29",
        "peer[0].allowed_ips[1]",
        "already listed",
    );
}

#[test]
fn keepalive() {
    let peer = |k: &str| {
        with_peers(&format!(
            "[[peer]]\nname = \"a\"\npublic_key = \"{K1}\"\npersistent_keepalive = {k}\n"
        ))
    };
    assert_eq!(parse(&peer("1")).peers[0].persistent_keepalive, Some(1));
    assert_eq!(
        parse(&peer("65535")).peers[0].persistent_keepalive,
        Some(65535)
    );
    assert_msg(
        &err(&peer("0")),
        "8:24",
        "peer[0].persistent_keepalive",
        "omit it",
    );
    assert_msg(
        &err(&peer("65536")),
        "8:24",
        "peer[0].persistent_keepalive",
        "65536",
    );
}

#[test]
fn endpoints() {
    let peer = |ep: &str| {
        with_peers(&format!(
            "[[peer]]\nname = \"a\"\npublic_key = \"{K1}\"\nendpoint = \"{ep}\"\n"
        ))
    };
    for good in [
        "198.18.0.2:51820",
        "[2001:db8::1]:51820",
        "db1.example.net:1",
        "db1:51820",
        "db1.example.net.:51820",
    ] {
        assert_eq!(parse(&peer(good)).peers[0].endpoint.as_deref(), Some(good));
    }
    for (bad, why) in [
        ("198.18.0.2", "missing \":port\""),
        ("198.18.0.2:0", "must not be 0"),
        ("host:99999", "not a number"),
        ("2001:db8::1:51820", "in brackets"),
        ("[2001:db8::zz]:51820", "bracketed"),
        (":51820", "1 to 253"),
        ("bad host:51820", "not a valid host name"),
        ("a..b:51820", "not a valid host name"),
    ] {
        let e = err(&peer(bad));
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    reason: Invalid::Endpoint { .. },
                    ..
                }
            ),
            "{bad}: {e:?}"
        );
        assert_msg(&e, "8:12", "peer[0].endpoint", why);
    }
}

#[test]
fn resolve_endpoint_literals() {
    let v6: SocketAddr = "[2001:db8::1]:51820".parse().unwrap();
    assert_eq!(resolve_endpoint("[2001:db8::1]:51820").unwrap(), v6);
    assert!(resolve_endpoint("no-port").is_err());
}

#[test]
fn own_key() {
    let sk = PrivateKey::from_bytes([7; 32]);
    let text = with_peers(&format!(
        "[[peer]]\nname = \"a\"\npublic_key = \"{K1}\"\n[[peer]]\nname = \"b\"\npublic_key = \"{}\"\n",
        sk.public_key()
    ));
    let c = parse(&text);
    assert!(c
        .check_own_key(&PrivateKey::from_bytes([8; 32]).public_key())
        .is_ok());
    let e = c.check_own_key(&sk.public_key()).unwrap_err();
    assert!(matches!(
        e,
        ConfigError::Invalid {
            reason: Invalid::OwnPublicKey,
            ..
        }
    ));
    assert_eq!(
        e.to_string(),
        format!("{FILE}: peer[1].public_key: this is the host's own public key; a host must not list itself as a peer")
    );
}

#[test]
fn debug_redacts_preshared_key() {
    let psk = key(9);
    let text = with_peers(&format!(
        "[[peer]]\nname = \"a\"\npublic_key = \"{K1}\"\npreshared_key = \"{psk}\"\n"
    ));
    let c = parse(&text);
    let dbg = format!("{c:?}");
    assert!(dbg.contains("<redacted>"), "{dbg}");
    let bytes = format!(
        "{:?}",
        PrivateKey::from_bytes([9; 32]).public_key().as_bytes()
    );
    assert!(!dbg.contains(&bytes), "{dbg}");
}

#[test]
fn load_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meshd.toml");
    let e = Config::load(&path).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }));
    assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    assert!(e.location().is_none());

    fs::write(&path, MINIMAL).unwrap();
    let c = Config::load(&path).unwrap();
    assert_eq!(c.path, path);
    assert_eq!(c.interface.private_key_file, dir.path().join("host.key"));

    fs::write(&path, MINIMAL.replace("mesh0", "a/b")).unwrap();
    let e = Config::load(&path).unwrap_err();
    assert!(
        e.to_string()
            .starts_with(&format!("{}:2:8: interface.name:", path.display())),
        "{e}"
    );
}

#[test]
fn key_file_roundtrip_and_modes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new/sub/host.key");
    let sk = PrivateKey::from_bytes([3; 32]);
    write_private_key(&path, &sk).unwrap();
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(&dir.path().join("new/sub")), 0o700);
    assert_eq!(mode(&dir.path().join("new")), 0o700);
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        format!("{}\n", sk.to_base64())
    );
    assert_eq!(
        load_private_key(&path).unwrap().public_key(),
        sk.public_key()
    );

    // Never overwrites an identity.
    let e = write_private_key(&path, &PrivateKey::from_bytes([4; 32])).unwrap_err();
    match &e {
        KeyFileError::Write { source, .. } => {
            assert_eq!(source.kind(), io::ErrorKind::AlreadyExists)
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        load_private_key(&path).unwrap().public_key(),
        sk.public_key()
    );

    // Through the config.
    let cfg = dir.path().join("new/meshd.toml");
    fs::write(&cfg, MINIMAL.replace("host.key", "sub/host.key")).unwrap();
    let c = Config::load(&cfg).unwrap();
    assert_eq!(c.load_private_key().unwrap().public_key(), sk.public_key());
}

#[test]
fn key_file_permissions_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("host.key");
    write_private_key(&path, &PrivateKey::from_bytes([3; 32])).unwrap();
    for bad in [0o644, 0o640, 0o604, 0o620, 0o602, 0o660] {
        fs::set_permissions(&path, fs::Permissions::from_mode(bad)).unwrap();
        let e = load_private_key(&path).unwrap_err();
        assert!(
            matches!(e, KeyFileError::Permissions { mode, .. } if mode == bad),
            "{bad:o}: {e:?}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("chmod 600 {}", path.display())),
            "{msg}"
        );
        assert!(msg.contains(&format!("{bad:04o}")), "{msg}");
    }
    for ok in [0o600, 0o400] {
        fs::set_permissions(&path, fs::Permissions::from_mode(ok)).unwrap();
        assert!(load_private_key(&path).is_ok(), "{ok:o}");
    }
}

#[test]
fn key_file_bad_content_and_missing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("host.key");
    for (content, needle) in [
        ("not base64!!\n", "not valid base64"),
        ("AAAA\n", "got 3"),
        ("", "got 0"),
    ] {
        fs::write(&path, content).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let e = load_private_key(&path).unwrap_err();
        assert!(matches!(e, KeyFileError::BadKey { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains(needle), "{msg}");
    }
    // Whitespace around the key is fine (wg genkey writes a newline).
    let sk = PrivateKey::from_bytes([5; 32]);
    fs::write(&path, format!("  {}\n\n", sk.to_base64())).unwrap();
    assert_eq!(
        load_private_key(&path).unwrap().public_key(),
        sk.public_key()
    );

    let missing = dir.path().join("nope.key");
    let e = load_private_key(&missing).unwrap_err();
    assert!(
        matches!(&e, KeyFileError::Read { source, .. } if source.kind() == io::ErrorKind::NotFound)
    );
    assert!(
        e.to_string().contains(&missing.display().to_string()),
        "{e}"
    );

    let e = load_private_key(dir.path()).unwrap_err();
    assert!(matches!(e, KeyFileError::Read { .. }), "{e:?}");
}

#[test]
fn line_col_counts_chars() {
    let text = "ab\nçd = 1\n";
    assert_eq!(line_col(text, 0), (1, 1));
    assert_eq!(line_col(text, 3), (2, 1));
    // 'ç' is two bytes, one column.
    assert_eq!(line_col(text, 5), (2, 2));
    assert_eq!(line_col(text, 999), (3, 1));
}

#[test]
fn routed_prefixes() {
    assert!(parse(MINIMAL).interface.routed_prefixes.is_empty());
    let c = parse(&MINIMAL.replace(
        "[interface]\n",
        "[interface]\nrouted_prefixes = [\"10.1.2.3/16\", \"fd10::/64\", \"10.1.0.0/16\"]\n",
    ));
    // Host bits cleared, sorted, duplicates folded.
    let want: Vec<IpNet> = ["10.1.0.0/16", "fd10::/64"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(c.interface.routed_prefixes, want);
    let c = parse(&MINIMAL.replace(
        "[interface]\n",
        "[interface]\nrouted_prefixes = \"192.0.2.0/24\"\n",
    ));
    assert_eq!(
        c.interface.routed_prefixes,
        vec!["192.0.2.0/24".parse::<IpNet>().unwrap()]
    );
    let e = err(&MINIMAL.replace(
        "[interface]\n",
        "[interface]\nrouted_prefixes = [\"10.1.0.0/16\", \"10.2.0.0\"]\n",
    ));
    assert_msg(
        &e,
        "2:35",
        "interface.routed_prefixes[1]",
        "needs a prefix length",
    );
}

#[test]
fn mode_is_one_lowercase_word_everywhere() {
    for (mode, word) in [
        (Mode::Overlay, "overlay"),
        (Mode::Transparent, "transparent"),
    ] {
        assert_eq!(mode.to_string(), word);
        assert_eq!(serde_json::to_string(&mode).unwrap(), format!("\"{word}\""));
        let back: Mode = serde_json::from_str(&format!("\"{word}\"")).unwrap();
        assert_eq!(back, mode);
    }
    assert!(serde_json::from_str::<Mode>("\"Overlay\"").is_err());
}

#[test]
fn metrics_listen() {
    assert_eq!(parse(MINIMAL).interface.metrics_listen, None);
    let c = parse(&MINIMAL.replace(
        "[interface]\n",
        "[interface]\nmetrics_listen = \"127.0.0.1:9586\"\n",
    ));
    assert_eq!(
        c.interface.metrics_listen,
        Some("127.0.0.1:9586".parse().unwrap())
    );
    let e = err(&MINIMAL.replace(
        "[interface]\n",
        "[interface]\nmetrics_listen = \"localhost\"\n",
    ));
    assert!(e.to_string().contains("metrics_listen"), "{e}");
}

#[test]
fn uapi_dir() {
    // Default: where `wg` looks.
    assert_eq!(
        parse(MINIMAL).interface.uapi_dir,
        PathBuf::from("/var/run/wireguard")
    );
    let c = parse(&MINIMAL.replace(
        "[interface]\n",
        "[interface]\nuapi_dir = \"/run/meshd-ns1\"\n",
    ));
    assert_eq!(c.interface.uapi_dir, PathBuf::from("/run/meshd-ns1"));
    // Relative to the config file's directory, like the key file.
    let c = parse(&MINIMAL.replace("[interface]\n", "[interface]\nuapi_dir = \"uapi\"\n"));
    assert_eq!(c.interface.uapi_dir, PathBuf::from("/etc/meshd/uapi"));
    let e = err(&MINIMAL.replace("[interface]\n", "[interface]\nuapi_dir = \"\"\n"));
    assert_msg(&e, "2:12", "interface.uapi_dir", "");
    let e = err(&MINIMAL.replace("[interface]\n", "[interface]\nuapi_dir = 3\n"));
    assert!(e.to_string().contains("interface.uapi_dir"), "{e}");
}

#[test]
fn log_format() {
    assert_eq!(parse(MINIMAL).interface.log_format, None);
    for (word, want) in [("json", LogFormat::Json), ("text", LogFormat::Text)] {
        let c = parse(&MINIMAL.replace(
            "[interface]\n",
            &format!("[interface]\nlog_format = \"{word}\"\n"),
        ));
        assert_eq!(c.interface.log_format, Some(want));
        assert_eq!(word.parse::<LogFormat>().unwrap(), want);
        assert_eq!(want.to_string(), word);
    }
    let e = err(&MINIMAL.replace("[interface]\n", "[interface]\nlog_format = \"JSON\"\n"));
    assert_msg(&e, "2:14", "interface.log_format", "unknown variant");
    let e = "yaml".parse::<LogFormat>().unwrap_err().to_string();
    assert!(e.contains("yaml") && e.contains("json"), "{e}");
}

#[test]
fn flow_settings() {
    use std::time::Duration;
    let d = parse(MINIMAL).interface.flows;
    assert_eq!(d, crate::FlowSettings::default());
    assert!(d.enabled);
    assert_eq!((d.interval, d.max_records), (Duration::from_secs(10), 4096));
    let c = parse(&MINIMAL.replace(
        "[interface]\n",
        "[interface]\nflow_records = false\nflow_interval = 60\nflow_max_records = 100\n",
    ));
    let f = c.interface.flows;
    assert!(!f.enabled);
    assert_eq!((f.interval, f.max_records), (Duration::from_secs(60), 100));
    let e = err(&MINIMAL.replace("[interface]\n", "[interface]\nflow_interval = 0\n"));
    assert_msg(&e, "2:17", "interface.flow_interval", "out of range");
    let e = err(&MINIMAL.replace("[interface]\n", "[interface]\nflow_max_records = 0\n"));
    assert_msg(&e, "2:20", "interface.flow_max_records", "out of range");
    let e = err(&MINIMAL.replace("[interface]\n", "[interface]\nflow_records = 1\n"));
    assert!(e.to_string().contains("interface.flow_records"), "{e}");
}
