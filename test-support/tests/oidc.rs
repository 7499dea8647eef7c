//! The OpenID Connect provider harness's own check: client credentials tokens are RS256 JWTs
//! for the requested resource with the client's claims and lifetime, signed by a key its
//! JWKS publishes; a wrong secret and an unknown resource are refused; and a user signs in
//! through the authorization code flow with PKCE on the provider's login form.

use anyhow::{Context, Result, ensure};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};
use test_support::oidc::{OidcClient, OidcProvider, OidcSetup, OidcUser};

const API: &str = "urn:fedrelay:api";
const OTHER: &str = "urn:other:api";
const REDIRECT: &str = "http://127.0.0.1:9/callback";

fn setup() -> OidcSetup {
    OidcSetup::new()
        .resource(API)
        .resource(OTHER)
        .client(OidcClient::new("ops-admin", "admin-secret").claim("roles", json!(["admin"])))
        .client(
            OidcClient::new("a-admin", "a-secret")
                .claim("roles", json!("domain-admin"))
                .claim("domains", json!(["a.example"]))
                .ttl(2),
        )
        .client(OidcClient::new("portal", "portal-secret").redirect_uri(REDIRECT))
        .user(
            OidcUser::new("alice", "alice-password")
                .claim("roles", json!(["auditor"]))
                .claim("email", json!("alice@a.example")),
        )
}

fn now() -> Result<i64> {
    Ok(SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as i64)
}

/// A compact JWT's header and payload, unverified.
fn decode(token: &str) -> Result<(Value, Value)> {
    let parts: Vec<&str> = token.split('.').collect();
    ensure!(parts.len() == 3, "not a compact JWS: {} parts", parts.len());
    let part =
        |s: &str| -> Result<Value> { Ok(serde_json::from_slice(&URL_SAFE_NO_PAD.decode(s)?)?) };
    Ok((part(parts[0])?, part(parts[1])?))
}

async fn get_json(url: &str) -> Result<Value> {
    let resp = http()?.get(url).send().await?.error_for_status()?;
    Ok(resp.json().await?)
}

fn http() -> Result<reqwest::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Ok(reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()?)
}

/// Checks the token's RS256 signature with the key of its `kid` from the provider's JWKS,
/// found through discovery as the relay finds it.
async fn verify_signature(op: &OidcProvider, token: &str) -> Result<()> {
    let (header, _) = decode(token)?;
    let kid = header["kid"].as_str().context("token without kid")?;
    let discovery = get_json(&op.discovery_url()).await?;
    assert_eq!(discovery["issuer"], json!(op.issuer()));
    assert_eq!(discovery["jwks_uri"], json!(op.jwks_url()));
    let jwks = get_json(&op.jwks_url()).await?;
    let key = jwks["keys"]
        .as_array()
        .context("jwks without keys")?
        .iter()
        .find(|k| k["kid"] == json!(kid))
        .with_context(|| format!("no key {kid} in {jwks}"))?;
    assert_eq!(key["kty"], json!("RSA"));
    assert!(key.get("d").is_none(), "the JWKS publishes a private key");
    let n = URL_SAFE_NO_PAD.decode(key["n"].as_str().context("key without n")?)?;
    let e = URL_SAFE_NO_PAD.decode(key["e"].as_str().context("key without e")?)?;
    let (signed, sig) = token.rsplit_once('.').context("no signature")?;
    ring::signature::RsaPublicKeyComponents { n: &n, e: &e }
        .verify(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            signed.as_bytes(),
            &URL_SAFE_NO_PAD.decode(sig)?,
        )
        .map_err(|_| anyhow::anyhow!("the signature does not verify"))?;
    // A flipped payload byte must not verify with the same key.
    let mut tampered = signed.as_bytes().to_vec();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    ensure!(
        ring::signature::RsaPublicKeyComponents { n: &n, e: &e }
            .verify(
                &ring::signature::RSA_PKCS1_2048_8192_SHA256,
                &tampered,
                &URL_SAFE_NO_PAD.decode(sig)?,
            )
            .is_err(),
        "a tampered token verifies"
    );
    Ok(())
}

