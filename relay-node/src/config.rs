//! The node's configuration: a TOML file, strict (an unknown key is an error), with
//! environment overrides.
//!
//! Any value can be overridden by `FEDRELAY_<PATH>`, the path's parts joined by `__`, e.g.
//! `FEDRELAY_STORE__REDIS_URL=redis://redis:6379` or `FEDRELAY_HTTP__LISTEN=0.0.0.0:8443`.
//! Values are read as TOML where they parse (numbers, booleans) and as strings otherwise.
//! Secrets are best given as files (`secret_file`), which the Helm chart mounts.

use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Parse(String),
    #[error("invalid config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Stable id of this node; defaults to the host name (a StatefulSet pod's name).
    #[serde(default)]
    pub node_id: Option<String>,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    /// The management API (`/api/v1/`): policy, explain, approvals, log, usage, audit.
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub session: SessionTuning,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub metadata: MetadataConfig,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    #[serde(default)]
    pub cluster: ClusterConfig,
    /// The Teams edge (the bot); needed when a domain has `platform = "teams"`.
    #[serde(default)]
    pub teams: Option<TeamsConfig>,
    /// The XMPP server-to-server edge; needed when a domain has `platform = "xmpp"`.
    #[serde(default)]
    pub xmpp: Option<XmppConfig>,
    /// The SIP/SIMPLE edge; needed when a domain has `platform = "sip"`.
    #[serde(default)]
    pub sip: Option<SipConfig>,
    #[serde(default)]
    pub domains: Vec<DomainConfig>,
    #[serde(default)]
    pub federation: Vec<FederationRule>,
}

/// The HTTP edge's listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// PEM certificate chain and key; with them the edge speaks HTTPS only.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Plain HTTP on a non-loopback address (behind a TLS-terminating ingress). Off by default:
    /// without TLS material the edge then refuses to start.
    pub allow_plaintext: bool,
    /// Largest request body accepted; larger gets 413.
    pub max_body_bytes: usize,
    /// Events kept per domain for streaming receivers to resume from.
    pub stream_retention: usize,
    /// Allowed clock difference for signed requests.
    pub signature_window_secs: u64,
    /// Timeout of one webhook POST.
    pub webhook_timeout_ms: u64,
    /// Events per webhook POST at most.
    pub webhook_batch: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            tls_cert: None,
            tls_key: None,
            allow_plaintext: false,
            max_body_bytes: 64 * 1024,
            stream_retention: 100_000,
            signature_window_secs: 300,
            webhook_timeout_ms: 10_000,
            webhook_batch: 256,
        }
    }
}

/// Health, readiness and metrics.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
        }
    }
}

/// The management API's listener and how it authenticates.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Where it listens; no management API without it.
    pub listen: Option<SocketAddr>,
    /// PEM certificate chain and key; with them the API speaks HTTPS only.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Plain HTTP on a non-loopback address (behind a TLS-terminating proxy). Off by default.
    pub allow_plaintext: bool,
    /// A file holding a break-glass `admin` token (at least 32 characters), accepted as
    /// `Authorization: Bearer <token>` besides the tokens the API issues.
    pub bootstrap_token_file: Option<PathBuf>,
    /// Bearer tokens from the enterprise's OpenID Connect provider.
    pub oidc: Option<OidcConfig>,
}

/// An OpenID Connect provider whose access tokens (JWT, RS256) the API accepts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// The `iss` of its tokens; its keys are found through
    /// `<issuer>/.well-known/openid-configuration` unless `jwks_url` is given.
    pub issuer: String,
    /// The `aud` the tokens must carry.
    pub audience: String,
    pub jwks_url: Option<String>,
    /// The claim holding the roles (`admin`, `auditor`, `domain-admin`), a string or a list.
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
    /// The claim listing a `domain-admin`'s internal domains.
    #[serde(default = "default_domains_claim")]
    pub domains_claim: String,
    /// A CA (PEM) to trust for the provider's HTTPS instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Clock difference allowed on `exp` and `nbf`.
    #[serde(default = "default_oidc_skew")]
    pub clock_skew_secs: u64,
    /// Signing in to the management portal through this provider.
    pub portal: Option<PortalLoginConfig>,
}

/// The management portal's client at the OpenID Connect provider: the authorization code
/// flow with PKCE, asking for an access token for `audience` (as a resource indicator).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortalLoginConfig {
    pub client_id: String,
    /// A file holding the client secret (`client_secret_basic`); a public client without it.
    pub client_secret_file: Option<PathBuf>,
    /// Where the provider sends the browser back: `https://<the portal's host>/portal/callback`,
    /// registered at the provider.
    pub redirect_url: String,
    /// Scopes asked for besides `openid`.
    #[serde(default = "default_portal_scopes")]
    pub scopes: String,
    /// The resource indicator (RFC 8707) asked for: `api.oidc.audience` when absent; `""` sends
    /// none, for providers that name the API in a scope instead (Microsoft Entra ID:
    /// `scopes = "api://<application id>/<scope>"`).
    pub resource: Option<String>,
    /// Sessions end after this long even if the access token lives longer.
    #[serde(default = "default_portal_session_secs")]
    pub session_secs: u64,
}

fn default_portal_scopes() -> String {
    "profile email".into()
}

fn default_portal_session_secs() -> u64 {
    8 * 3600
}

fn default_oidc_skew() -> u64 {
    60
}

fn default_roles_claim() -> String {
    "roles".into()
}

fn default_domains_claim() -> String {
    "domains".into()
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    Redis,
    Memory,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    pub backend: StoreBackend,
    /// `redis://host:port`, or `rediss://host:port` for TLS.
    pub redis_url: String,
    pub key_prefix: String,
    pub response_timeout_ms: u64,
    /// With `rediss://`: a CA (PEM) to trust instead of the system's roots, and a client
    /// certificate and key for a Redis that requires one (`tls-auth-clients`).
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: StoreBackend::Redis,
            redis_url: "redis://127.0.0.1:6379".into(),
            key_prefix: "fr".into(),
            response_timeout_ms: 2_000,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// Session tunables (see `session_actor::SessionConfig`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionTuning {
    pub hibernate_after_secs: u64,
    pub delivery_batch: usize,
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    pub max_attempts: u32,
    pub ack_flush_ms: u64,
    pub max_backlog: usize,
}

impl Default for SessionTuning {
    fn default() -> Self {
        let d = session_actor::SessionConfig::default();
        Self {
            hibernate_after_secs: d.hibernate_after.as_secs(),
            delivery_batch: d.max_batch,
            retry_base_ms: d.retry_base.as_millis() as u64,
            retry_max_ms: d.retry_max.as_millis() as u64,
            max_attempts: d.max_attempts,
            ack_flush_ms: d.ack_flush_interval.as_millis() as u64,
            max_backlog: d.max_backlog,
        }
    }
}

impl SessionTuning {
    pub fn to_session_config(&self) -> session_actor::SessionConfig {
        session_actor::SessionConfig {
            hibernate_after: Duration::from_secs(self.hibernate_after_secs),
            max_batch: self.delivery_batch,
            retry_base: Duration::from_millis(self.retry_base_ms),
            retry_max: Duration::from_millis(self.retry_max_ms),
            max_attempts: self.max_attempts,
            ack_flush_interval: Duration::from_millis(self.ack_flush_ms),
            max_backlog: self.max_backlog,
            ..session_actor::SessionConfig::default()
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    pub log_format: LogFormat,
    /// A `tracing` filter: `info`, `warn,relay_node=debug`, ... (`RUST_LOG` wins when set).
    pub log_level: String,
    /// OTLP/gRPC endpoint (`http://collector:4317`); spans are exported when set.
    pub otlp_endpoint: Option<String>,
    pub service_name: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Json,
            log_level: "info".into(),
            otlp_endpoint: None,
            service_name: "fedrelay".into(),
        }
    }
}

