//! HTTP Digest authentication for SIP (RFC 3261 §22, RFC 7616, RFC 8760): SHA-256 and
//! SHA-512/256, and MD5 only where the config allows it.
//!
//! As a client the edge answers a peer's 401/407 with the strongest challenge it supports;
//! as a server it challenges with one `WWW-Authenticate` per algorithm in preference order
//! and verifies the answer (`qop=auth`, nonces it issued and that have not expired).

use super::msg::{is_token_byte, parse_quoted, push_quoted};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use md5::Md5;
use sha2::{Digest, Sha256, Sha512_256};
use thiserror::Error;

/// A digest algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Algorithm {
    /// Preferred.
    Sha256,
    Sha512_256,
    /// Only where configured.
    Md5,
}

impl Algorithm {
    /// `SHA-256`, `SHA-512-256`, `MD5` (RFC 8760 §2.1 names).
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "SHA-256",
            Algorithm::Sha512_256 => "SHA-512-256",
            Algorithm::Md5 => "MD5",
        }
    }

    /// The algorithm an `algorithm` parameter names (case-insensitively); the `-sess`
    /// variants and anything else are not supported.
    pub fn from_name(name: &str) -> Option<Self> {
        [Algorithm::Sha256, Algorithm::Sha512_256, Algorithm::Md5]
            .into_iter()
            .find(|a| a.name().eq_ignore_ascii_case(name))
    }

    /// The hex digest of `data`.
    pub fn hash_hex(self, data: &[u8]) -> String {
        match self {
            Algorithm::Sha256 => hex::encode(Sha256::digest(data)),
            Algorithm::Sha512_256 => hex::encode(Sha512_256::digest(data)),
            Algorithm::Md5 => hex::encode(Md5::digest(data)),
        }
    }

    /// The length of [`Algorithm::hash_hex`]'s output.
    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 | Algorithm::Sha512_256 => 64,
            Algorithm::Md5 => 32,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DigestError {
    #[error("no usable challenge: {0}")]
    NoChallenge(String),
    #[error("malformed credentials: {0}")]
    Malformed(String),
}

/// One `Digest` challenge (a `WWW-Authenticate` or `Proxy-Authenticate` value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub realm: String,
    pub nonce: String,
    pub opaque: Option<String>,
    pub algorithm: Algorithm,
    /// Whether `qop=auth` is offered (the only qop the edge uses).
    pub qop_auth: bool,
    pub stale: bool,
}

/// `Digest` followed by `name=value` pairs separated by commas (RFC 7235 §2.1, RFC 3261
/// §25.1): names lowercased, values tokens or quoted strings (quotes removed). `None` for
/// another scheme, bad syntax, a repeated name or more than [`MAX_PARAMS`] parameters.
fn digest_params(value: &str) -> Option<Vec<(String, String)>> {
    let s = value.trim_matches([' ', '\t']);
    let (scheme, rest) = s.split_at(s.find([' ', '\t']).unwrap_or(s.len()));
    if !scheme.eq_ignore_ascii_case("Digest") {
        return None;
    }
    let mut out: Vec<(String, String)> = Vec::new();
    let mut s = rest;
    loop {
        s = s.trim_start_matches([' ', '\t', ',']);
        if s.is_empty() {
            break;
        }
        let n = s.bytes().take_while(|&b| is_token_byte(b)).count();
        if n == 0 {
            return None;
        }
        let name = s[..n].to_ascii_lowercase();
        s = s[n..].trim_start_matches([' ', '\t']).strip_prefix('=')?;
        s = s.trim_start_matches([' ', '\t']);
        let value = if s.starts_with('"') {
            let (v, rest) = parse_quoted(s)?;
            s = rest;
            v
        } else {
            let n = s.bytes().take_while(|&b| is_token_byte(b)).count();
            if n == 0 {
                return None;
            }
            let v = s[..n].to_string();
            s = &s[n..];
            v
        };
        if out.len() >= MAX_PARAMS || out.iter().any(|(n, _)| *n == name) {
            return None;
        }
        out.push((name, value));
        s = s.trim_start_matches([' ', '\t']);
        if !s.is_empty() && !s.starts_with(',') {
            return None;
        }
    }
    (!out.is_empty()).then_some(out)
}

