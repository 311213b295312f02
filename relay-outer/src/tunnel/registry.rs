//! Live tunnel sessions by tunnel name. Several sessions per tunnel are kept (HA: two
//! relay-inner processes with the same identity, or one with several connections); new
//! streams go to the least-loaded live one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use routy_tunnel::session::SessionHandle;

/// One accepted, handshaken session.
#[derive(Debug)]
pub struct SessionEntry {
    /// Unique within this process.
    pub id: u64,
    /// Tunnel name from the client certificate.
    pub tunnel: String,
    /// Address of relay-inner's connection.
    pub peer: SocketAddr,
    /// relay-inner's node name from its Hello.
    pub node: String,
    /// Services relay-inner said it exposes.
    pub services: Vec<String>,
    /// The client certificate's (issuer, serial), to close the session when a reload's
    /// revocation lists name it.
    pub cert: Option<routy_tunnel::tls::RevocationKey>,
    /// Opens streams on the session.
    pub handle: SessionHandle,
    /// Set when relay-inner announced GoAway: no new streams.
    pub draining: AtomicBool,
    /// When the session was registered.
    pub since: Instant,
    /// Client streams assigned to this session and not yet finished.
    pub load: AtomicUsize,
    /// Last keepalive round trip, microseconds (0: none yet).
    pub rtt_micros: AtomicU64,
    /// An operator asked to drain the session ([`SessionEntry::drain`]).
    pub drain_asked: tokio::sync::Notify,
    /// How long that drain waits for the session's client streams, milliseconds.
    pub drain_grace_ms: AtomicU64,
    /// Bytes its client streams moved, both directions (for its bytes/s in `/status`).
    pub bytes: Arc<AtomicU64>,
}

/// Counts one client stream against its session's load until dropped.
#[derive(Debug)]
pub struct LoadGuard(Arc<SessionEntry>);