/// The metadata log (content-free, one entry per message).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetadataConfig {
    /// Days the log (and the usage counters) are kept, in Redis and in the archive.
    pub retention_days: u32,
    /// Entries kept by the in-memory log of `--dev`.
    pub memory_capacity: usize,
    /// With an archive: days a day's log stays in Redis before it is moved to the archive.
    pub redis_window_days: u32,
    /// Where older days go, as one NDJSON object per day: `file:///var/lib/fedrelay/meta`,
    /// `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix` (credentials from
    /// the environment: `AWS_*`, `GOOGLE_*`, `AZURE_*`). Without one, Redis keeps the whole
    /// retention.
    pub archive_url: Option<String>,
    /// How often a node looks for days to archive and for days past the retention.
    pub maintenance_interval_secs: u64,
}

impl Default for MetadataConfig {
    fn default() -> Self {
        Self {
            retention_days: 400,
            memory_capacity: 100_000,
            redis_window_days: 7,
            archive_url: None,
            maintenance_interval_secs: 600,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// On SIGTERM, how long to finish in-flight requests and deliveries before exiting.
    pub drain_timeout_secs: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            drain_timeout_secs: 20,
        }
    }
}

/// The async runtime.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Worker threads; 0 means one per CPU core. On a machine shared with Redis or other
    /// busy processes, fewer workers than cores means fewer cross-thread wake-ups.
    pub worker_threads: usize,
}

#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    Http,
    Teams,
    /// A remote XMPP server's domain, reached over server-to-server federation.
    Xmpp,
    /// A remote SIP/SIMPLE domain (Skype for Business, Lync, Cisco…).
    Sip,
}

impl Platform {
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Http => "http",
            Platform::Teams => "teams",
            Platform::Xmpp => "xmpp",
            Platform::Sip => "sip",
        }
    }

    /// How people are shown the platform.
    pub fn label(self) -> &'static str {
        match self {
            Platform::Http => "HTTP",
            Platform::Teams => "Teams",
            Platform::Xmpp => "XMPP",
            Platform::Sip => "SIP",
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    /// The domain pulls events from `GET /v1/stream`.
    Stream,
    /// The relay POSTs events to `webhook_url`.
    Webhook,
}

/// A domain the relay serves, bound to one edge.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainConfig {
    pub name: String,
    pub platform: Platform,
    /// Shared secret for request and webhook signatures (at least 16 bytes).
    pub secret: Option<String>,
    /// File holding the secret (trailing newline ignored).
    pub secret_file: Option<PathBuf>,
    #[serde(default = "default_delivery")]
    pub delivery: Delivery,
    pub webhook_url: Option<String>,
    /// Teams domains: the Microsoft Entra tenant whose users this domain's addresses name.
    pub tenant_id: Option<String>,
    /// Whose users these are, for the federation policy: `internal` (the enterprise's own)
    /// or `external` (a partner's). Default: external for XMPP and SIP, internal otherwise.
    #[serde(default)]
    pub side: Option<crate::control::policy::model::Side>,
}

fn default_delivery() -> Delivery {
    Delivery::Stream
}

/// How a remote XMPP server must prove its domain on server-to-server streams.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum XmppAuth {
    /// A certificate valid for the domain (SASL EXTERNAL, XEP-0178) or, failing that,
    /// Server Dialback (XEP-0220).
    #[default]
    Any,
    /// Only a certificate valid for the domain.
    External,
    /// Server Dialback, even when the certificate would do.
    Dialback,
}

/// One remote XMPP domain's peering: where to connect instead of DNS, how it authenticates.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XmppPeer {
    pub domain: String,
    /// `host:port` to connect to, instead of the `_xmpp-server._tcp` SRV lookup.
    pub address: Option<String>,
    #[serde(default)]
    pub auth: XmppAuth,
}

/// Checks a federation edge's peer list: each peer once, each a declared domain of the
/// edge's platform, each `address` a `host:port`.
fn check_peers(
    peers: &[(&str, Option<&str>)],
    domains: &[DomainConfig],
    platform: Platform,
) -> Result<(), String> {
    let mut seen = HashSet::new();
    for (domain, address) in peers {
        let name = domain.to_ascii_lowercase();
        if !seen.insert(name.clone()) {
            return Err(format!("peer `{domain}` is listed twice"));
        }
        if !domains
            .iter()
            .any(|d| d.platform == platform && d.name.eq_ignore_ascii_case(&name))
        {
            return Err(format!(
                "peer `{domain}` is not a declared domain with platform = \"{}\"",
                platform.as_str()
            ));
        }
        if let Some(a) = address
            && a.rsplit_once(':')
                .is_none_or(|(h, port)| h.is_empty() || port.parse::<u16>().is_err())
        {
            return Err(format!("peer `{domain}`: address `{a}` must be host:port"));
        }
    }
    Ok(())
}

/// A SIP transport.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "lowercase")]
pub enum SipTransport {
    Udp,
    Tcp,
    /// TLS over TCP, with certificates checked both ways (RFC 5922).
    #[default]
    Tls,
}

impl SipTransport {
    /// `UDP`, `TCP`, `TLS`, as in a Via header.
    pub fn via_name(self) -> &'static str {
        match self {
            SipTransport::Udp => "UDP",
            SipTransport::Tcp => "TCP",
            SipTransport::Tls => "TLS",
        }
    }
}

/// How instant messages are carried to a SIP domain.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SipImMode {
    /// Each message is a `MESSAGE` request outside any dialog (RFC 3428).
    #[default]
    Page,
    /// An `INVITE` for an IM session first, then `MESSAGE` requests inside its dialog, as
    /// Skype for Business and Lync expect.
    Session,
}

/// One remote SIP domain's peering.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SipPeer {
    pub domain: String,
    /// `host:port` to send to, instead of the NAPTR/SRV lookup.
    pub address: Option<String>,
    /// The transport to reach it over (and the only one it may send over, unless `sources`
    /// lets it use UDP/TCP from known addresses).
    #[serde(default)]
    pub transport: SipTransport,
    /// Addresses (IPs or CIDR blocks) allowed to send for this domain over UDP or TCP, where
    /// no certificate proves the domain. Without them, only TLS with a certificate valid for
    /// the domain is believed, or the IP of `address` when the transport is UDP or TCP.
    #[serde(default)]
    pub sources: Vec<String>,
    /// Credentials for the peer's digest challenges (401/407).
    pub username: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    /// Answer MD5 challenges (RFC 8760 prefers SHA-256; MD5 only for old peers).
    #[serde(default)]
    pub allow_md5: bool,
    #[serde(default)]
    pub im_mode: SipImMode,
}

impl SipPeer {
    /// The digest password, from the config or its file.
    pub fn password(&self) -> Result<Option<String>, ConfigError> {
        match (&self.password, &self.password_file) {
            (Some(s), _) => Ok(Some(s.clone())),
            (None, Some(p)) => {
                let raw = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.clone(),
                    source,
                })?;
                Ok(Some(raw.trim_end_matches(['\r', '\n']).to_string()))
            }
            (None, None) => Ok(None),
        }
    }
}

/// The SIP/SIMPLE edge (RFC 3261, 3428, 3856, 3863, 3994).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SipConfig {
    /// Where peers send over UDP, TCP and TLS; a transport without an address is off.
    pub udp: Option<SocketAddr>,
    pub tcp: Option<SocketAddr>,
    pub tls: Option<SocketAddr>,
    /// The host the relay names in Via and Contact headers (its public name); the address
    /// of the listener when unset.
    pub host: Option<String>,
    /// The certificate (PEM chain) for the relay's domains, presented to peers connecting
    /// over TLS and as client certificate when the relay connects.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM) trusted for peers' certificates; the system's roots if unset.
    pub tls_ca: Option<PathBuf>,
    #[serde(default)]
    pub peers: Vec<SipPeer>,
    /// The largest message accepted, in bytes.
    #[serde(default = "default_sip_max")]
    pub max_message_bytes: usize,
    /// Requests per second each source IP may send, and the burst above it; over the rate a
    /// request gets 503 with Retry-After.
    #[serde(default = "default_sip_rate")]
    pub rate_per_source: u32,
    #[serde(default = "default_sip_burst")]
    pub burst_per_source: u32,
    /// RFC 3261's T1 (the round-trip estimate behind retransmissions and timeouts), in ms.
    #[serde(default = "default_sip_t1")]
    pub t1_ms: u64,
    /// The longest presence subscription granted, in seconds.
    #[serde(default = "default_sip_expires")]
    pub max_subscription_secs: u32,
    /// Connecting to a peer over TCP or TLS, handshake included.
    #[serde(default = "default_xmpp_connect")]
    pub connect_timeout_secs: u64,
    /// A DNS server (`ip:port`) for NAPTR/SRV lookups instead of the system's.
    pub dns_server: Option<SocketAddr>,
}