#[tokio::test]
async fn client_credentials_tokens_are_signed_jwts_for_the_resource() -> Result<()> {
    let op = OidcProvider::start(setup())?;

    let token = op.token("ops-admin", "admin-secret", API).await?;
    let (header, claims) = decode(&token)?;
    assert_eq!(header["alg"], json!("RS256"));
    assert_eq!(header["typ"], json!("at+jwt"));
    assert_eq!(claims["iss"], json!(op.issuer()));
    assert_eq!(claims["aud"], json!(API));
    assert_eq!(claims["sub"], json!("ops-admin"));
    assert_eq!(claims["roles"], json!(["admin"]));
    assert!(claims.get("domains").is_none());
    let exp = claims["exp"].as_i64().context("no exp")?;
    assert!(
        (exp - (now()? + 600)).abs() <= 5,
        "exp {exp} is not now + 600 s"
    );
    verify_signature(&op, &token).await?;

    let token = op.token("a-admin", "a-secret", OTHER).await?;
    let (_, claims) = decode(&token)?;
    assert_eq!(claims["aud"], json!(OTHER));
    assert_eq!(claims["sub"], json!("a-admin"));
    assert_eq!(claims["roles"], json!("domain-admin"));
    assert_eq!(claims["domains"], json!(["a.example"]));
    let (iat, exp) = (claims["iat"].as_i64(), claims["exp"].as_i64());
    assert_eq!(exp.zip(iat).map(|(e, i)| e - i), Some(2), "ttl: {claims}");
    verify_signature(&op, &token).await?;
    Ok(())
}

#[tokio::test]
async fn a_wrong_secret_or_an_unknown_resource_is_refused() -> Result<()> {
    let op = OidcProvider::start(setup())?;
    let err = op
        .token("ops-admin", "not-the-secret", API)
        .await
        .err()
        .context("a wrong secret got a token")?;
    assert!(format!("{err:#}").contains("invalid_client"), "{err:#}");
    let err = op
        .token("nobody", "admin-secret", API)
        .await
        .err()
        .context("an unknown client got a token")?;
    assert!(format!("{err:#}").contains("invalid_client"), "{err:#}");
    let err = op
        .token("ops-admin", "admin-secret", "urn:unknown:api")
        .await
        .err()
        .context("an unknown resource got a token")?;
    assert!(format!("{err:#}").contains("invalid_target"), "{err:#}");
    Ok(())
}

/// The cookies a browser would keep (every path, no expiry: enough for one flow).
#[derive(Default)]
struct Jar(BTreeMap<String, String>);

impl Jar {
    fn take(&mut self, resp: &reqwest::Response) {
        for v in resp.headers().get_all(reqwest::header::SET_COOKIE) {
            let Some((name, value)) = v
                .to_str()
                .ok()
                .and_then(|c| c.split(';').next())
                .and_then(|c| c.split_once('='))
            else {
                continue;
            };
            if value.is_empty() {
                self.0.remove(name);
            } else {
                self.0.insert(name.to_string(), value.to_string());
            }
        }
    }

    fn header(&self) -> String {
        let pairs: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
        pairs.join("; ")
    }
}

/// The redirect's target, resolved against the issuer.
fn location(op: &OidcProvider, resp: &reqwest::Response) -> Result<String> {
    ensure!(
        resp.status().is_redirection(),
        "expected a redirect, got {}",
        resp.status()
    );
    let loc = resp
        .headers()
        .get(reqwest::header::LOCATION)
        .context("redirect without location")?
        .to_str()?;
    Ok(if loc.starts_with('/') {
        format!("{}{loc}", op.issuer())
    } else {
        loc.to_string()
    })
}

