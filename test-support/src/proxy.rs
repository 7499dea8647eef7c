//! A TCP proxy that can partition (blackhole) or refuse the path it carries, for fault tests.
//!
//! It runs on a small Tokio runtime of its own, so it keeps forwarding while the test's
//! runtime is blocked (a `current_thread` test starting a process, say) and it works from any
//! kind of test.

use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What a [`FaultProxy`] does with the traffic it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forward bytes both ways.
    Pass,
    /// A network partition: connections (existing and new) stay open, but no byte moves in
    /// either direction. Leaving this mode closes the connections it held.
    Blackhole,
    /// Close every existing connection, and every new one right after it is accepted.
    Refuse,
}

/// Counters of a [`FaultProxy`].
#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    refused: AtomicU64,
}

/// A TCP proxy from `127.0.0.1:<listen_port>` to a target, switchable between
/// [`ProxyMode`]s. Dropping it stops it and closes its connections.
pub struct FaultProxy {
    rt: Option<tokio::runtime::Runtime>,
    mode: watch::Sender<ProxyMode>,
    local: SocketAddr,
    target: SocketAddr,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("local", &self.local)
            .field("target", &self.target)
            .field("mode", &*self.mode.borrow())
            .finish()
    }
}

impl FaultProxy {
    /// Listens on `127.0.0.1:listen_port` (0: any free port, see
    /// [`local_addr`](Self::local_addr)) and forwards to `target`, starting in
    /// [`ProxyMode::Pass`]. The port is bound when this returns.
    pub fn start(listen_port: u16, target: SocketAddr) -> Result<Self> {
        let std_listener = std::net::TcpListener::bind(("127.0.0.1", listen_port))
            .with_context(|| format!("fault proxy: binding 127.0.0.1:{listen_port}"))?;
        std_listener.set_nonblocking(true)?;
        let local = std_listener.local_addr()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fault-proxy")
            .enable_all()
            .build()
            .context("fault proxy runtime")?;
        let listener = {
            let _guard = rt.enter();
            TcpListener::from_std(std_listener)?
        };
        let (mode, mode_rx) = watch::channel(ProxyMode::Pass);
        let counters = Arc::new(Counters::default());
        rt.spawn(accept_loop(listener, target, mode_rx, counters.clone()));
        Ok(Self {
            rt: Some(rt),
            mode,
            local,
            target,
            counters,
        })
    }

    /// Switches the mode; it applies at once to existing and new connections.
    pub fn set_mode(&self, mode: ProxyMode) {
        self.mode.send_replace(mode);
    }

