//! PostgreSQL streaming-replication client (logical, pgoutput) over `postgres-protocol`.
//!
//! tokio-postgres has no replication mode, so this module speaks the wire protocol itself:
//! a connection with `replication=database`, authentication (trust, cleartext, MD5,
//! SCRAM-SHA-256 without channel binding), the simple-query replication commands
//! (IDENTIFY_SYSTEM, CREATE_REPLICATION_SLOT, DROP_REPLICATION_SLOT, …) and START_REPLICATION
//! in CopyBoth mode with XLogData, keepalives and standby status updates.
//!
//! Every request/response exchange has a deadline. After a deadline or I/O error the
//! connection is marked broken (its protocol state is unknown) and must be dropped.
//! [`ReplicationStream::next`] alone has no deadline: an idle walsender whose client has
//! confirmed everything legitimately sends nothing, so the caller's select loop owns that
//! wait (status updates, asking for a keepalive and giving up after `receive_timeout`, see
//! [`crate::cdc::source::stream`]); `next` is cancel-safe for that reason.
//!
//! TLS follows libpq's `sslmode` and `sslrootcert` (see [`routy_pg::tls`]); the same
//! parsed DSN also configures the ordinary tokio-postgres connection
//! ([`ReplicationConfig::tokio_postgres`]). Not supported: unix sockets, multiple hosts,
//! client certificates.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::backend::{self, ErrorResponseBody, Message};
use postgres_protocol::message::frontend;
use routy_pg::tls::{MakeRustlsConnect, PgStream, PgTls, SslMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_postgres::fallible_iterator::FallibleIterator;

/// Default deadline for TCP connect plus startup and authentication (`connect_timeout`
/// absent or 0 in the DSN; unlike libpq, 0 does not mean "wait forever").
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default PostgreSQL port.
pub const DEFAULT_PORT: u16 = 5432;
/// Deadline for one simple-query exchange (request written to ReadyForQuery received).
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(60);
/// Deadline for CREATE_REPLICATION_SLOT, which waits for running transactions to finish
/// before it reaches a consistent point.
pub const CREATE_SLOT_TIMEOUT: Duration = Duration::from_secs(600);
/// Deadline for writing one message (status update, query) to the socket.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest backend message accepted; PostgreSQL itself caps messages near 1 GiB.
pub const MAX_MESSAGE_LEN: usize = 1 << 30;
/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01 00:00:00 UTC).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;
/// Backend tag of CopyBothResponse, which `postgres_protocol` does not parse.
const COPY_BOTH_RESPONSE_TAG: u8 = b'W';

/// Errors of the replication client.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// The socket failed.
    #[error("I/O error talking to PostgreSQL: {0}")]
    Io(#[from] std::io::Error),
    /// A deadline elapsed; the connection is no longer usable.
    #[error("timed out after {0:?} while {1}")]
    Timeout(Duration, &'static str),
    /// The server answered with an ErrorResponse.
    #[error("PostgreSQL {severity} {code}: {message}{}", detail.as_ref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Server {
        /// Severity (ERROR, FATAL, PANIC).
        severity: String,
        /// SQLSTATE code, e.g. 28P01 for a wrong password.
        code: String,
        /// The server's primary message.
        message: String,
        /// The server's detail message, if any.
        detail: Option<String>,
    },
    /// The server sent something this client does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Authentication cannot proceed on our side (method unsupported, password missing).
    #[error("authentication failed: {0}")]
    Auth(String),
    /// An argument (slot name, option) cannot be sent safely.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// TLS could not be set up or the handshake failed (certificate check, server without TLS).
    #[error("{0}")]
    Tls(String),
    /// An earlier error left the connection in an unknown state.
    #[error("connection unusable after an earlier error")]
    Broken,
    /// The server closed the connection.
    #[error("PostgreSQL closed the connection")]
    Closed,
}

/// Result alias of this module.
pub type Result<T, E = ReplicationError> = std::result::Result<T, E>;

/// Where and as whom to open a replication connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationConfig {
    /// Host name or IP address (TCP only).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Role; needs the REPLICATION attribute.
    pub user: String,
    /// Password for cleartext, MD5 or SCRAM authentication.
    pub password: Option<String>,
    /// Database whose changes are decoded.
    pub dbname: String,
    /// Deadline for TCP connect, startup and authentication together.
    pub connect_timeout: Duration,
    /// libpq `sslmode` (default `prefer`).
    pub sslmode: SslMode,
    /// libpq `sslrootcert`: CA certificate(s) the server's certificate must chain to.
    pub sslrootcert: Option<PathBuf>,
}

impl ReplicationConfig {
    /// The TLS side of the connection, per `sslmode` / `sslrootcert`.
    pub fn tls(&self) -> Result<PgTls, String> {
        PgTls::new(self.sslmode, self.sslrootcert.as_deref())
    }

    /// The same target as an ordinary (non-replication) tokio-postgres configuration and
    /// its TLS connector.
    pub fn tokio_postgres(&self) -> Result<(tokio_postgres::Config, MakeRustlsConnect), String> {
        let tls = self.tls()?;
        let mut c = tokio_postgres::Config::new();
        c.host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .application_name("routy")
            .connect_timeout(self.connect_timeout)
            .ssl_mode(self.sslmode.tokio_postgres());
        if let Some(pw) = &self.password {
            c.password(pw.as_bytes());
        }
        Ok((c, tls.make_tls_connect()))
    }
}

