//! A real XMPP client for tests: one slixmpp process (`test-support/py/xmpp_client.py`) per
//! logged-in user, driven over JSON lines, killed on drop.
//!
//! The interpreter is `$XMPP_TEST_PYTHON` if set, else the virtualenv that
//! `tools/xmpp-tools` makes at `<workspace>/.tools/xmpp-venv` (slixmpp pinned there).

use crate::wait_for;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

/// How long [`XmppClient::login`] waits for the session (TLS, SASL, bind, roster, presence).
const LOGIN_TIMEOUT: Duration = Duration::from_secs(15);

/// A stanza the client received: `<message/>`, `<presence/>` or `<iq/>`, with its
/// top-level attributes (empty when absent) and its whole XML.
#[derive(Debug, Clone)]
pub struct Stanza {
    /// `message`, `presence` or `iq`.
    pub name: String,
    /// The `type` attribute.
    pub kind: String,
    pub from: String,
    pub id: String,
    pub xml: String,
}

impl std::fmt::Display for Stanza {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.xml)
    }
}

#[derive(Default)]
struct State {
    received: Vec<Stanza>,
    /// Indexes into `received` already returned by `wait_stanza`.
    taken: Vec<bool>,
    /// The full JID once the session is ready.
    ready: Option<String>,
    failed: Option<String>,
    disconnected: Option<String>,
    /// `error` events (commands it did not understand) and lines that were not JSON.
    errors: Vec<String>,
    /// stdout closed: the process is gone.
    eof: bool,
    stderr_eof: bool,
    stderr: String,
}

type Shared = Arc<Mutex<State>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One logged-in XMPP user (a slixmpp process); the process is killed on drop.
pub struct XmppClient {
    jid: String,
    child: Child,
    stdin: tokio::sync::Mutex<ChildStdin>,
    state: Shared,
}

/// The Python interpreter with slixmpp: `$XMPP_TEST_PYTHON`, else the virtualenv of
/// `tools/xmpp-tools`.
pub fn python() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("XMPP_TEST_PYTHON") {
        return Ok(PathBuf::from(p));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("test-support has no parent directory")?;
    let p = root.join(".tools/xmpp-venv/bin/python3");
    if !p.is_file() {
        bail!(
            "{} not found: run `tools/xmpp-tools` (it makes that virtualenv with slixmpp; \
             `tools/test` runs it), or point XMPP_TEST_PYTHON at a python3 with slixmpp 1.17",
            p.display()
        );
    }
    Ok(p)
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("py/xmpp_client.py")
}

