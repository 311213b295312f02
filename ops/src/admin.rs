//! Who may use the admin endpoint: the `admin:` block of either relay's configuration
//! (address, bearer tokens with a role, an open `/metrics`, TLS), and the layer that checks
//! every request against it and writes the audit line of every action.
//!
//! - Open to anyone who reaches the port: `/healthz`, `/readyz` (probes), the console's
//!   page and assets (`/`, `/console/...`: static code, no data; the page reads the data
//!   with the operator's token) and `/v1/whoami` (whether tokens are required, and the
//!   name and role of the token sent, if valid). `/metrics` too with `public_metrics`.
//! - Everything else needs `Authorization: Bearer TOKEN` once `tokens` is set: a `read`
//!   token may GET and HEAD; an action (any other method: they are all POST) needs an
//!   `admin` token. Without a token: 401; a read token on an action: 403.
//! - Without `tokens` the endpoint must listen on loopback (the default), where it is open
//!   to the host as before; a non-loopback `listen` without tokens is a configuration
//!   error.
//! - Every action, allowed or refused, is logged at INFO (WARN when refused), its
//!   message starting `audit:` (target `routy::audit`): the token's name, the client's
//!   address, method, path and status.
//!
//! Bearer tokens in a header (not cookies or Basic auth) keep the console safe from
//! cross-site requests: a browser never adds them to a request on its own.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;

/// The `admin:` block of either relay's config file.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSpec {
    /// Address of the admin HTTP endpoint.
    pub listen: Option<String>,
    /// Bearer tokens.
    #[serde(default)]
    pub tokens: Vec<TokenSpec>,
    /// Serve `/metrics` without a token (for a Prometheus that has none).
    #[serde(default)]
    pub public_metrics: bool,
    /// HTTPS instead of HTTP.
    pub tls: Option<TlsSpec>,
}

/// One entry of `admin.tokens`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSpec {
    /// Shown in the audit log.
    pub name: String,
    /// File holding the token (at least 16 characters; surrounding whitespace ignored).
    pub token_file: PathBuf,
    /// What the token may do.
    pub role: Role,
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// GET and HEAD: the page, `/status`, `/metrics`, `/v1/history`, `/v1/sinks`.
    Read,
    /// Everything, actions included.
    Admin,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Admin => "admin",
        }
    }
}

/// `admin.tls`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSpec {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// When set, clients must present a certificate this CA signed.
    pub client_ca: Option<PathBuf>,
}

/// The validated `admin:` block.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    /// Where the endpoint listens.
    pub listen: SocketAddr,
    /// The tokens, read from their files.
    pub tokens: Vec<Token>,
    /// `/metrics` without a token.
    pub public_metrics: bool,
    /// Certificate, key and optional client CA (paths resolved), for HTTPS.
    pub tls: Option<TlsSpec>,
}