/// The most parameters one challenge or answer may carry (RFC 7616 defines eleven), which
/// also bounds the duplicate search.
const MAX_PARAMS: usize = 32;

fn get<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// One challenge, whatever its algorithm; `None` when unusable (unknown algorithm, a qop
/// list without `auth`, missing realm or nonce).
fn parse_challenge(value: &str) -> Option<Challenge> {
    let params = digest_params(value)?;
    let algorithm = match get(&params, "algorithm") {
        None => Algorithm::Md5,
        Some(a) => Algorithm::from_name(a)?,
    };
    let qop_auth = match get(&params, "qop") {
        None => false,
        Some(q) => {
            if !q
                .split(',')
                .any(|o| o.trim_matches([' ', '\t']).eq_ignore_ascii_case("auth"))
            {
                return None;
            }
            true
        }
    };
    Some(Challenge {
        realm: get(&params, "realm")?.to_string(),
        nonce: get(&params, "nonce")?.to_string(),
        opaque: get(&params, "opaque").map(str::to_string),
        algorithm,
        qop_auth,
        stale: get(&params, "stale").is_some_and(|s| s.eq_ignore_ascii_case("true")),
    })
}

/// Of a response's challenges (each header value), the best one the edge may answer:
/// SHA-256, then SHA-512-256, then MD5 when `allow_md5`; unknown algorithms and
/// `qop=auth-int`-only challenges are skipped.
///
/// A challenge without an `algorithm` parameter is MD5 (RFC 7616 §3.3). Of equally good
/// challenges the first is taken.
pub fn pick_challenge(values: &[&str], allow_md5: bool) -> Result<Challenge, DigestError> {
    let mut best: Option<Challenge> = None;
    for ch in values.iter().filter_map(|v| parse_challenge(v)) {
        if ch.algorithm == Algorithm::Md5 && !allow_md5 {
            continue;
        }
        if best.as_ref().is_none_or(|b| ch.algorithm < b.algorithm) {
            best = Some(ch);
        }
    }
    best.ok_or_else(|| {
        DigestError::NoChallenge(format!(
            "none of {} challenge(s) is Digest with {}",
            values.len(),
            if allow_md5 {
                "SHA-256, SHA-512-256 or MD5"
            } else {
                "SHA-256 or SHA-512-256"
            }
        ))
    })
}

/// The request digest (RFC 7616 §3.4.1): `H(HA1:nonce:nc:cnonce:qop:HA2)` with `qop=auth`
/// (`qop` given as `(nc, cnonce)`), else `H(HA1:nonce:HA2)`, with `HA1 = H(user:realm:pass)`
/// and `HA2 = H(method:uri)`.
#[allow(clippy::too_many_arguments)]
fn response_hex(
    alg: Algorithm,
    username: &str,
    realm: &str,
    password: &str,
    method: &str,
    uri: &str,
    nonce: &str,
    qop: Option<(&str, &str)>,
) -> String {
    let ha1 = alg.hash_hex(format!("{username}:{realm}:{password}").as_bytes());
    let ha2 = alg.hash_hex(format!("{method}:{uri}").as_bytes());
    let data = match qop {
        Some((nc, cnonce)) => format!("{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}"),
        None => format!("{ha1}:{nonce}:{ha2}"),
    };
    alg.hash_hex(data.as_bytes())
}

/// The `Authorization`/`Proxy-Authorization` value answering `ch` for `method` and `uri`,
/// with `qop=auth`, `nc` and a fresh `cnonce` when the challenge offers qop.
pub fn authorization(
    ch: &Challenge,
    username: &str,
    password: &str,
    method: &str,
    uri: &str,
    nc: u32,
) -> String {
    let cnonce = hex::encode(rand::random::<[u8; 16]>());
    authorization_with_cnonce(ch, username, password, method, uri, nc, &cnonce)
}