/// Reads a connection string, either form ([`routy_pg::dsn`]), for a replication
/// connection: one host, and only the options this client implements.
pub fn parse_dsn(dsn: &str) -> Result<ReplicationConfig, String> {
    let d = routy_pg::dsn::parse(dsn).map_err(|e| e.to_string())?;
    if let Some(key) = ["sslcert", "sslkey", "sslcrl"]
        .into_iter()
        .find(|k| d.get(k).is_some())
    {
        return Err(format!(
            "{key}: client certificates and CRLs are not supported; use password authentication over TLS"
        ));
    }
    d.check_only(&[
        "host",
        "hostaddr",
        "port",
        "user",
        "password",
        "dbname",
        "connect_timeout",
        "sslmode",
        "sslrootcert",
        "application_name",
    ])
    .map_err(|e| e.to_string())?;
    let host = d.get("hostaddr").or(d.get("host")).unwrap_or("localhost");
    if host.contains(',') {
        return Err(format!(
            "host \"{host}\": the CDC source connects to one host; name the primary"
        ));
    }
    let port = match d.get("port").filter(|p| !p.is_empty()) {
        None => DEFAULT_PORT,
        Some(p) => p.parse().map_err(|_| format!("invalid port \"{p}\""))?,
    };
    let connect_timeout = match d.get("connect_timeout") {
        None => DEFAULT_CONNECT_TIMEOUT,
        Some(v) => match v.parse::<u64>() {
            Ok(0) => DEFAULT_CONNECT_TIMEOUT,
            Ok(secs) => Duration::from_secs(secs),
            Err(_) => return Err(format!("invalid connect_timeout \"{v}\"")),
        },
    };
    let user = d.get("user").ok_or("connection string lacks user=")?;
    if user.is_empty() {
        return Err("empty user in connection string".into());
    }
    Ok(ReplicationConfig {
        host: host.to_string(),
        port,
        dbname: d.get("dbname").unwrap_or(user).to_string(),
        user: user.to_string(),
        password: d.get("password").map(str::to_string),
        connect_timeout,
        sslmode: d.sslmode().map_err(|e| e.to_string())?,
        sslrootcert: d.sslrootcert(),
    })
}

pub use relay_proto::lsn::format_lsn;

/// Parses an LSN in PostgreSQL's text form (`16/B374D848`), as this module's error.
pub fn parse_lsn(s: &str) -> Result<u64> {
    relay_proto::lsn::parse_lsn(s).map_err(|e| ReplicationError::Protocol(e.to_string()))
}

/// Current time as microseconds since 2000-01-01 (PostgreSQL's timestamp epoch).
pub fn pg_now_micros() -> i64 {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    unix.saturating_sub(PG_EPOCH_OFFSET_MICROS)
}

/// Answer of IDENTIFY_SYSTEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemId {
    /// The cluster's system identifier.
    pub systemid: String,
    /// Current timeline.
    pub timeline: u32,
    /// Current WAL flush location.
    pub xlogpos: u64,
    /// Database of this connection.
    pub dbname: Option<String>,
}

/// Answer of CREATE_REPLICATION_SLOT … LOGICAL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotCreated {
    /// Name of the new slot.
    pub slot_name: String,
    /// LSN from which the slot streams changes not in the snapshot.
    pub consistent_point: u64,
    /// Exported snapshot (for `SET TRANSACTION SNAPSHOT`), valid until the next command on
    /// this connection.
    pub snapshot_name: Option<String>,
}

/// One message of the replication stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationEvent {
    /// WAL data: for pgoutput one logical-decoding message (Begin, Relation, Insert, …).
    XLogData {
        /// WAL position where this data starts.
        wal_start: u64,
        /// Current end of WAL on the server.
        wal_end: u64,
        /// Server clock at send time, microseconds since 2000-01-01.
        server_time: i64,
        /// The decoded-plugin payload.
        data: Bytes,
    },
    /// Primary keepalive.
    Keepalive {
        /// Current end of WAL on the server.
        wal_end: u64,
        /// Server clock at send time, microseconds since 2000-01-01.
        server_time: i64,
        /// The server wants a status update now, or it will time us out.
        reply_requested: bool,
    },
}

/// A backend message, including CopyBothResponse which `postgres_protocol` cannot parse.
enum Backend {
    Msg(Message),
    CopyBoth,
}

/// A replication connection in normal (command) mode.
pub struct ReplicationClient {
    sock: PgStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    broken: bool,
}

impl std::fmt::Debug for ReplicationClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationClient")
            .field("peer", &self.sock.tcp().peer_addr().ok())
            .field("tls", &self.sock.is_tls())
            .field("broken", &self.broken)
            .finish()
    }
}

