use super::*;

fn h(b: u8) -> [u8; 32] {
    hash_secret(&[b; 32])
}

/// A state with the bootstrap token (hash `h(0)`), created at 100.
fn with_bootstrap() -> CoordinatorState {
    let mut s = st();
    s.restore_admin_tokens(vec![AdminToken {
        name: BOOTSTRAP_ADMIN_TOKEN.into(),
        hash: h(0),
        created_at: 100,
        expires_at: None,
        revoked_at: None,
    }]);
    s
}

#[test]
fn create_list_and_authenticate() {
    let mut s = with_bootstrap();
    let t = s
        .create_admin_token(1000, "ci-2024.a_b", Some(60), h(1))
        .unwrap();
    assert_eq!(
        (t.created_at, t.expires_at, t.revoked_at),
        (1000, Some(1060), None)
    );
    // Persisted, by name, once.
    let d = s.take_dirty();
    assert_eq!(d.admin_tokens, vec![t.clone()]);
    assert!(!d.is_empty());
    assert!(s.take_dirty().admin_tokens.is_empty());
    let names: Vec<&str> = s.admin_tokens().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["bootstrap", "ci-2024.a_b"]);
    let a = s.admin_tokens();
    assert_eq!(a.authenticate(1000, &h(1)).unwrap().name, "ci-2024.a_b");
    assert_eq!(a.authenticate(1059, &h(1)).unwrap().name, "ci-2024.a_b");
    assert_eq!(a.authenticate(1000, &h(0)).unwrap().name, "bootstrap");
    assert_eq!(a.authenticate(1000, &h(9)), Err(AdminAuthError::Unknown));
    assert_eq!(a.valid_count(1000), 2);
}

#[test]
fn expiry_is_checked_at_the_time_passed_in() {
    let mut s = with_bootstrap();
    s.create_admin_token(1000, "short", Some(60), h(1)).unwrap();
    let a = s.admin_tokens();
    assert!(a.authenticate(1059, &h(1)).is_ok());
    assert_eq!(
        a.authenticate(1060, &h(1)),
        Err(AdminAuthError::Expired("short".into()))
    );
    assert_eq!(a.get("short").unwrap().state(1060), "expired");
    assert_eq!(a.get("short").unwrap().state(1000), "active");
    assert_eq!(a.valid_count(1060), 1);
    // Zero: expired at once (as for join tokens).
    s.create_admin_token(2000, "zero", Some(0), h(2)).unwrap();
    assert_eq!(
        s.admin_tokens().authenticate(2000, &h(2)),
        Err(AdminAuthError::Expired("zero".into()))
    );
}

#[test]
fn names_and_lifetimes_are_validated_before_anything_changes() {
    let mut s = with_bootstrap();
    let long = "a".repeat(MAX_ADMIN_TOKEN_NAME + 1);
    for bad in ["", "CI", "a b", "ci/1", "é", "tok\n", long.as_str()] {
        assert!(
            matches!(
                s.create_admin_token(1, bad, None, h(1)),
                Err(AdminError::InvalidAdminTokenName(_))
            ),
            "{bad:?}"
        );
    }
    assert!(validate_admin_token_name(&"a".repeat(MAX_ADMIN_TOKEN_NAME)).is_ok());
    assert_eq!(
        s.create_admin_token(1, "ci", Some(MAX_TOKEN_TTL_SECS + 1), h(1)),
        Err(AdminError::InvalidTtl(MAX_TOKEN_TTL_SECS + 1))
    );
    assert!(s
        .create_admin_token(1, "max", Some(MAX_TOKEN_TTL_SECS), h(3))
        .is_ok());
    assert_eq!(
        s.create_admin_token(1, "bootstrap", None, h(1)),
        Err(AdminError::AdminTokenNameTaken("bootstrap".into()))
    );
    let d = s.take_dirty();
    assert_eq!(d.admin_tokens.len(), 1, "only the valid one");
    assert!(s.admin_tokens().authenticate(1, &h(1)).is_err());
}

#[test]
fn revoke_refuses_the_last_valid_token() {
    let mut s = with_bootstrap();
    assert_eq!(
        s.revoke_admin_token(1000, "bootstrap"),
        Err(AdminError::LastAdminToken("bootstrap".into()))
    );
    assert!(s.take_dirty().admin_tokens.is_empty());
    assert!(s.admin_tokens().authenticate(1000, &h(0)).is_ok());
    assert_eq!(
        s.revoke_admin_token(1000, "nope"),
        Err(AdminError::NoSuchAdminToken("nope".into()))
    );

    // With a second valid token the bootstrap can go; then the second is the last.
    s.create_admin_token(1000, "ops", None, h(1)).unwrap();
    let _ = s.take_dirty();
    let r = s.revoke_admin_token(1001, "bootstrap").unwrap();
    assert!(r.changed);
    assert_eq!(r.token.revoked_at, Some(1001));
    assert_eq!(s.take_dirty().admin_tokens, vec![r.token.clone()]);
    assert_eq!(
        s.admin_tokens().authenticate(1001, &h(0)),
        Err(AdminAuthError::Revoked("bootstrap".into()))
    );
    assert_eq!(
        s.revoke_admin_token(1002, "ops"),
        Err(AdminError::LastAdminToken("ops".into()))
    );
    // Revoking a revoked token changes nothing (same time, nothing to persist).
    let again = s.revoke_admin_token(1003, "bootstrap").unwrap();
    assert!(!again.changed);
    assert_eq!(again.token.revoked_at, Some(1001));
    assert!(s.take_dirty().admin_tokens.is_empty());
    // A name is not reused after a revocation.
    assert_eq!(
        s.create_admin_token(1004, "bootstrap", None, h(5)),
        Err(AdminError::AdminTokenNameTaken("bootstrap".into()))
    );
}

#[test]
fn an_expired_token_does_not_count_as_valid() {
    let two = || {
        let mut s = with_bootstrap();
        s.create_admin_token(1000, "short", Some(10), h(1)).unwrap();
        s
    };
    // While both are valid, either may go ...
    assert!(two().revoke_admin_token(1005, "bootstrap").is_ok());
    let mut s = two();
    // ... but once `short` expired, bootstrap is the last valid one.
    assert_eq!(
        s.revoke_admin_token(1010, "bootstrap"),
        Err(AdminError::LastAdminToken("bootstrap".into()))
    );
    // An expired token can be revoked at any time.
    let r = s.revoke_admin_token(1010, "short").unwrap();
    assert!(r.changed);
    assert_eq!(
        s.admin_tokens().get("short").unwrap().state(1010),
        "revoked"
    );
}
