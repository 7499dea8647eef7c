//! Transactions (RFC 3261 §17).
//!
//! Server side: a request is matched to its transaction by the top Via's branch, sent-by and
//! method (ACK matching INVITE), or for RFC 2543 peers without a `z9hG4bK` branch by
//! Call-ID, CSeq, From tag and top Via. A retransmission of a request still being worked on
//! is absorbed; one whose transaction has completed gets the same final response again, for
//! 64·T1 (Timer J; Timer H/I for INVITE). Nothing is relayed twice.
//!
//! Client side: responses are matched to the waiting request by the branch the relay put in
//! its own Via and the CSeq method; over UDP the request is retransmitted from T1 doubling up
//! to T2 (Timers A/E) until a response, and a transaction with no final response after 64·T1
//! (Timers B/F) times out.

use super::msg::Message;
use bytes::Bytes;
use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The final response of a completed server transaction, kept for retransmissions.
#[derive(Debug, Clone)]
pub enum Stored {
    /// Rebuilt from the retransmitted request: the code and the To tag given.
    Plain { code: u16, to_tag: Option<String> },
    /// Stored as sent (it carries headers or a body of its own).
    Full(Bytes),
}

impl Stored {
    /// The bytes to send again in answer to `req`.
    pub fn bytes_for(&self, req: &Message) -> Bytes {
        match self {
            Stored::Plain { code, to_tag } => {
                Bytes::from(req.response(*code, "", to_tag.as_deref()).to_bytes())
            }
            Stored::Full(b) => b.clone(),
        }
    }
}

/// What the server transaction layer makes of a request.
#[derive(Debug)]
pub enum Seen {
    /// A new transaction: the request goes to the edge.
    New,
    /// A retransmission while the first copy is being worked on: dropped.
    InProgress,
    /// A retransmission after the final response: send it again.
    Completed(Stored),
    /// The ACK of a non-2xx final response: absorbed.
    AckAbsorbed,
}

enum Entry {
    Proceeding,
    Completed(Stored),
}

#[derive(Default)]
struct Shard {
    /// Each transaction with the time it is forgotten.
    map: HashMap<String, (Instant, Entry)>,
    /// Keys in the order their entries expire (every entry lives as long).
    expiry: VecDeque<(Instant, String)>,
}

const SHARDS: usize = 16;
/// Expired transactions dropped per lookup at most.
const SWEEP_PER_LOOK: usize = 8;

/// The server transactions.
pub struct ServerTxns {
    shards: Vec<Mutex<Shard>>,
    linger: Duration,
}

impl std::fmt::Debug for ServerTxns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTxns")
    }
}

/// The transaction key of a request (ACK keyed as the INVITE it acknowledges).
pub fn server_key(req: &Message) -> Option<String> {
    let method = req.method()?;
    let method = if method == "ACK" { "INVITE" } else { method };
    let via = req.vias().into_iter().next()?;
    let sent_by = format!("{}:{}", via.host, via.port.unwrap_or(0));
    match via.branch() {
        Some(b) if b.starts_with("z9hG4bK") => Some(format!("{b}|{sent_by}|{method}")),
        _ => {
            // RFC 2543 matching (§17.2.3): Request-URI, To tag, From tag, Call-ID, CSeq, top Via.
            let cseq = req.cseq()?;
            let to_tag = if req.method() == Some("ACK") {
                String::new()
            } else {
                req.to()
                    .and_then(|t| t.tag().map(str::to_string))
                    .unwrap_or_default()
            };
            Some(format!(
                "2543|{}|{}|{}|{}|{}|{sent_by}|{method}|{}",
                req.uri().unwrap_or(""),
                to_tag,
                req.from()
                    .and_then(|f| f.tag().map(str::to_string))
                    .unwrap_or_default(),
                req.call_id().unwrap_or(""),
                cseq.seq,
                via.branch().unwrap_or("")
            ))
        }
    }
}