impl XmppClient {
    /// Logs `jid` in over STARTTLS on 127.0.0.1:`port`, the server's certificate checked
    /// against `ca` for the JID's domain, then fetches the roster and sends initial
    /// presence. Subscription requests are never answered automatically. Fails with the
    /// client's reason (e.g. a wrong password) and its stderr.
    pub async fn login(jid: &str, password: &str, port: u16, ca: &Path) -> Result<Self> {
        let python = python()?;
        let mut child = Command::new(&python)
            .arg(script())
            .args(["--jid", jid, "--password", password, "--host", "127.0.0.1"])
            .arg("--port")
            .arg(port.to_string())
            .arg("--ca")
            .arg(ca)
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} {}", python.display(), script().display()))?;
        let state: Shared = Arc::default();
        let stdin = child.stdin.take().context("no stdin")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let stderr = child.stderr.take().context("no stderr")?;
        tokio::spawn(read_stdout(stdout, state.clone()));
        tokio::spawn(read_stderr(stderr, state.clone()));
        let client = Self {
            jid: jid.to_string(),
            child,
            stdin: tokio::sync::Mutex::new(stdin),
            state,
        };
        let outcome = wait_for(
            &format!("{jid} to log in on port {port}"),
            LOGIN_TIMEOUT,
            || {
                let s = lock(&client.state);
                let r = if let Some(full) = &s.ready {
                    Some(Ok(full.clone()))
                } else if let Some(reason) = &s.failed {
                    Some(Err(reason.clone()))
                } else if s.eof {
                    Some(Err("the client exited without a word".to_string()))
                } else {
                    None
                };
                async move { r }
            },
        )
        .await;
        match outcome {
            Ok(Ok(full)) => Ok(Self {
                jid: full,
                ..client
            }),
            Ok(Err(reason)) => {
                // Let stderr (a Python traceback, say) arrive before reporting it.
                let _ = wait_for("the client's stderr", Duration::from_secs(2), || {
                    let s = lock(&client.state);
                    let r = (s.eof && s.stderr_eof).then_some(());
                    async move { r }
                })
                .await;
                bail!(
                    "XMPP login of {jid} on port {port} failed: {reason}\nclient stderr:\n{}",
                    client.stderr()
                )
            }
            Err(e) => bail!("{e:#}\nclient stderr:\n{}", client.stderr()),
        }
    }

    /// The full JID the server bound (`user@domain/resource`).
    pub fn jid(&self) -> &str {
        &self.jid
    }

    /// Sends `xml` (one stanza, or several) as it is on the client's stream.
    pub async fn send(&self, xml: &str) -> Result<()> {
        let mut line = serde_json::json!({"op": "send", "xml": xml}).to_string();
        line.push('\n');
        let mut stdin = self.stdin.lock().await;
        stdin
            .write_all(line.as_bytes())
            .await
            .with_context(|| format!("sending to {}'s client (has it exited?)", self.jid))?;
        stdin.flush().await?;
        Ok(())
    }

    /// Waits up to `timeout` for the first received stanza not returned before that
    /// matches `pred`, and returns it (taken: later calls skip it). The error names `what`
    /// and lists everything received.
    pub async fn wait_stanza(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Stanza) -> bool,
    ) -> Result<Stanza> {
        let found = wait_for(what, timeout, || {
            let mut s = lock(&self.state);
            let i = (0..s.received.len()).find(|&i| !s.taken[i] && pred(&s.received[i]));
            let r = i.map(|i| {
                s.taken[i] = true;
                s.received[i].clone()
            });
            async move { r }
        })
        .await;
        found.map_err(|e| {
            anyhow::anyhow!("{}: {e}\n{}", self.jid, self.describe_received().trim_end())
        })
    }

    /// Every stanza received so far, taken or not.
    pub fn received(&self) -> Vec<Stanza> {
        lock(&self.state).received.clone()
    }

    /// What the client's stderr holds so far (slixmpp's warnings, a traceback).
    pub fn stderr(&self) -> String {
        lock(&self.state).stderr.clone()
    }

    fn describe_received(&self) -> String {
        let s = lock(&self.state);
        let mut out = format!("{} received {} stanza(s):\n", self.jid, s.received.len());
        for (st, taken) in s.received.iter().zip(&s.taken) {
            let mark = if *taken { "  (taken) " } else { "  " };
            out.push_str(&format!("{mark}{}\n", st.xml));
        }
        if let Some(d) = &s.disconnected {
            out.push_str(&format!("then disconnected: {d}\n"));
        }
        for e in &s.errors {
            out.push_str(&format!("client error: {e}\n"));
        }
        if !s.stderr.is_empty() {
            out.push_str(&format!("client stderr:\n{}", s.stderr));
        }
        out
    }

    /// Closes the stream cleanly and waits for the process to exit (killed after 5 s).
    pub async fn quit(mut self) -> Result<()> {
        let line = format!("{}\n", serde_json::json!({"op": "quit"}));
        {
            let mut stdin = self.stdin.lock().await;
            let _ = stdin.write_all(line.as_bytes()).await;
            let _ = stdin.flush().await;
        }
        match tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    bail!(
                        "{}'s client exited with {status} on quit\n{}",
                        self.jid,
                        self.describe_received()
                    );
                }
                Ok(())
            }
            Err(_) => {
                let _ = self.child.kill().await;
                bail!("{}'s client did not exit within 5 s of quit", self.jid)
            }
        }
    }
}

async fn read_stdout(stdout: impl AsyncRead + Unpin, state: Shared) {
    let mut lines = BufReader::new(stdout).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let v: serde_json::Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(_) => {
                lock(&state).errors.push(format!("not JSON: {line}"));
                continue;
            }
        };
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
        let mut s = lock(&state);
        match field("event").as_str() {
            "stanza" => {
                s.received.push(Stanza {
                    name: field("name"),
                    kind: field("type"),
                    from: field("from"),
                    id: field("id"),
                    xml: field("xml"),
                });
                s.taken.push(false);
            }
            "ready" => s.ready = Some(field("jid")),
            "failed" => s.failed = Some(field("reason")),
            "disconnected" => s.disconnected = Some(field("reason")),
            _ => s.errors.push(line),
        }
    }
    lock(&state).eof = true;
}

async fn read_stderr(stderr: impl AsyncRead + Unpin, state: Shared) {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut s = lock(&state);
        s.stderr.push_str(&line);
        s.stderr.push('\n');
    }
    lock(&state).stderr_eof = true;
}