#[tokio::test]
async fn a_user_signs_in_through_the_code_flow_with_pkce() -> Result<()> {
    let op = OidcProvider::start(setup())?;
    let http = http()?;
    let verifier = URL_SAFE_NO_PAD.encode(Sha256::digest(format!("{:?}", SystemTime::now())));
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    let auth = |challenge: Option<&str>| {
        let mut q = vec![
            ("client_id", "portal"),
            ("response_type", "code"),
            ("redirect_uri", REDIRECT),
            ("scope", "openid email api"),
            ("resource", API),
            ("state", "state-1"),
        ];
        if let Some(c) = challenge {
            q.extend([("code_challenge", c), ("code_challenge_method", "S256")]);
        }
        let url = reqwest::Url::parse_with_params(&format!("{}/auth", op.issuer()), &q);
        let http = &http;
        async move { Ok::<_, anyhow::Error>(http.get(url?).send().await?) }
    };

    // Without PKCE the provider sends the browser back with an error.
    let resp = auth(None).await?;
    let back = location(&op, &resp)?;
    assert!(
        back.starts_with(REDIRECT) && back.contains("error=invalid_request"),
        "{back}"
    );

    let mut jar = Jar::default();
    let resp = auth(Some(&challenge)).await?;
    jar.take(&resp);
    let login = location(&op, &resp)?;
    assert!(login.contains("/interaction/"), "{login}");
    assert!(
        jar.0.contains_key("op_interaction"),
        "cookies: {:?}",
        jar.0.keys()
    );
    assert!(!jar.0.keys().any(|k| k.starts_with("_session")));

    let resp = http
        .get(&login)
        .header("cookie", jar.header())
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let page = resp.text().await?;
    assert!(page.contains("name=\"password\""), "{page}");

    let post = |password: &'static str| {
        http.post(format!("{login}/login"))
            .header("cookie", jar.header())
            .form(&[("username", "alice"), ("password", password)])
            .send()
    };
    let resp = post("wrong-password").await?;
    assert_eq!(resp.status(), 401);
    let resp = post("alice-password").await?;
    jar.take(&resp);
    let resume = location(&op, &resp)?;

    let resp = http
        .get(&resume)
        .header("cookie", jar.header())
        .send()
        .await?;
    jar.take(&resp);
    let back = reqwest::Url::parse(&location(&op, &resp)?)?;
    assert!(back.as_str().starts_with(REDIRECT), "{back}");
    let param = |name: &str| {
        back.query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    };
    assert_eq!(param("state").as_deref(), Some("state-1"));
    assert_eq!(param("iss"), Some(op.issuer()));
    let code = param("code").with_context(|| format!("no code in {back}"))?;
    assert!(
        jar.0.contains_key("op_session"),
        "cookies: {:?}",
        jar.0.keys()
    );

    let token = |verifier: String| {
        http.post(format!("{}/token", op.issuer()))
            .basic_auth("portal", Some("portal-secret"))
            .form(&[
                ("grant_type", "authorization_code".to_string()),
                ("code", code.clone()),
                ("redirect_uri", REDIRECT.to_string()),
                ("code_verifier", verifier),
            ])
            .send()
    };
    // A wrong verifier is refused (and the code is not consumed by it).
    let resp = token(URL_SAFE_NO_PAD.encode([7u8; 32])).await?;
    assert_eq!(resp.status(), 400);
    let resp = token(verifier).await?;
    ensure!(resp.status() == 200, "token: {}", resp.text().await?);
    let body: Value = resp.json().await?;
    let access = body["access_token"].as_str().context("no access_token")?;
    let (_, claims) = decode(access)?;
    assert_eq!(claims["iss"], json!(op.issuer()));
    assert_eq!(claims["aud"], json!(API));
    assert_eq!(claims["sub"], json!("alice"));
    assert_eq!(claims["roles"], json!(["auditor"]));
    verify_signature(&op, access).await?;
    let id_token = body["id_token"].as_str().context("no id_token")?;
    let (_, id) = decode(id_token)?;
    assert_eq!(id["sub"], json!("alice"));
    assert_eq!(id["aud"], json!("portal"));
    verify_signature(&op, id_token).await?;
    Ok(())
}
