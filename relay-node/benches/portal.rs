//! The portal's overview for the trailing 12 months with 1,000 domains: the server time of
//! `GET /portal/` from the request to the last byte of the page — the session lookup, the two
//! usage reports through the management API (months and today) and the rendering of the charts
//! and tables.
//!
//! `cargo bench -p relay-node --bench portal` seeds a real `redis-server` with a year of
//! traffic (every day, each of 950 external domains talks with one of 50 internal domains)
//! through the usage aggregator, as the nodes would have flushed it, then renders the overview
//! in process: once cold (the months' user sets are merged on the first report) and then
//! repeatedly. It prints the median and the 90th percentile (target: under 300 ms). Without
//! `--bench`, as `cargo test --all-targets` runs it, a small year in memory checks that the
//! page shows the seeded numbers and nothing more.

#![allow(clippy::print_stdout)]

use anyhow::{Context, Result, ensure};
use axum::body::Body;
use axum::http::{Request, header};
use relay_node::config::Platform;
use relay_node::control::api::auth::Authenticator;
use relay_node::control::api::{self, ApiState};
use relay_node::control::approvals::ApprovalBook;
use relay_node::control::logstore::{LogReader, MemLog};
use relay_node::control::policy::Policy;
use relay_node::control::policy::model::{Action, DomainPolicy, Initiate, PolicyDoc, Rule, Side};
use relay_node::control::policy::store::{MemoryPolicyStore, PolicyStore};
use relay_node::control::portal::session::{Session, Sessions};
use relay_node::control::portal::{self, PortalState};
use relay_node::control::usage::{StaticSides, UsageAggregator, UsageConfig, UsageStore};
use relay_node::edges::teams::state::MemoryKv;
use session_actor::MetadataEntry;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tower::ServiceExt;

const TOKEN: &str = "bench-bootstrap-token-0123456789abcdef-0123456789";
const DAY_MS: i64 = 86_400_000;

struct Size {
    internal: usize,
    external: usize,
    days: i64,
    renders: usize,
}

fn policy(size: &Size) -> PolicyDoc {
    let mut doc = PolicyDoc::default();
    for i in 0..size.internal {
        doc.domains.push(DomainPolicy {
            name: format!("int{i}.example.com"),
            platform: Platform::Teams,
            side: Side::Internal,
            approval: false,
            rate_limit: None,
        });
    }
    for e in 0..size.external {
        doc.domains.push(DomainPolicy {
            name: format!("partner{e}.example.org"),
            platform: if e % 2 == 0 {
                Platform::Xmpp
            } else {
                Platform::Sip
            },
            side: Side::External,
            approval: false,
            rate_limit: None,
        });
        doc.rules.push(Rule {
            id: format!("r{e}"),
            between: [
                format!("int{}.example.com", e % size.internal),
                format!("partner{e}.example.org"),
            ],
            action: Action::Allow,
            initiate: Initiate::Either,
            kinds: None,
            note: None,
        });
    }
    doc
}

/// A year of traffic ending today: each day, every external domain exchanges `1 + e % 3`
/// messages with one internal domain.
async fn seed(size: &Size, store: &UsageStore) -> Result<u64> {
    let internal: Vec<String> = (0..size.internal)
        .map(|i| format!("int{i}.example.com"))
        .collect();
    let today = relay_node::edges::now_ms().div_euclid(DAY_MS);
    let mut total = 0;
    for d in 0..size.days {
        let agg = UsageAggregator::new(
            Arc::new(StaticSides::new(internal.iter())),
            UsageConfig::default(),
        );
        let at = (today - d) * DAY_MS + 3_600_000;
        for e in 0..size.external {
            for k in 0..(1 + e % 3) {
                agg.add(&MetadataEntry {
                    at_ms: at + k as i64,
                    session_id: None,
                    relay_msg_id: format!("m{d}-{e}-{k}"),
                    sender: format!("u{}@int{}.example.com", e % 40, e % size.internal),
                    sender_platform: "teams".into(),
                    receivers: vec![format!("p{}@partner{e}.example.org", k)],
                    receiver_platform: if e % 2 == 0 { "xmpp" } else { "sip" }.into(),
                    category: "im",
                    kind: "message".into(),
                });
                total += 1;
            }
        }
        agg.flush(store).await.context("seeding usage")?;
    }
    Ok(total)
}