fn default_sip_max() -> usize {
    65_535
}
fn default_sip_rate() -> u32 {
    2_000
}
fn default_sip_burst() -> u32 {
    4_000
}
fn default_sip_t1() -> u64 {
    500
}
fn default_sip_expires() -> u32 {
    3_600
}

impl SipConfig {
    /// The peering of `domain`, if listed.
    pub fn peer(&self, domain: &str) -> Option<&SipPeer> {
        self.peers
            .iter()
            .find(|p| p.domain.eq_ignore_ascii_case(domain))
    }

    fn validate(&self, domains: &[DomainConfig]) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(format!("sip: {m}")));
        if self.udp.is_none() && self.tcp.is_none() && self.tls.is_none() {
            return bad("set at least one of `udp`, `tcp` and `tls`".into());
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return bad("give both `tls_cert` and `tls_key`, or neither".into());
        }
        let uses_tls =
            self.tls.is_some() || self.peers.iter().any(|p| p.transport == SipTransport::Tls);
        if uses_tls && self.tls_cert.is_none() {
            return bad(
                "TLS (a `tls` listener or a peer on TLS) needs `tls_cert` and `tls_key`".into(),
            );
        }
        if self.max_message_bytes < 1_500 || self.t1_ms == 0 || self.max_subscription_secs < 60 {
            return bad("`max_message_bytes` must be at least 1500, `t1_ms` positive and `max_subscription_secs` at least 60".into());
        }
        if self.rate_per_source == 0 || self.burst_per_source == 0 || self.connect_timeout_secs == 0
        {
            return bad("rates, bursts and timeouts must be positive".into());
        }
        let peers: Vec<_> = self
            .peers
            .iter()
            .map(|p| (p.domain.as_str(), p.address.as_deref()))
            .collect();
        check_peers(&peers, domains, Platform::Sip)
            .map_err(|m| ConfigError::Invalid(format!("sip: {m}")))?;
        for p in &self.peers {
            if p.password.is_some() && p.password_file.is_some() {
                return bad(format!(
                    "peer `{}`: give `password` or `password_file`, not both",
                    p.domain
                ));
            }
            if (p.password.is_some() || p.password_file.is_some()) != p.username.is_some() {
                return bad(format!(
                    "peer `{}`: digest credentials need both `username` and a password",
                    p.domain
                ));
            }
            for s in &p.sources {
                if crate::edges::sip::net::IpNet::parse(s).is_none() {
                    return bad(format!(
                        "peer `{}`: source `{s}` is not an IP address or CIDR block",
                        p.domain
                    ));
                }
            }
            let needs = match p.transport {
                SipTransport::Udp => self.udp.is_none(),
                SipTransport::Tcp => self.tcp.is_none(),
                SipTransport::Tls => self.tls.is_none(),
            };
            if needs {
                return bad(format!(
                    "peer `{}` uses {}, but the relay has no listener for it",
                    p.domain,
                    p.transport.via_name()
                ));
            }
        }
        Ok(())
    }
}

/// The XMPP edge: server-to-server federation (RFC 6120/6121) for the relay's domains.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XmppConfig {
    /// Where remote servers connect (5269 is the standard port).
    #[serde(default = "default_xmpp_listen")]
    pub listen: SocketAddr,
    /// The certificate (chain, PEM) presented for the relay's domains: its SANs must cover
    /// every domain XMPP peers reach here, and it is also the client certificate used for
    /// SASL EXTERNAL on outgoing streams.
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// CA certificates (PEM) trusted for peers' certificates; the system's roots if unset.
    pub tls_ca: Option<PathBuf>,
    /// STARTTLS required on every stream (RFC 7590). Only tests of the refusal turn it off.
    #[serde(default = "default_true")]
    pub require_tls: bool,
    /// How peers not listed in `peers` authenticate.
    #[serde(default)]
    pub default_auth: XmppAuth,
    #[serde(default)]
    pub peers: Vec<XmppPeer>,
    /// The secret behind dialback keys (XEP-0185); every node of a cluster needs the same.
    /// A random one per process is used when unset, which suits a single node only.
    pub dialback_secret: Option<String>,
    pub dialback_secret_file: Option<PathBuf>,
    /// The largest stanza accepted, in bytes (Prosody's s2s default).
    #[serde(default = "default_xmpp_stanza")]
    pub max_stanza_bytes: usize,
    /// The deepest element nesting accepted inside a stanza.
    #[serde(default = "default_xmpp_depth")]
    pub max_depth: usize,
    /// Time for a new stream to become authenticated.
    #[serde(default = "default_xmpp_handshake")]
    pub handshake_timeout_secs: u64,
    /// An incoming stream that sends nothing (not even a keepalive) this long is closed.
    #[serde(default = "default_xmpp_idle")]
    pub idle_timeout_secs: u64,
    /// Connecting to a peer, TLS included.
    #[serde(default = "default_xmpp_connect")]
    pub connect_timeout_secs: u64,
    /// How long a stanza sent on an outgoing stream may wait for the peer's acknowledgement
    /// (XEP-0198) before the delivery is retried.
    #[serde(default = "default_xmpp_ack")]
    pub ack_timeout_secs: u64,
    /// A DNS server (`ip:port`) for SRV lookups instead of the system's.
    pub dns_server: Option<SocketAddr>,
}

fn default_true() -> bool {
    true
}
fn default_xmpp_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 5269))
}
fn default_xmpp_stanza() -> usize {
    524_288
}
fn default_xmpp_depth() -> usize {
    32
}
fn default_xmpp_handshake() -> u64 {
    30
}
fn default_xmpp_idle() -> u64 {
    600
}
fn default_xmpp_connect() -> u64 {
    10
}
fn default_xmpp_ack() -> u64 {
    30
}

impl XmppConfig {
    /// How `domain` must authenticate.
    pub fn auth_for(&self, domain: &str) -> XmppAuth {
        self.peers
            .iter()
            .find(|p| p.domain.eq_ignore_ascii_case(domain))
            .map(|p| p.auth)
            .unwrap_or(self.default_auth)
    }

    /// The dialback secret, from the config or its file, if one is set.
    pub fn dialback_secret(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        match (&self.dialback_secret, &self.dialback_secret_file) {
            (Some(s), _) => Ok(Some(s.clone().into_bytes())),
            (None, Some(p)) => {
                let raw = std::fs::read(p).map_err(|source| ConfigError::Read {
                    path: p.clone(),
                    source,
                })?;
                Ok(Some(raw.trim_ascii_end().to_vec()))
            }
            (None, None) => Ok(None),
        }
    }

    fn validate(&self, domains: &[DomainConfig]) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(format!("xmpp: {m}")));
        if self.dialback_secret.is_some() && self.dialback_secret_file.is_some() {
            return bad("give `dialback_secret` or `dialback_secret_file`, not both".into());
        }
        if self.dialback_secret.as_ref().is_some_and(|s| s.len() < 16) {
            return bad("`dialback_secret` must be at least 16 bytes".into());
        }
        if self.max_stanza_bytes < 10_000 || self.max_depth < 4 {
            return bad(
                "`max_stanza_bytes` must be at least 10000 and `max_depth` at least 4".into(),
            );
        }
        if self.handshake_timeout_secs == 0
            || self.idle_timeout_secs == 0
            || self.connect_timeout_secs == 0
            || self.ack_timeout_secs == 0
        {
            return bad("timeouts must be positive".into());
        }
        let peers: Vec<_> = self
            .peers
            .iter()
            .map(|p| (p.domain.as_str(), p.address.as_deref()))
            .collect();
        check_peers(&peers, domains, Platform::Xmpp)
            .map_err(|m| ConfigError::Invalid(format!("xmpp: {m}")))
    }
}

