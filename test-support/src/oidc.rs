//! A real OpenID Connect provider (npm `oidc-provider` on Node.js) on a free loopback port,
//! killed on drop: it issues the RS256 JWT access tokens the management API accepts.
//!
//! [`OidcProvider::start`] writes the [`OidcSetup`] as JSON into a temporary directory and
//! runs `node test-support/oidc/provider.mjs <port> <config.json>` with the npm packages of
//! `<workspace>/.tools/oidc/node_modules`, which `tools/oidc-tools` installs from
//! `test-support/oidc/package-lock.json` (`tools/test` runs it). The issuer is
//! `http://127.0.0.1:<port>`; its signing key is new on every start.
//!
//! - Client credentials: [`OidcProvider::token`] asks for a token for one resource indicator
//!   of [`OidcSetup::resource`]; the token is a JWT with that resource as `aud`, the client id
//!   as `sub`, the client's [`OidcClient::claim`]s and its [`OidcClient::ttl`].
//! - Authorization code with PKCE (S256, required): a client with
//!   [`OidcClient::redirect_uri`]s, and [`OidcUser`]s who sign in on the provider's form at
//!   `/interaction/<uid>` (fields `username`, `password`; posted to
//!   `/interaction/<uid>/login`). Consent is implied. Ask for `scope=openid api` and
//!   `resource=<indicator>` to get a JWT access token with the user's claims. The provider's
//!   cookies are `op_session`, `op_interaction` and `op_interaction_resume`.

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value, json};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// How long [`OidcProvider::start`] waits for the provider's `listening` line.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// What the provider knows: the resources tokens may be asked for, its clients and users.
#[derive(Debug, Clone, Default)]
pub struct OidcSetup {
    resources: Vec<String>,
    clients: Vec<OidcClient>,
    users: Vec<OidcUser>,
}

impl OidcSetup {
    pub fn new() -> Self {
        Self::default()
    }

    /// A resource indicator (an absolute URI such as `urn:fedrelay:api`) that clients may ask
    /// tokens for: the `aud` of those tokens.
    pub fn resource(mut self, indicator: &str) -> Self {
        self.resources.push(indicator.to_string());
        self
    }

    pub fn client(mut self, client: OidcClient) -> Self {
        self.clients.push(client);
        self
    }

    pub fn user(mut self, user: OidcUser) -> Self {
        self.users.push(user);
        self
    }

    /// The provider's config file (the format `provider.mjs` documents).
    pub fn to_json(&self) -> Value {
        json!({
            "resources": self.resources,
            "clients": self.clients.iter().map(OidcClient::to_json).collect::<Vec<_>>(),
            "users": self.users.iter().map(OidcUser::to_json).collect::<Vec<_>>(),
        })
    }
}

/// A confidential client (`client_secret_basic`) of the client credentials grant, and of
/// the authorization code flow once it has redirect URIs.
#[derive(Debug, Clone)]
pub struct OidcClient {
    client_id: String,
    client_secret: String,
    claims: Map<String, Value>,
    ttl: Option<u64>,
    redirect_uris: Vec<String>,
}

impl OidcClient {
    pub fn new(client_id: &str, client_secret: &str) -> Self {
        Self {
            client_id: client_id.to_string(),
            client_secret: client_secret.to_string(),
            claims: Map::new(),
            ttl: None,
            redirect_uris: Vec::new(),
        }
    }

    /// A claim of its access tokens, e.g. `roles` (`"admin"` or `["admin"]`) or `domains`.
    pub fn claim(mut self, name: &str, value: Value) -> Self {
        self.claims.insert(name.to_string(), value);
        self
    }

    /// The lifetime of its access tokens in seconds (600 by default).
    pub fn ttl(mut self, secs: u64) -> Self {
        self.ttl = Some(secs);
        self
    }

    /// A redirect URI of the code flow; makes it a web client.
    pub fn redirect_uri(mut self, uri: &str) -> Self {
        self.redirect_uris.push(uri.to_string());
        self
    }

