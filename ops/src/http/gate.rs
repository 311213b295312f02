//! Who keeps an HTTP connection when they are all taken.
//!
//! A server holds at most `max_connections` connections, and at most `max_per_client`
//! from one address. A slow client (a request head sent a byte at a time, or a
//! connection opened and left silent: slowloris) holds its connection until the head
//! deadline, so with plain caps a few dozen of them, reopened as they close, lock every
//! fresh client out. Here a new connection that would go over a cap takes the place of
//! the connection that has waited longest for its next request head (one with no request
//! in progress); it is refused only when every candidate is in the middle of a request.
//! Over the per-client cap only that address's own connections are candidates, so a
//! flood from one address never closes another address's connection, and a load
//! balancer's probe always gets in: it takes the place of a stalled client.
//!
//! A client that reconnects the moment it is closed turns this into a storm of
//! admissions (tens of thousands a second on loopback), in which even a fresh
//! connection would be displaced before the server has read its head. So a connection
//! whose whole request head had already arrived when it was accepted (the server peeks)
//! is admitted as mid-request: it is never displaced before it is answered (the server
//! lets a new connection wait briefly for its head, holding no place, when the gate is
//! full).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

/// The connections of one server (see the module).
#[derive(Debug)]
pub struct Gate {
    /// The server's `endpoint` label on the connections gauge.
    endpoint: &'static str,
    max_total: usize,
    max_per_client: usize,
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    /// Ticks on every admission and every request's end: orders who waited longest.
    clock: u64,
    conns: HashMap<u64, Conn>,
    per_client: HashMap<IpAddr, usize>,
}

#[derive(Debug)]
struct Conn {
    client: IpAddr,
    /// Requests in progress (a response whose body is still being produced counts).
    busy: u32,
    /// Its whole request head had arrived when it was admitted: it counts as
    /// mid-request until its first request starts.
    arrived: bool,
    /// When the connection last began waiting for a request head ([`Table::clock`]).
    waiting_since: u64,
    /// Fired to close the connection when another takes its place.
    close: Option<oneshot::Sender<()>>,
}

/// What [`Gate::admit`] decided.
#[derive(Debug)]
pub enum Admission {
    /// Admitted; `made_room` says a waiting connection was closed for it.
    In {
        /// The admitted connection's place; dropping it frees the place.
        ticket: Ticket,
        /// A waiting connection was closed to make room.
        made_room: bool,
    },
    /// Every candidate connection is in the middle of a request: refuse this one.
    Full,
}

/// A connection's place at the gate. The connection ends when [`Ticket::closed`]
/// resolves (its place was taken); dropping the ticket frees the place.
#[derive(Debug)]
pub struct Ticket {
    slot: Slot,
    closed: oneshot::Receiver<()>,
}

/// A handle on one connection's place, to mark requests in progress.
#[derive(Debug, Clone)]
pub struct Slot {
    gate: Arc<Gate>,
    id: u64,
}

/// A request in progress; dropping it marks the connection waiting again.
#[derive(Debug)]
pub struct Busy {
    slot: Slot,
}

impl Gate {
    /// A gate holding at most `max_total` connections and `max_per_client` from one
    /// address (each at least 1), counted in the gauge
    /// `routy_http_connections{endpoint}`.
    pub fn new(endpoint: &'static str, max_total: usize, max_per_client: usize) -> Arc<Gate> {
        Arc::new(Gate {
            endpoint,
            max_total: max_total.max(1),
            max_per_client: max_per_client.clamp(1, max_total.max(1)),
            table: Mutex::new(Table::default()),
        })
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count(&self, t: &Table) {
        metrics::gauge!(crate::metrics::HTTP_CONNECTIONS, "endpoint" => self.endpoint)
            .set(t.conns.len() as f64);
    }

    /// Admits a connection from `client`, closing the longest-waiting candidate if a cap
    /// would be exceeded. With `head_arrived` the connection counts as mid-request until
    /// its first request starts ([`Slot::busy`]).
    pub fn admit(self: &Arc<Gate>, client: IpAddr, head_arrived: bool) -> Admission {
        let mut t = self.table();
        let from_client = t.per_client.get(&client).copied().unwrap_or(0);
        let over_client = from_client >= self.max_per_client;
        let over_total = t.conns.len() >= self.max_total;
        let mut made_room = false;
        if over_client || over_total {
            let victim = t
                .conns
                .iter()
                .filter(|(_, c)| c.busy == 0 && !c.arrived && (!over_client || c.client == client))
                .min_by_key(|(id, c)| (c.waiting_since, **id))
                .map(|(id, _)| *id);
            let Some(victim) = victim else {
                return Admission::Full;
            };
            if let Some(mut c) = t.remove(victim) {
                if let Some(close) = c.close.take() {
                    let _ = close.send(());
                }
            }
            made_room = true;
        }
        t.clock += 1;
        let id = t.clock;
        let (tx, rx) = oneshot::channel();
        t.conns.insert(
            id,
            Conn {
                client,
                busy: 0,
                arrived: head_arrived,
                waiting_since: id,
                close: Some(tx),
            },
        );
        *t.per_client.entry(client).or_insert(0) += 1;
        self.count(&t);
        Admission::In {
            ticket: Ticket {
                slot: Slot {
                    gate: self.clone(),
                    id,
                },
                closed: rx,
            },
            made_room,
        }
    }

    /// Whether a new connection from `client` would go over a cap.
    pub fn is_full_for(&self, client: IpAddr) -> bool {
        let t = self.table();
        t.conns.len() >= self.max_total
            || t.per_client.get(&client).copied().unwrap_or(0) >= self.max_per_client
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.table().conns.len()
    }
}

impl Table {
    fn remove(&mut self, id: u64) -> Option<Conn> {
        let c = self.conns.remove(&id)?;
        if let Some(n) = self.per_client.get_mut(&c.client) {
            *n -= 1;
            if *n == 0 {
                self.per_client.remove(&c.client);
            }
        }
        Some(c)
    }
}

impl Ticket {
    /// This connection's place, for [`Slot::busy`].
    pub fn slot(&self) -> Slot {
        self.slot.clone()
    }