/// A token read from its file: its name, role and the SHA-256 of the secret.
#[derive(Clone)]
pub struct Token {
    /// Its name (`admin.tokens[].name`).
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Where it was read from.
    pub file: PathBuf,
    digest: [u8; 32],
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

impl AdminSettings {
    /// Validates the block (`None`: the defaults, listening on `default`); relative paths
    /// are resolved against `base`, the configuration file's directory; token files are
    /// read. Errors name the key.
    pub fn resolve(
        spec: Option<&AdminSpec>,
        default: &str,
        base: &Path,
    ) -> Result<AdminSettings, String> {
        let addr = spec.and_then(|a| a.listen.as_deref()).unwrap_or(default);
        let listen: SocketAddr = addr.parse().map_err(|_| {
            format!("admin.listen: {addr:?} is not an address with a port, like {default:?}")
        })?;
        let Some(spec) = spec else {
            return Ok(AdminSettings {
                listen,
                tokens: Vec::new(),
                public_metrics: false,
                tls: None,
            });
        };
        let mut tokens: Vec<Token> = Vec::new();
        for (i, t) in spec.tokens.iter().enumerate() {
            let key = format!("admin.tokens[{i}]");
            if t.name.is_empty()
                || !t
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
            {
                return Err(format!(
                    "{key}.name: {:?} must be letters, digits and - _ . @",
                    t.name
                ));
            }
            if tokens.iter().any(|o| o.name == t.name) {
                return Err(format!("{key}.name: {:?} is used twice", t.name));
            }
            let file = resolve_path(base, &t.token_file);
            let digest = read_token(&file).map_err(|e| format!("{key}.token_file: {e}"))?;
            if let Some(o) = tokens.iter().find(|o| o.digest == digest) {
                return Err(format!(
                    "{key}.token_file: {} holds the same token as {:?}",
                    file.display(),
                    o.name
                ));
            }
            tokens.push(Token {
                name: t.name.clone(),
                role: t.role,
                file,
                digest,
            });
        }
        if tokens.is_empty() && !listen.ip().is_loopback() {
            return Err(format!(
                "admin.listen: {listen} is reachable from other machines: set admin.tokens \
                 (without them the endpoint is open to whoever reaches it), or listen on \
                 loopback (127.0.0.1)"
            ));
        }
        if spec.public_metrics && tokens.is_empty() {
            return Err(
                "admin.public_metrics: needs admin.tokens (without tokens everything is open)"
                    .into(),
            );
        }
        let tls = spec.tls.as_ref().map(|t| TlsSpec {
            cert: resolve_path(base, &t.cert),
            key: resolve_path(base, &t.key),
            client_ca: t.client_ca.as_ref().map(|p| resolve_path(base, p)),
        });
        Ok(AdminSettings {
            listen,
            tokens,
            public_metrics: spec.public_metrics,
            tls,
        })
    }

    /// The certificate files to watch for expiry (configuration key, file).
    pub fn cert_files(&self) -> Vec<(&'static str, PathBuf)> {
        let mut v = Vec::new();
        if let Some(t) = &self.tls {
            v.push(("admin.tls.cert", t.cert.clone()));
            if let Some(ca) = &t.client_ca {
                v.push(("admin.tls.client_ca", ca.clone()));
            }
        }
        v
    }

    /// A reload's check: the address and TLS take effect only at start.
    pub fn reloadable(&self, new: &AdminSettings) -> Result<(), String> {
        crate::config_file::restart_needed("admin.listen", &self.listen, &new.listen)?;
        let tls = |s: &AdminSettings| {
            s.tls.as_ref().map_or("none".to_string(), |t| {
                format!(
                    "{} {} {}",
                    t.cert.display(),
                    t.key.display(),
                    t.client_ca
                        .as_ref()
                        .map_or("-".into(), |p| p.display().to_string())
                )
            })
        };
        crate::config_file::restart_needed("admin.tls", &tls(self), &tls(new))
    }

    /// The URL scheme clients use: `https` with `tls`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// A token with the admin role, for the commands that act through the endpoint
    /// (`None` without tokens).
    pub fn admin_token_file(&self) -> Option<&Path> {
        self.tokens
            .iter()
            .find(|t| t.role == Role::Admin)
            .map(|t| t.file.as_path())
    }
}

fn resolve_path(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        base.join(p)
    }
}

/// Smallest token accepted, in characters.
pub const MIN_TOKEN_LEN: usize = 16;

/// Reads the secret in `file` (trimmed); its SHA-256.
fn read_token(file: &Path) -> Result<[u8; 32], String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let secret = text.trim();
    if secret.len() < MIN_TOKEN_LEN {
        return Err(format!(
            "the token in {} is shorter than {MIN_TOKEN_LEN} characters",
            file.display()
        ));
    }
    if secret.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
        return Err(format!(
            "the token in {} has spaces or characters that are not printable ASCII",
            file.display()
        ));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(file) {
            if m.permissions().mode() & 0o004 != 0 {
                tracing::warn!(file = %file.display(), "an admin token file is readable by every user on this host: chmod 600 it");
            }
        }
    }
    Ok(sha256(secret.as_bytes()))
}

/// Reads a token file as the commands that talk to the endpoint send it.
pub fn read_secret(file: &Path) -> Result<String, String> {
    std::fs::read_to_string(file)
        .map(|t| t.trim().to_string())
        .map_err(|e| format!("cannot read {}: {e}", file.display()))
}

