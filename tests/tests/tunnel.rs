//! End to end on loopback: a real PostgreSQL behind relay-inner, clients through
//! relay-outer's listener.

use std::time::Duration;

use routy_e2e::relays::{inner_yaml, outer_yaml, ListenerSpec, Pki, Relay};
use routy_e2e::{free_port, psql_at, wait_until, Pg, PgOpts};

const KA: (&str, &str) = ("500ms", "3s");

/// PostgreSQL, both relays and one listener `pg` for tunnel `site-a`.
struct Setup {
    pg: Pg,
    pki: Pki,
    outer: Relay,
    inner: Relay,
    tunnel_port: u16,
    listen_port: u16,
}

impl Setup {
    fn new() -> Setup {
        let pg = Pg::start(PgOpts::default());
        let pki = Pki::new(&["localhost", "127.0.0.1"]);
        pki.issue("site-a");
        let tunnel_port = free_port();
        let listen_port = free_port();
        let outer = Relay::outer(&Self::outer_cfg(&pki, tunnel_port, listen_port), None);
        let inner = Relay::inner(
            "relay-inner",
            &Self::inner_cfg(&pki, tunnel_port, &pg),
            None,
        );
        Setup {
            pg,
            pki,
            outer,
            inner,
            tunnel_port,
            listen_port,
        }
    }

    fn outer_cfg(pki: &Pki, tunnel_port: u16, listen_port: u16) -> String {
        let l = ListenerSpec::new("pg", &format!("127.0.0.1:{listen_port}"), "site-a", "pg");
        outer_yaml(
            pki,
            &format!("127.0.0.1:{tunnel_port}"),
            KA,
            &[l],
            "shutdown_grace: 5s\n",
        )
    }

    fn inner_cfg(pki: &Pki, tunnel_port: u16, pg: &Pg) -> String {
        inner_yaml(
            pki,
            "site-a",
            &[(format!("127.0.0.1:{tunnel_port}"), "localhost")],
            &[("pg", format!("127.0.0.1:{}", pg.port()))],
            KA,
            "shutdown_grace: 5s\n",
        )
    }

    fn sql(&self, sql: &str) -> Result<String, String> {
        psql_at("127.0.0.1", self.listen_port, sql)
    }
}

#[test]
fn sql_through_the_tunnel() {
    let s = Setup::new();
    s.pg.psql(
        "CREATE TABLE t (id int primary key, v text); INSERT INTO t VALUES (1, 'één'), (2, 'two');",
    );
    let out = s
        .sql("SELECT string_agg(v, ',' ORDER BY id) FROM t")
        .unwrap();
    assert_eq!(out, "één,two");
    // The database saw the connection come from relay-inner, on its own host.
    let addr = s.sql("SELECT inet_client_addr()").unwrap();
    assert_eq!(addr, "127.0.0.1");
    s.inner
        .proc
        .wait_for_log("stream open", Duration::from_secs(5));
    s.outer
        .proc
        .wait_for_log("stream closed", Duration::from_secs(5));
}