/// [`authorization`] with a given client nonce.
fn authorization_with_cnonce(
    ch: &Challenge,
    username: &str,
    password: &str,
    method: &str,
    uri: &str,
    nc: u32,
    cnonce: &str,
) -> String {
    let nc = format!("{nc:08x}");
    let qop = ch.qop_auth.then_some((nc.as_str(), cnonce));
    let response = response_hex(
        ch.algorithm,
        username,
        &ch.realm,
        password,
        method,
        uri,
        &ch.nonce,
        qop,
    );
    let mut out = String::from("Digest username=");
    push_quoted(&mut out, username);
    out.push_str(", realm=");
    push_quoted(&mut out, &ch.realm);
    out.push_str(", nonce=");
    push_quoted(&mut out, &ch.nonce);
    out.push_str(", uri=");
    push_quoted(&mut out, uri);
    out.push_str(&format!(
        ", response=\"{response}\", algorithm={}",
        ch.algorithm.name()
    ));
    if let Some((nc, cnonce)) = qop {
        out.push_str(", qop=auth, nc=");
        out.push_str(nc);
        out.push_str(", cnonce=");
        push_quoted(&mut out, cnonce);
    }
    if let Some(opaque) = &ch.opaque {
        out.push_str(", opaque=");
        push_quoted(&mut out, opaque);
    }
    out
}

/// Parsed `Digest` credentials from an `Authorization` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub realm: String,
    pub nonce: String,
    pub uri: String,
    pub response: String,
    pub algorithm: Algorithm,
    pub qop: Option<String>,
    pub nc: Option<String>,
    pub cnonce: Option<String>,
    pub opaque: Option<String>,
}

/// Parses `Digest username="…", realm="…", …`; MD5 is accepted only when `allow_md5`.
///
/// A missing `algorithm` means MD5. `qop`, when present, must be `auth` and comes with an
/// 8-hex-digit `nc` and a `cnonce`; `response` must be a hex digest of the algorithm's
/// length. Repeated parameters are refused.
pub fn parse_credentials(value: &str, allow_md5: bool) -> Result<Credentials, DigestError> {
    let bad = |why: &str| DigestError::Malformed(why.to_string());
    let params = digest_params(value).ok_or_else(|| bad("not Digest credentials"))?;
    let required = |name: &str| {
        get(&params, name)
            .map(str::to_string)
            .ok_or_else(|| DigestError::Malformed(format!("no {name}")))
    };
    let algorithm = match get(&params, "algorithm") {
        None => Algorithm::Md5,
        Some(a) => Algorithm::from_name(a).ok_or_else(|| bad("unsupported algorithm"))?,
    };
    if algorithm == Algorithm::Md5 && !allow_md5 {
        return Err(bad("MD5 is not allowed"));
    }
    let response = required("response")?;
    if response.len() != algorithm.hex_len() || !response.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("response is not a digest"));
    }
    let qop = get(&params, "qop").map(str::to_string);
    let nc = get(&params, "nc").map(str::to_string);
    let cnonce = get(&params, "cnonce").map(str::to_string);
    if let Some(q) = &qop {
        if !q.eq_ignore_ascii_case("auth") {
            return Err(bad("unsupported qop"));
        }
        if !nc
            .as_deref()
            .is_some_and(|n| n.len() == 8 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(bad("qop without a valid nc"));
        }
        if cnonce.as_deref().is_none_or(str::is_empty) {
            return Err(bad("qop without a cnonce"));
        }
    }
    Ok(Credentials {
        username: required("username")?,
        realm: required("realm")?,
        nonce: required("nonce")?,
        uri: required("uri")?,
        response,
        algorithm,
        qop,
        nc,
        cnonce,
        opaque: get(&params, "opaque").map(str::to_string),
    })
}

/// How far in the future a nonce's timestamp may be (clock differences between nodes).
const NONCE_CLOCK_SKEW_SECS: u64 = 30;

/// The server side: issues nonces (an HMAC over a timestamp with `secret`, so any node with
/// the same secret can verify them, valid for `ttl_secs`) and verifies answers.
///
/// A nonce is the base64url (unpadded) form of the 8-byte big-endian issue time followed by
/// HMAC-SHA256(`secret`, time ‖ realm). Nonces carry no state, so a captured answer can be
/// replayed until its nonce expires; keep `ttl_secs` short.
#[derive(Debug, Clone)]
pub struct Verifier {
    pub realm: String,
    pub secret: Vec<u8>,
    pub ttl_secs: u64,
    pub allow_md5: bool,
}