    /// Resolves when another connection took this one's place (never, otherwise).
    pub async fn closed(&mut self) {
        if (&mut self.closed).await.is_err() {
            // The sender is gone only with the table entry; never close for it.
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let gate = &self.slot.gate;
        let mut t = gate.table();
        t.remove(self.slot.id);
        gate.count(&t);
    }
}

impl Slot {
    /// Marks a request in progress until the returned guard is dropped (it takes over
    /// the mark of a connection admitted with its head arrived).
    pub fn busy(&self) -> Busy {
        if let Some(c) = self.gate.table().conns.get_mut(&self.id) {
            c.busy += 1;
            c.arrived = false;
        }
        Busy { slot: self.clone() }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut t = self.slot.gate.table();
        t.clock += 1;
        let now = t.clock;
        if let Some(c) = t.conns.get_mut(&self.slot.id) {
            c.busy = c.busy.saturating_sub(1);
            if c.busy == 0 {
                c.waiting_since = now;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))
    }

    fn admit(g: &Arc<Gate>, client: IpAddr) -> (Ticket, bool) {
        match g.admit(client, false) {
            Admission::In { ticket, made_room } => (ticket, made_room),
            Admission::Full => panic!("refused"),
        }
    }

    #[tokio::test]
    async fn the_longest_waiting_makes_room_and_busy_ones_stay() {
        let g = Gate::new("test", 3, 3);
        let (mut a, _) = admit(&g, ip(1));
        let (b, _) = admit(&g, ip(2));
        let (c, _) = admit(&g, ip(3));
        // b is mid-request; a waited longest: a goes.
        let busy_b = b.slot().busy();
        let (d, made_room) = admit(&g, ip(4));
        assert!(made_room);
        tokio::time::timeout(std::time::Duration::from_secs(1), a.closed())
            .await
            .expect("a was told to close");
        assert_eq!(g.len(), 3);
        // c waits since before d: c goes next, then d; b never while busy.
        let _busy_d = d.slot().busy();
        let _busy_c = c.slot().busy();
        assert!(matches!(g.admit(ip(5), false), Admission::Full));
        drop(busy_b);
        let (_e, made_room) = admit(&g, ip(5));
        assert!(made_room, "b, done with its request, made room");
        drop(a);
        assert_eq!(g.len(), 3, "a's own drop frees nothing twice");
    }

    #[test]
    fn a_client_over_its_cap_only_displaces_its_own() {
        let g = Gate::new("test", 10, 2);
        let (_other, _) = admit(&g, ip(9));
        let (_a1, _) = admit(&g, ip(1));
        let (_a2, _) = admit(&g, ip(1));
        let (_a3, made_room) = admit(&g, ip(1));
        assert!(made_room);
        assert_eq!(g.len(), 3, "ip 9's connection, the oldest, stayed");
        let t = g.table();
        assert_eq!(t.per_client[&ip(1)], 2);
        assert_eq!(t.per_client[&ip(9)], 1);
    }

    #[test]
    fn a_connection_whose_head_had_arrived_is_not_displaced_before_its_request() {
        let g = Gate::new("test", 2, 2);
        let ready = match g.admit(ip(1), true) {
            Admission::In { ticket, .. } => ticket,
            Admission::Full => panic!("refused"),
        };
        let (_slow, _) = admit(&g, ip(1));
        let (_slow2, made_room) = admit(&g, ip(1));
        assert!(made_room, "the slow one made room, not the ready one");
        assert!(matches!(g.admit(ip(1), false), Admission::In { .. }));
        assert!(g.table().conns.contains_key(&ready.slot().id));
        // Its request starts and ends: from then on it is an ordinary waiting connection.
        drop(ready.slot().busy());
        let (_next, _) = admit(&g, ip(1));
        let (_next2, _) = admit(&g, ip(1));
        assert!(!g.table().conns.contains_key(&ready.slot().id));
    }

    #[test]
    fn dropping_tickets_frees_places() {
        let g = Gate::new("test", 2, 2);
        let (a, _) = admit(&g, ip(1));
        let (b, _) = admit(&g, ip(1));
        drop(a);
        drop(b);
        assert_eq!(g.len(), 0);
        assert!(g.table().per_client.is_empty());
    }
}
