//! End-to-end runs of the harness against a small in-test fake of the relay's HTTP edge
//! (signed `POST /v1/events`, SSE `GET /v1/stream` with `Last-Event-ID`, webhook push,
//! `/readyz`), with fault injection to show that loss, duplicates and reordering are caught.
//! The real relay-node is not needed.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::watch;

use relay_loadtest::plan::DomainSpec;
use relay_loadtest::receiver::ReceiveMode;
use relay_loadtest::report::RunResult;
use relay_loadtest::runner::{DeploymentSpec, RunOptions, run_and_report};
use relay_loadtest::scenario::{Protocol, ScenarioKind, Shape, domain_name};
use relay_loadtest::sign::{self, unix_now_secs};
use relay_loadtest::system::free_ports;

#[derive(Debug, Clone, Copy, Default)]
struct Faults {
    /// Accept but never deliver every n-th message.
    drop_every: Option<u64>,
    /// Deliver every n-th message twice.
    duplicate_every: Option<u64>,
    /// Swap the seq of every n-th message with the one before it on delivery.
    swap_every: Option<u64>,
    /// Close every SSE connection after this many events (tests resuming).
    close_stream_after: Option<usize>,
}

struct DomainLog {
    events: Mutex<Vec<String>>,
    len: watch::Sender<usize>,
}

struct Fake {
    domains: Vec<DomainSpec>,
    logs: Vec<DomainLog>,
    sessions: Mutex<HashMap<(String, String), (u64, u64)>>,
    counter: Mutex<u64>,
    pending_swap: Mutex<HashMap<(usize, String), String>>,
    faults: Faults,
    webhook: Option<String>,
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, s: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(s.into()).boxed());
    *r.status_mut() = status;
    r
}