/// The Teams edge: the bot's registration, where Microsoft's keys and tokens come from, and
/// where the relay may call the Bot Connector.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeamsConfig {
    /// The bot's Microsoft App ID: the audience of inbound tokens and the client id of
    /// outbound ones.
    pub app_id: String,
    /// The bot's client secret, or (better) a file holding it.
    pub app_password: Option<String>,
    pub app_password_file: Option<PathBuf>,
    /// The tenant the bot is registered in (single-tenant bots, as new bots must be).
    pub app_tenant_id: String,
    /// Bot Connector OpenID metadata (public cloud by default).
    #[serde(default = "default_openid_metadata_url")]
    pub openid_metadata_url: String,
    /// Issuer of the Bot Connector's tokens.
    #[serde(default = "default_bot_issuer")]
    pub issuer: String,
    /// OAuth2 token endpoint; default
    /// `https://login.microsoftonline.com/<app_tenant_id>/oauth2/v2.0/token`.
    #[serde(default)]
    pub token_url: Option<String>,
    #[serde(default = "default_bot_scope")]
    pub token_scope: String,
    /// The relay calls a conversation's `serviceUrl` only when it starts with one of these
    /// (and only the latest one an authenticated activity of that conversation carried).
    #[serde(default = "default_service_url_prefixes")]
    pub service_url_prefixes: Vec<String>,
    /// Allowed clock difference for inbound tokens.
    #[serde(default = "default_clock_skew")]
    pub clock_skew_secs: u64,
    /// Refresh the signing keys this often, and on an unknown key id at most once per
    /// `jwks_min_refetch_secs`.
    #[serde(default = "default_jwks_refresh")]
    pub jwks_refresh_secs: u64,
    #[serde(default = "default_jwks_min_refetch")]
    pub jwks_min_refetch_secs: u64,
    /// Largest activity accepted.
    #[serde(default = "default_teams_body")]
    pub max_body_bytes: usize,
    /// Timeout of one Bot Connector or token call.
    #[serde(default = "default_teams_timeout")]
    pub request_timeout_ms: u64,
    /// The bot's name as Teams users see it (in help texts).
    #[serde(default = "default_bot_name")]
    pub bot_name: String,
}

fn default_openid_metadata_url() -> String {
    "https://login.botframework.com/v1/.well-known/openidconfiguration".into()
}
fn default_bot_issuer() -> String {
    "https://api.botframework.com".into()
}
fn default_bot_scope() -> String {
    "https://api.botframework.com/.default".into()
}
fn default_service_url_prefixes() -> Vec<String> {
    vec![
        "https://smba.trafficmanager.net/".into(),
        "https://smba.infra.gcc.teams.microsoft.com/".into(),
        "https://smba.infra.gov.teams.microsoft.us/".into(),
        "https://smba.infra.dod.teams.microsoft.us/".into(),
    ]
}
fn default_clock_skew() -> u64 {
    300
}
fn default_jwks_refresh() -> u64 {
    86_400
}
fn default_jwks_min_refetch() -> u64 {
    300
}
fn default_teams_body() -> usize {
    256 * 1024
}
fn default_teams_timeout() -> u64 {
    10_000
}
fn default_bot_name() -> String {
    "fedrelay".into()
}

impl TeamsConfig {
    pub fn token_url(&self) -> String {
        self.token_url.clone().unwrap_or_else(|| {
            format!(
                "https://login.microsoftonline.com/{}/oauth2/v2.0/token",
                self.app_tenant_id
            )
        })
    }

    /// The client secret, from the config or its file.
    pub fn password(&self) -> Result<String, ConfigError> {
        match (&self.app_password, &self.app_password_file) {
            (Some(p), _) => Ok(p.clone()),
            (None, Some(path)) => {
                let raw = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                Ok(raw.trim_end().to_string())
            }
            (None, None) => Err(ConfigError::Invalid(
                "teams: `app_password` or `app_password_file` is required".into(),
            )),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(format!("teams: {m}")));
        if self.app_id.trim().is_empty() || self.app_tenant_id.trim().is_empty() {
            return bad("`app_id` and `app_tenant_id` are required".into());
        }
        if self.app_password.is_some() == self.app_password_file.is_some() {
            return bad("give `app_password` or `app_password_file` (one of them)".into());
        }
        for (name, url) in [
            ("openid_metadata_url", self.openid_metadata_url.as_str()),
            ("token_url", self.token_url().as_str()),
        ] {
            if !https_or_loopback(url) {
                return bad(format!(
                    "`{name}` must be https://, or http:// to a loopback address"
                ));
            }
        }
        if self.service_url_prefixes.is_empty() {
            return bad("`service_url_prefixes` must not be empty".into());
        }
        for p in &self.service_url_prefixes {
            if !https_or_loopback(p) || !p.ends_with('/') {
                return bad(format!(
                    "service URL prefix `{p}` must be https:// (or http:// to a loopback address) and end with `/`"
                ));
            }
        }
        // The token checks can be tuned, not switched off.
        if self.clock_skew_secs > 600 {
            return bad("`clock_skew_secs` is at most 600".into());
        }
        if self.jwks_min_refetch_secs < 30 || !(300..=7 * 86_400).contains(&self.jwks_refresh_secs)
        {
            return bad(
                "`jwks_min_refetch_secs` is at least 30 and `jwks_refresh_secs` 300 to 604800"
                    .into(),
            );
        }
        if self.max_body_bytes == 0 || self.request_timeout_ms == 0 {
            return bad("sizes and timeouts must be positive".into());
        }
        Ok(())
    }
}

/// Two domains whose users may talk to each other (both directions).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationRule {
    pub between: [String; 2],
}

/// How this node finds the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MembershipKind {
    /// This node alone (`--dev`, single-node deployments).
    Static,
    /// Registered in etcd with a lease; the member set is watched.
    Etcd,
}

/// The cluster: membership, the gRPC listener for peers, and the links to them.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    pub membership: MembershipKind,
    /// Cluster name: the etcd key prefix is `/fedrelay/<name>/`.
    pub name: String,
    /// `http://` or, with TLS, `https://` URLs (all the same scheme).
    pub etcd_endpoints: Vec<String>,
    /// For `https://` endpoints: the CA (PEM) that signed etcd's certificate, and this node's
    /// certificate and key when etcd checks client certificates (`--client-cert-auth`).
    pub etcd_tls_ca: Option<PathBuf>,
    pub etcd_tls_cert: Option<PathBuf>,
    pub etcd_tls_key: Option<PathBuf>,
    /// A node that stops renewing its lease (dead, paused, cut off) drops out after this.
    pub lease_ttl_secs: u64,
    /// Where peers' gRPC (sessions, presence, status) is served.
    pub grpc_listen: Option<SocketAddr>,
    /// The address registered for peers to dial (a pod's DNS name); default `grpc_listen`.
    pub grpc_advertise: Option<String>,
    /// mTLS between nodes: this node's certificate and key, and the CA that signed every
    /// node's certificate. All three, or none.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    /// The name peers' certificates are checked against; default the host of their address.
    pub tls_server_name: Option<String>,
    /// Serve peers without TLS on a non-loopback address (a network only the cluster's
    /// nodes can reach, e.g. behind a NetworkPolicy). Off: such a config is refused.
    pub allow_plaintext: bool,
    /// How long a forwarded envelope may wait for the owner's ack before the origin gets a
    /// retryable error.
    pub forward_timeout_ms: u64,
    /// Envelopes per batch on a peer stream. A batch is whatever gathered while the stream
    /// was busy sending the previous one; `flush_delay_us` > 0 also lets a partial batch wait
    /// that long to fill (fewer, fuller batches at low rates, for latency).
    pub max_batch: usize,
    pub flush_delay_us: u64,
    /// Envelopes queued per peer before senders get a retryable error.
    pub peer_queue: usize,
    /// Besides on every membership change, scan for owned sessions owing deliveries this
    /// often (0: never).
    pub resume_scan_secs: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            membership: MembershipKind::Static,
            name: "default".into(),
            etcd_endpoints: Vec::new(),
            etcd_tls_ca: None,
            etcd_tls_cert: None,
            etcd_tls_key: None,
            lease_ttl_secs: 5,
            grpc_listen: None,
            grpc_advertise: None,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            tls_server_name: None,
            allow_plaintext: false,
            forward_timeout_ms: 5_000,
            max_batch: 256,
            flush_delay_us: 2_000,
            peer_queue: 8_192,
            resume_scan_secs: 60,
        }
    }
}

