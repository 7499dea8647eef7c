//! sipp (Debian's `sip-tester`, 3.6.1) as a SIP peer: a UAC or a UAS running a scenario
//! given as XML, on a free port of 127.0.0.1, with its own temporary directory, killed on
//! drop.
//!
//! Every run traces the messages sipp sends and receives (`-trace_msg`), its errors
//! (`-trace_err`), the scenario's `<log>` actions (`-trace_logs`) and its statistics
//! (`-trace_stat`, the last line of which holds the totals), so a test asserts on the raw SIP
//! messages sipp received: [`SippRun::messages_received`], [`TracedMessage::header`],
//! [`TracedMessage::body`].
//!
//! Debian's sipp is built without TLS: for SIP over TLS, put [`crate::stunnel::Stunnel`]
//! between sipp (TCP) and the TLS peer.
//!
//! The shared scenarios of `loadtest/sip/` are here as [`MESSAGE_UAC`] and [`MESSAGE_UAS`].

use crate::find_binary;
use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `loadtest/sip/message_uac.xml`: sends one `MESSAGE` per call (From
/// `<sip:[field0]@[field1]>`, To and Request-URI `sip:[field2]@[field3]` from the injection
/// file, a `text/plain` body with `token=[call_id]`) and expects a 200.
pub const MESSAGE_UAC: &str = include_str!("../../loadtest/sip/message_uac.xml");

/// `loadtest/sip/message_uas.xml`: answers each `MESSAGE` with a 200 and logs its arrival
/// with the body's token; lingers `linger_ms` (a `-set` variable, 5000 when unset) after
/// answering. Set it to 0 over TCP (see the file).
pub const MESSAGE_UAS: &str = include_str!("../../loadtest/sip/message_uas.xml");

/// How long [`Sipp::start`] waits for sipp to bind its port.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`Sipp::stop`] waits after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The transport sipp uses, with one socket for all calls (`-t u1`, `-t t1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SippTransport {
    /// `-t u1`: one UDP socket.
    Udp,
    /// `-t t1`: one TCP connection (sipp listens on its port too).
    Tcp,
}

impl SippTransport {
    fn flag(self) -> &'static str {
        match self {
            SippTransport::Udp => "u1",
            SippTransport::Tcp => "t1",
        }
    }
}

/// What to run: a scenario and the command line around it. Build with [`SippOptions::uac`]
/// or [`SippOptions::uas`] and the builder methods.
#[derive(Debug, Clone)]
pub struct SippOptions {
    /// The scenario (XML), written to `scenario.xml` in sipp's directory (`-sf`).
    pub scenario: String,
    /// `-t u1` or `-t t1`.
    pub transport: SippTransport,
    /// Where a UAC sends (`host:port`, the last argument); `None` for a UAS.
    pub remote: Option<SocketAddr>,
    /// The local port (`-p`); a free one when `None` (and a fresh one again if someone else
    /// takes it before sipp binds it).
    pub port: Option<u16>,
    /// Calls to run before exiting (`-m`); `None` runs until stopped (a UAS in the
    /// background).
    pub calls: Option<u64>,
    /// New calls per second (`-r`).
    pub rate: u32,
    /// sipp's own deadline (`-timeout` with `-timeout_error`: reaching it is a failure, and
    /// the calls still open are abandoned).
    pub timeout: Duration,
    /// How long a `<recv>` waits before the call fails (`-recv_timeout`); without it a UAC
    /// over UDP retransmits for about 30 s before giving up.
    pub recv_timeout: Option<Duration>,
    /// The injection file's content (`-inf`): `SEQUENTIAL` (or `RANDOM`, `USER`) on the first
    /// line, then `;`-separated fields (`[field0]`, `[field1]`…) one call a line.
    pub injection: Option<String>,
    /// Global variables (`-set name value`), declared in the scenario with `<Global>`.
    pub set: Vec<(String, String)>,
    /// Whether [`Sipp::wait`] fails on a nonzero exit code (true unless told otherwise).
    pub expect_success: bool,
    /// More arguments, before the remote address.
    pub extra_args: Vec<String>,
}