    fn to_json(&self) -> Value {
        let mut v = json!({
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "claims": self.claims,
        });
        if let Some(ttl) = self.ttl {
            v["ttl"] = json!(ttl);
        }
        if !self.redirect_uris.is_empty() {
            v["redirect_uris"] = json!(self.redirect_uris);
        }
        v
    }
}

/// Someone who signs in on the code flow's login form; `sub` of their tokens is the
/// username.
#[derive(Debug, Clone)]
pub struct OidcUser {
    username: String,
    password: String,
    claims: Map<String, Value>,
}

impl OidcUser {
    pub fn new(username: &str, password: &str) -> Self {
        Self {
            username: username.to_string(),
            password: password.to_string(),
            claims: Map::new(),
        }
    }

    /// A claim of their access tokens (`roles`, `domains`), and of userinfo when standard
    /// (`name`, `email` by scope).
    pub fn claim(mut self, name: &str, value: Value) -> Self {
        self.claims.insert(name.to_string(), value);
        self
    }

    fn to_json(&self) -> Value {
        json!({
            "username": self.username,
            "password": self.password,
            "claims": self.claims,
        })
    }
}

/// The running provider.
pub struct OidcProvider {
    child: Option<Child>,
    port: u16,
    /// Everything it printed on stdout (notices; never tokens).
    stdout: Arc<Mutex<String>>,
    http: reqwest::Client,
    dir: tempfile::TempDir,
}

impl OidcProvider {
    /// Starts the provider on a free port and waits until it answers. Fails naming
    /// `tools/oidc-tools` when Node.js or the npm packages are missing.
    pub fn start(setup: OidcSetup) -> Result<Self> {
        let modules = node_modules()?;
        let dir = tempfile::Builder::new().prefix("oidc-").tempdir()?;
        let config = dir.path().join("config.json");
        std::fs::write(&config, serde_json::to_vec_pretty(&setup.to_json())?)?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .context("building the HTTP client")?;
        let mut provider = Self {
            child: None,
            port: 0,
            stdout: Arc::default(),
            http,
            dir,
        };
        // A free port can be taken by someone else before the provider binds it.
        let mut attempt = 0;
        loop {
            attempt += 1;
            provider.port = crate::free_port()?;
            match provider.spawn(&modules, &config) {
                Err(_) if attempt < 3 && provider.stderr().contains("cannot listen") => {}
                r => return r.map(|()| provider),
            }
        }
    }

