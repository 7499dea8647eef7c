//! Envelopes per second over one node-pair stream: a [`Peers`] link batching envelopes onto
//! a `SessionService.Deliver` stream to a real tonic server on loopback, whose handler acks
//! at once — the transport between nodes, without sessions or Redis.
//!
//! `cargo bench -p cluster --bench peer_stream` runs the full size; without `--bench` (as
//! `cargo test --all-targets` runs it) a small smoke run checks every envelope is acked.

use anyhow::{Result, ensure};
use cluster::service::{HopIngress, SessionSvc};
use cluster::{Member, PeerConfig, Peers};
use fedrelay_proto::v1::session_service_server::SessionServiceServer;
use fedrelay_proto::{Address, Body, Envelope, v1};
use session_actor::{Accepted, SessionError, SessionId};
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Acks every envelope at once, numbering them.
struct Acker(AtomicU64);

#[async_trait::async_trait]
impl HopIngress for Acker {
    async fn submit_hop(&self, env: Envelope, _hops: u32) -> Result<Accepted, SessionError> {
        let seq = self.0.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(Accepted {
            session_id: SessionId::from_bytes(&env.session_id)
                .ok_or_else(|| SessionError::Invalid("session id".into()))?,
            relay_msg_id: env.relay_msg_id,
            seq,
            duplicate: false,
        })
    }
}

fn envelope(i: u64) -> Envelope {
    let alice = Address::new("http", "a.example", format!("alice{}", i % 500));
    let bob = Address::new("http", "b.example", format!("bob{}", i % 500));
    Envelope {
        session_id: SessionId::one_to_one(&alice, &bob).0.to_vec(),
        relay_msg_id: format!("0190f3a2-7c1e-7000-8000-{i:012}"),
        origin: Some(v1::Origin {
            platform: "http/a.example".into(),
            native_id: format!("evt-{i}"),
        }),
        sender: Some(alice),
        recipients: vec![bob],
        sent_at_ms: 1_763_900_000_000,
        body: Some(Body::Text(v1::Text {
            plain: "a message of about the length people send in chat".into(),
            rich: Vec::new(),
        })),
        ..Default::default()
    }
}

/// Process CPU time (user + system) so far, from /proc/self/stat, in seconds.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which is in parentheses): utime is the 12th, stime the
    // 13th of those; clock ticks are 100 per second on Linux.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

struct Outcome {
    per_sec: f64,
    cpu_us: f64,
    acked: u64,
}

async fn run(total: u64, callers: u64, flush_delay: Duration) -> Result<Outcome> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let acker = Arc::new(Acker(AtomicU64::new(0)));
    let svc = SessionServiceServer::new(SessionSvc {
        router: acker.clone(),
    });
    let server = tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(8 << 20))
            .add_service(svc)
            .serve_with_incoming(incoming)
            .await
    });
    let peers = Arc::new(Peers::new(PeerConfig {
        flush_delay,
        ..PeerConfig::default()
    }));
    let peer = Member::new("peer", addr.to_string());
    // Warm the link up (connect, open the stream).
    peers.forward(&peer, envelope(0), 0).await?;

    let next = Arc::new(AtomicU64::new(0));
    let cpu0 = cpu_seconds();
    let started = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let (peers, peer, next) = (peers.clone(), peer.clone(), next.clone());
            tokio::spawn(async move {
                let mut acked = 0u64;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return Ok::<u64, SessionError>(acked);
                    }
                    peers.forward(&peer, envelope(i), 0).await?;
                    acked += 1;
                }
            })
        })
        .collect();
    let mut acked = 0;
    for t in tasks {
        acked += t.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    server.abort();
    Ok(Outcome {
        per_sec: acked as f64 / elapsed,
        cpu_us: cpu * 1e6 / acked.max(1) as f64,
        acked,
    })
}

fn main() -> Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let (total, callers) = if full {
        (2_000_000, 8_192)
    } else {
        (5_000, 256)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut out = std::io::stdout();
    writeln!(
        out,
        "peer stream: {total} envelopes, {callers} concurrent callers, 2 worker threads"
    )?;
    writeln!(
        out,
        "{:<22} {:>14} {:>16}",
        "flush delay", "envelopes/s", "CPU µs/envelope"
    )?;
    for delay in [Duration::ZERO, Duration::from_millis(2)] {
        let o = rt.block_on(run(total, callers, delay))?;
        ensure!(o.acked == total, "{} of {total} envelopes acked", o.acked);
        writeln!(
            out,
            "{:<22} {:>14.0} {:>16.2}",
            format!("{delay:?}"),
            o.per_sec,
            o.cpu_us
        )?;
    }
    // One caller at a time: the round trip of one forward, envelope out and ack back.
    let sequential = if full { 20_000 } else { 500 };
    let o = rt.block_on(run(sequential, 1, Duration::ZERO))?;
    ensure!(o.acked == sequential, "{} of {sequential} acked", o.acked);
    writeln!(
        out,
        "one caller: {:.1} µs per round trip, {:.2} CPU µs per envelope",
        1e6 / o.per_sec,
        o.cpu_us
    )?;
    Ok(())
}