/// `relay-node --dev`: one node, in-memory store, the HTTP edge on localhost with two demo
/// domains that may talk to each other. The secrets are public: never use them elsewhere.
pub const DEV_CONFIG: &str = r#"
node_id = "dev-1"

[http]
listen = "127.0.0.1:8080"

[admin]
listen = "127.0.0.1:9090"

[api]
listen = "127.0.0.1:9443"

[store]
backend = "memory"

[telemetry]
log_format = "text"

[[domains]]
name = "alpha.example"
platform = "http"
secret = "alpha-demo-secret-0123456789"

[[domains]]
name = "beta.example"
platform = "http"
secret = "beta-demo-secret-0123456789"

[[federation]]
between = ["alpha.example", "beta.example"]
"#;

// === loading ===

impl Config {
    /// Reads `path`, applies `FEDRELAY_*` overrides from `env`, and validates.
    pub fn load(
        path: &Path,
        env: impl Iterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, env)
    }

    pub fn from_toml(
        text: &str,
        env: impl Iterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut value: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        apply_env(&mut value, env)?;
        let cfg: Config = value
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The embedded default of `relay-node --dev` ([`DEV_CONFIG`]), with `FEDRELAY_*`
    /// overrides from `env` (to move its ports, say).
    pub fn dev(env: impl Iterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        Self::from_toml(DEV_CONFIG, env)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let mut names = HashSet::new();
        let mut tenants = HashSet::new();
        if let Some(t) = &self.teams {
            t.validate()?;
        }
        if let Some(x) = &self.xmpp {
            x.validate(&self.domains)?;
        }
        if let Some(x) = &self.sip {
            x.validate(&self.domains)?;
        }
        for d in &self.domains {
            let name = d.name.to_ascii_lowercase();
            if !valid_domain(&name) {
                return bad(format!("domain `{}` is not a valid domain name", d.name));
            }
            if !names.insert(name) {
                return bad(format!("domain `{}` is declared twice", d.name));
            }
            if d.platform == Platform::Teams {
                if d.secret.is_some() || d.secret_file.is_some() || d.webhook_url.is_some() {
                    return bad(format!(
                        "domain `{}`: a Teams domain has no `secret` or `webhook_url`; the bot's credentials are in [teams]",
                        d.name
                    ));
                }
                match d.tenant_id.as_deref().map(str::trim) {
                    Some(t) if !t.is_empty() => {
                        if !tenants.insert(t.to_ascii_lowercase()) {
                            return bad(format!(
                                "domain `{}`: tenant {t} is bound to another domain already",
                                d.name
                            ));
                        }
                    }
                    _ => {
                        return bad(format!(
                            "domain `{}`: a Teams domain needs `tenant_id`",
                            d.name
                        ));
                    }
                }
                if self.teams.is_none() {
                    return bad(format!(
                        "domain `{}` is on Teams, but there is no [teams] section",
                        d.name
                    ));
                }
                continue;
            }
            if matches!(d.platform, Platform::Xmpp | Platform::Sip) {
                let (label, section) = match d.platform {
                    Platform::Xmpp => ("an XMPP", "xmpp"),
                    _ => ("a SIP", "sip"),
                };
                if d.secret.is_some()
                    || d.secret_file.is_some()
                    || d.webhook_url.is_some()
                    || d.tenant_id.is_some()
                {
                    return bad(format!(
                        "domain `{}`: {label} domain has no `secret`, `webhook_url` or `tenant_id`; its peering is in [{section}]",
                        d.name
                    ));
                }
                let missing = match d.platform {
                    Platform::Xmpp => self.xmpp.is_none(),
                    _ => self.sip.is_none(),
                };
                if missing {
                    return bad(format!(
                        "domain `{}` is on {}, but there is no [{section}] section",
                        d.name,
                        d.platform.label()
                    ));
                }
                continue;
            }
            if d.tenant_id.is_some() {
                return bad(format!(
                    "domain `{}`: `tenant_id` is only for Teams domains",
                    d.name
                ));
            }
            match (&d.secret, &d.secret_file) {
                (Some(_), Some(_)) => {
                    return bad(format!(
                        "domain `{}`: give `secret` or `secret_file`, not both",
                        d.name
                    ));
                }
                (None, None) => {
                    return bad(format!(
                        "domain `{}` needs `secret` or `secret_file`",
                        d.name
                    ));
                }
                (Some(s), None) if s.len() < 16 => {
                    return bad(format!(
                        "domain `{}`: secret must be at least 16 bytes",
                        d.name
                    ));
                }
                _ => {}
            }
            match (d.delivery, &d.webhook_url) {
                (Delivery::Webhook, None) => {
                    return bad(format!(
                        "domain `{}`: delivery = \"webhook\" needs `webhook_url`",
                        d.name
                    ));
                }
                (Delivery::Webhook, Some(u)) => check_webhook_url(&d.name, u)?,
                (Delivery::Stream, Some(_)) => {
                    return bad(format!(
                        "domain `{}`: `webhook_url` is only for delivery = \"webhook\"",
                        d.name
                    ));
                }
                (Delivery::Stream, None) => {}
            }
        }
        for r in &self.federation {
            for d in &r.between {
                if !names.contains(&d.to_ascii_lowercase()) {
                    return bad(format!(
                        "federation rule names `{d}`, which is not a declared domain"
                    ));
                }
            }
        }
        if self.http.tls_cert.is_some() != self.http.tls_key.is_some() {
            return bad("http: give both `tls_cert` and `tls_key`, or neither".into());
        }
        if self.http.tls_cert.is_none()
            && !self.http.allow_plaintext
            && !self.http.listen.ip().is_loopback()
        {
            return bad(format!(
                "http: listening on {} without TLS; set `tls_cert`/`tls_key`, or `allow_plaintext = true` behind a TLS-terminating proxy",
                self.http.listen
            ));
        }
        if self.metadata.retention_days == 0
            || self.metadata.redis_window_days == 0
            || self.metadata.maintenance_interval_secs == 0
        {
            return bad("metadata: retention_days, redis_window_days and maintenance_interval_secs must be positive".into());
        }
        if let Some(u) = &self.metadata.archive_url {
            let scheme = u.split_once("://").map(|(s, _)| s).unwrap_or("");
            if !["file", "s3", "gs", "az", "azure", "abfs", "abfss"].contains(&scheme) {
                return bad(format!(
                    "metadata.archive_url `{u}`: a file://, s3://, gs:// or az:// URL"
                ));
            }
            if self.metadata.redis_window_days >= self.metadata.retention_days {
                return bad("metadata: redis_window_days must be below retention_days".into());
            }
        }
        if self.api.tls_cert.is_some() != self.api.tls_key.is_some() {
            return bad("api: give both `tls_cert` and `tls_key`, or neither".into());
        }
        if let Some(l) = self.api.listen
            && self.api.tls_cert.is_none()
            && !self.api.allow_plaintext
            && !l.ip().is_loopback()
        {
            return bad(format!(
                "api: listening on {l} without TLS; set `tls_cert`/`tls_key`, or `allow_plaintext = true` behind a TLS-terminating proxy"
            ));
        }
        if let Some(o) = &self.api.oidc {
            if !https_or_loopback(&o.issuer) {
                return bad("api.oidc: `issuer` must be an https:// URL".into());
            }
            if o.audience.trim().is_empty() {
                return bad("api.oidc: `audience` must not be empty".into());
            }
            if let Some(j) = &o.jwks_url
                && !https_or_loopback(j)
            {
                return bad("api.oidc: `jwks_url` must be an https:// URL".into());
            }
            if let Some(pl) = &o.portal {
                if pl.client_id.trim().is_empty() {
                    return bad("api.oidc.portal: `client_id` must not be empty".into());
                }
                if !https_or_loopback(&pl.redirect_url)
                    || !pl.redirect_url.ends_with("/portal/callback")
                {
                    return bad(
                        "api.oidc.portal: `redirect_url` must be https://<host>/portal/callback"
                            .into(),
                    );
                }
                if pl.session_secs == 0 {
                    return bad("api.oidc.portal: `session_secs` must be positive".into());
                }
            }
        }
        if self.http.max_body_bytes == 0
            || self.http.webhook_batch == 0
            || self.session.delivery_batch == 0
        {
            return bad("sizes and batch limits must be positive".into());
        }
        let st = &self.store;
        if st.redis_url.contains("#insecure") {
            return bad(
                "store: `#insecure` would turn off the check of Redis's certificate; trust its CA with `tls_ca` instead".into(),
            );
        }
        if st.tls_cert.is_some() != st.tls_key.is_some() {
            return bad("store: give both `tls_cert` and `tls_key`, or neither".into());
        }
        if (st.tls_ca.is_some() || st.tls_cert.is_some()) && !st.redis_url.starts_with("rediss://")
        {
            return bad(
                "store: `tls_ca`/`tls_cert` are for TLS; use a rediss:// `redis_url`".into(),
            );
        }
        let c = &self.cluster;
        let https = c
            .etcd_endpoints
            .iter()
            .filter(|e| e.starts_with("https://"))
            .count();
        if https != 0 && https != c.etcd_endpoints.len() {
            return bad("cluster: `etcd_endpoints` must be all http:// or all https://".into());
        }
        if let Some(e) = c
            .etcd_endpoints
            .iter()
            .find(|e| !(e.starts_with("http://") || e.starts_with("https://")))
        {
            return bad(format!(
                "cluster: etcd endpoint `{e}` must be an http:// or https:// URL"
            ));
        }
        if c.etcd_tls_cert.is_some() != c.etcd_tls_key.is_some() {
            return bad("cluster: give both `etcd_tls_cert` and `etcd_tls_key`, or neither".into());
        }
        if https > 0 && c.etcd_tls_ca.is_none() {
            return bad(
                "cluster: https:// etcd endpoints need `etcd_tls_ca`, the CA that signed etcd's certificate".into(),
            );
        }
        if https == 0 && (c.etcd_tls_ca.is_some() || c.etcd_tls_cert.is_some()) {
            return bad(
                "cluster: `etcd_tls_ca`/`etcd_tls_cert` are for TLS; use https:// `etcd_endpoints`"
                    .into(),
            );
        }
        if c.membership == MembershipKind::Etcd {
            if c.etcd_endpoints.is_empty() {
                return bad("cluster: membership = \"etcd\" needs `etcd_endpoints`".into());
            }
            if c.grpc_listen.is_none() {
                return bad("cluster: membership = \"etcd\" needs `grpc_listen`".into());
            }
            if self.store.backend != StoreBackend::Redis {
                return bad(
                    "cluster: nodes of a cluster share their sessions in Redis; set store.backend = \"redis\"".into(),
                );
            }
            if c.lease_ttl_secs < 2 {
                return bad("cluster: lease_ttl_secs must be at least 2".into());
            }
        }
        if c.name.is_empty() || c.name.contains('/') {
            return bad("cluster: `name` must be non-empty and contain no `/`".into());
        }
        let tls_parts = [&c.tls_cert, &c.tls_key, &c.tls_ca]
            .iter()
            .filter(|p| p.is_some())
            .count();
        if tls_parts != 0 && tls_parts != 3 {
            return bad(
                "cluster: give `tls_cert`, `tls_key` and `tls_ca` together, or none".into(),
            );
        }
        if let Some(l) = c.grpc_listen
            && tls_parts == 0
            && !c.allow_plaintext
            && !l.ip().is_loopback()
        {
            return bad(format!(
                "cluster: gRPC on {l} without TLS would let anyone who reaches it inject messages; set `tls_cert`/`tls_key`/`tls_ca`, or `allow_plaintext = true` on a network only the nodes reach"
            ));
        }
        if c.max_batch == 0 || c.peer_queue == 0 || c.forward_timeout_ms == 0 {
            return bad("cluster: batch, queue and timeout must be positive".into());
        }
        if let Some(e) = &self.telemetry.otlp_endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            return bad("telemetry.otlp_endpoint must be an http:// or https:// URL".into());
        }
        Ok(())
    }

    /// Reads every domain's secret (from the config or its file).
    pub fn secrets(&self) -> Result<HashMap<String, Vec<u8>>, ConfigError> {
        self.domains
            .iter()
            .filter(|d| d.platform == Platform::Http)
            .map(|d| {
                let s = match (&d.secret, &d.secret_file) {
                    (Some(s), _) => s.clone().into_bytes(),
                    (None, Some(p)) => {
                        let raw = std::fs::read(p).map_err(|source| ConfigError::Read {
                            path: p.clone(),
                            source,
                        })?;
                        let trimmed = raw.trim_ascii_end().to_vec();
                        if trimmed.len() < 16 {
                            return Err(ConfigError::Invalid(format!(
                                "domain `{}`: secret in {} is shorter than 16 bytes",
                                d.name,
                                p.display()
                            )));
                        }
                        trimmed
                    }
                    (None, None) => {
                        return Err(ConfigError::Invalid(format!(
                            "domain `{}` has no secret",
                            d.name
                        )));
                    }
                };
                Ok((d.name.to_ascii_lowercase(), s))
            })
            .collect()
    }

    /// The configured node id, else the host name — a StatefulSet pod's name
    /// (`fedrelay-2`), which keeps its ordinal across restarts.
    pub fn node_id(&self) -> String {
        self.node_id.clone().unwrap_or_else(|| {
            std::env::var("HOSTNAME")
                .ok()
                .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "node-1".into())
        })
    }
}

