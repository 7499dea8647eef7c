//! Request signing of the HTTP edge (`docs/http-edge.md`, "Signing").
//!
//! Every request carries `X-Fedrelay-Domain`, `X-Fedrelay-Timestamp` and
//! `X-Fedrelay-Signature: v1=<lowercase hex HMAC-SHA256(secret, signed string)>`, where the
//! signed string is `<ts>.<raw body>` for requests with a body and `<ts>.<METHOD> <path>` for
//! requests without one. Webhooks pushed by the relay are signed the same way.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Header naming the domain making the request (for webhooks: the receiving domain).
pub const HEADER_DOMAIN: &str = "x-fedrelay-domain";
/// Header carrying the Unix time in seconds used in the signature.
pub const HEADER_TIMESTAMP: &str = "x-fedrelay-timestamp";
/// Header carrying `v1=<hex hmac>`.
pub const HEADER_SIGNATURE: &str = "x-fedrelay-signature";
/// How far a webhook timestamp may be from our clock, as the relay allows for requests.
pub const MAX_SKEW_SECS: u64 = 300;

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &[u8]) -> HmacSha256 {
    match HmacSha256::new_from_slice(secret) {
        Ok(m) => m,
        // HMAC takes keys of any length.
        Err(e) => unreachable!("hmac key: {e}"),
    }
}

/// The signed string of a request with a body: `<ts>.<body>`.
pub fn body_signed_string(ts: u64, body: &[u8]) -> Vec<u8> {
    let mut s = format!("{ts}.").into_bytes();
    s.extend_from_slice(body);
    s
}

/// The signed string of a request without a body: `<ts>.<METHOD> <path>`.
pub fn bodyless_signed_string(ts: u64, method: &str, path: &str) -> Vec<u8> {
    format!("{ts}.{method} {path}").into_bytes()
}

/// `v1=` + lowercase hex HMAC-SHA256 of `signed` keyed with `secret`.
pub fn signature(secret: &[u8], signed: &[u8]) -> String {
    let mut m = mac(secret);
    m.update(signed);
    format!("v1={}", hex::encode(m.finalize().into_bytes()))
}

/// Signature header value for a request with a body.
pub fn sign_body(secret: &[u8], ts: u64, body: &[u8]) -> String {
    signature(secret, &body_signed_string(ts, body))
}

/// Signature header value for a request without a body (e.g. `GET /v1/stream`).
pub fn sign_bodyless(secret: &[u8], ts: u64, method: &str, path: &str) -> String {
    signature(secret, &bodyless_signed_string(ts, method, path))
}

/// Why a pushed webhook was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyError {
    /// The header is not `v1=<64 hex chars>`.
    Malformed,
    /// The timestamp is not a number or too far from `now`.
    Stale,
    /// The HMAC does not match.
    Mismatch,
}

/// Verifies a `v1=` signature over `<ts>.<body>` in constant time, and the timestamp's skew
/// against `now_secs`.
pub fn verify_body(
    secret: &[u8],
    ts_header: &str,
    body: &[u8],
    sig_header: &str,
    now_secs: u64,
) -> Result<(), VerifyError> {
    let ts: u64 = ts_header.trim().parse().map_err(|_| VerifyError::Stale)?;
    if ts.abs_diff(now_secs) > MAX_SKEW_SECS {
        return Err(VerifyError::Stale);
    }
    let hex_part = sig_header
        .trim()
        .strip_prefix("v1=")
        .ok_or(VerifyError::Malformed)?;
    let raw = hex::decode(hex_part).map_err(|_| VerifyError::Malformed)?;
    if raw.len() != 32 {
        return Err(VerifyError::Malformed);
    }
    let mut m = mac(secret);
    m.update(&body_signed_string(ts, body));
    m.verify_slice(&raw).map_err(|_| VerifyError::Mismatch)
}

/// Unix time in whole seconds (0 if the clock is before 1970).
pub fn unix_now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Unix time in milliseconds (0 if the clock is before 1970).
pub fn unix_now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector_rfc4231_case2() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let sig = signature(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            sig,
            "v1=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn signed_strings_follow_the_docs() {
        assert_eq!(
            bodyless_signed_string(1732350000, "GET", "/v1/stream"),
            b"1732350000.GET /v1/stream".to_vec()
        );
        assert_eq!(
            body_signed_string(1732350000, br#"{"a":1}"#),
            br#"1732350000.{"a":1}"#.to_vec()
        );
        assert_eq!(
            sign_bodyless(b"k", 5, "GET", "/v1/stream"),
            signature(b"k", b"5.GET /v1/stream")
        );
        let s = sign_body(b"k", 5, b"xyz");
        assert!(s.starts_with("v1="));
        assert_eq!(s.len(), 3 + 64);
        assert!(
            s[3..]
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
    }

    #[test]
    fn verify_accepts_good_and_rejects_bad() {
        let body = br#"{"events":[]}"#;
        let good = sign_body(b"secret", 1000, body);
        assert_eq!(verify_body(b"secret", "1000", body, &good, 1010), Ok(()));
        assert_eq!(
            verify_body(b"other", "1000", body, &good, 1010),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            verify_body(b"secret", "1000", b"{}", &good, 1010),
            Err(VerifyError::Mismatch)
        );
        // Timestamp is part of the signed string.
        assert_eq!(
            verify_body(b"secret", "1001", body, &good, 1010),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            verify_body(b"secret", "1000", body, &good, 1000 + MAX_SKEW_SECS + 1),
            Err(VerifyError::Stale)
        );
        assert_eq!(
            verify_body(b"secret", "x", body, &good, 1000),
            Err(VerifyError::Stale)
        );
        assert_eq!(
            verify_body(b"secret", "1000", body, &good[3..], 1000),
            Err(VerifyError::Malformed)
        );
        assert_eq!(
            verify_body(b"secret", "1000", body, "v1=abcd", 1000),
            Err(VerifyError::Malformed)
        );
    }
}