impl ServerTxns {
    /// Transactions remembered for `linger` after they start (64·T1).
    pub fn new(linger: Duration) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            linger,
        }
    }

    fn shard(&self, key: &str) -> &Mutex<Shard> {
        let mut h = DefaultHasher::new();
        key.hash(&mut h);
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    /// Looks the request up, starting a transaction when it is new.
    pub fn seen(&self, req: &Message) -> Seen {
        self.seen_at(req, Instant::now())
    }

    /// [`ServerTxns::seen`] at the time `now`.
    pub fn seen_at(&self, req: &Message, now: Instant) -> Seen {
        let Some(key) = server_key(req) else {
            return Seen::New;
        };
        let is_ack = req.method() == Some("ACK");
        let Ok(mut s) = self.shard(&key).lock() else {
            return Seen::New;
        };
        // A few expired entries per look, so a burst that expires at once is swept over the
        // next requests instead of stalling one of them.
        for _ in 0..SWEEP_PER_LOOK {
            match s.expiry.front() {
                Some((t, _)) if *t <= now => {}
                _ => break,
            }
            if let Some((t, k)) = s.expiry.pop_front()
                && s.map.get(&k).is_some_and(|(until, _)| *until == t)
            {
                s.map.remove(&k);
            }
        }
        // One expired but not swept yet is gone all the same.
        let entry = s
            .map
            .get(&key)
            .filter(|(until, _)| *until > now)
            .map(|(_, e)| e);
        match entry {
            Some(Entry::Completed(st)) if is_ack => match st {
                Stored::Plain { code, .. } if *code >= 300 => Seen::AckAbsorbed,
                // The ACK of a 2xx is its own transaction, for the dialog.
                _ => Seen::New,
            },
            Some(Entry::Completed(st)) => Seen::Completed(st.clone()),
            Some(Entry::Proceeding) if !is_ack => Seen::InProgress,
            _ if is_ack => Seen::New,
            _ => {
                let until = now + self.linger;
                s.map.insert(key.clone(), (until, Entry::Proceeding));
                s.expiry.push_back((until, key));
                Seen::New
            }
        }
    }

    /// Records the final response of the request's transaction.
    pub fn complete(&self, req: &Message, stored: Stored) {
        if req.method() == Some("ACK") {
            return;
        }
        let Some(key) = server_key(req) else { return };
        if let Ok(mut s) = self.shard(&key).lock()
            && let Some((_, e)) = s.map.get_mut(&key)
        {
            *e = Entry::Completed(stored);
        }
    }

    /// Forgets a transaction that ended without a response (the request was dropped), so
    /// a retransmission is looked at afresh.
    pub fn forget(&self, req: &Message) {
        let Some(key) = server_key(req) else { return };
        if let Ok(mut s) = self.shard(&key).lock() {
            s.map.remove(&key);
        }
    }

    /// Transactions remembered.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|s| s.map.len()).unwrap_or(0))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The client transactions waiting for responses, by the branch of the relay's Via.
#[derive(Default)]
pub struct ClientTxns {
    waiting: Mutex<HashMap<String, mpsc::UnboundedSender<Message>>>,
}

impl std::fmt::Debug for ClientTxns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTxns")
    }
}

/// A fresh branch (RFC 3261 magic cookie and 128 random bits).
pub fn new_branch() -> String {
    format!("z9hG4bK{:032x}", rand::random::<u128>())
}

/// A fresh tag or Call-ID part.
pub fn new_token() -> String {
    format!("{:024x}", rand::random::<u128>() >> 32)
}

impl ClientTxns {
    /// Starts waiting for responses to the request with this branch and method.
    pub fn register(&self, branch: &str, method: &str) -> Waiting<'_> {
        let (tx, rx) = mpsc::unbounded_channel();
        let key = format!("{branch}|{method}");
        if let Ok(mut m) = self.waiting.lock() {
            m.insert(key.clone(), tx);
        }
        Waiting {
            txns: self,
            key,
            rx,
        }
    }

    /// Routes a response to its transaction; false when none waits for it (a stray or late
    /// response, dropped as RFC 3261 §18.1.2 says).
    pub fn on_response(&self, resp: &Message) -> bool {
        let Some(via) = resp.vias().into_iter().next() else {
            return false;
        };
        let (Some(branch), Some(cseq)) = (via.branch(), resp.cseq()) else {
            return false;
        };
        let key = format!("{branch}|{}", cseq.method);
        match self.waiting.lock().ok().and_then(|m| m.get(&key).cloned()) {
            Some(tx) => tx.send(resp.clone()).is_ok(),
            None => false,
        }
    }
}