fn server_error(body: &ErrorResponseBody) -> ReplicationError {
    let mut severity = String::from("ERROR");
    let mut code = String::new();
    let mut message = String::new();
    let mut detail = None;
    let mut fields = body.fields();
    loop {
        match fields.next() {
            Ok(Some(f)) => {
                let v = String::from_utf8_lossy(f.value_bytes()).into_owned();
                match f.type_() {
                    b'V' => severity = v,
                    b'S' if severity == "ERROR" => severity = v,
                    b'C' => code = v,
                    b'M' => message = v,
                    b'D' => detail = Some(v),
                    _ => {}
                }
            }
            Ok(None) => break,
            Err(e) => {
                return ReplicationError::Protocol(format!("malformed ErrorResponse: {e}"));
            }
        }
    }
    ReplicationError::Server {
        severity,
        code,
        message,
        detail,
    }
}

fn notice_text(body: &backend::NoticeResponseBody) -> String {
    let mut fields = body.fields();
    let mut out = String::new();
    while let Ok(Some(f)) = fields.next() {
        if f.type_() == b'M' {
            out = String::from_utf8_lossy(f.value_bytes()).into_owned();
        }
    }
    out
}

/// Quotes an identifier for a replication command, after checking it is a valid slot or
/// plugin name (lower-case letters, digits, underscore; at most 63 bytes).
fn quote_name(name: &str) -> Result<String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !ok {
        return Err(ReplicationError::InvalidArgument(format!(
            "\"{name}\" is not a valid slot/plugin name (a-z, 0-9, _; at most 63 bytes)"
        )));
    }
    Ok(format!("\"{name}\""))
}

