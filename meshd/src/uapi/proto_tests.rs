use super::*;

const K1: &str = "e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a";
const K2: &str = "b85996fecc9c7f1fc6d2572a76eda11d59bcd20be8e543b15ce4bd85a8e75a33";

fn key(hex: &str) -> [u8; 32] {
    hex_key(hex).unwrap()
}

/// What `wg` makes of a `get` answer (ipc-uapi.h `userspace_get_device`), enough to compare.
fn parse_get(text: &str) -> Result<DeviceState, String> {
    let body = text
        .strip_suffix("errno=0\n\n")
        .ok_or("no errno=0 at the end")?;
    let mut d = DeviceState {
        private_key: [0; 32],
        listen_port: 0,
        fwmark: None,
        peers: vec![],
    };
    for line in body.lines() {
        let (k, v) = line.split_once('=').ok_or(line.to_string())?;
        let num = |v: &str| v.parse::<u64>().map_err(|e| e.to_string());
        match (k, d.peers.last_mut()) {
            ("private_key", None) => d.private_key = key(v),
            ("listen_port", None) => d.listen_port = num(v)? as u16,
            ("fwmark", None) => d.fwmark = Some(num(v)? as u32),
            ("public_key", _) => d.peers.push(PeerState {
                public_key: key(v),
                preshared_key: None,
                endpoint: None,
                last_handshake: (0, 0),
                tx_bytes: 0,
                rx_bytes: 0,
                persistent_keepalive: 0,
                allowed_ips: vec![],
            }),
            ("preshared_key", Some(p)) => p.preshared_key = Some(key(v)),
            ("protocol_version", Some(_)) if v == "1" => {}
            ("endpoint", Some(p)) => p.endpoint = Some(v.parse().map_err(|_| v.to_string())?),
            ("last_handshake_time_sec", Some(p)) => p.last_handshake.0 = num(v)?,
            ("last_handshake_time_nsec", Some(p)) => p.last_handshake.1 = num(v)? as u32,
            ("tx_bytes", Some(p)) => p.tx_bytes = num(v)?,
            ("rx_bytes", Some(p)) => p.rx_bytes = num(v)?,
            ("persistent_keepalive_interval", Some(p)) => p.persistent_keepalive = num(v)? as u16,
            ("allowed_ip", Some(p)) => p.allowed_ips.push(v.parse().map_err(|_| v.to_string())?),
            _ => return Err(format!("unexpected line {line:?}")),
        }
    }
    Ok(d)
}

/// A `set` as `wg` writes it (ipc-uapi.h `userspace_set_device`).
fn encode_set(s: &SetRequest) -> String {
    let mut out = String::from("set=1\n");
    if let Some(k) = &s.private_key {
        out += &format!("private_key={}\n", to_hex(k));
    }
    if let Some(p) = s.listen_port {
        out += &format!("listen_port={p}\n");
    }
    if let Some(m) = s.fwmark {
        out += &format!("fwmark={m}\n");
    }
    if s.replace_peers {
        out += "replace_peers=true\n";
    }
    for p in &s.peers {
        out += &format!("public_key={}\n", to_hex(&p.public_key));
        if p.update_only {
            out += "update_only=true\n";
        }
        if p.remove {
            out += "remove=true\n";
        }
        if let Some(k) = &p.preshared_key {
            out += &format!("preshared_key={}\n", to_hex(k));
        }
        if let Some(ep) = p.endpoint {
            out += &format!("endpoint={ep}\n");
        }
        if let Some(k) = p.persistent_keepalive {
            out += &format!("persistent_keepalive_interval={k}\n");
        }
        for op in &p.allowed_ips {
            match op {
                AllowedIpOp::Clear => out += "replace_allowed_ips=true\n",
                AllowedIpOp::Add(n) => out += &format!("allowed_ip={n}\n"),
                AllowedIpOp::Remove(n) => out += &format!("allowed_ip=-{n}\n"),
            }
        }
    }
    out + "\n"
}

fn set(text: &str) -> Result<SetRequest, Option<Errno>> {
    match parse_request(text)? {
        Request::Set(s) => Ok(s),
        Request::Get => panic!("a get"),
    }
}

#[test]
fn hex_keys_round_trip_and_refuse_bad_digits() {
    assert_eq!(to_hex(&key(K1)), K1);
    assert_eq!(key(&K1.to_uppercase()), key(K1));
    assert_eq!(hex_key(&K1[..62]), Err(Errno::EINVAL));
    assert_eq!(hex_key(&format!("{}zz", &K1[..62])), Err(Errno::EINVAL));
    assert_eq!(hex_key(&format!("{K1}00")), Err(Errno::EINVAL));
    // Multi-byte characters are not digits (and never split a char).
    assert_eq!(hex_key(&"é".repeat(32)), Err(Errno::EINVAL));
}