impl LoadGuard {
    /// The session the stream was assigned to.
    pub fn session(&self) -> &Arc<SessionEntry> {
        &self.0
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.load.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Who a new session is: what the handshake established.
#[derive(Debug)]
pub struct Identity {
    /// Tunnel name from the client certificate.
    pub tunnel: String,
    /// Address of relay-inner's connection.
    pub peer: SocketAddr,
    /// relay-inner's node name.
    pub node: String,
    /// Services relay-inner said it exposes.
    pub services: Vec<String>,
    /// The client certificate's revocation key.
    pub cert: Option<routy_tunnel::tls::RevocationKey>,
}

impl SessionEntry {
    /// A session `id` of `who` on `handle`, registered now, with no streams yet.
    pub fn new(id: u64, who: Identity, handle: SessionHandle) -> SessionEntry {
        SessionEntry {
            id,
            tunnel: who.tunnel,
            peer: who.peer,
            node: who.node,
            services: who.services,
            cert: who.cert,
            handle,
            draining: AtomicBool::new(false),
            since: Instant::now(),
            load: AtomicUsize::new(0),
            rtt_micros: AtomicU64::new(0),
            drain_asked: Default::default(),
            drain_grace_ms: AtomicU64::new(0),
            bytes: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A session of `tunnel` from nowhere in particular, for tests.
    #[cfg(test)]
    pub fn for_test(id: u64, tunnel: &str, handle: SessionHandle) -> SessionEntry {
        let who = Identity {
            tunnel: tunnel.into(),
            peer: SocketAddr::from(([127, 0, 0, 1], 1)),
            node: "n".into(),
            services: vec![],
            cert: None,
        };
        SessionEntry::new(id, who, handle)
    }

    /// The last keepalive round trip, if one was measured.
    pub fn rtt(&self) -> Option<std::time::Duration> {
        match self.rtt_micros.load(Ordering::Relaxed) {
            0 => None,
            us => Some(std::time::Duration::from_micros(us)),
        }
    }

    /// Drains the session: no new streams, GoAway to relay-inner (which dials a new
    /// session), and the session closes once its client streams have finished, or after
    /// `grace`. Returns false when it was draining already.
    pub fn drain(&self, grace: std::time::Duration) -> bool {
        if self.draining.swap(true, Ordering::Relaxed) {
            return false;
        }
        let ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
        self.drain_grace_ms.store(ms, Ordering::Relaxed);
        self.drain_asked.notify_one();
        true
    }

    /// Whether new streams may go to this session.
    pub fn usable(&self) -> bool {
        !self.handle.is_closed() && !self.draining.load(Ordering::Relaxed)
    }
}

/// The registry shared by the acceptor and every listener.
#[derive(Debug, Default)]
pub struct Registry {
    map: Mutex<HashMap<String, Vec<Arc<SessionEntry>>>>,
    next_id: AtomicU64,
    max_streams: AtomicUsize,
}

/// Why no session could take a new stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PickError {
    /// The tunnel has no live session.
    NoSession,
    /// Every live session carries its maximum of streams.
    Full,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Vec<Arc<SessionEntry>>>> {
        // A panic while holding this lock cannot leave the map inconsistent (every
        // operation is a single push or retain), so a poisoned lock is still usable.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the most streams a session may carry (0: no limit).
    pub fn set_max_streams(&self, n: usize) {
        self.max_streams.store(n, Ordering::Relaxed);
    }

    /// A fresh session id.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Adds a session; returns how many the tunnel now has.
    pub fn add(&self, entry: Arc<SessionEntry>) -> usize {
        let mut map = self.lock();
        let v = map.entry(entry.tunnel.clone()).or_default();
        v.push(entry);
        v.len()
    }

    /// Removes a session; returns how many the tunnel still has.
    pub fn remove(&self, tunnel: &str, id: u64) -> usize {
        let mut map = self.lock();
        let Some(v) = map.get_mut(tunnel) else {
            return 0;
        };
        v.retain(|e| e.id != id);
        let n = v.len();
        if n == 0 {
            map.remove(tunnel);
        }
        n
    }

    /// Assigns a new client stream to the live session of `tunnel` with the fewest
    /// streams, if any. The count rises here, under the lock, so clients arriving at the
    /// same moment spread over the sessions instead of all seeing the same counts.
    pub fn pick(&self, tunnel: &str) -> Result<LoadGuard, PickError> {
        let map = self.lock();
        let entry = map
            .get(tunnel)
            .and_then(|v| {
                v.iter()
                    .filter(|e| e.usable())
                    .min_by_key(|e| e.load.load(Ordering::Relaxed))
            })
            .ok_or(PickError::NoSession)?
            .clone();
        let max = self.max_streams.load(Ordering::Relaxed);
        if max > 0 && entry.load.load(Ordering::Relaxed) >= max {
            return Err(PickError::Full);
        }
        entry.load.fetch_add(1, Ordering::Relaxed);
        Ok(LoadGuard(entry))
    }

    /// Every session, for status and shutdown.
    pub fn all(&self) -> Vec<Arc<SessionEntry>> {
        self.lock().values().flatten().cloned().collect()
    }

    /// The live session `id`.
    pub fn find(&self, id: u64) -> Option<Arc<SessionEntry>> {
        self.lock().values().flatten().find(|s| s.id == id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use routy_tunnel::session::{yamux, Role};

    /// A session entry; the returned peer end keeps its session alive.
    fn entry(reg: &Registry, tunnel: &str) -> (Arc<SessionEntry>, tokio::io::DuplexStream) {
        let (a, b) = tokio::io::duplex(1024);
        let e = Arc::new(SessionEntry::for_test(
            reg.next_id(),
            tunnel,
            yamux(a, Role::Server).handle,
        ));
        (e, b)
    }

    #[tokio::test]
    async fn simultaneous_picks_spread_and_draining_sessions_get_none() {
        let reg = Registry::default();
        let (a, _pa) = entry(&reg, "t");
        let (b, _pb) = entry(&reg, "t");
        reg.add(a.clone());
        reg.add(b.clone());
        let picks: Vec<_> = (0..4).map(|_| reg.pick("t").unwrap()).collect();
        reg.set_max_streams(2);
        assert_eq!(reg.pick("t").err(), Some(PickError::Full));
        reg.set_max_streams(0);
        let on_a = picks.iter().filter(|g| g.session().id == a.id).count();
        assert_eq!(on_a, 2);
        drop(picks);
        assert_eq!(a.load.load(Ordering::Relaxed), 0);
        b.draining.store(true, Ordering::Relaxed);
        for _ in 0..3 {
            assert_eq!(reg.pick("t").unwrap().session().id, a.id);
        }
        assert_eq!(reg.pick("other").err(), Some(PickError::NoSession));
        assert_eq!(reg.remove("t", a.id), 1);
        assert_eq!(
            reg.pick("t").err(),
            Some(PickError::NoSession),
            "only a draining session is left"
        );
    }
}