/// Quotes a string with doubled quote characters; NUL bytes are refused.
fn quote_with(s: &str, q: char) -> Result<String> {
    if s.contains('\0') {
        return Err(ReplicationError::InvalidArgument(
            "NUL byte in replication option".into(),
        ));
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push(q);
    for c in s.chars() {
        if c == q {
            out.push(q);
        }
        out.push(c);
    }
    out.push(q);
    Ok(out)
}

impl ReplicationClient {
    /// Opens a `replication=database` connection, authenticates and waits for ReadyForQuery.
    pub async fn connect(cfg: &ReplicationConfig) -> Result<Self> {
        timeout(cfg.connect_timeout, Self::connect_inner(cfg))
            .await
            .map_err(|_| ReplicationError::Timeout(cfg.connect_timeout, "connecting"))?
    }

    async fn connect_inner(cfg: &ReplicationConfig) -> Result<Self> {
        let tls = cfg.tls().map_err(ReplicationError::Tls)?;
        let tcp = TcpStream::connect((cfg.host.as_str(), cfg.port)).await?;
        tcp.set_nodelay(true)?;
        let sock = tls
            .negotiate(tcp, &cfg.host)
            .await
            .map_err(ReplicationError::Tls)?;
        let mut c = ReplicationClient {
            sock,
            rbuf: BytesMut::with_capacity(8192),
            wbuf: BytesMut::new(),
            broken: false,
        };
        frontend::startup_message(
            [
                ("user", cfg.user.as_str()),
                ("database", cfg.dbname.as_str()),
                ("replication", "database"),
                ("application_name", "routy"),
                ("client_encoding", "UTF8"),
            ],
            &mut c.wbuf,
        )?;
        c.flush().await?;
        let mut scram: Option<ScramSha256> = None;
        let password = || {
            cfg.password.as_deref().ok_or_else(|| {
                ReplicationError::Auth(
                    "the server asks for a password but none is configured".into(),
                )
            })
        };
        loop {
            match c.read_message().await? {
                Backend::Msg(Message::AuthenticationOk) => break,
                Backend::Msg(Message::AuthenticationCleartextPassword) => {
                    frontend::password_message(password()?.as_bytes(), &mut c.wbuf)?;
                    c.flush().await?;
                }
                Backend::Msg(Message::AuthenticationMd5Password(body)) => {
                    let hash = md5_hash(cfg.user.as_bytes(), password()?.as_bytes(), body.salt());
                    frontend::password_message(hash.as_bytes(), &mut c.wbuf)?;
                    c.flush().await?;
                }
                Backend::Msg(Message::AuthenticationSasl(body)) => {
                    let mut mechs = body.mechanisms();
                    let mut has_scram = false;
                    while let Some(m) = mechs
                        .next()
                        .map_err(|e| ReplicationError::Protocol(format!("SASL mechanisms: {e}")))?
                    {
                        has_scram |= m == SCRAM_SHA_256;
                    }
                    if !has_scram {
                        return Err(ReplicationError::Auth(
                            "the server offers no SASL mechanism we support (SCRAM-SHA-256)".into(),
                        ));
                    }
                    // No TLS, hence no channel binding: the client says it does not support it.
                    let s = ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut c.wbuf)?;
                    c.flush().await?;
                    scram = Some(s);
                }
                Backend::Msg(Message::AuthenticationSaslContinue(body)) => {
                    let s = scram.as_mut().ok_or_else(|| {
                        ReplicationError::Protocol("SASLContinue without SASL start".into())
                    })?;
                    s.update(body.data())
                        .map_err(|e| ReplicationError::Auth(format!("SCRAM: {e}")))?;
                    frontend::sasl_response(s.message(), &mut c.wbuf)?;
                    c.flush().await?;
                }
                Backend::Msg(Message::AuthenticationSaslFinal(body)) => {
                    let s = scram.as_mut().ok_or_else(|| {
                        ReplicationError::Protocol("SASLFinal without SASL start".into())
                    })?;
                    s.finish(body.data()).map_err(|e| {
                        ReplicationError::Auth(format!("SCRAM server signature: {e}"))
                    })?;
                }
                Backend::Msg(Message::ErrorResponse(body)) => return Err(server_error(&body)),
                Backend::Msg(Message::NoticeResponse(_)) => {}
                Backend::Msg(_) | Backend::CopyBoth => {
                    return Err(ReplicationError::Auth(
                        "unsupported authentication request (GSS/SSPI/Kerberos)".into(),
                    ))
                }
            }
        }
        loop {
            match c.read_message().await? {
                Backend::Msg(Message::ReadyForQuery(_)) => return Ok(c),
                Backend::Msg(Message::ErrorResponse(body)) => return Err(server_error(&body)),
                Backend::Msg(
                    Message::ParameterStatus(_)
                    | Message::BackendKeyData(_)
                    | Message::NoticeResponse(_),
                ) => {}
                Backend::Msg(_) | Backend::CopyBoth => {
                    return Err(ReplicationError::Protocol(
                        "unexpected message during startup".into(),
                    ))
                }
            }
        }
    }

    /// Writes out the pending output buffer (with [`WRITE_TIMEOUT`]).
    async fn flush(&mut self) -> Result<()> {
        let (sock, wbuf) = (&mut self.sock, &self.wbuf);
        let res = timeout(WRITE_TIMEOUT, async {
            sock.write_all(wbuf).await?;
            // TLS buffers inside the session: push it to the socket.
            sock.flush().await
        })
        .await;
        self.wbuf.clear();
        match res {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.broken = true;
                Err(e.into())
            }
            Err(_) => {
                self.broken = true;
                Err(ReplicationError::Timeout(
                    WRITE_TIMEOUT,
                    "writing to PostgreSQL",
                ))
            }
        }
    }

    /// Parses one complete message out of the read buffer, if there is one.
    fn parse_buffered(&mut self) -> Result<Option<Backend>> {
        let Some(header) = backend::Header::parse(&self.rbuf)? else {
            return Ok(None);
        };
        let len = usize::try_from(header.len()).unwrap_or(usize::MAX);
        if !(4..=MAX_MESSAGE_LEN).contains(&len) {
            self.broken = true;
            return Err(ReplicationError::Protocol(format!(
                "backend message length {} out of range",
                header.len()
            )));
        }
        if header.tag() == COPY_BOTH_RESPONSE_TAG {
            if self.rbuf.len() < len + 1 {
                self.rbuf.reserve(len + 1 - self.rbuf.len());
                return Ok(None);
            }
            // Body: overall format and per-column formats; nothing we need.
            self.rbuf.advance(len + 1);
            return Ok(Some(Backend::CopyBoth));
        }
        match Message::parse(&mut self.rbuf) {
            Ok(Some(m)) => Ok(Some(Backend::Msg(m))),
            Ok(None) => Ok(None),
            Err(e) => {
                self.broken = true;
                Err(ReplicationError::Protocol(format!(
                    "malformed backend message (tag {:?}): {e}",
                    char::from(header.tag())
                )))
            }
        }
    }

    /// Reads one backend message. Cancel-safe: partial input stays in the buffer.
    /// No deadline of its own; callers wrap it (or, when streaming, own the wait).
    async fn read_message(&mut self) -> Result<Backend> {
        if self.broken {
            return Err(ReplicationError::Broken);
        }
        loop {
            if let Some(m) = self.parse_buffered()? {
                return Ok(m);
            }
            let n = match self.sock.read_buf(&mut self.rbuf).await {
                Ok(n) => n,
                Err(e) => {
                    self.broken = true;
                    return Err(e.into());
                }
            };
            if n == 0 {
                self.broken = true;
                return Err(ReplicationError::Closed);
            }
        }
    }

    /// Runs a simple query within `limit`; rows as text, NULL as None.
    async fn query_with(&mut self, sql: &str, limit: Duration) -> Result<Vec<Vec<Option<String>>>> {
        if self.broken {
            return Err(ReplicationError::Broken);
        }
        frontend::query(sql, &mut self.wbuf)
            .map_err(|e| ReplicationError::InvalidArgument(format!("query: {e}")))?;
        self.flush().await?;
        match timeout(limit, self.collect_rows()).await {
            Ok(r) => r,
            Err(_) => {
                self.broken = true;
                Err(ReplicationError::Timeout(
                    limit,
                    "waiting for a query result",
                ))
            }
        }
    }

    async fn collect_rows(&mut self) -> Result<Vec<Vec<Option<String>>>> {
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.read_message().await? {
                Backend::Msg(Message::DataRow(body)) => {
                    let mut row = Vec::new();
                    let mut ranges = body.ranges();
                    while let Some(r) = ranges
                        .next()
                        .map_err(|e| ReplicationError::Protocol(format!("DataRow: {e}")))?
                    {
                        row.push(match r {
                            None => None,
                            Some(r) => {
                                let raw = body.buffer().get(r).ok_or_else(|| {
                                    ReplicationError::Protocol("DataRow range".into())
                                })?;
                                Some(String::from_utf8(raw.to_vec()).map_err(|_| {
                                    ReplicationError::Protocol("non-UTF-8 column value".into())
                                })?)
                            }
                        });
                    }
                    rows.push(row);
                }
                Backend::Msg(Message::ErrorResponse(body)) => error = Some(server_error(&body)),
                Backend::Msg(Message::ReadyForQuery(_)) => {
                    return match error {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    }
                }
                Backend::Msg(Message::NoticeResponse(body)) => {
                    tracing::info!(notice = %notice_text(&body), "PostgreSQL notice");
                }
                Backend::Msg(
                    Message::RowDescription(_)
                    | Message::CommandComplete(_)
                    | Message::EmptyQueryResponse
                    | Message::ParameterStatus(_),
                ) => {}
                Backend::Msg(_) | Backend::CopyBoth => {
                    self.broken = true;
                    return Err(ReplicationError::Protocol(
                        "unexpected message in a simple-query response (COPY?)".into(),
                    ));
                }
            }
        }
    }

    /// Runs a replication command (e.g. DROP_REPLICATION_SLOT) and returns its rows as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
        self.query_with(sql, QUERY_TIMEOUT).await
    }

    /// Runs IDENTIFY_SYSTEM.
    pub async fn identify_system(&mut self) -> Result<SystemId> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = match rows.as_slice() {
            [row] if row.len() >= 4 => row,
            _ => {
                return Err(ReplicationError::Protocol(
                    "IDENTIFY_SYSTEM: expected one row of four columns".into(),
                ))
            }
        };
        let col = |i: usize| {
            row[i].clone().ok_or_else(|| {
                ReplicationError::Protocol(format!("IDENTIFY_SYSTEM: column {i} is NULL"))
            })
        };
        let timeline = col(1)?;
        Ok(SystemId {
            systemid: col(0)?,
            timeline: timeline.parse().map_err(|_| {
                ReplicationError::Protocol(format!("IDENTIFY_SYSTEM: bad timeline {timeline}"))
            })?,
            xlogpos: parse_lsn(&col(2)?)?,
            dbname: row[3].clone(),
        })
    }

    /// Creates a logical slot with an exported snapshot (PG 15 syntax). The snapshot stays
    /// importable (`SET TRANSACTION SNAPSHOT`) only until the next command on this connection.
    pub async fn create_logical_slot(&mut self, name: &str, plugin: &str) -> Result<SlotCreated> {
        self.create_slot(name, plugin, false).await
    }

    /// Like [`ReplicationClient::create_logical_slot`] but `TEMPORARY`: the slot disappears
    /// when this connection ends (used only for its exported snapshot).
    pub async fn create_temporary_logical_slot(
        &mut self,
        name: &str,
        plugin: &str,
    ) -> Result<SlotCreated> {
        self.create_slot(name, plugin, true).await
    }

    async fn create_slot(
        &mut self,
        name: &str,
        plugin: &str,
        temporary: bool,
    ) -> Result<SlotCreated> {
        let sql = format!(
            "CREATE_REPLICATION_SLOT {}{} LOGICAL {} (SNAPSHOT 'export')",
            quote_name(name)?,
            if temporary { " TEMPORARY" } else { "" },
            quote_name(plugin)?
        );
        let rows = self.query_with(&sql, CREATE_SLOT_TIMEOUT).await?;
        let row = match rows.as_slice() {
            [row] if row.len() >= 3 => row,
            _ => {
                return Err(ReplicationError::Protocol(
                    "CREATE_REPLICATION_SLOT: expected one row".into(),
                ))
            }
        };
        let slot_name = row[0].clone().ok_or_else(|| {
            ReplicationError::Protocol("CREATE_REPLICATION_SLOT: NULL slot name".into())
        })?;
        let point = row[1].clone().ok_or_else(|| {
            ReplicationError::Protocol("CREATE_REPLICATION_SLOT: NULL consistent point".into())
        })?;
        Ok(SlotCreated {
            slot_name,
            consistent_point: parse_lsn(&point)?,
            snapshot_name: row[2].clone(),
        })
    }

    /// Sends START_REPLICATION … LOGICAL from `start_lsn` with plugin options and enters
    /// CopyBoth mode.
    pub async fn start_logical(
        mut self,
        slot: &str,
        start_lsn: u64,
        options: &[(&str, &str)],
    ) -> Result<ReplicationStream> {
        if self.broken {
            return Err(ReplicationError::Broken);
        }
        let mut sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {}",
            quote_name(slot)?,
            format_lsn(start_lsn)
        );
        if !options.is_empty() {
            sql.push_str(" (");
            for (i, (k, v)) in options.iter().enumerate() {
                if i > 0 {
                    sql.push_str(", ");
                }
                let _ = write!(sql, "{} {}", quote_with(k, '"')?, quote_with(v, '\'')?);
            }
            sql.push(')');
        }
        frontend::query(&sql, &mut self.wbuf)
            .map_err(|e| ReplicationError::InvalidArgument(format!("query: {e}")))?;
        self.flush().await?;
        let res = timeout(QUERY_TIMEOUT, async {
            loop {
                match self.read_message().await? {
                    Backend::CopyBoth => return Ok(()),
                    Backend::Msg(Message::ErrorResponse(body)) => {
                        let err = server_error(&body);
                        // Drain to ReadyForQuery; the connection stays usable then.
                        loop {
                            if let Backend::Msg(Message::ReadyForQuery(_)) =
                                self.read_message().await?
                            {
                                return Err(err);
                            }
                        }
                    }
                    Backend::Msg(Message::NoticeResponse(_) | Message::ParameterStatus(_)) => {}
                    Backend::Msg(_) => {
                        self.broken = true;
                        return Err(ReplicationError::Protocol(
                            "unexpected answer to START_REPLICATION".into(),
                        ));
                    }
                }
            }
        })
        .await;
        match res {
            Ok(Ok(())) => Ok(ReplicationStream {
                client: self,
                done: false,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ReplicationError::Timeout(
                QUERY_TIMEOUT,
                "waiting for START_REPLICATION",
            )),
        }
    }
}