pub(crate) fn valid_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
        })
}

/// Webhooks go out over HTTPS; plain HTTP only to this machine (local sinks, tests).
fn check_webhook_url(domain: &str, url: &str) -> Result<(), ConfigError> {
    if https_or_loopback(url) {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!(
            "domain `{domain}`: webhook_url must be https://, or http:// to a loopback address"
        )))
    }
}

/// `https://…`, or `http://` to a loopback address (local sinks, tests).
pub fn https_or_loopback(url: &str) -> bool {
    if url.starts_with("https://") {
        return true;
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Applies `FEDRELAY_A__B=v` as `a.b = v`.
fn apply_env(
    root: &mut toml::Table,
    env: impl Iterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    for (k, v) in env {
        let Some(path) = k.strip_prefix("FEDRELAY_") else {
            continue;
        };
        // FEDRELAY_CONFIG names the file itself (`--config`), not a key in it.
        if path == "CONFIG" {
            continue;
        }
        let parts: Vec<String> = path.split("__").map(|p| p.to_ascii_lowercase()).collect();
        if parts.iter().any(String::is_empty) {
            return Err(ConfigError::Invalid(format!(
                "environment override `{k}` has an empty part"
            )));
        }
        let value = toml::from_str::<toml::Table>(&format!("v = {v}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(toml::Value::String(v));
        let mut table = &mut *root;
        for p in &parts[..parts.len() - 1] {
            let entry = table
                .entry(p.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            table = entry.as_table_mut().ok_or_else(|| {
                ConfigError::Invalid(format!("environment override `{k}`: `{p}` is not a table"))
            })?;
        }
        if let Some(last) = parts.last() {
            table.insert(last.clone(), value);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
node_id = "n1"
[store]
backend = "memory"
[[domains]]
name = "a.example"
platform = "http"
secret = "0123456789abcdef"
[[domains]]
name = "b.example"
platform = "http"
secret = "0123456789abcdef"
delivery = "webhook"
webhook_url = "http://127.0.0.1:9999/hook"
[[federation]]
between = ["a.example", "b.example"]
"#;

    fn load(extra: &str) -> Result<Config, ConfigError> {
        Config::from_toml(&format!("{BASE}{extra}"), std::iter::empty())
    }

    #[test]
    fn base_config_loads() -> Result<(), ConfigError> {
        let c = load("")?;
        assert_eq!(c.domains.len(), 2);
        assert_eq!(c.store.backend, StoreBackend::Memory);
        assert_eq!(c.http.max_body_bytes, 65536);
        Ok(())
    }

    #[test]
    fn tls_to_redis_and_etcd_is_checked() -> Result<(), ConfigError> {
        // `extra` replaces the base config's [store] section.
        let load = |extra: &str| {
            Config::from_toml(
                &BASE.replace("[store]\nbackend = \"memory\"\n", extra),
                std::iter::empty(),
            )
        };
        let invalid = |extra: &str, needle: &str| {
            let e = load(extra);
            assert!(
                matches!(&e, Err(ConfigError::Invalid(m)) if m.contains(needle)),
                "{extra}: {e:?}"
            );
        };
        let c = load(
            "[store]\nredis_url = \"rediss://r:6380\"\ntls_ca = \"/ca.pem\"\ntls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"\n",
        )?;
        assert_eq!(
            c.store.tls_ca.as_deref(),
            Some(std::path::Path::new("/ca.pem"))
        );
        invalid(
            "[store]\nredis_url = \"redis://r:6379\"\ntls_ca = \"/ca.pem\"\n",
            "rediss://",
        );
        invalid(
            "[store]\nredis_url = \"rediss://r:6380\"\ntls_cert = \"/c.pem\"\n",
            "both `tls_cert` and `tls_key`",
        );
        invalid(
            "[store]\nredis_url = \"rediss://r:6380/#insecure\"\n",
            "`#insecure`",
        );
        let cluster = |endpoints: &str, tls: &str| {
            format!(
                "[store]\nbackend = \"redis\"\n[cluster]\nmembership = \"etcd\"\ngrpc_listen = \"127.0.0.1:7000\"\netcd_endpoints = {endpoints}\n{tls}\n"
            )
        };
        let c = load(&cluster(
            "[\"https://e1:2379\", \"https://e2:2379\"]",
            "etcd_tls_ca = \"/ca.pem\"\netcd_tls_cert = \"/c.pem\"\netcd_tls_key = \"/k.pem\"",
        ))?;
        assert_eq!(c.cluster.etcd_endpoints.len(), 2);
        invalid(&cluster("[\"https://e1:2379\"]", ""), "need `etcd_tls_ca`");
        invalid(
            &cluster(
                "[\"http://e1:2379\", \"https://e2:2379\"]",
                "etcd_tls_ca = \"/ca.pem\"",
            ),
            "all http:// or all https://",
        );
        invalid(
            &cluster("[\"http://e1:2379\"]", "etcd_tls_ca = \"/ca.pem\""),
            "https://",
        );
        invalid(&cluster("[\"e1:2379\"]", ""), "http:// or https:// URL");
        invalid(
            &cluster(
                "[\"https://e1:2379\"]",
                "etcd_tls_ca = \"/ca.pem\"\netcd_tls_key = \"/k.pem\"",
            ),
            "both `etcd_tls_cert` and `etcd_tls_key`",
        );
        Ok(())
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = load("[http]\nlisten = \"127.0.0.1:1\"\nlisten_typo = 1\n");
        assert!(matches!(e, Err(ConfigError::Parse(m)) if m.contains("listen_typo")));
        let e = Config::from_toml("nodeid = \"x\"", std::iter::empty());
        assert!(e.is_err());
    }

    #[test]
    fn environment_overrides_apply() -> Result<(), ConfigError> {
        let env = vec![
            (
                "FEDRELAY_STORE__REDIS_URL".to_string(),
                "redis://r:1".to_string(),
            ),
            (
                "FEDRELAY_HTTP__MAX_BODY_BYTES".to_string(),
                "1024".to_string(),
            ),
            ("FEDRELAY_NODE_ID".to_string(), "n9".to_string()),
            ("UNRELATED".to_string(), "x".to_string()),
            (
                "FEDRELAY_CONFIG".to_string(),
                "/etc/fedrelay/relay.toml".to_string(),
            ),
        ];
        let c = Config::from_toml(BASE, env.into_iter())?;
        assert_eq!(c.store.redis_url, "redis://r:1");
        assert_eq!(c.http.max_body_bytes, 1024);
        assert_eq!(c.node_id(), "n9");
        let bad = vec![("FEDRELAY_HTTP__NOPE".to_string(), "1".to_string())];
        assert!(Config::from_toml(BASE, bad.into_iter()).is_err());
        Ok(())
    }

    #[test]
    fn invalid_configs_are_refused() {
        for (extra, why) in [
            (
                "[[federation]]\nbetween = [\"a.example\", \"c.example\"]\n",
                "not a declared domain",
            ),
            (
                "[[domains]]\nname = \"a.example\"\nplatform = \"http\"\nsecret = \"0123456789abcdef\"\n",
                "twice",
            ),
            (
                "[[domains]]\nname = \"c.example\"\nplatform = \"http\"\nsecret = \"short\"\n",
                "16 bytes",
            ),
            (
                "[[domains]]\nname = \"c.example\"\nplatform = \"http\"\nsecret = \"0123456789abcdef\"\ndelivery = \"webhook\"\nwebhook_url = \"http://example.com/x\"\n",
                "loopback",
            ),
            ("[http]\nlisten = \"0.0.0.0:8080\"\n", "without TLS"),
            (
                "[cluster]\ngrpc_listen = \"0.0.0.0:7443\"\n",
                "gRPC on 0.0.0.0:7443 without TLS",
            ),
            (
                "[cluster]\nmembership = \"etcd\"\ngrpc_listen = \"127.0.0.1:7443\"\n",
                "needs `etcd_endpoints`",
            ),
            ("[cluster]\ntls_cert = \"/c.pem\"\n", "together, or none"),
        ] {
            match load(extra) {
                Err(ConfigError::Invalid(m)) => assert!(m.contains(why), "{m}"),
                other => panic!("{why}: {other:?}"),
            }
        }
    }

    const TEAMS: &str =
        "[teams]\napp_id = \"app\"\napp_password = \"pw\"\napp_tenant_id = \"t0\"\n";
    const TEAMS_DOMAIN: &str =
        "[[domains]]\nname = \"contoso.com\"\nplatform = \"teams\"\ntenant_id = \"t1\"\n";

    #[test]
    fn teams_config_loads_with_safe_defaults() -> Result<(), ConfigError> {
        let c = load(&format!("{TEAMS}{TEAMS_DOMAIN}"))?;
        let t = c
            .teams
            .as_ref()
            .ok_or(ConfigError::Invalid("no teams".into()))?;
        assert_eq!(t.issuer, "https://api.botframework.com");
        assert_eq!(
            t.token_url(),
            "https://login.microsoftonline.com/t0/oauth2/v2.0/token"
        );
        assert_eq!(t.clock_skew_secs, 300);
        assert!(
            t.service_url_prefixes
                .iter()
                .all(|p| p.starts_with("https://"))
        );
        // A Teams domain has no secret, and `secrets()` does not ask for one.
        assert!(!c.secrets()?.contains_key("contoso.com"));
        Ok(())
    }

    #[test]
    fn invalid_teams_configs_are_refused() {
        for (extra, why) in [
            (TEAMS_DOMAIN.to_string(), "no [teams] section"),
            (
                format!("{TEAMS}[[domains]]\nname = \"contoso.com\"\nplatform = \"teams\"\n"),
                "needs `tenant_id`",
            ),
            (
                format!(
                    "{TEAMS}{TEAMS_DOMAIN}[[domains]]\nname = \"x.com\"\nplatform = \"teams\"\ntenant_id = \"T1\"\n"
                ),
                "bound to another domain",
            ),
            (
                format!(
                    "{TEAMS}[[domains]]\nname = \"c.com\"\nplatform = \"teams\"\ntenant_id = \"t\"\nsecret = \"0123456789abcdef\"\n"
                ),
                "has no `secret`",
            ),
            (
                "[teams]\napp_id = \"a\"\napp_tenant_id = \"t\"\n".to_string(),
                "`app_password` or `app_password_file`",
            ),
            (
                format!("{TEAMS}openid_metadata_url = \"http://login.example/meta\"\n"),
                "loopback",
            ),
            (
                format!("{TEAMS}service_url_prefixes = [\"https://smba.trafficmanager.net\"]\n"),
                "end with `/`",
            ),
            (
                format!("{TEAMS}service_url_prefixes = []\n"),
                "must not be empty",
            ),
            (format!("{TEAMS}clock_skew_secs = 86400\n"), "at most 600"),
            (format!("{TEAMS}jwks_min_refetch_secs = 0\n"), "at least 30"),
        ] {
            match load(&extra) {
                Err(ConfigError::Invalid(m)) => assert!(m.contains(why), "{why}: {m}"),
                other => panic!("{why}: {other:?}"),
            }
        }
    }

    const XMPP: &str = "[xmpp]\ntls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"\n";
    const XMPP_DOMAIN: &str = "[[domains]]\nname = \"jabber.example\"\nplatform = \"xmpp\"\n";

    #[test]
    fn xmpp_peers_and_their_authentication() -> Result<(), ConfigError> {
        let c = load(&format!(
            "{XMPP}default_auth = \"external\"\n[[xmpp.peers]]\ndomain = \"Jabber.example\"\naddress = \"127.0.0.1:5269\"\nauth = \"dialback\"\n{XMPP_DOMAIN}"
        ))?;
        let x = c
            .xmpp
            .as_ref()
            .ok_or(ConfigError::Invalid("no xmpp".into()))?;
        assert_eq!(x.listen.port(), 5269);
        assert!(x.require_tls);
        assert_eq!(x.max_stanza_bytes, 524_288);
        assert_eq!(x.auth_for("jabber.example"), XmppAuth::Dialback);
        assert_eq!(x.auth_for("other.example"), XmppAuth::External);
        assert_eq!(x.dialback_secret()?, None);
        Ok(())
    }

    #[test]
    fn invalid_xmpp_configs_are_refused() {
        for (extra, why) in [
            (XMPP_DOMAIN.to_string(), "no [xmpp] section"),
            (
                format!("{XMPP}{XMPP_DOMAIN}secret = \"0123456789abcdef\"\n"),
                "has no `secret`",
            ),
            (
                format!("{XMPP}[[xmpp.peers]]\ndomain = \"a.example\"\n{XMPP_DOMAIN}"),
                "not a declared domain with platform = \"xmpp\"",
            ),
            (
                format!(
                    "{XMPP}[[xmpp.peers]]\ndomain = \"jabber.example\"\naddress = \"nohost\"\n{XMPP_DOMAIN}"
                ),
                "must be host:port",
            ),
            (
                format!(
                    "{XMPP}[[xmpp.peers]]\ndomain = \"jabber.example\"\n[[xmpp.peers]]\ndomain = \"JABBER.example\"\n{XMPP_DOMAIN}"
                ),
                "listed twice",
            ),
            (
                format!("{XMPP}dialback_secret = \"short\"\n"),
                "at least 16 bytes",
            ),
            (format!("{XMPP}max_stanza_bytes = 100\n"), "at least 10000"),
            (
                format!("{XMPP}idle_timeout_secs = 0\n"),
                "timeouts must be positive",
            ),
        ] {
            match load(&extra) {
                Err(ConfigError::Invalid(m)) => assert!(m.contains(why), "{why}: {m}"),
                other => panic!("{why}: {other:?}"),
            }
        }
        // Unknown keys are errors here too.
        assert!(matches!(
            load(&format!("{XMPP}starttls = false\n")),
            Err(ConfigError::Parse(_))
        ));
    }

    const SIP: &str = "[sip]\nudp = \"127.0.0.1:5060\"\n";
    const SIP_DOMAIN: &str = "[[domains]]\nname = \"sfb.example\"\nplatform = \"sip\"\n";

    #[test]
    fn sip_peers_and_their_defaults() -> Result<(), ConfigError> {
        let c = load(&format!(
            "{SIP}[[sip.peers]]\ndomain = \"SFB.example\"\ntransport = \"udp\"\naddress = \"10.0.0.5:5060\"\nsources = [\"10.0.0.0/24\"]\nusername = \"relay\"\npassword = \"pw\"\nim_mode = \"session\"\n{SIP_DOMAIN}"
        ))?;
        let x = c
            .sip
            .as_ref()
            .ok_or(ConfigError::Invalid("no sip".into()))?;
        assert_eq!(x.t1_ms, 500);
        assert_eq!(x.max_message_bytes, 65_535);
        assert_eq!(x.max_subscription_secs, 3_600);
        let p = x
            .peer("sfb.example")
            .ok_or(ConfigError::Invalid("no peer".into()))?;
        assert_eq!(p.transport, SipTransport::Udp);
        assert_eq!(p.im_mode, SipImMode::Session);
        assert!(!p.allow_md5);
        assert_eq!(p.password()?, Some("pw".to_string()));
        assert!(x.peer("other.example").is_none());
        Ok(())
    }

    #[test]
    fn invalid_sip_configs_are_refused() {
        for (extra, why) in [
            (SIP_DOMAIN.to_string(), "no [sip] section"),
            (
                "[sip]\n".to_string(),
                "at least one of `udp`, `tcp` and `tls`",
            ),
            (
                format!(
                    "{SIP}[[sip.peers]]\ndomain = \"a.example\"\ntransport = \"udp\"\n{SIP_DOMAIN}"
                ),
                "not a declared domain with platform = \"sip\"",
            ),
            (
                format!("{SIP}[[sip.peers]]\ndomain = \"sfb.example\"\n{SIP_DOMAIN}"),
                "needs `tls_cert` and `tls_key`",
            ),
            (
                format!(
                    "{SIP}[[sip.peers]]\ndomain = \"sfb.example\"\ntransport = \"tcp\"\n{SIP_DOMAIN}"
                ),
                "no listener for it",
            ),
            (
                format!(
                    "{SIP}[[sip.peers]]\ndomain = \"sfb.example\"\ntransport = \"udp\"\nsources = [\"somewhere\"]\n{SIP_DOMAIN}"
                ),
                "not an IP address or CIDR block",
            ),
            (
                format!(
                    "{SIP}[[sip.peers]]\ndomain = \"sfb.example\"\ntransport = \"udp\"\nusername = \"u\"\n{SIP_DOMAIN}"
                ),
                "need both `username` and a password",
            ),
            (
                format!(
                    "{SIP}[[sip.peers]]\ndomain = \"sfb.example\"\ntransport = \"udp\"\naddress = \"nohost\"\n{SIP_DOMAIN}"
                ),
                "must be host:port",
            ),
            (format!("{SIP}t1_ms = 0\n"), "`t1_ms` positive"),
            (format!("{SIP}rate_per_source = 0\n"), "must be positive"),
            (
                format!("{SIP_DOMAIN}secret = \"0123456789abcdef\"\n{SIP}"),
                "has no `secret`",
            ),
        ] {
            match load(&extra) {
                Err(ConfigError::Invalid(m)) => assert!(m.contains(why), "{why}: {m}"),
                other => panic!("{why}: {other:?}"),
            }
        }
    }

    #[test]
    fn dev_config_is_valid_and_movable() -> Result<(), ConfigError> {
        let c = Config::dev(std::iter::empty())?;
        assert_eq!(c.store.backend, StoreBackend::Memory);
        assert_eq!(c.domains.len(), 2);
        let moved = Config::dev(std::iter::once((
            "FEDRELAY_HTTP__LISTEN".to_string(),
            "127.0.0.1:1".to_string(),
        )))?;
        assert_eq!(moved.http.listen.port(), 1);
        Ok(())
    }
}