/// A registered client transaction; unregisters when dropped.
pub struct Waiting<'a> {
    txns: &'a ClientTxns,
    key: String,
    pub rx: mpsc::UnboundedReceiver<Message>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.txns.waiting.lock() {
            m.remove(&self.key);
        }
    }
}

/// The To tag a response carries.
pub fn to_tag(m: &Message) -> Option<String> {
    m.to().and_then(|t| t.tag().map(str::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edges::sip::msg::{Limits, parse};

    fn req(method: &str, branch: &str, cseq_method: &str) -> Option<Message> {
        let raw = format!(
            "{method} sip:alice@a.example SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1:5060;branch={branch}\r\nFrom: <sip:bob@b.example>;tag=f\r\nTo: <sip:alice@a.example>\r\nCall-ID: c1\r\nCSeq: 1 {cseq_method}\r\nContent-Length: 0\r\n\r\n"
        );
        parse(raw.as_bytes(), &Limits::default()).ok()
    }

    #[test]
    fn retransmissions_are_absorbed_then_answered_from_the_transaction() {
        let t = ServerTxns::new(Duration::from_secs(32));
        let Some(m) = req("MESSAGE", "z9hG4bK1", "MESSAGE") else {
            panic!("request not parsed");
        };
        assert!(matches!(t.seen(&m), Seen::New));
        assert!(matches!(t.seen(&m), Seen::InProgress));
        t.complete(
            &m,
            Stored::Plain {
                code: 200,
                to_tag: Some("x".into()),
            },
        );
        let Seen::Completed(st) = t.seen(&m) else {
            panic!("not completed");
        };
        let again = String::from_utf8_lossy(&st.bytes_for(&m)).into_owned();
        assert!(again.starts_with("SIP/2.0 200 OK\r\n"), "{again}");
        assert!(again.contains(";tag=x"), "{again}");
        // Another branch is another transaction.
        let Some(other) = req("MESSAGE", "z9hG4bK2", "MESSAGE") else {
            panic!("request not parsed");
        };
        assert!(matches!(t.seen(&other), Seen::New));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn the_ack_of_a_failure_is_absorbed_and_a_2xx_ack_goes_to_the_dialog() {
        let t = ServerTxns::new(Duration::from_secs(32));
        let (Some(inv), Some(ack)) = (
            req("INVITE", "z9hG4bK9", "INVITE"),
            req("ACK", "z9hG4bK9", "ACK"),
        ) else {
            panic!("requests not parsed");
        };
        assert!(matches!(t.seen(&inv), Seen::New));
        t.complete(
            &inv,
            Stored::Plain {
                code: 488,
                to_tag: None,
            },
        );
        assert!(matches!(t.seen(&ack), Seen::AckAbsorbed));
        let Some(inv2) = req("INVITE", "z9hG4bK10", "INVITE") else {
            panic!("request not parsed");
        };
        assert!(matches!(t.seen(&inv2), Seen::New));
        t.complete(
            &inv2,
            Stored::Plain {
                code: 200,
                to_tag: None,
            },
        );
        let Some(ack2) = req("ACK", "z9hG4bK10", "ACK") else {
            panic!("request not parsed");
        };
        assert!(matches!(t.seen(&ack2), Seen::New));
    }

    #[test]
    fn transactions_are_forgotten_after_their_time() {
        let t = ServerTxns::new(Duration::ZERO);
        let Some(m) = req("MESSAGE", "z9hG4bK1", "MESSAGE") else {
            panic!("request not parsed");
        };
        assert!(matches!(t.seen(&m), Seen::New));
        // Expired at once: the next look sweeps it and starts afresh.
        assert!(matches!(t.seen(&m), Seen::New));
        // However many expire together, each look sweeps a few, and an expired one not swept
        // yet counts as gone.
        let t = ServerTxns::new(Duration::from_millis(20));
        for i in 0..500 {
            if let Some(r) = req("MESSAGE", &format!("z9hG4bKmany{i}"), "MESSAGE") {
                assert!(matches!(t.seen(&r), Seen::New));
            }
        }
        assert_eq!(t.len(), 500);
        let later = Instant::now() + Duration::from_millis(30);
        if let Some(r) = req("MESSAGE", "z9hG4bKmany7", "MESSAGE") {
            assert!(matches!(t.seen_at(&r, later), Seen::New));
        }
        assert!(t.len() > 400, "swept {} at once", 501 - t.len());
    }
}