    fn spawn(&mut self, modules: &Path, config: &Path) -> Result<()> {
        let stderr = std::fs::File::create(self.dir.path().join("stderr.log"))?;
        let mut child = Command::new("node")
            .arg(script())
            .arg(self.port.to_string())
            .arg(config)
            .env("OIDC_PROVIDER_NODE_MODULES", modules)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    anyhow::anyhow!(
                        "`node` not found: install Node.js 20 or newer, then run `tools/oidc-tools`"
                    )
                } else {
                    anyhow::Error::new(e).context("starting node for the OpenID Connect provider")
                }
            })?;
        let out = child.stdout.take().context("node's stdout")?;
        // The reader keeps draining stdout after the ready line, so the provider never
        // blocks on a full pipe.
        let (ready_tx, ready_rx) = mpsc::channel();
        let ready_line = format!("listening {}", self.port);
        let log = Arc::clone(&self.stdout);
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if line == ready_line {
                    let _ = ready_tx.send(());
                }
                let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
                log.push_str(&line);
                log.push('\n');
            }
        });
        self.child = Some(child);
        match ready_rx.recv_timeout(START_TIMEOUT) {
            Ok(()) => Ok(()),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = self.child.take().map(|mut c| c.wait()).transpose()?;
                bail!(
                    "the OpenID Connect provider exited ({}) before listening: {}{}",
                    status.map(|s| s.to_string()).unwrap_or_default(),
                    self.stderr(),
                    self.stdout()
                )
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.kill();
                bail!(
                    "the OpenID Connect provider did not listen within {START_TIMEOUT:?}: {}{}",
                    self.stderr(),
                    self.stdout()
                )
            }
        }
    }

    /// `http://127.0.0.1:<port>`, the `iss` of its tokens.
    pub fn issuer(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `<issuer>/.well-known/openid-configuration`.
    pub fn discovery_url(&self) -> String {
        format!("{}/.well-known/openid-configuration", self.issuer())
    }

    /// `<issuer>/jwks`, the discovery document's `jwks_uri`.
    pub fn jwks_url(&self) -> String {
        format!("{}/jwks", self.issuer())
    }

    /// An access token (a compact JWT) for `resource` by the client credentials grant, the
    /// client authenticated with HTTP Basic. Fails with the provider's error
    /// (`invalid_client`, `invalid_target`) when it refuses.
    pub async fn token(
        &self,
        client_id: &str,
        client_secret: &str,
        resource: &str,
    ) -> Result<String> {
        let resp = self
            .http
            .post(format!("{}/token", self.issuer()))
            .basic_auth(form_encode(client_id), Some(form_encode(client_secret)))
            .form(&[("grant_type", "client_credentials"), ("resource", resource)])
            .send()
            .await
            .context("token request")?;
        let status = resp.status();
        let body: Value = resp.json().await.context("token response")?;
        if !status.is_success() {
            bail!(
                "the provider refused a token for {client_id} ({status}): {} {}",
                body["error"].as_str().unwrap_or("?"),
                body["error_description"].as_str().unwrap_or("")
            );
        }
        body["access_token"]
            .as_str()
            .map(str::to_string)
            .context("token response without access_token")
    }

    /// What the provider printed on stdout so far (start-up notices).
    pub fn stdout(&self) -> String {
        self.stdout
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// What the provider printed on stderr so far (warnings, errors).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The client id and secret as HTTP Basic credentials of OAuth 2.0 (RFC 6749 §2.3.1: each
/// `application/x-www-form-urlencoded` first).
fn form_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(char::from(b));
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn workspace_root() -> Result<&'static Path> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("test-support has no parent directory")
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("oidc/provider.mjs")
}

/// `<workspace>/.tools/oidc/node_modules`, installed from the committed lock file.
fn node_modules() -> Result<PathBuf> {
    let root = workspace_root()?;
    let installed = root.join(".tools/oidc");
    let modules = installed.join("node_modules");
    if !modules.join("oidc-provider").is_dir() {
        bail!(
            "{} has no oidc-provider: run `tools/oidc-tools` (needs Node.js 20 or newer with \
             npm; `tools/test` runs it)",
            modules.display()
        );
    }
    let committed =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("oidc/package-lock.json"))
            .context("reading test-support/oidc/package-lock.json")?;
    if std::fs::read(installed.join("package-lock.json")).ok() != Some(committed) {
        bail!(
            "{} was installed from another package-lock.json: run `tools/oidc-tools` again",
            installed.display()
        );
    }
    Ok(modules)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_form_encoded() {
        assert_eq!(form_encode("ops-admin"), "ops-admin");
        assert_eq!(form_encode("a b:c/é"), "a+b%3Ac%2F%C3%A9");
    }

    #[test]
    fn setup_json_has_what_provider_mjs_reads() {
        let setup = OidcSetup::new()
            .resource("urn:fedrelay:api")
            .client(
                OidcClient::new("c", "s")
                    .claim("roles", json!(["admin"]))
                    .ttl(2),
            )
            .client(OidcClient::new("web", "s").redirect_uri("http://127.0.0.1:1/cb"))
            .user(OidcUser::new("alice", "pw").claim("roles", json!("auditor")));
        let v = setup.to_json();
        assert_eq!(v["resources"], json!(["urn:fedrelay:api"]));
        assert_eq!(v["clients"][0]["claims"]["roles"], json!(["admin"]));
        assert_eq!(v["clients"][0]["ttl"], json!(2));
        assert!(v["clients"][0].get("redirect_uris").is_none());
        assert_eq!(
            v["clients"][1]["redirect_uris"],
            json!(["http://127.0.0.1:1/cb"])
        );
        assert_eq!(v["users"][0]["username"], json!("alice"));
        assert_eq!(v["users"][0]["claims"]["roles"], json!("auditor"));
    }
}