/// A connection in CopyBoth mode, streaming logical changes.
#[derive(Debug)]
pub struct ReplicationStream {
    client: ReplicationClient,
    done: bool,
}

fn be_u64(b: &[u8], at: usize) -> Result<u64> {
    b.get(at..at + 8)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| ReplicationError::Protocol("truncated CopyData payload".into()))
}

/// Decodes one CopyData payload of the replication stream.
fn parse_copy_data(data: Bytes) -> Result<ReplicationEvent> {
    match data.first() {
        Some(b'w') => {
            if data.len() < 25 {
                return Err(ReplicationError::Protocol("truncated XLogData".into()));
            }
            Ok(ReplicationEvent::XLogData {
                wal_start: be_u64(&data, 1)?,
                wal_end: be_u64(&data, 9)?,
                server_time: be_u64(&data, 17)? as i64,
                data: data.slice(25..),
            })
        }
        Some(b'k') => {
            if data.len() < 18 {
                return Err(ReplicationError::Protocol("truncated keepalive".into()));
            }
            Ok(ReplicationEvent::Keepalive {
                wal_end: be_u64(&data, 1)?,
                server_time: be_u64(&data, 9)? as i64,
                reply_requested: data[17] != 0,
            })
        }
        Some(t) => Err(ReplicationError::Protocol(format!(
            "unknown replication message type {:?}",
            char::from(*t)
        ))),
        None => Err(ReplicationError::Protocol("empty CopyData".into())),
    }
}