impl SippOptions {
    /// A UAC sending to `remote`: 1 call at 10 calls/s, a 10 s deadline, UDP.
    pub fn uac(scenario: &str, remote: SocketAddr) -> Self {
        Self {
            remote: Some(remote),
            ..Self::uas(scenario)
        }
    }

    /// A UAS: answers 1 call, a 10 s deadline, UDP.
    pub fn uas(scenario: &str) -> Self {
        Self {
            scenario: scenario.to_string(),
            transport: SippTransport::Udp,
            remote: None,
            port: None,
            calls: Some(1),
            rate: 10,
            timeout: Duration::from_secs(10),
            recv_timeout: None,
            injection: None,
            set: Vec::new(),
            expect_success: true,
            extra_args: Vec::new(),
        }
    }

    /// UDP or TCP.
    pub fn transport(mut self, transport: SippTransport) -> Self {
        self.transport = transport;
        self
    }

    /// A fixed local port (`-p`), instead of a free one.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// `-m calls`.
    pub fn calls(mut self, calls: u64) -> Self {
        self.calls = Some(calls);
        self
    }

    /// No `-m`: runs until [`Sipp::stop`], drop, or the deadline (which is then raised to an
    /// hour unless set afterwards).
    pub fn background(mut self) -> Self {
        self.calls = None;
        self.timeout = Duration::from_secs(3600);
        self
    }

    /// `-r rate`: new calls per second.
    pub fn rate(mut self, rate: u32) -> Self {
        self.rate = rate;
        self
    }

    /// sipp's own deadline (`-timeout`, whole seconds, at least 1).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// `-recv_timeout`: a call waiting longer than this for a message fails.
    pub fn recv_timeout(mut self, timeout: Duration) -> Self {
        self.recv_timeout = Some(timeout);
        self
    }

    /// The injection file's content (`-inf`), e.g. from [`users_csv`].
    pub fn injection(mut self, csv: &str) -> Self {
        self.injection = Some(csv.to_string());
        self
    }

    /// `-set name value`.
    pub fn set(mut self, name: &str, value: &str) -> Self {
        self.set.push((name.to_string(), value.to_string()));
        self
    }

    /// With `false`, [`Sipp::wait`] returns the run whatever the exit code.
    pub fn expect_success(mut self, expect: bool) -> Self {
        self.expect_success = expect;
        self
    }

    /// One more command-line argument (before the remote address).
    pub fn arg(mut self, arg: &str) -> Self {
        self.extra_args.push(arg.to_string());
        self
    }
}

/// An injection file for [`MESSAGE_UAC`]: `SEQUENTIAL`, then `users` rows
/// `user<i>;<from_domain>;user<i>;<to_domain>`, so calls go round the user pairs in order.
pub fn users_csv(users: usize, from_domain: &str, to_domain: &str) -> String {
    let mut s = String::from("SEQUENTIAL\n");
    for i in 0..users {
        let _ = writeln!(s, "user{i};{from_domain};user{i};{to_domain}");
    }
    s
}

/// A free port on 127.0.0.1 for UDP and TCP alike (sipp binds one or the other on the same
/// number), never handed out twice in one process (it comes from [`free_port`]).
pub fn free_udp_port() -> Result<u16> {
    crate::free_udp_tcp_port()
}

/// Whether something is bound to 127.0.0.1:`port` (or the wildcard address): a UDP socket,
/// or a TCP socket in the LISTEN state, as `/proc/net/udp` and `/proc/net/tcp` list them.
/// Reading them has no side effect on the server, unlike connecting or binding to probe.
pub(crate) fn bound(udp: bool, port: u16) -> bool {
    let file = if udp {
        "/proc/net/udp"
    } else {
        "/proc/net/tcp"
    };
    let Ok(table) = std::fs::read_to_string(file) else {
        return false;
    };
    let ours = [
        format!("0100007F:{port:04X}"),
        format!("00000000:{port:04X}"),
    ];
    table.lines().skip(1).any(|line| {
        let mut cols = line.split_whitespace();
        let local = cols.nth(1).unwrap_or_default();
        let state = cols.nth(1).unwrap_or_default();
        ours.iter().any(|o| o == local) && (udp || state == "0A")
    })
}