    pub fn mode(&self) -> ProxyMode {
        *self.mode.borrow()
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Connections accepted so far (including refused ones).
    pub fn accepted(&self) -> u64 {
        self.counters.accepted.load(Ordering::Relaxed)
    }

    /// Connections closed right after accept because the mode was `Refuse`.
    pub fn refused(&self) -> u64 {
        self.counters.refused.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Also fine inside another runtime: nothing here waits for the tasks.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    mode: watch::Receiver<ProxyMode>,
    counters: Arc<Counters>,
) {
    loop {
        let sock = match listener.accept().await {
            Ok((s, _)) => s,
            // Out of descriptors and the like: try again shortly rather than spin.
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        counters.accepted.fetch_add(1, Ordering::Relaxed);
        if *mode.borrow() == ProxyMode::Refuse {
            counters.refused.fetch_add(1, Ordering::Relaxed);
            drop(sock);
            continue;
        }
        let _ = sock.set_nodelay(true);
        tokio::spawn(connection(sock, target, mode.clone()));
    }
}

/// Waits until the mode is no longer `Blackhole` (or the proxy is gone).
async fn hold(mode: &mut watch::Receiver<ProxyMode>) {
    loop {
        if *mode.borrow_and_update() != ProxyMode::Blackhole {
            return;
        }
        if mode.changed().await.is_err() {
            return;
        }
    }
}

/// Waits until the mode is no longer `Pass` (or the proxy is gone).
async fn left_pass(mode: &mut watch::Receiver<ProxyMode>) {
    loop {
        if *mode.borrow_and_update() != ProxyMode::Pass {
            return;
        }
        if mode.changed().await.is_err() {
            return;
        }
    }
}

/// One proxied connection. Whenever the mode leaves `Pass` the connection stalls (while
/// `Blackhole`) and then closes, or closes at once (`Refuse`).
async fn connection(
    mut client: TcpStream,
    target: SocketAddr,
    mut mode: watch::Receiver<ProxyMode>,
) {
    let upstream = tokio::select! {
        r = TcpStream::connect(target) => r,
        _ = left_pass(&mut mode) => {
            hold(&mut mode).await;
            return;
        }
    };
    let Ok(mut upstream) = upstream else {
        return; // the target is down: the client sees the connection close
    };
    let _ = upstream.set_nodelay(true);
    let (mut cr, mut cw) = client.split();
    let (mut ur, mut uw) = upstream.split();
    let mut cbuf = vec![0u8; 16 * 1024];
    let mut ubuf = vec![0u8; 16 * 1024];
    let (mut client_open, mut upstream_open) = (true, true);
    while client_open || upstream_open {
        let step = tokio::select! {
            r = cr.read(&mut cbuf), if client_open => {
                pump(r, &cbuf, &mut uw, &mut client_open, &mut mode).await
            }
            r = ur.read(&mut ubuf), if upstream_open => {
                pump(r, &ubuf, &mut cw, &mut upstream_open, &mut mode).await
            }
            _ = left_pass(&mut mode) => Step::ModeChanged,
        };
        match step {
            Step::Continue => {}
            Step::Close => return,
            Step::ModeChanged => {
                // Blackhole: keep both sockets open and move nothing until the mode
                // changes again; Refuse: close now.
                hold(&mut mode).await;
                return;
            }
        }
    }
}

enum Step {
    Continue,
    Close,
    ModeChanged,
}

/// Forwards what one read returned to the other side, unless the mode left `Pass` meanwhile.
async fn pump<W: AsyncWrite + Unpin>(
    read: std::io::Result<usize>,
    buf: &[u8],
    to: &mut W,
    open: &mut bool,
    mode: &mut watch::Receiver<ProxyMode>,
) -> Step {
    match read {
        Ok(0) => {
            // Half close: pass the FIN on and keep the other direction going.
            *open = false;
            let _ = to.shutdown().await;
            Step::Continue
        }
        Ok(n) => {
            if *mode.borrow() != ProxyMode::Pass {
                return Step::ModeChanged;
            }
            tokio::select! {
                w = to.write_all(&buf[..n]) => match w {
                    Ok(()) => Step::Continue,
                    Err(_) => Step::Close,
                },
                _ = left_pass(mode) => Step::ModeChanged,
            }
        }
        Err(_) => Step::Close,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::{Result, bail, ensure};
    use std::time::Duration;

    const T: Duration = Duration::from_secs(5);
    /// How long "nothing arrives" is watched for.
    const QUIET: Duration = Duration::from_millis(300);

    /// An echo server on a free port of this test's runtime.
    async fn echo() -> Result<SocketAddr> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        Ok(addr)
    }

    /// Writes `msg` and reads its echo at the same time (large messages fill the buffers).
    async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Result<()> {
        let (mut r, mut w) = s.split();
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(T, async {
            tokio::try_join!(w.write_all(msg), r.read_exact(&mut got))
        })
        .await??;
        ensure!(got == msg, "echo differs ({} bytes)", got.len());
        Ok(())
    }

    /// The peer closed the connection (EOF or reset) within `T`.
    async fn closed(s: &mut TcpStream) -> Result<()> {
        let mut b = [0u8; 16];
        match tokio::time::timeout(T, s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => Ok(()),
            Ok(Ok(n)) => bail!("read {n} bytes from a connection that should be closed"),
            Err(_) => bail!("connection still open after {T:?}"),
        }
    }

    /// Nothing arrives within `QUIET`, and the connection stays open.
    async fn stalled(s: &mut TcpStream) -> Result<()> {
        let mut b = [0u8; 16];
        match tokio::time::timeout(QUIET, s.read(&mut b)).await {
            Err(_) => Ok(()),
            Ok(r) => bail!("expected a stall, read returned {r:?}"),
        }
    }

    #[tokio::test]
    async fn pass_forwards_both_ways() -> Result<()> {
        let proxy = FaultProxy::start(0, echo().await?)?;
        let mut s = TcpStream::connect(proxy.local_addr()).await?;
        round_trip(&mut s, b"hello").await?;
        round_trip(&mut s, &vec![7u8; 100_000]).await?;
        // Half close travels through: the echo server ends its copy and closes.
        s.shutdown().await?;
        closed(&mut s).await?;
        ensure!(proxy.accepted() == 1);
        Ok(())
    }

    #[tokio::test]
    async fn refuse_closes_existing_and_new_connections() -> Result<()> {
        let proxy = FaultProxy::start(0, echo().await?)?;
        let mut s = TcpStream::connect(proxy.local_addr()).await?;
        round_trip(&mut s, b"before").await?;
        proxy.set_mode(ProxyMode::Refuse);
        closed(&mut s).await?;
        // A new connection is accepted by the kernel, then closed by the proxy.
        if let Ok(mut n) = TcpStream::connect(proxy.local_addr()).await {
            closed(&mut n).await?;
        }
        proxy.set_mode(ProxyMode::Pass);
        let mut s = TcpStream::connect(proxy.local_addr()).await?;
        round_trip(&mut s, b"after").await?;
        Ok(())
    }

    #[tokio::test]
    async fn blackhole_stalls_and_pass_restores() -> Result<()> {
        let proxy = FaultProxy::start(0, echo().await?)?;
        let mut old = TcpStream::connect(proxy.local_addr()).await?;
        round_trip(&mut old, b"before").await?;
        proxy.set_mode(ProxyMode::Blackhole);
        ensure!(proxy.mode() == ProxyMode::Blackhole);
        // Existing connection: the write is taken, nothing comes back.
        old.write_all(b"lost in the partition").await?;
        stalled(&mut old).await?;
        // New connection: accepted, but nothing moves either.
        let mut new = TcpStream::connect(proxy.local_addr()).await?;
        new.write_all(b"also lost").await?;
        stalled(&mut new).await?;
        // Healing closes what the partition held and lets new connections through.
        proxy.set_mode(ProxyMode::Pass);
        closed(&mut old).await?;
        closed(&mut new).await?;
        let mut s = TcpStream::connect(proxy.local_addr()).await?;
        round_trip(&mut s, b"after").await?;
        Ok(())
    }

    #[tokio::test]
    async fn a_down_target_closes_the_connection() -> Result<()> {
        // A port nothing listens on.
        let target = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let proxy = FaultProxy::start(0, target)?;
        let mut s = TcpStream::connect(proxy.local_addr()).await?;
        closed(&mut s).await?;
        Ok(())
    }
}