impl Verifier {
    /// The `WWW-Authenticate` values to send, one per algorithm, preferred first.
    ///
    /// SHA-256, SHA-512-256, then MD5 when allowed; each with `qop="auth"`, the same fresh
    /// nonce, and `stale=true` when `stale`.
    pub fn challenges(&self, now_secs: u64, stale: bool) -> Vec<String> {
        let nonce = self.nonce(now_secs);
        let mut algs = vec![Algorithm::Sha256, Algorithm::Sha512_256];
        if self.allow_md5 {
            algs.push(Algorithm::Md5);
        }
        algs.into_iter()
            .map(|alg| {
                let mut v = String::from("Digest realm=");
                push_quoted(&mut v, &self.realm);
                v.push_str(&format!(
                    ", nonce=\"{nonce}\", algorithm={}, qop=\"auth\"",
                    alg.name()
                ));
                if stale {
                    v.push_str(", stale=true");
                }
                v
            })
            .collect()
    }

    /// The MAC of a nonce issued at `ts`; `None` only if the key were refused, which HMAC
    /// never does.
    fn mac(&self, ts: u64) -> Option<Hmac<Sha256>> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.secret).ok()?;
        mac.update(&ts.to_be_bytes());
        mac.update(self.realm.as_bytes());
        Some(mac)
    }

    fn nonce(&self, ts: u64) -> String {
        let mut raw = ts.to_be_bytes().to_vec();
        if let Some(mac) = self.mac(ts) {
            raw.extend_from_slice(&mac.finalize().into_bytes());
        }
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// The issue time of a nonce this verifier made, or `None`.
    fn nonce_time(&self, nonce: &str) -> Option<u64> {
        let raw = URL_SAFE_NO_PAD.decode(nonce).ok()?;
        if raw.len() != 40 {
            return None;
        }
        let (ts, tag) = raw.split_at(8);
        let ts = u64::from_be_bytes(ts.try_into().ok()?);
        self.mac(ts)?.verify_slice(tag).ok()?;
        Some(ts)
    }

    /// Whether `creds` prove knowledge of `password` for `method`, with a nonce this
    /// verifier issued that has not expired. `Err(true)` when only the nonce is stale.
    ///
    /// The answer must use `qop=auth` (every challenge offers it), the verifier's realm and
    /// an allowed algorithm; the response is compared in constant time. Whether `creds.uri`
    /// is the request's URI is for the caller to check.
    pub fn verify(
        &self,
        creds: &Credentials,
        password: &str,
        method: &str,
        now_secs: u64,
    ) -> Result<(), bool> {
        if creds.realm != self.realm || (creds.algorithm == Algorithm::Md5 && !self.allow_md5) {
            return Err(false);
        }
        let issued = self.nonce_time(&creds.nonce).ok_or(false)?;
        if issued > now_secs.saturating_add(NONCE_CLOCK_SKEW_SECS) {
            return Err(false);
        }
        let (Some(qop), Some(nc), Some(cnonce)) = (&creds.qop, &creds.nc, &creds.cnonce) else {
            return Err(false);
        };
        if !qop.eq_ignore_ascii_case("auth") {
            return Err(false);
        }
        let expected = response_hex(
            creds.algorithm,
            &creds.username,
            &creds.realm,
            password,
            method,
            &creds.uri,
            &creds.nonce,
            Some((nc, cnonce)),
        );
        if !constant_time_eq(
            expected.as_bytes(),
            creds.response.to_ascii_lowercase().as_bytes(),
        ) {
            return Err(false);
        }
        if now_secs > issued.saturating_add(self.ttl_secs) {
            return Err(true);
        }
        Ok(())
    }
}

