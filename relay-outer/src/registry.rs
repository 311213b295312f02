//! Live tunnel sessions by tunnel name. Several sessions per tunnel are kept (HA: two
//! relay-inner processes with the same identity, or one with several connections); new
//! streams go to the least-loaded live one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use relay_proto::session::SessionHandle;

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
    /// Opens streams on the session.
    pub handle: SessionHandle,
    /// Set when relay-inner announced GoAway: no new streams.
    pub draining: AtomicBool,
    /// When the session was registered.
    pub since: Instant,
}

impl SessionEntry {
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
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Vec<Arc<SessionEntry>>>> {
        // A panic while holding this lock cannot leave the map inconsistent (every
        // operation is a single push or retain), so a poisoned lock is still usable.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
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

    /// The live session of `tunnel` with the fewest open streams, if any.
    pub fn pick(&self, tunnel: &str) -> Option<Arc<SessionEntry>> {
        let map = self.lock();
        map.get(tunnel)?
            .iter()
            .filter(|e| e.usable())
            .min_by_key(|e| e.handle.open_streams())
            .cloned()
    }

    /// Every session, for status and shutdown.
    pub fn all(&self) -> Vec<Arc<SessionEntry>> {
        self.lock().values().flatten().cloned().collect()
    }
}