#[test]
fn get_answer_is_in_wireguard_go_order_and_round_trips() {
    let d = DeviceState {
        private_key: key(K1),
        listen_port: 51820,
        fwmark: Some(0x4d5348),
        peers: vec![
            PeerState {
                public_key: key(K2),
                preshared_key: Some([7; 32]),
                endpoint: Some("198.18.0.2:51820".parse().unwrap()),
                last_handshake: (1_700_000_000, 123_000_000),
                tx_bytes: 10,
                rx_bytes: 20,
                persistent_keepalive: 25,
                allowed_ips: vec![
                    "100.64.0.2/32".parse().unwrap(),
                    "fd00::2/128".parse().unwrap(),
                ],
            },
            PeerState {
                public_key: [9; 32],
                preshared_key: None,
                endpoint: Some("[fd00:1::3]:51821".parse().unwrap()),
                last_handshake: (0, 0),
                tx_bytes: 0,
                rx_bytes: 0,
                persistent_keepalive: 0,
                allowed_ips: vec![],
            },
        ],
    };
    let text = format_get(&d);
    let want = format!(
        "private_key={K1}\nlisten_port=51820\nfwmark=5067592\npublic_key={K2}\npreshared_key={}\n\
         protocol_version=1\nendpoint=198.18.0.2:51820\nlast_handshake_time_sec=1700000000\n\
         last_handshake_time_nsec=123000000\ntx_bytes=10\nrx_bytes=20\n\
         persistent_keepalive_interval=25\nallowed_ip=100.64.0.2/32\nallowed_ip=fd00::2/128\n\
         public_key={}\nprotocol_version=1\nendpoint=[fd00:1::3]:51821\n\
         last_handshake_time_sec=0\nlast_handshake_time_nsec=0\ntx_bytes=0\nrx_bytes=0\n\
         persistent_keepalive_interval=0\nerrno=0\n\n",
        to_hex(&[7; 32]),
        to_hex(&[9; 32])
    );
    assert_eq!(text, want);
    assert_eq!(parse_get(&text).unwrap(), d);
    // No port (0) and no mark: the lines are left out, as wireguard-go does.
    let bare = DeviceState {
        listen_port: 0,
        fwmark: None,
        peers: vec![],
        ..d
    };
    assert_eq!(format_get(&bare), format!("private_key={K1}\nerrno=0\n\n"));
}

#[test]
fn set_requests_round_trip() {
    let s = SetRequest {
        private_key: Some(key(K1)),
        listen_port: Some(51820),
        fwmark: Some(0),
        replace_peers: true,
        peers: vec![
            PeerChange {
                public_key: key(K2),
                remove: false,
                update_only: true,
                preshared_key: Some([0; 32]),
                endpoint: Some("[fd00::1]:1".parse().unwrap()),
                persistent_keepalive: Some(0),
                allowed_ips: vec![
                    AllowedIpOp::Clear,
                    AllowedIpOp::Add("100.64.0.9/32".parse().unwrap()),
                    AllowedIpOp::Remove("10.0.0.0/8".parse().unwrap()),
                ],
            },
            PeerChange {
                remove: true,
                ..PeerChange::new([3; 32])
            },
        ],
    };
    assert_eq!(set(&encode_set(&s)), Ok(s));
    assert_eq!(set("set=1\n\n"), Ok(SetRequest::default()));
    assert_eq!(parse_request("get=1\n\n"), Ok(Request::Get));
}

#[test]
fn a_set_from_wg_set_parses() {
    // `wg set mesh0 peer K2 allowed-ips 100.64.0.3/32 endpoint 198.18.0.3:51820`
    let text = format!(
        "set=1\npublic_key={K2}\nendpoint=198.18.0.3:51820\nreplace_allowed_ips=true\n\
         allowed_ip=100.64.0.3/32\n\n"
    );
    let s = set(&text).unwrap();
    assert_eq!(s.peers.len(), 1);
    let p = &s.peers[0];
    assert_eq!(p.public_key, key(K2));
    assert_eq!(p.endpoint, Some("198.18.0.3:51820".parse().unwrap()));
    assert_eq!(
        p.allowed_ips,
        vec![
            AllowedIpOp::Clear,
            AllowedIpOp::Add("100.64.0.3/32".parse().unwrap())
        ]
    );
}