fn header(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

impl Fake {
    fn domain_index(&self, name: &str) -> Option<usize> {
        self.domains.iter().position(|d| d.name == name)
    }

    fn publish(&self, domain: usize, ev: String) {
        let log = &self.logs[domain];
        let n = {
            let Ok(mut v) = log.events.lock() else { return };
            v.push(ev);
            v.len()
        };
        let _ = log.len.send(n);
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        match (req.method().as_str(), req.uri().path()) {
            ("GET", "/readyz") => full(StatusCode::OK, "ok"),
            ("POST", "/v1/events") => self.post(req).await,
            ("GET", "/v1/stream") => self.clone().stream(req),
            _ => full(StatusCode::NOT_FOUND, "{}"),
        }
    }

    async fn post(&self, req: Request<Incoming>) -> Response<Body> {
        let (d, ts, sig) = (
            header(&req, sign::HEADER_DOMAIN),
            header(&req, sign::HEADER_TIMESTAMP),
            header(&req, sign::HEADER_SIGNATURE),
        );
        let Ok(body) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
            return full(StatusCode::BAD_REQUEST, "{}");
        };
        let (Some(d), Some(ts), Some(sig)) = (d, ts, sig) else {
            return full(StatusCode::UNAUTHORIZED, "{}");
        };
        let Some(from_domain) = self.domain_index(&d) else {
            return full(StatusCode::UNAUTHORIZED, "{}");
        };
        let secret = self.domains[from_domain].secret.as_bytes();
        if sign::verify_body(secret, &ts, &body, &sig, unix_now_secs()).is_err() {
            return full(StatusCode::UNAUTHORIZED, "{}");
        }
        let Ok(ev) = serde_json::from_slice::<serde_json::Value>(&body) else {
            return full(StatusCode::BAD_REQUEST, "{}");
        };
        let from = format!("{}@{}", ev["from"].as_str().unwrap_or(""), d);
        let to = ev["to"].as_str().unwrap_or("").to_owned();
        let Some(to_domain) = to
            .split_once('@')
            .and_then(|(_, dom)| self.domain_index(dom))
        else {
            return full(StatusCode::BAD_REQUEST, "{}");
        };
        let key = if from < to {
            (from.clone(), to.clone())
        } else {
            (to.clone(), from.clone())
        };
        let (session, seq, n) = {
            let (Ok(mut sessions), Ok(mut counter)) = (self.sessions.lock(), self.counter.lock())
            else {
                return full(StatusCode::SERVICE_UNAVAILABLE, "{}");
            };
            let next = sessions.len() as u64;
            let entry = sessions.entry(key).or_insert((next, 0));
            entry.1 += 1;
            *counter += 1;
            (format!("{:032x}", entry.0), entry.1, *counter)
        };
        let delivered = serde_json::json!({
            "session_id": session, "seq": seq, "relay_msg_id": format!("m{n}"),
            "type": "message", "from": from, "from_platform": "http", "to": to,
            "sent_at": ev["sent_at"], "text": ev["text"],
        })
        .to_string();
        let f = self.faults;
        let dropped = f.drop_every.is_some_and(|k| n % k == 0);
        if !dropped {
            if f.swap_every.is_some_and(|k| n % k == 0) {
                // Hold this one back and publish it after the session's next one.
                if let Ok(mut p) = self.pending_swap.lock() {
                    p.insert((to_domain, session.clone()), delivered);
                }
            } else {
                self.publish(to_domain, delivered.clone());
                let held = self
                    .pending_swap
                    .lock()
                    .ok()
                    .and_then(|mut p| p.remove(&(to_domain, session.clone())));
                if let Some(h) = held {
                    self.publish(to_domain, h);
                }
                if f.duplicate_every.is_some_and(|k| n % k == 0) {
                    self.publish(to_domain, delivered);
                }
            }
        }
        full(
            StatusCode::ACCEPTED,
            serde_json::json!({"relay_msg_id": format!("m{n}"), "session_id": session,
                               "seq": seq, "duplicate": false})
            .to_string(),
        )
    }

    fn stream(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let (Some(d), Some(ts), Some(sig)) = (
            header(&req, sign::HEADER_DOMAIN),
            header(&req, sign::HEADER_TIMESTAMP),
            header(&req, sign::HEADER_SIGNATURE),
        ) else {
            return full(StatusCode::UNAUTHORIZED, "{}");
        };
        let Some(domain) = self.domain_index(&d) else {
            return full(StatusCode::UNAUTHORIZED, "{}");
        };
        let Ok(tsn) = ts.parse::<u64>() else {
            return full(StatusCode::UNAUTHORIZED, "{}");
        };
        let want = sign::sign_bodyless(
            self.domains[domain].secret.as_bytes(),
            tsn,
            "GET",
            "/v1/stream",
        );
        if want != sig {
            return full(StatusCode::UNAUTHORIZED, "{}");
        }
        // Ids are "<index>"; resume after Last-Event-ID.
        let start = header(&req, "last-event-id")
            .and_then(|s| s.parse::<usize>().ok())
            .map_or(0, |i| i + 1);
        let rx = self.logs[domain].len.subscribe();
        let limit = self.faults.close_stream_after;
        let state = (start, rx, 0usize, self.clone());
        let s = futures::stream::unfold(state, move |(cur, mut rx, sent, fake)| async move {
            if limit.is_some_and(|l| sent >= l) {
                return None;
            }
            let log = &fake.logs[domain];
            loop {
                let ev = log.events.lock().ok().and_then(|v| v.get(cur).cloned());
                if let Some(ev) = ev {
                    let text = format!(": keepalive\nid: {cur}\nevent: message\ndata: {ev}\n\n");
                    let frame: Result<Frame<Bytes>, Infallible> =
                        Ok(Frame::data(Bytes::from(text)));
                    return Some((frame, (cur + 1, rx, sent + 1, fake.clone())));
                }
                let _ = rx.borrow_and_update();
                if log.events.lock().map(|v| v.len() > cur).unwrap_or(false) {
                    continue;
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        });
        let mut r = Response::new(StreamBody::new(s).boxed());
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/event-stream"),
        );
        r
    }
}

async fn serve(fake: Arc<Fake>) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let fake = fake.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let fake = fake.clone();
                    async move { Ok::<_, Infallible>(fake.handle(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// In webhook mode, pushes each domain's log to the webhook in batches.
fn spawn_pusher(fake: Arc<Fake>, url: String) {
    for domain in 0..fake.domains.len() {
        let fake = fake.clone();
        let url = url.clone();
        tokio::spawn(async move {
            let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
            let mut rx = fake.logs[domain].len.subscribe();
            let mut cur = 0usize;
            loop {
                let batch: Vec<serde_json::Value> = fake.logs[domain]
                    .events
                    .lock()
                    .map(|v| v[cur.min(v.len())..].to_vec())
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|s| serde_json::from_str(s).ok())
                    .collect();
                if batch.is_empty() {
                    if rx.changed().await.is_err() {
                        return;
                    }
                    continue;
                }
                cur += batch.len();
                let body = serde_json::json!({ "events": batch }).to_string();
                let ts = unix_now_secs();
                let d = &fake.domains[domain];
                let Ok(req) = Request::post(url.as_str())
                    .header("content-type", "application/json")
                    .header(sign::HEADER_DOMAIN, d.name.as_str())
                    .header(sign::HEADER_TIMESTAMP, ts.to_string())
                    .header(
                        sign::HEADER_SIGNATURE,
                        sign::sign_body(d.secret.as_bytes(), ts, body.as_bytes()),
                    )
                    .body(Full::new(Bytes::from(body)))
                else {
                    return;
                };
                match client.request(req).await {
                    Ok(resp) if resp.status() == StatusCode::OK => {}
                    _ => return,
                }
            }
        });
    }
}

fn domains(n: usize) -> Vec<DomainSpec> {
    (0..n)
        .map(|i| DomainSpec {
            name: domain_name(i),
            secret: format!("secret-{i}"),
        })
        .collect()
}

fn fake(n: usize, faults: Faults, webhook: Option<String>) -> Arc<Fake> {
    Arc::new(Fake {
        domains: domains(n),
        logs: (0..n)
            .map(|_| DomainLog {
                events: Mutex::new(Vec::new()),
                len: watch::channel(0).0,
            })
            .collect(),
        sessions: Mutex::new(HashMap::new()),
        counter: Mutex::new(0),
        pending_swap: Mutex::new(HashMap::new()),
        faults,
        webhook,
    })
}

fn opts(rate: f64) -> RunOptions {
    RunOptions {
        scenario: ScenarioKind::OneToOne,
        protocol: Protocol::Http,
        shape: Shape {
            users: 40,
            ..Shape::default()
        },
        rate,
        duration: Duration::from_millis(1000),
        warmup: Duration::from_millis(200),
        max_inflight: 64,
        drain_timeout: Duration::from_secs(3),
        request_timeout: Duration::from_secs(5),
        retry_for: Duration::ZERO,
        faults: Default::default(),
        quiet: true,
    }
}

async fn run_against(
    faults: Faults,
    receive: ReceiveMode,
) -> Result<(RunResult, tempfile::TempDir)> {
    let out = tempfile::tempdir()?;
    let (webhook_listen, url) = match receive {
        ReceiveMode::Stream => (None, None),
        ReceiveMode::Webhook => {
            let port = free_ports(1)?
                .first()
                .copied()
                .ok_or_else(|| anyhow!("no port"))?;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            (Some(addr), Some(format!("http://{addr}/hook")))
        }
    };
    let f = fake(3, faults, url.clone());
    let addr = serve(f.clone()).await?;
    if let Some(u) = &f.webhook {
        spawn_pusher(f.clone(), u.clone());
    }
    let spec = DeploymentSpec::Target {
        targets: vec![format!("http://{addr}")],
        grpc_targets: Vec::new(),
        admin: Some(format!("http://{addr}")),
        domains: domains(3),
        webhook_listen,
        tls: Default::default(),
        xmpp: None,
    };
    let r = run_and_report(
        spec,
        receive,
        &opts(400.0),
        out.path(),
        Duration::from_secs(5),
    )
    .await
    .context("run")?;
    Ok((r, out))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_stream_run_passes_and_writes_results() -> Result<()> {
    let (r, out) = run_against(Faults::default(), ReceiveMode::Stream).await?;
    assert!(r.passed, "{:#?}", r.contract);
    assert_eq!(r.counts.planned, 480);
    assert_eq!(r.counts.accepted, 480);
    assert_eq!(r.contract.received_unique, 480);
    assert_eq!(r.counts.send_errors_total, 0);
    assert_eq!(
        r.latency_ms.end_to_end.count, 400,
        "only the measured window"
    );
    assert!(r.latency_ms.end_to_end.p50 > 0.0);
    assert!(r.throughput.received_per_s > 200.0, "{:?}", r.throughput);
    assert_eq!(r.receivers.stream_connects, 3);
    assert!(r.cpu.harness.is_some());
    assert!(r.cpu.relay.is_none(), "no relay pid with --target");
    assert!(!r.series.is_empty());
    for f in [
        "result.json",
        "latency_over_time.svg",
        "throughput.svg",
        "latency_distribution.svg",
    ] {
        assert!(out.path().join(f).is_file(), "{f}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loss_is_caught_end_to_end() -> Result<()> {
    let faults = Faults {
        drop_every: Some(40),
        ..Default::default()
    };
    let (r, _out) = run_against(faults, ReceiveMode::Stream).await?;
    assert!(!r.passed);
    assert_eq!(r.contract.lost, 12, "{:#?}", r.contract);
    assert!(r.counts.drain_timed_out);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_exits_1_when_the_contract_breaks() -> Result<()> {
    let faults = Faults {
        drop_every: Some(25),
        ..Default::default()
    };
    let f = fake(2, faults, None);
    let addr = serve(f).await?;
    let out = tempfile::tempdir()?;
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_relay-loadtest"));
    cmd.args(["run", "one-to-one", "--target"])
        .arg(format!("http://{addr}"))
        .args([
            "--rate",
            "200",
            "--duration",
            "1s",
            "--warmup",
            "0s",
            "--users",
            "8",
        ])
        .args(["--drain-timeout", "1s", "--quiet", "--out"])
        .arg(out.path());
    for d in domains(2) {
        cmd.arg("--domain").arg(format!("{}={}", d.name, d.secret));
    }
    let output = cmd.output().await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("contract              FAILED  lost 8"),
        "{stdout}"
    );
    assert!(out.path().join("result.json").is_file());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_and_reordering_are_caught_end_to_end() -> Result<()> {
    let faults = Faults {
        duplicate_every: Some(50),
        swap_every: Some(97),
        ..Default::default()
    };
    let (r, _out) = run_against(faults, ReceiveMode::Stream).await?;
    assert!(!r.passed);
    assert_eq!(r.contract.duplicates, 9, "{:#?}", r.contract);
    assert!(r.contract.order_violations >= 1, "{:#?}", r.contract);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_streams_resume_with_last_event_id() -> Result<()> {
    let faults = Faults {
        close_stream_after: Some(25),
        ..Default::default()
    };
    let (r, _out) = run_against(faults, ReceiveMode::Stream).await?;
    assert!(r.passed, "{:#?}", r.contract);
    assert!(r.receivers.stream_reconnects > 3, "{:?}", r.receivers);
    assert_eq!(r.contract.duplicates, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_run_passes() -> Result<()> {
    let (r, _out) = run_against(Faults::default(), ReceiveMode::Webhook).await?;
    assert!(r.passed, "{:#?}", r.contract);
    assert_eq!(r.contract.received_unique, 480);
    assert!(r.receivers.webhook_batches > 0);
    assert_eq!(r.receivers.webhook_auth_failures, 0);
    Ok(())
}