/// A running sipp, killed on drop.
pub struct Sipp {
    child: Option<Child>,
    status: Option<i32>,
    port: u16,
    expect_success: bool,
    what: String,
    dir: tempfile::TempDir,
}

impl Sipp {
    /// Starts sipp with `opts` and returns once it has bound its port (or has already
    /// exited: [`wait`](Self::wait) then reports how). Fails naming `apt-get install
    /// sip-tester` when sipp is missing.
    pub fn start(opts: SippOptions) -> Result<Self> {
        let bin = find_binary("sipp", "sip-tester")?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = match opts.port {
                Some(p) => p,
                None => free_udp_port()?,
            };
            let mut s = Self::spawn(&bin, &opts, port)?;
            match s.wait_bound(opts.transport) {
                Ok(()) => return Ok(s),
                // A port chosen free can be taken by someone else before sipp binds it.
                Err(e) if opts.port.is_none() && attempt < 3 && s.bind_failed() => drop(e),
                Err(e) => return Err(e),
            }
        }
    }

    fn spawn(bin: &Path, opts: &SippOptions, port: u16) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("sipp-").tempdir()?;
        let d = dir.path();
        std::fs::write(d.join("scenario.xml"), &opts.scenario)?;
        let mut cmd = Command::new(bin);
        // -sf first: -set needs the scenario's <Global> variables declared.
        cmd.arg("-sf")
            .arg(d.join("scenario.xml"))
            .args(["-i", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .args(["-t", opts.transport.flag(), "-nostdin"])
            .args(["-trace_msg", "-message_file"])
            .arg(d.join("messages.log"))
            .args(["-trace_err", "-error_file"])
            .arg(d.join("errors.log"))
            .args(["-trace_logs", "-log_file"])
            .arg(d.join("log.log"))
            .args(["-trace_stat", "-stf"])
            .arg(d.join("stats.csv"))
            .args(["-timeout"])
            .arg(format!("{}s", opts.timeout.as_secs().max(1)))
            .arg("-timeout_error")
            .args(["-r"])
            .arg(opts.rate.to_string())
            .args(["-buff_size", "4194304"]);
        if let Some(m) = opts.calls {
            cmd.arg("-m").arg(m.to_string());
        }
        if let Some(t) = opts.recv_timeout {
            cmd.arg("-recv_timeout")
                .arg(format!("{}ms", t.as_millis().max(1)));
        }
        if let Some(csv) = &opts.injection {
            std::fs::write(d.join("injection.csv"), csv)?;
            cmd.arg("-inf").arg(d.join("injection.csv"));
        }
        for (name, value) in &opts.set {
            cmd.arg("-set").arg(name).arg(value);
        }
        cmd.args(&opts.extra_args);
        if let Some(remote) = opts.remote {
            cmd.arg(remote.to_string());
        }
        let what = match opts.remote {
            Some(r) => format!("sipp UAC on 127.0.0.1:{port} to {r}"),
            None => format!("sipp UAS on 127.0.0.1:{port}"),
        };
        let child = cmd
            .current_dir(d)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(d.join("screen.log"))?)
            .stderr(std::fs::File::create(d.join("stderr.log"))?)
            .spawn()
            .context("starting sipp")?;
        Ok(Self {
            child: Some(child),
            status: None,
            port,
            expect_success: opts.expect_success,
            what,
            dir,
        })
    }

    fn wait_bound(&mut self, transport: SippTransport) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if bound(transport == SippTransport::Udp, self.port) {
                return Ok(());
            }
            if self.try_exit()?.is_some() {
                if self.bind_failed() {
                    bail!(
                        "{} could not bind its port:\n{}",
                        self.what,
                        self.diagnostics()
                    );
                }
                // It ran and exited (a fast UAC, or a failure): wait() reports it.
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not bind its port within {START_TIMEOUT:?}:\n{}",
                    self.what,
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn bind_failed(&self) -> bool {
        let out = self.read("stderr.log") + &self.read("errors.log");
        out.contains("Unable to bind") || out.contains("Address already in use")
    }

    /// The exit code once it has exited (reaped then); a signal counts as -1.
    fn try_exit(&mut self) -> Result<Option<i32>> {
        if self.status.is_none()
            && let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            self.status = Some(status.code().unwrap_or(-1));
            self.child = None;
        }
        Ok(self.status)
    }

    /// The local port (UDP or TCP, per its transport).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its directory: `scenario.xml`, `messages.log`, `errors.log`, `log.log`, `stats.csv`,
    /// `screen.log` (its screen output), `stderr.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(file)).unwrap_or_default()
    }

    /// Its message trace so far (sipp writes every entry through at once).
    pub fn messages(&self) -> String {
        self.read("messages.log")
    }

    /// Its `<log>` lines so far.
    pub fn log(&self) -> String {
        self.read("log.log")
    }

    /// Waits until its trace holds `count` received messages that are `method_or_code`
    /// ([`TracedMessage::is`]) and returns them all; fails after `timeout`, or if sipp exits
    /// without them.
    pub fn wait_received(
        &mut self,
        method_or_code: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<TracedMessage>> {
        let deadline = Instant::now() + timeout;
        loop {
            let got: Vec<TracedMessage> = parse_trace(&self.messages())
                .into_iter()
                .filter(|m| m.direction == Direction::Received && m.is(method_or_code))
                .collect();
            if got.len() >= count {
                return Ok(got);
            }
            let exited = self.try_exit()?;
            if exited.is_some() || Instant::now() >= deadline {
                let why = match exited {
                    Some(code) => format!("it exited with {code}"),
                    None => format!("waited {timeout:?}"),
                };
                bail!(
                    "{} received {} {method_or_code}, not {count} ({why}):\n{}",
                    self.what,
                    got.len(),
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for sipp to exit and returns what it did. Fails after `timeout` (killing it),
    /// and on a nonzero exit code unless the options said not to expect success; the error
    /// holds its stderr and the end of its error file.
    pub fn wait(&mut self, timeout: Duration) -> Result<SippRun> {
        let deadline = Instant::now() + timeout;
        let code = loop {
            if let Some(code) = self.try_exit()? {
                break code;
            }
            if Instant::now() >= deadline {
                self.kill();
                bail!(
                    "{} did not exit within {timeout:?} (killed):\n{}",
                    self.what,
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        self.finish(code)
    }

    /// Stops sipp (SIGTERM: it closes its files and exits with 0 if no call failed, 1 if
    /// one did; SIGKILL after 5 s) and returns what it did, whatever the exit code.
    pub fn stop(&mut self) -> Result<SippRun> {
        if let Some(child) = self.child.as_ref() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        let code = loop {
            if let Some(code) = self.try_exit()? {
                break code;
            }
            if Instant::now() >= deadline {
                self.kill();
                break -1;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Ok(self.run(code))
    }

    fn finish(&self, code: i32) -> Result<SippRun> {
        if code != 0 && self.expect_success {
            bail!(
                "{} exited with {code} ({}):\n{}",
                self.what,
                exit_meaning(code),
                self.diagnostics()
            );
        }
        Ok(self.run(code))
    }

    fn run(&self, exit_code: i32) -> SippRun {
        SippRun {
            exit_code,
            messages: self.messages(),
            log: self.log(),
            errors: self.read("errors.log"),
            stderr: self.read("stderr.log"),
            stats: last_stats(&self.read("stats.csv")),
        }
    }

    /// Its stderr, the end of its error file and of its message trace, for failures.
    pub fn diagnostics(&self) -> String {
        let mut s = String::new();
        let stderr = self.read("stderr.log");
        let _ = writeln!(s, "--- stderr:\n{}", stderr.trim_end());
        let _ = writeln!(
            s,
            "--- errors.log (end):\n{}",
            tail(&self.read("errors.log"), 20)
        );
        let _ = write!(s, "--- messages.log (end):\n{}", tail(&self.messages(), 40));
        s
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            if let Ok(status) = c.wait() {
                self.status = Some(status.code().unwrap_or(-1));
            }
        }
    }
}

impl Drop for Sipp {
    fn drop(&mut self) {
        self.kill();
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// What sipp's exit codes mean (3.6.1, `include/defines.h`).
pub fn exit_meaning(code: i32) -> &'static str {
    match code {
        0 => "all calls successful",
        1 => "at least one call failed",
        97 => "exit on internal command, or the global timeout with no successful call",
        99 => "normal exit without calls processed",
        255 | -1 => "fatal error (see stderr), or the global timeout with -timeout_error",
        254 => "fatal error binding a socket",
        _ => "unknown exit code",
    }
}

/// The last line of sipp's statistics file (`-trace_stat`), by column name
/// (`SuccessfulCall(C)`, `FailedCall(C)`, `Retransmissions(C)`, …).
fn last_stats(csv: &str) -> BTreeMap<String, String> {
    let mut lines = csv.lines().filter(|l| !l.trim().is_empty());
    let Some(header) = lines.next() else {
        return BTreeMap::new();
    };
    let Some(last) = lines.next_back() else {
        return BTreeMap::new();
    };
    header
        .split(';')
        .zip(last.split(';'))
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// What a sipp run did.
#[derive(Debug, Clone)]
pub struct SippRun {
    /// 0: every call succeeded; 1: a call failed; 97: the deadline with no successful call;
    /// 255: a fatal error, or the deadline (`-timeout_error`); -1: killed. See
    /// [`exit_meaning`].
    pub exit_code: i32,
    /// The message trace (`-trace_msg`); [`parse_trace`] reads it.
    pub messages: String,
    /// The scenario's `<log>` lines (`-trace_logs`).
    pub log: String,
    /// The error file (`-trace_err`).
    pub errors: String,
    /// What sipp wrote to stderr (its fatal errors, "Resolving remote host…").
    pub stderr: String,
    /// The statistics file's last line (its totals), by column name.
    pub stats: BTreeMap<String, String>,
}

impl SippRun {
    /// Every message of the trace, in order.
    pub fn traced(&self) -> Vec<TracedMessage> {
        parse_trace(&self.messages)
    }

    /// The messages sipp sent that are `method_or_code` ([`TracedMessage::is`]).
    pub fn messages_sent(&self, method_or_code: &str) -> Vec<TracedMessage> {
        self.select(Direction::Sent, method_or_code)
    }

    /// The messages sipp received that are `method_or_code` ([`TracedMessage::is`]).
    pub fn messages_received(&self, method_or_code: &str) -> Vec<TracedMessage> {
        self.select(Direction::Received, method_or_code)
    }

    fn select(&self, direction: Direction, method_or_code: &str) -> Vec<TracedMessage> {
        self.traced()
            .into_iter()
            .filter(|m| m.direction == direction && m.is(method_or_code))
            .collect()
    }

    /// A cumulative counter of the statistics file, e.g. `stat("FailedCall")` for
    /// `FailedCall(C)`.
    pub fn stat(&self, counter: &str) -> Option<u64> {
        self.stats
            .get(&format!("{counter}(C)"))?
            .trim()
            .parse()
            .ok()
    }

    /// `SuccessfulCall(C)`.
    pub fn successful_calls(&self) -> Option<u64> {
        self.stat("SuccessfulCall")
    }

    /// `FailedCall(C)`.
    pub fn failed_calls(&self) -> Option<u64> {
        self.stat("FailedCall")
    }

    /// `Retransmissions(C)`: requests sipp sent again (UDP) and answers it repeated for
    /// retransmitted requests.
    pub fn retransmissions(&self) -> Option<u64> {
        self.stat("Retransmissions")
    }
}

/// Which way a traced message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Sent by sipp.
    Sent,
    /// Received by sipp (whether its scenario expected it or not).
    Received,
}

/// One message of sipp's trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TracedMessage {
    /// Sent or received.
    pub direction: Direction,
    /// `UDP`, `TCP`.
    pub transport: String,
    /// When sipp traced it: `2026-11-23 19:01:59.896930` (local time).
    pub time: String,
    /// The message as sent or received (CRLF line ends).
    pub text: String,
}

/// The long-form name of a compact header (RFC 3261 §7.3.3 and extensions).
fn long_name(name: &str) -> &str {
    match name.to_ascii_lowercase().as_str() {
        "i" => "call-id",
        "m" => "contact",
        "e" => "content-encoding",
        "l" => "content-length",
        "c" => "content-type",
        "f" => "from",
        "s" => "subject",
        "k" => "supported",
        "t" => "to",
        "v" => "via",
        "o" => "event",
        "u" => "allow-events",
        "r" => "refer-to",
        _ => name,
    }
}

impl TracedMessage {
    /// The request or status line.
    pub fn first_line(&self) -> &str {
        self.text.lines().next().unwrap_or_default().trim_end()
    }

    /// The method of a request (`MESSAGE`), `None` for a response.
    pub fn method(&self) -> Option<&str> {
        let line = self.first_line();
        if line.starts_with("SIP/") {
            return None;
        }
        line.split_whitespace().next()
    }

    /// The status code of a response, `None` for a request.
    pub fn status(&self) -> Option<u16> {
        let line = self.first_line();
        if !line.starts_with("SIP/") {
            return None;
        }
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// Whether this is a request with method `method_or_code` (case-insensitive) or a
    /// response with that status code (`"200"`); `"*"` matches everything.
    pub fn is(&self, method_or_code: &str) -> bool {
        if method_or_code == "*" {
            return true;
        }
        match (self.method(), self.status()) {
            (Some(m), _) => m.eq_ignore_ascii_case(method_or_code),
            (_, Some(code)) => method_or_code.parse() == Ok(code),
            _ => false,
        }
    }

    /// The header section, without the first line, folded lines joined.
    fn header_lines(&self) -> Vec<String> {
        let head = match self.text.find("\r\n\r\n") {
            Some(i) => &self.text[..i],
            None => self.text.split("\n\n").next().unwrap_or_default(),
        };
        let mut out: Vec<String> = Vec::new();
        for line in head.lines().skip(1) {
            let line = line.trim_end_matches('\r');
            if line.starts_with([' ', '\t']) {
                if let Some(last) = out.last_mut() {
                    last.push(' ');
                    last.push_str(line.trim());
                }
            } else {
                out.push(line.to_string());
            }
        }
        out
    }

    /// Every value of header `name` (case-insensitive, compact forms included), in order;
    /// a header line with several comma-separated values is one entry.
    pub fn headers(&self, name: &str) -> Vec<String> {
        let want = long_name(name).to_ascii_lowercase();
        self.header_lines()
            .into_iter()
            .filter_map(|line| {
                let (n, v) = line.split_once(':')?;
                (long_name(n.trim()).eq_ignore_ascii_case(&want)).then(|| v.trim().to_string())
            })
            .collect()
    }

    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers(name).into_iter().next()
    }

    /// The body (after the blank line), as traced.
    pub fn body(&self) -> &str {
        match self.text.find("\r\n\r\n") {
            Some(i) => &self.text[i + 4..],
            None => self.text.split_once("\n\n").map(|(_, b)| b).unwrap_or(""),
        }
    }
}

/// The separator sipp writes before each trace entry: 47 dashes, then a space and the time
/// for sent and received messages.
const SEPARATOR: &str = "-----------------------------------------------";

/// Reads sipp 3.6.1's message trace (`-trace_msg`). Each message is an entry
///
/// ```text
/// ----------------------------------------------- 2026-11-23 19:01:59.896930
/// UDP message sent (514 bytes):
///
/// <the message, 514 bytes>
///
/// ```
///
/// or, received, `UDP message received [313] bytes :` (note the different brackets and the
/// space before the colon). The byte count delimits the message, so a body holding a line
/// of dashes is read whole. Other entries — `Unexpected UDP message received:`, `Dead call
/// … received a … message:`, `Ignoring final …` — start with the dashes alone and repeat a
/// message already traced as received: they are skipped.
pub fn parse_trace(trace: &str) -> Vec<TracedMessage> {
    let mut out = Vec::new();
    let mut rest = trace;
    while let Some(pos) = find_separator(rest) {
        rest = &rest[pos + SEPARATOR.len()..];
        let (line, after) = rest.split_once('\n').unwrap_or((rest, ""));
        let time = line.trim().to_string();
        let (head, after_head) = after.split_once('\n').unwrap_or((after, ""));
        rest = after_head;
        let Some((direction, transport, len)) = parse_entry_head(head) else {
            continue;
        };
        let body = rest.strip_prefix('\n').unwrap_or(rest);
        // The count is in bytes; a received message is traced up to a NUL, so it may be
        // shorter than its count.
        let mut end = len.min(body.len());
        while !body.is_char_boundary(end) {
            end -= 1;
        }
        let text = &body[..end];
        out.push(TracedMessage {
            direction,
            transport,
            time,
            text: text.to_string(),
        });
        rest = &body[text.len()..];
    }
    out
}

/// The next separator at the start of a line.
fn find_separator(text: &str) -> Option<usize> {
    if text.starts_with(SEPARATOR) {
        return Some(0);
    }
    text.find(&format!("\n{SEPARATOR}")).map(|i| i + 1)
}

/// `UDP message sent (514 bytes):`, `TCP message received [313] bytes :` (optionally
/// `control message`).
fn parse_entry_head(head: &str) -> Option<(Direction, String, usize)> {
    let mut words = head.split_whitespace();
    let transport = words.next()?.to_string();
    let mut word = words.next()?;
    if word == "control" {
        word = words.next()?;
    }
    if word != "message" {
        return None;
    }
    let direction = match words.next()? {
        "sent" => Direction::Sent,
        "received" => Direction::Received,
        _ => return None,
    };
    let count = words
        .next()?
        .trim_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .ok()?;
    Some((direction, transport, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A trace as sipp writes it: a received MESSAGE whose body holds a line of dashes as
    /// long as the separator, an `Unexpected` entry, a sent 200.
    fn trace() -> String {
        let message = format!(
            "MESSAGE sip:bob@b.test SIP/2.0\r\n\
             v: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-1\r\n\
             Via: SIP/2.0/UDP 127.0.0.1:5062\r\n\
             Subject: folded\r\n  on two lines\r\n\
             l: 58\r\n\
             \r\n\
             {SEPARATOR}\nline two\r\n"
        );
        let ok = "SIP/2.0 200 OK\r\nCall-ID: 1-2@x\r\nContent-Length: 0\r\n\r\n";
        format!(
            "{SEPARATOR} 2026-11-23 19:05:43.649642\n\
             UDP message received [{}] bytes :\n\n{message}\n\
             {SEPARATOR}\n\
             Unexpected UDP message received:\n\nSIP/2.0 481 Whatever\r\n\r\n\n\
             {SEPARATOR} 2026-11-23 19:05:43.649830\n\
             UDP message sent ({} bytes):\n\n{ok}\n",
            message.len(),
            ok.len()
        )
    }

    #[test]
    fn parses_sipp_trace() {
        let msgs = parse_trace(&trace());
        assert_eq!(msgs.len(), 2, "{msgs:#?}");
        let m = &msgs[0];
        assert_eq!(m.direction, Direction::Received);
        assert_eq!(m.transport, "UDP");
        assert_eq!(m.time, "2026-11-23 19:05:43.649642");
        assert!(m.is("message") && !m.is("200"));
        assert_eq!(m.headers("Via").len(), 2);
        assert_eq!(
            m.header("via").as_deref(),
            Some("SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-1")
        );
        assert_eq!(m.header("subject").as_deref(), Some("folded on two lines"));
        assert_eq!(m.body(), format!("{SEPARATOR}\nline two\r\n"));
        assert_eq!(m.header("Content-Length"), Some(m.body().len().to_string()));
        let r = &msgs[1];
        assert_eq!(r.direction, Direction::Sent);
        assert_eq!(r.status(), Some(200));
        assert!(r.is("200"));
        assert_eq!(r.header("i").as_deref(), Some("1-2@x"));
        assert_eq!(r.body(), "");
    }

    #[test]
    fn reads_the_last_stats_line() {
        let s = last_stats("A;SuccessfulCall(C);FailedCall(C);\n1;2;3;\n4;5;6;\n");
        assert_eq!(s.get("SuccessfulCall(C)").map(String::as_str), Some("5"));
        assert_eq!(s.get("FailedCall(C)").map(String::as_str), Some("6"));
    }

    #[test]
    fn injection_file_rows() {
        assert_eq!(
            users_csv(2, "a.test", "b.test"),
            "SEQUENTIAL\nuser0;a.test;user0;b.test\nuser1;a.test;user1;b.test\n"
        );
    }
}