#[test]
fn malformed_requests_get_wireguard_go_errnos() {
    let pk = format!("public_key={K2}\n");
    for (text, want) in [
        // No '=': a protocol error.
        ("set=1\nlisten_port\n\n".to_string(), Errno::EPROTO),
        (format!("set=1\n{pk}garbage\n\n"), Errno::EPROTO),
        // Unknown keys, at device and at peer level.
        ("set=1\nfoo=1\n\n".into(), Errno::EINVAL),
        (format!("set=1\n{pk}foo=1\n\n"), Errno::EINVAL),
        // A peer key at device level and vice versa.
        ("set=1\nendpoint=1.2.3.4:5\n\n".into(), Errno::EINVAL),
        // Values that do not parse.
        ("set=1\nlisten_port=65536\n\n".into(), Errno::EINVAL),
        ("set=1\nlisten_port=-1\n\n".into(), Errno::EINVAL),
        ("set=1\nlisten_port=+1\n\n".into(), Errno::EINVAL),
        ("set=1\nfwmark=0x10\n\n".into(), Errno::EINVAL),
        ("set=1\nprivate_key=00\n\n".into(), Errno::EINVAL),
        ("set=1\nreplace_peers=false\n\n".into(), Errno::EINVAL),
        ("set=1\npublic_key=xyz\n\n".into(), Errno::EINVAL),
        (
            format!("set=1\n{pk}endpoint=host.example:51820\n\n"),
            Errno::EINVAL,
        ),
        (format!("set=1\n{pk}endpoint=1.2.3.4\n\n"), Errno::EINVAL),
        (format!("set=1\n{pk}allowed_ip=10.0.0.1\n\n"), Errno::EINVAL),
        (
            format!("set=1\n{pk}allowed_ip=10.0.0.0/33\n\n"),
            Errno::EINVAL,
        ),
        (
            format!("set=1\n{pk}allowed_ip=--10.0.0.0/8\n\n"),
            Errno::EINVAL,
        ),
        (
            format!("set=1\n{pk}persistent_keepalive_interval=65536\n\n"),
            Errno::EINVAL,
        ),
        (format!("set=1\n{pk}protocol_version=2\n\n"), Errno::EINVAL),
        (format!("set=1\n{pk}remove=yes\n\n"), Errno::EINVAL),
        (format!("set=1\n{pk}update_only=1\n\n"), Errno::EINVAL),
        (
            format!("set=1\n{pk}replace_allowed_ips=\n\n"),
            Errno::EINVAL,
        ),
        (
            format!("set=1\n{pk}preshared_key={}\n\n", &K1[1..]),
            Errno::EINVAL,
        ),
        // Something after get=1 but the blank line.
        ("get=1\nx=1\n\n".into(), Errno::EINVAL),
    ] {
        assert_eq!(parse_request(&text), Err(Some(want)), "{text:?}");
    }
    // Not a request at all: no answer (the connection is closed).
    assert_eq!(parse_request("hello\n\n"), Err(None));
    assert_eq!(parse_request("get=2\n\n"), Err(None));
    assert_eq!(parse_request(""), Err(None));
    // A set cut off before its blank line.
    assert_eq!(parse_set("listen_port=1\n"), Err(Errno::EIO));
}

#[test]
fn errnos_go_on_the_wire_negated_as_wg_reads_them() {
    assert_eq!(status_line(Errno::OK), "errno=0\n\n");
    assert_eq!(status_line(Errno::EPERM), "errno=-1\n\n");
    assert_eq!(status_line(Errno::EINVAL), "errno=-22\n\n");
    assert_eq!(status_line(Errno::EOPNOTSUPP), "errno=-95\n\n");
    assert_eq!(Errno::EPERM.0, libc::EPERM);
    assert_eq!(Errno::EIO.0, libc::EIO);
    assert_eq!(Errno::E2BIG.0, libc::E2BIG);
    assert_eq!(Errno::EINVAL.0, libc::EINVAL);
    assert_eq!(Errno::EPROTO.0, libc::EPROTO);
    assert_eq!(Errno::EOPNOTSUPP.0, libc::EOPNOTSUPP);
}

/// Random text never panics the parser, and whatever parses re-encodes to the same request.
#[test]
fn arbitrary_text_never_panics_and_what_parses_round_trips() {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let alphabet = b"=\n-:/[]0123456789abcdefpublic_keyallowed_iptrue.";
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = (x % 120) as usize;
        let mut s = String::from(if x & 1 == 0 { "set=1\n" } else { "get=1\n" });
        let mut y = x;
        for _ in 0..len {
            y = y
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            s.push(alphabet[(y >> 33) as usize % alphabet.len()] as char);
        }
        s.push_str("\n\n");
        if let Ok(Request::Set(parsed)) = parse_request(&s) {
            assert_eq!(set(&encode_set(&parsed)), Ok(parsed), "{s:?}");
        }
    }
}