fn sha256(b: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, b);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The client's address, put into each request's extensions by the HTTP server.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// The rules in force; replaced on reload.
#[derive(Debug)]
pub struct Access {
    rules: RwLock<Rules>,
}

#[derive(Debug)]
struct Rules {
    tokens: Vec<Token>,
    public_metrics: bool,
}

/// Who made a request.
#[derive(Debug, Clone)]
enum Caller {
    /// No tokens configured: the loopback endpoint is open.
    Anyone,
    /// A token.
    Token { name: String, role: Role },
}

impl Access {
    /// The rules of `settings`.
    pub fn new(settings: &AdminSettings) -> Arc<Access> {
        Arc::new(Access {
            rules: RwLock::new(Rules::of(settings)),
        })
    }

    /// Takes the tokens and `public_metrics` of a reloaded configuration.
    pub fn update(&self, settings: &AdminSettings) {
        *self.rules.write().unwrap_or_else(|p| p.into_inner()) = Rules::of(settings);
    }

    /// `router` with every request checked against these rules.
    pub fn guard(self: &Arc<Self>, router: Router) -> Router {
        router.layer(axum::middleware::from_fn_with_state(self.clone(), check))
    }

    /// Who `authorization` (the header's value) identifies; the refusal otherwise.
    fn caller(&self, authorization: Option<&str>) -> Result<Caller, Refusal> {
        let rules = self.rules.read().unwrap_or_else(|p| p.into_inner());
        if rules.tokens.is_empty() {
            return Ok(Caller::Anyone);
        }
        let Some(value) = authorization else {
            return Err(Refusal::Unauthorized(
                "this endpoint needs a token: Authorization: Bearer TOKEN",
            ));
        };
        let Some(given) = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
        else {
            return Err(Refusal::Unauthorized(
                "only bearer tokens are accepted: Authorization: Bearer TOKEN",
            ));
        };
        let digest = sha256(given.trim().as_bytes());
        // Equal digests of different secrets do not happen; comparing digests (not the
        // secrets) tells a timing observer nothing about the token.
        match rules.tokens.iter().find(|t| t.digest == digest) {
            Some(t) => Ok(Caller::Token {
                name: t.name.clone(),
                role: t.role,
            }),
            None => Err(Refusal::Unauthorized("the token is not valid")),
        }
    }

    fn public_metrics(&self) -> bool {
        self.rules
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .public_metrics
    }
}

impl Rules {
    fn of(s: &AdminSettings) -> Rules {
        Rules {
            tokens: s.tokens.clone(),
            public_metrics: s.public_metrics,
        }
    }
}

#[derive(Debug)]
enum Refusal {
    Unauthorized(&'static str),
}

/// `GET /v1/whoami`: open to all, so the console learns whether it needs a token, and
/// whether the one it has is good, without a refused request (which a browser reports
/// as an error).
pub const WHOAMI: &str = "/v1/whoami";

/// The answer of [`WHOAMI`]: `tokens_required`, and the token's `name` and `role` (both
/// `null` without a valid token; `role` is `admin` for anyone when no tokens are set).
fn whoami(access: &Access, authorization: Option<&str>) -> Response {
    let required = !access
        .rules
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .tokens
        .is_empty();
    let (name, role) = match access.caller(authorization) {
        Ok(Caller::Anyone) => (None, Some("admin")),
        Ok(Caller::Token { name, role }) => (Some(name), Some(role.as_str())),
        Err(_) => (None, None),
    };
    crate::http::json(
        StatusCode::OK,
        &serde_json::json!({ "tokens_required": required, "token": name, "role": role }),
    )
}

/// Paths anyone may GET: probes and the console's static page.
fn always_open(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/") || path.starts_with("/console/")
}

fn error(status: StatusCode, msg: &str) -> Response {
    let mut r = crate::http::json(status, &serde_json::json!({ "error": msg }));
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"routy-admin\""),
        );
    }
    r
}