/// Byte equality whose time depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    // RFC 7616 §3.9.1.
    const NONCE: &str = "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v";
    const CNONCE: &str = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ";
    const REALM: &str = "http-auth@example.org";

    fn rfc7616_challenge(algorithm: Algorithm) -> Challenge {
        Challenge {
            realm: REALM.into(),
            nonce: NONCE.into(),
            opaque: Some("FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS".into()),
            algorithm,
            qop_auth: true,
            stale: false,
        }
    }

    #[test]
    fn rfc7616_vectors() -> TestResult {
        for (alg, want) in [
            (Algorithm::Md5, "8ca523f5e9506fed4657c9700eebdbec"),
            (
                Algorithm::Sha256,
                "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1",
            ),
        ] {
            let got = response_hex(
                alg,
                "Mufasa",
                REALM,
                "Circle of Life",
                "GET",
                "/dir/index.html",
                NONCE,
                Some(("00000001", CNONCE)),
            );
            assert_eq!(got, want, "{}", alg.name());
            let header = authorization_with_cnonce(
                &rfc7616_challenge(alg),
                "Mufasa",
                "Circle of Life",
                "GET",
                "/dir/index.html",
                1,
                CNONCE,
            );
            assert!(header.contains(&format!("response=\"{want}\"")), "{header}");
            let creds = parse_credentials(&header, true)?;
            assert_eq!(creds.response, want);
            assert_eq!(creds.username, "Mufasa");
            assert_eq!(creds.uri, "/dir/index.html");
            assert_eq!(creds.nc.as_deref(), Some("00000001"));
            assert_eq!(creds.cnonce.as_deref(), Some(CNONCE));
            assert_eq!(creds.algorithm, alg);
            assert_eq!(
                creds.opaque.as_deref(),
                Some("FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS")
            );
        }
        Ok(())
    }

    #[test]
    fn hashes() {
        // FIPS 180-4 / RFC 1321 test vectors for "abc".
        assert_eq!(
            Algorithm::Sha512_256.hash_hex(b"abc"),
            "53048e2681941ef99b2e29b76b4c7dabe4c2d0c634fc6d46e0e2f13107e7af23"
        );
        assert_eq!(
            Algorithm::Sha256.hash_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            Algorithm::Md5.hash_hex(b"abc"),
            "900150983cd24fb0d6963f7d28e17f72"
        );
    }

    #[test]
    fn legacy_response_without_qop() {
        let mut ch = rfc7616_challenge(Algorithm::Md5);
        ch.qop_auth = false;
        ch.opaque = None;
        let header = authorization_with_cnonce(&ch, "a", "b", "REGISTER", "sip:x", 1, "c");
        let ha1 = Algorithm::Md5.hash_hex(format!("a:{REALM}:b").as_bytes());
        let ha2 = Algorithm::Md5.hash_hex(b"REGISTER:sip:x");
        let want = Algorithm::Md5.hash_hex(format!("{ha1}:{NONCE}:{ha2}").as_bytes());
        assert!(header.contains(&format!("response=\"{want}\"")), "{header}");
        assert!(!header.contains("qop") && !header.contains("cnonce") && !header.contains("nc="));
    }

    #[test]
    fn picks_the_strongest_challenge() -> TestResult {
        let md5 = r#"Digest realm="r", nonce="n1", qop="auth""#;
        let sha512 = r#"Digest realm="r", nonce="n2", algorithm=SHA-512-256, qop="auth,auth-int""#;
        let sha256 = r#"digest REALM="r", Nonce="n3", algorithm="sha-256", qop="auth", stale=TRUE, opaque="o""#;
        let int_only = r#"Digest realm="r", nonce="n4", algorithm=SHA-256, qop="auth-int""#;
        let sess = r#"Digest realm="r", nonce="n5", algorithm=SHA-256-sess, qop="auth""#;
        let basic = r#"Basic realm="r""#;

        let ch = pick_challenge(&[md5, sha512, sha256, int_only, sess, basic], false)?;
        assert_eq!(ch.algorithm, Algorithm::Sha256);
        assert_eq!(ch.nonce, "n3");
        assert!(ch.qop_auth && ch.stale);
        assert_eq!(ch.opaque.as_deref(), Some("o"));
        assert_eq!(pick_challenge(&[md5, sha512], false)?.nonce, "n2");
        assert_eq!(pick_challenge(&[md5, sha512], true)?.nonce, "n2");
        let ch = pick_challenge(&[md5], true)?;
        assert_eq!(ch.algorithm, Algorithm::Md5);
        assert!(ch.qop_auth && !ch.stale);
        assert!(pick_challenge(&[md5], false).is_err());
        assert!(pick_challenge(&[int_only, sess, basic], true).is_err());
        assert!(pick_challenge(&[], true).is_err());
        let legacy = pick_challenge(&[r#"Digest realm="r", nonce="n""#], true)?;
        assert!(!legacy.qop_auth);
        for bad in [
            r#"Digest realm="r""#,
            r#"Digest nonce="n""#,
            r#"Digest realm="r", realm="s", nonce="n""#,
            r#"Digest realm="r" nonce="n""#,
            r#"Digest realm="r, nonce="n""#,
            r#"Digest realm=, nonce="n""#,
            "Digest",
            "",
        ] {
            assert!(pick_challenge(&[bad], true).is_err(), "{bad}");
        }
        Ok(())
    }

    #[test]
    fn credentials_grammar() -> TestResult {
        let good = format!(
            r#"Digest username="bob", realm="r", nonce="n", uri="sip:a@b", response="{}", algorithm=SHA-256, qop=auth, nc=0000000a, cnonce="c""#,
            "0".repeat(64)
        );
        let creds = parse_credentials(&good, false)?;
        assert_eq!(creds.qop.as_deref(), Some("auth"));
        assert_eq!(creds.nc.as_deref(), Some("0000000a"));
        let md5 = format!(
            r#"Digest username="bob", realm="r", nonce="n", uri="sip:a@b", response="{}""#,
            "0".repeat(32)
        );
        assert_eq!(parse_credentials(&md5, true)?.algorithm, Algorithm::Md5);
        assert!(parse_credentials(&md5, false).is_err());
        let escaped = format!(
            r#"Digest username="a\"b\\c", realm="r", nonce="n", uri="sip:a@b", response="{}", algorithm=SHA-256"#,
            "f".repeat(64)
        );
        assert_eq!(parse_credentials(&escaped, false)?.username, "a\"b\\c");
        for bad in [
            good.replace("username=\"bob\", ", ""),
            good.replace("algorithm=SHA-256", "algorithm=SHA-256-sess"),
            good.replace("qop=auth", "qop=auth-int"),
            good.replace("nc=0000000a", "nc=10"),
            good.replace(", cnonce=\"c\"", ""),
            good.replace(&"0".repeat(64), "xyz"),
            good.replace("realm=\"r\"", "realm=\"r\", realm=\"s\""),
            good.replace("Digest", "Basic"),
            "NoOneKnowsThisScheme opaque-data=here".to_string(),
        ] {
            assert!(parse_credentials(&bad, true).is_err(), "{bad}");
        }
        Ok(())
    }

    fn verifier(allow_md5: bool) -> Verifier {
        Verifier {
            realm: "relay.example.com".into(),
            secret: b"cluster secret".to_vec(),
            ttl_secs: 300,
            allow_md5,
        }
    }

    /// A client's answer to the verifier's challenges issued at `issued`.
    fn answer(
        v: &Verifier,
        issued: u64,
        allow_md5: bool,
        password: &str,
    ) -> Result<Credentials, DigestError> {
        let challenges = v.challenges(issued, false);
        let refs: Vec<&str> = challenges.iter().map(String::as_str).collect();
        let ch = pick_challenge(&refs, allow_md5)?;
        let header = authorization(
            &ch,
            "alice",
            password,
            "REGISTER",
            "sip:relay.example.com",
            1,
        );
        parse_credentials(&header, allow_md5)
    }

    #[test]
    fn challenges_per_algorithm() -> TestResult {
        let v = verifier(false);
        let c = v.challenges(1000, false);
        assert_eq!(c.len(), 2);
        assert!(c[0].starts_with("Digest realm=\"relay.example.com\", nonce=\""));
        assert!(
            c[0].ends_with(", algorithm=SHA-256, qop=\"auth\""),
            "{}",
            c[0]
        );
        assert!(c[1].contains("algorithm=SHA-512-256"));
        let c = verifier(true).challenges(1000, true);
        assert_eq!(c.len(), 3);
        assert!(c[2].contains("algorithm=MD5"));
        assert!(c.iter().all(|v| v.ends_with(", stale=true")));
        for value in &c {
            let ch = pick_challenge(&[value.as_str()], true)?;
            assert!(ch.stale && ch.qop_auth);
            assert_eq!(ch.realm, "relay.example.com");
        }
        Ok(())
    }

    #[test]
    fn verifies_answers() -> TestResult {
        let v = verifier(false);
        let creds = answer(&v, 1000, false, "pw")?;
        assert_eq!(creds.algorithm, Algorithm::Sha256);
        assert_eq!(v.verify(&creds, "pw", "REGISTER", 1000), Ok(()));
        assert_eq!(v.verify(&creds, "pw", "REGISTER", 1300), Ok(()));
        // Expired but otherwise right: stale.
        assert_eq!(v.verify(&creds, "pw", "REGISTER", 1301), Err(true));
        // Wrong password or method.
        assert_eq!(v.verify(&creds, "PW", "REGISTER", 1000), Err(false));
        assert_eq!(v.verify(&creds, "pw", "INVITE", 1000), Err(false));
        // Expired and wrong: not stale.
        assert_eq!(v.verify(&creds, "PW", "REGISTER", 5000), Err(false));
        // Issued in the future.
        assert_eq!(v.verify(&creds, "pw", "REGISTER", 900), Err(false));
        // Another node with the same secret accepts it; another secret or realm does not.
        assert_eq!(
            verifier(false).verify(&creds, "pw", "REGISTER", 1000),
            Ok(())
        );
        let other = Verifier {
            secret: b"other".to_vec(),
            ..verifier(false)
        };
        assert_eq!(other.verify(&creds, "pw", "REGISTER", 1000), Err(false));
        let mut wrong_realm = creds.clone();
        wrong_realm.realm = "evil.example.com".into();
        assert_eq!(v.verify(&wrong_realm, "pw", "REGISTER", 1000), Err(false));
        // A forged nonce (another time with the old MAC) or none at all.
        let mut forged = creds.clone();
        let mut raw = URL_SAFE_NO_PAD.decode(&creds.nonce)?;
        raw[7] ^= 1;
        forged.nonce = URL_SAFE_NO_PAD.encode(&raw);
        assert_eq!(v.verify(&forged, "pw", "REGISTER", 1000), Err(false));
        forged.nonce = "junk".into();
        assert_eq!(v.verify(&forged, "pw", "REGISTER", 1000), Err(false));
        // Without qop.
        let mut no_qop = creds.clone();
        no_qop.qop = None;
        assert_eq!(v.verify(&no_qop, "pw", "REGISTER", 1000), Err(false));
        // Upper-case hex is the same digest.
        let mut upper = creds.clone();
        upper.response = upper.response.to_ascii_uppercase();
        assert_eq!(v.verify(&upper, "pw", "REGISTER", 1000), Ok(()));
        Ok(())
    }

    #[test]
    fn md5_only_where_allowed() -> TestResult {
        let strict = verifier(false);
        let lax = verifier(true);
        let challenges = lax.challenges(1000, false);
        let md5 = pick_challenge(&[challenges[2].as_str()], true)?;
        assert_eq!(md5.algorithm, Algorithm::Md5);
        let header = authorization(&md5, "alice", "pw", "MESSAGE", "sip:b@relay.example.com", 7);
        let creds = parse_credentials(&header, true)?;
        assert_eq!(creds.nc.as_deref(), Some("00000007"));
        assert_eq!(lax.verify(&creds, "pw", "MESSAGE", 1000), Ok(()));
        assert_eq!(strict.verify(&creds, "pw", "MESSAGE", 1000), Err(false));
        Ok(())
    }

    #[test]
    fn cnonces_are_fresh() {
        let ch = rfc7616_challenge(Algorithm::Sha256);
        let a = authorization(&ch, "u", "p", "GET", "/", 1);
        let b = authorization(&ch, "u", "p", "GET", "/", 1);
        assert_ne!(a, b);
    }
}