impl ReplicationStream {
    /// Next XLogData or keepalive; `None` once the server has ended the copy.
    ///
    /// No deadline: an idle, fully confirmed walsender sends nothing, so the caller's loop
    /// (which also sends status updates) owns the wait. Cancel-safe, for use in `select!`.
    pub async fn next(&mut self) -> Result<Option<ReplicationEvent>> {
        if self.done {
            return Ok(None);
        }
        loop {
            match self.client.read_message().await? {
                Backend::Msg(Message::CopyData(body)) => {
                    return parse_copy_data(body.into_bytes()).map(Some);
                }
                Backend::Msg(Message::CopyDone) => {
                    self.done = true;
                    frontend::copy_done(&mut self.client.wbuf);
                    self.client.flush().await?;
                    let client = &mut self.client;
                    let drain = async {
                        loop {
                            match client.read_message().await? {
                                Backend::Msg(Message::ReadyForQuery(_)) => return Ok(()),
                                Backend::Msg(Message::ErrorResponse(body)) => {
                                    return Err(server_error(&body))
                                }
                                _ => {}
                            }
                        }
                    };
                    return match timeout(QUERY_TIMEOUT, drain).await {
                        Ok(Ok(())) => Ok(None),
                        Ok(Err(e)) => Err(e),
                        Err(_) => {
                            self.client.broken = true;
                            Err(ReplicationError::Timeout(QUERY_TIMEOUT, "ending the copy"))
                        }
                    };
                }
                Backend::Msg(Message::ErrorResponse(body)) => {
                    self.client.broken = true;
                    return Err(server_error(&body));
                }
                Backend::Msg(Message::NoticeResponse(body)) => {
                    tracing::info!(notice = %notice_text(&body), "PostgreSQL notice");
                }
                Backend::Msg(Message::ParameterStatus(_)) => {}
                Backend::Msg(_) | Backend::CopyBoth => {
                    self.client.broken = true;
                    return Err(ReplicationError::Protocol(
                        "unexpected message in CopyBoth mode".into(),
                    ));
                }
            }
        }
    }