async fn check(State(access): State<Arc<Access>>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let read_only = method == Method::GET || method == Method::HEAD;
    let path = req.uri().path().to_string();
    if read_only && (always_open(&path) || (path == "/metrics" && access.public_metrics())) {
        return next.run(req).await;
    }
    if read_only && path == WHOAMI {
        let auth = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        return whoami(&access, auth);
    }
    let peer = req
        .extensions()
        .get::<ClientAddr>()
        .map_or("-".to_string(), |a| a.0.to_string());
    let target = req
        .uri()
        .path_and_query()
        .map_or(path.clone(), |p| p.as_str().to_string());
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let caller = match access.caller(auth) {
        Ok(c) => c,
        Err(Refusal::Unauthorized(msg)) => {
            if !read_only {
                tracing::warn!(target: "routy::audit", token = %"-", %peer, %method, path = %target,
                    status = 401, "audit: admin action refused: {msg}");
            }
            return error(StatusCode::UNAUTHORIZED, msg);
        }
    };
    if read_only {
        return next.run(req).await;
    }
    let (name, role) = match &caller {
        Caller::Anyone => ("-".to_string(), "none"),
        Caller::Token { name, role } => (name.clone(), role.as_str()),
    };
    if let Caller::Token {
        role: Role::Read, ..
    } = caller
    {
        tracing::warn!(target: "routy::audit", token = %name, role = %role, %peer, %method, path = %target,
            status = 403, "audit: admin action refused: a read token");
        return error(
            StatusCode::FORBIDDEN,
            &format!("token {name} may only read: actions need a token with role admin"),
        );
    }
    let response = next.run(req).await;
    let status = response.status().as_u16();
    tracing::info!(target: "routy::audit", token = %name, role = %role, %peer, %method, path = %target,
        status, "audit: admin action");
    response.into_response()
}

/// How long `POST /v1/reload` waits for the reload before it answers 202: well inside the
/// admin endpoint's request deadline ([`crate::http::DEFAULT_DEADLINE`]).
pub const RELOAD_ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(4);