async fn app(size: &Size, usage: UsageStore, sessions: Sessions) -> Result<(axum::Router, String)> {
    let doc = policy(size);
    doc.validate().context("the generated policy is valid")?;
    let policy = Arc::new(Policy::new(doc.clone(), 1));
    let store: Arc<dyn PolicyStore> = Arc::new(MemoryPolicyStore::default());
    let state = Arc::new(ApiState {
        policy: policy.clone(),
        store: store.clone(),
        approvals: Arc::new(ApprovalBook::new(
            Box::<MemoryKv>::default(),
            "bench",
            policy,
        )),
        teams: None,
        forget_log: None,
        usage,
        log: LogReader::Memory(Arc::new(Mutex::new(MemLog::default()))),
        auth: Authenticator::new(store, Some(TOKEN), None),
        cluster: Arc::new(|| Box::pin(async { serde_json::json!({"members": []}) })),
    });
    let api = api::router(state, axum::Router::new());
    let session = sessions
        .create(&Session {
            token: TOKEN.into(),
            name: "bootstrap".into(),
            role: "admin".into(),
            domains: Vec::new(),
            csrf: "bench".into(),
            expires_ms: relay_node::edges::now_ms() + 3_600_000,
        })
        .await?;
    let portal = Arc::new(PortalState {
        api: api.clone(),
        sessions,
        login: None,
        secure: true,
        token_session_secs: 3600,
    });
    Ok((api.merge(portal::router(portal)), session))
}

/// One overview: the page and the server time it took.
async fn render(app: &axum::Router, session: &str) -> Result<(String, Duration)> {
    let req = Request::get("/portal/")
        .header(header::COOKIE, format!("__Host-fedrelay={session}"))
        .body(Body::empty())?;
    let t = Instant::now();
    let r = app.clone().oneshot(req).await?;
    let status = r.status();
    let bytes = axum::body::to_bytes(r.into_body(), 64 << 20).await?;
    let took = t.elapsed();
    let page = String::from_utf8(bytes.to_vec())?;
    ensure!(status == 200, "{status}: {page}");
    Ok((page, took))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let size = if full {
        Size {
            internal: 50,
            external: 950,
            days: 365,
            renders: 30,
        }
    } else {
        Size {
            internal: 3,
            external: 12,
            days: 40,
            renders: 2,
        }
    };
    // Redis for the full size, as a cluster keeps usage; memory for the quick check.
    let _redis;
    let (usage, sessions) = if full {
        let r = test_support::RedisServer::start()?;
        // The node's default response timeout (`store.response_timeout_ms`).
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(Duration::from_millis(2_000)));
        let conn = redis::Client::open(r.url())?
            .get_connection_manager_with_config(cfg)
            .await?;
        _redis = Some(r);
        (
            UsageStore::redis(conn.clone(), "fr", 400),
            Sessions::new(
                Box::new(relay_node::edges::teams::state::RedisKv::new(conn)),
                "fr",
            ),
        )
    } else {
        _redis = None;
        (
            UsageStore::memory(400),
            Sessions::new(Box::<MemoryKv>::default(), "fr"),
        )
    };
    let t = Instant::now();
    let total = seed(&size, &usage).await?;
    let seeding = t.elapsed();
    let (app, session) = app(&size, usage, sessions).await?;

    let (page, cold) = render(&app, &session).await?;
    // The page shows what was seeded: the 12-month total (the oldest seeded days may fall
    // before the window's first month), every external domain in the top ten's table.
    ensure!(page.contains("id=\"chart-messages\"") && page.contains("id=\"chart-external\""));
    // The busiest partners (3 messages a day), by name: the first of the top ten.
    let mut busiest: Vec<String> = (0..size.external)
        .filter(|e| e % 3 == 2)
        .map(|e| format!("partner{e}.example.org"))
        .collect();
    busiest.sort();
    let first = busiest.first().context("a busiest partner")?;
    ensure!(
        page.contains(&format!("<tr><th scope=\"row\">{first}</th>")),
        "{first} heads the top external domains"
    );
    let year: u64 = page
        .split("id=\"year-messages\">")
        .nth(1)
        .and_then(|s| s.split('<').next())
        .map(|s| s.replace('\u{202f}', ""))
        .context("the year's messages")?
        .parse()?;
    ensure!(year > 0 && year <= total, "{year} of {total}");
    let mut times = Vec::with_capacity(size.renders);
    for _ in 0..size.renders {
        let (p, took) = render(&app, &session).await?;
        ensure!(
            p.len() == page.len() || full,
            "the page changed between renders"
        );
        times.push(took);
    }
    times.sort();
    let median = times[times.len() / 2];
    let p90 = times[(times.len() * 9 / 10).min(times.len() - 1)];
    if full {
        println!(
            "seeded {total} messages over {} days, {} domains, in {:.1} s",
            size.days,
            size.internal + size.external,
            seeding.as_secs_f64()
        );
        println!(
            "overview (12 months, {} domains): page {} KB; first render {:.1} ms; over {} renders: median {:.1} ms, p90 {:.1} ms (target < 300 ms)",
            size.internal + size.external,
            page.len() / 1024,
            ms(cold),
            size.renders,
            ms(median),
            ms(p90)
        );
    }
    Ok(())
}