    /// Sends a Standby Status Update: WAL written, flushed (confirmed to the slot) and
    /// applied up to these LSNs; `reply` asks the server to answer with a keepalive.
    pub async fn send_status(
        &mut self,
        written: u64,
        flushed: u64,
        applied: u64,
        reply: bool,
    ) -> Result<()> {
        if self.client.broken {
            return Err(ReplicationError::Broken);
        }
        let mut payload = BytesMut::with_capacity(34);
        payload.put_u8(b'r');
        payload.put_u64(written);
        payload.put_u64(flushed);
        payload.put_u64(applied);
        payload.put_i64(pg_now_micros());
        payload.put_u8(u8::from(reply));
        frontend::CopyData::new(payload.freeze())?.write(&mut self.client.wbuf);
        self.client.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use routy_e2e::{Pg, PgOpts};

    fn cfg(pg: &Pg, user: &str, password: Option<&str>) -> ReplicationConfig {
        ReplicationConfig {
            host: pg.host().to_string(),
            port: pg.port(),
            user: user.into(),
            password: password.map(Into::into),
            dbname: "postgres".into(),
            connect_timeout: Duration::from_secs(10),
            sslmode: SslMode::Prefer,
            sslrootcert: None,
        }
    }

    #[test]
    fn dsn_parsing() {
        let c = parse_dsn(
            "host=db.example port = 6543 user=rep password='it\\'s a \\\\secret' dbname=app connect_timeout=3",
        )
        .unwrap();
        assert_eq!(c.host, "db.example");
        assert_eq!(c.port, 6543);
        assert_eq!(c.user, "rep");
        assert_eq!(c.password.as_deref(), Some("it's a \\secret"));
        assert_eq!(c.dbname, "app");
        assert_eq!(c.connect_timeout, Duration::from_secs(3));
        let d = parse_dsn("user=u").unwrap();
        assert_eq!(
            (d.host.as_str(), d.port, d.dbname.as_str()),
            ("localhost", 5432, "u")
        );
        assert!(parse_dsn("user=u password='open").is_err());
        assert!(parse_dsn("user=u bogus=1").is_err());
        let t = parse_dsn("user=u sslmode=verify-full sslrootcert=/etc/ca.crt").unwrap();
        assert_eq!(t.sslmode, SslMode::VerifyFull);
        assert_eq!(
            t.sslrootcert.as_deref(),
            Some(std::path::Path::new("/etc/ca.crt"))
        );
        assert!(parse_dsn("user=u sslmode=bogus").is_err());
        assert!(parse_dsn("user=u sslcert=c.crt").is_err());
        assert!(parse_dsn("host=h").is_err());
        // The URL form reads the same.
        let u = parse_dsn(
            "postgresql://rep:it%27s@db.example:6543/app?connect_timeout=3&sslmode=verify-full&sslrootcert=/etc/ca.crt",
        )
        .unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.user.as_str(), u.dbname.as_str()),
            ("db.example", 6543, "rep", "app")
        );
        assert_eq!(u.password.as_deref(), Some("it's"));
        assert_eq!(u.connect_timeout, Duration::from_secs(3));
        assert_eq!(u.sslmode, SslMode::VerifyFull);
        assert!(parse_dsn("postgresql://u@h1,h2/db").is_err());
        assert!(parse_dsn("postgresql://u@h/db?bogus=1").is_err());
    }

    #[test]
    fn lsn_and_quoting() {
        assert_eq!(parse_lsn("16/B374D848").unwrap(), 0x16_B374_D848);
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert!(parse_lsn("16B374D848").is_err());
        assert!(parse_lsn("x/1").is_err());
        assert_eq!(quote_with("a'b", '\'').unwrap(), "'a''b'");
        assert!(quote_name("Bad-Name").is_err());
        assert!(quote_name("ok_1").is_ok());
    }

    #[test]
    fn malformed_copy_data_is_an_error() {
        for bad in [&b""[..], b"w", b"w0123456789", b"k12345", b"z"] {
            assert!(
                parse_copy_data(Bytes::copy_from_slice(bad)).is_err(),
                "{bad:?}"
            );
        }
        let mut ok = vec![b'k'];
        ok.extend(7u64.to_be_bytes());
        ok.extend(9i64.to_be_bytes());
        ok.push(1);
        assert_eq!(
            parse_copy_data(Bytes::from(ok)).unwrap(),
            ReplicationEvent::Keepalive {
                wal_end: 7,
                server_time: 9,
                reply_requested: true
            }
        );
    }

    #[tokio::test]
    async fn authentication_methods() {
        let pg = Pg::start(PgOpts {
            extra_hba: vec![
                "host all scram_user 127.0.0.1/32 scram-sha-256".into(),
                "host replication scram_user 127.0.0.1/32 scram-sha-256".into(),
                "host all md5_user 127.0.0.1/32 md5".into(),
                "host replication md5_user 127.0.0.1/32 md5".into(),
            ],
            ..Default::default()
        });
        pg.psql(
            "SET password_encryption = 'scram-sha-256';
             CREATE ROLE scram_user LOGIN REPLICATION PASSWORD 's3cret';
             SET password_encryption = 'md5';
             CREATE ROLE md5_user LOGIN REPLICATION PASSWORD 'md5pass';",
        );
        for (user, pw) in [
            ("postgres", None),
            ("scram_user", Some("s3cret")),
            ("md5_user", Some("md5pass")),
        ] {
            let mut c = ReplicationClient::connect(&cfg(&pg, user, pw))
                .await
                .unwrap_or_else(|e| panic!("{user}: {e}"));
            let id = c.identify_system().await.unwrap();
            assert_eq!(id.timeline, 1, "{user}");
            assert!(id.xlogpos > 0, "{user}");
            assert_eq!(id.dbname.as_deref(), Some("postgres"));
            assert!(id.systemid.parse::<u64>().is_ok(), "{id:?}");
        }
        for user in ["scram_user", "md5_user"] {
            let err = ReplicationClient::connect(&cfg(&pg, user, Some("wrong")))
                .await
                .unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains("password authentication failed") && text.contains("28P01"),
                "{user}: {text}"
            );
        }
        let err = ReplicationClient::connect(&cfg(&pg, "scram_user", None))
            .await
            .unwrap_err();
        assert!(matches!(err, ReplicationError::Auth(_)), "{err}");
    }

    /// Commit end LSN of a pgoutput Commit message.
    fn commit_end_lsn(data: &[u8]) -> u64 {
        assert_eq!(data[0], b'C');
        u64::from_be_bytes(data[10..18].try_into().unwrap())
    }

    #[tokio::test]
    async fn slot_snapshot_and_streaming() {
        let pg = Pg::start(PgOpts {
            extra_conf: vec!["wal_sender_timeout = 2s".into()],
            ..Default::default()
        });
        pg.psql(
            "CREATE TABLE t (id int PRIMARY KEY, v text);
             INSERT INTO t VALUES (1, 'before');
             CREATE PUBLICATION pub FOR TABLE t;",
        );
        let mut c = ReplicationClient::connect(&cfg(&pg, "postgres", None))
            .await
            .unwrap();
        let slot = c
            .create_logical_slot("routy_test", "pgoutput")
            .await
            .unwrap();
        assert_eq!(slot.slot_name, "routy_test");
        assert!(slot.consistent_point > 0);
        let snapshot = slot.snapshot_name.clone().expect("exported snapshot");

        // A row committed after the slot: not in the snapshot, but in the stream.
        pg.psql("INSERT INTO t VALUES (2, 'after');");
        let (pgc, conn) = tokio_postgres::connect(&pg.conninfo(), tokio_postgres::NoTls)
            .await
            .unwrap();
        let conn_task = tokio::spawn(conn);
        pgc.batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT '{snapshot}'"
        ))
        .await
        .unwrap();
        let n: i64 = pgc
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            n, 1,
            "the exported snapshot sees only the row from before the slot"
        );
        pgc.batch_execute("COMMIT").await.unwrap();

        // Other commands still work on the replication connection.
        let rows = c
            .simple_query("SELECT slot_name FROM pg_replication_slots")
            .await
            .unwrap();
        assert_eq!(rows, vec![vec![Some("routy_test".to_string())]]);

        let mut stream = c
            .start_logical(
                "routy_test",
                slot.consistent_point,
                &[
                    ("proto_version", "1"),
                    ("publication_names", "pub"),
                    ("messages", "true"),
                ],
            )
            .await
            .unwrap();
        let mut tags = Vec::new();
        let mut commit_end = None;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while commit_end.is_none() {
            let ev = tokio::time::timeout_at(deadline, stream.next())
                .await
                .expect("XLogData within 30 s")
                .unwrap()
                .expect("stream open");
            if let ReplicationEvent::XLogData { data, .. } = ev {
                tags.push(data[0]);
                if data[0] == b'C' {
                    commit_end = Some(commit_end_lsn(&data));
                }
            }
        }
        assert_eq!(tags, b"BRIC".to_vec());
        let commit_end = commit_end.unwrap();
        stream
            .send_status(commit_end, commit_end, commit_end, false)
            .await
            .unwrap();
        let mut confirmed = 0;
        for _ in 0..100 {
            let lsn = pg.psql(
                "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'routy_test'",
            );
            confirmed = parse_lsn(lsn.trim()).unwrap();
            if confirmed >= commit_end {
                break;
            }
            // The walsender only reads our update while it waits; keep the stream read.
            let _ = tokio::time::timeout(Duration::from_millis(100), stream.next()).await;
        }
        assert!(
            confirmed >= commit_end,
            "slot at {} after confirming {}",
            format_lsn(confirmed),
            format_lsn(commit_end)
        );

        // wal_sender_timeout = 2s: a keepalive asking for a reply comes within a few seconds.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let ev = tokio::time::timeout_at(deadline, stream.next())
                .await
                .expect("keepalive with reply request within 20 s")
                .unwrap()
                .expect("stream open");
            if let ReplicationEvent::Keepalive {
                wal_end,
                reply_requested: true,
                ..
            } = ev
            {
                stream
                    .send_status(wal_end, wal_end, wal_end, false)
                    .await
                    .unwrap();
                break;
            }
        }
        // Still alive after answering: a logical message comes through.
        pg.psql("SELECT pg_logical_emit_message(true, 'routy', 'hello');");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let ev = tokio::time::timeout_at(deadline, stream.next())
                .await
                .expect("logical message within 20 s")
                .unwrap()
                .expect("stream open");
            match ev {
                ReplicationEvent::XLogData { data, .. } if data[0] == b'M' => break,
                ReplicationEvent::Keepalive {
                    wal_end,
                    reply_requested: true,
                    ..
                } => stream
                    .send_status(wal_end, wal_end, wal_end, false)
                    .await
                    .unwrap(),
                _ => {}
            }
        }
        drop(pgc);
        let _ = conn_task.await;
    }
}