/// `POST /v1/reload` on either relay: runs `reload` (the relay's own, the same as SIGHUP)
/// as a task of its own, so it always runs to its end: a client that goes away, or the
/// request deadline, never cancels a reload half applied. Answers 200 `{"reloaded":
/// summary}`, 422 `{"error": why}` (the old configuration stays), or, when the reload is
/// still running after [`RELOAD_ANSWER_WITHIN`], 202 `{"reloading": true, ..}`: its outcome
/// is then in the log and in `routy_config_reloads_total`.
pub async fn reload_answer<F>(reload: F) -> Response
where
    F: std::future::Future<Output = Result<String, String>> + Send + 'static,
{
    let task = tokio::spawn(reload);
    match tokio::time::timeout(RELOAD_ANSWER_WITHIN, task).await {
        Ok(Ok(Ok(summary))) => {
            crate::http::json(StatusCode::OK, &serde_json::json!({ "reloaded": summary }))
        }
        Ok(Ok(Err(why))) => error(StatusCode::UNPROCESSABLE_ENTITY, &why),
        Ok(Err(e)) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("the reload failed: {e}"),
        ),
        Err(_) => crate::http::json(
            StatusCode::ACCEPTED,
            &serde_json::json!({
                "reloading": true,
                "note": format!(
                    "still running after {} s; it goes on: its outcome is in the log and in routy_config_reloads_total",
                    RELOAD_ANSWER_WITHIN.as_secs()
                ),
            }),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::routing::{get, post};
    use tower::ServiceExt;

    fn token_file(dir: &Path, name: &str, secret: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, format!("{secret}\n")).unwrap();
        p
    }

    fn spec(dir: &Path, listen: &str) -> AdminSpec {
        AdminSpec {
            listen: Some(listen.into()),
            tokens: vec![
                TokenSpec {
                    name: "viewer".into(),
                    token_file: token_file(dir, "r", "read-token-0123456789"),
                    role: Role::Read,
                },
                TokenSpec {
                    name: "ops".into(),
                    token_file: "a".into(),
                    role: Role::Admin,
                },
            ],
            public_metrics: false,
            tls: None,
        }
    }

    #[test]
    fn settings_are_checked_and_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        token_file(dir.path(), "a", "admin-token-0123456789");
        let s = AdminSettings::resolve(
            Some(&spec(dir.path(), "0.0.0.0:9464")),
            "127.0.0.1:1",
            dir.path(),
        )
        .unwrap();
        assert_eq!(s.tokens.len(), 2);
        assert_eq!(s.admin_token_file(), Some(dir.path().join("a").as_path()));
        // No block: loopback default, open.
        let d = AdminSettings::resolve(None, "127.0.0.1:9464", dir.path()).unwrap();
        assert!(d.tokens.is_empty() && d.listen.ip().is_loopback());

        let err = |spec: AdminSpec| {
            AdminSettings::resolve(Some(&spec), "127.0.0.1:1", dir.path()).unwrap_err()
        };
        let open = AdminSpec {
            tokens: vec![],
            ..spec(dir.path(), "0.0.0.0:9464")
        };
        assert!(err(open).contains("admin.listen: 0.0.0.0:9464 is reachable"));
        let mut short = spec(dir.path(), "127.0.0.1:9464");
        short.tokens[0].token_file = token_file(dir.path(), "s", "short");
        assert!(err(short).contains("admin.tokens[0].token_file: the token in"));
        let mut missing = spec(dir.path(), "127.0.0.1:9464");
        missing.tokens[1].token_file = "nope".into();
        assert!(err(missing).contains("admin.tokens[1].token_file: cannot read"));
        let mut twice = spec(dir.path(), "127.0.0.1:9464");
        twice.tokens[1].name = "viewer".into();
        assert!(err(twice).contains("admin.tokens[1].name: \"viewer\" is used twice"));
        let mut same = spec(dir.path(), "127.0.0.1:9464");
        same.tokens[1].token_file = dir.path().join("r");
        assert!(err(same).contains("holds the same token as \"viewer\""));
        let bad_addr = spec(dir.path(), "localhost");
        assert!(err(bad_addr).contains("admin.listen: \"localhost\""));
        let metrics_without_tokens = AdminSpec {
            tokens: vec![],
            public_metrics: true,
            ..spec(dir.path(), "127.0.0.1:9464")
        };
        assert!(err(metrics_without_tokens).contains("admin.public_metrics"));
        // The YAML form, and a typo in a role.
        let y: AdminSpec = serde_saphyr::from_str(
            "listen: 127.0.0.1:9\ntokens:\n  - {name: a, token_file: a, role: admin}\n",
        )
        .unwrap();
        assert_eq!(y.tokens[0].role, Role::Admin);
        let typo = serde_saphyr::from_str::<AdminSpec>(
            "tokens:\n  - {name: a, token_file: a, role: root}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(typo.contains("root"), "{typo}");
    }

    fn app(access: &Arc<Access>) -> Router {
        access.guard(
            Router::new()
                .route("/", get(|| async { "page" }))
                .route("/healthz", get(|| async { "ok" }))
                .route("/metrics", get(|| async { "m" }))
                .route("/status", get(|| async { "{}" }))
                .route("/v1/reload", post(|| async { "reloaded" })),
        )
    }

    async fn call(app: &Router, method: &str, path: &str, token: Option<&str>) -> u16 {
        let mut req = axum::http::Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let r = app
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        r.status().as_u16()
    }

    #[tokio::test]
    async fn tokens_and_roles() {
        let dir = tempfile::tempdir().unwrap();
        token_file(dir.path(), "a", "admin-token-0123456789");
        let mut settings = AdminSettings::resolve(
            Some(&spec(dir.path(), "127.0.0.1:9464")),
            "127.0.0.1:1",
            dir.path(),
        )
        .unwrap();
        let access = Access::new(&settings);
        let app = app(&access);
        let (read, admin) = (
            Some("read-token-0123456789"),
            Some("admin-token-0123456789"),
        );
        assert_eq!(call(&app, "GET", "/healthz", None).await, 200);
        assert_eq!(call(&app, "GET", "/", None).await, 200);
        assert_eq!(call(&app, "GET", "/status", None).await, 401);
        assert_eq!(
            call(&app, "GET", "/status", Some("wrong-token-0123456789")).await,
            401
        );
        assert_eq!(call(&app, "GET", "/metrics", None).await, 401);
        assert_eq!(call(&app, "GET", "/status", read).await, 200);
        assert_eq!(call(&app, "GET", WHOAMI, None).await, 200);
        let who = |token: Option<&'static str>| {
            let app = app.clone();
            async move {
                let mut req = axum::http::Request::builder().uri(WHOAMI);
                if let Some(t) = token {
                    req = req.header("authorization", format!("Bearer {t}"));
                }
                let r = app.oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
                let b = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
                serde_json::from_slice::<serde_json::Value>(&b).unwrap()
            }
        };
        assert_eq!(
            who(None).await,
            serde_json::json!({"tokens_required": true, "token": null, "role": null})
        );
        assert_eq!(who(read).await["role"], "read");
        assert_eq!(who(admin).await["token"], "ops");
        assert_eq!(call(&app, "POST", "/v1/reload", None).await, 401);
        assert_eq!(call(&app, "POST", "/v1/reload", read).await, 403);
        assert_eq!(call(&app, "POST", "/v1/reload", admin).await, 200);
        // An action is never a GET.
        assert_eq!(call(&app, "GET", "/v1/reload", admin).await, 405);
        // Basic auth is not accepted.
        let r = app
            .clone()
            .oneshot(
                axum::http::Request::builder()
                    .uri("/status")
                    .header("authorization", "Basic dXNlcjpwYXNz")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        assert!(r.headers().contains_key("www-authenticate"));
        // A reload opens /metrics and drops the read token.
        settings.public_metrics = true;
        settings.tokens.retain(|t| t.role == Role::Admin);
        access.update(&settings);
        assert_eq!(call(&app, "GET", "/metrics", None).await, 200);
        assert_eq!(call(&app, "GET", "/status", read).await, 401);
        // No tokens: open (loopback).
        settings.tokens.clear();
        access.update(&settings);
        assert_eq!(call(&app, "POST", "/v1/reload", None).await, 200);
    }

    async fn answer(r: Response) -> (u16, serde_json::Value) {
        let status = r.status().as_u16();
        let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_is_answered_when_done_and_never_cancelled_when_slow() {
        let (status, body) =
            answer(reload_answer(async { Ok("2 changes".to_string()) }).await).await;
        assert_eq!(
            (status, &body["reloaded"]),
            (200, &serde_json::json!("2 changes"))
        );
        let (status, body) = answer(reload_answer(async { Err("x: bad".to_string()) }).await).await;
        assert_eq!(
            (status, &body["error"]),
            (422, &serde_json::json!("x: bad"))
        );
        // A reload that panicked: 500, the relay goes on.
        let (status, body) = answer(reload_answer(async { panic!("a bug") }).await).await;
        assert_eq!(status, 500, "{body}");
        assert!(body["error"]
            .as_str()
            .is_some_and(|e| e.contains("the reload failed")));
        // A slow reload: 202 at the deadline, and it still runs to its end afterwards,
        // even though the request that started it is over.
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d = done.clone();
        let slow = async move {
            tokio::time::sleep(RELOAD_ANSWER_WITHIN * 3).await;
            d.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok("late".to_string())
        };
        let (status, body) = answer(reload_answer(slow).await).await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["reloading"], true);
        assert!(!done.load(std::sync::atomic::Ordering::SeqCst));
        tokio::time::sleep(RELOAD_ANSWER_WITHIN * 3).await;
        assert!(
            done.load(std::sync::atomic::Ordering::SeqCst),
            "the reload ran to its end"
        );
        // Dropping the request's future (a client gone, the deadline) does not cancel it.
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d = done.clone();
        let request = tokio::spawn(reload_answer(async move {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            d.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok(String::new())
        }));
        tokio::task::yield_now().await;
        request.abort();
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        assert!(
            done.load(std::sync::atomic::Ordering::SeqCst),
            "the reload ran to its end"
        );
    }
}
