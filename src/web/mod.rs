//! The reception page for clerks (docs/web.md): log in, scan a token and watch its import
//! live, see failed and held jobs with the reason in plain words and retry them, list the
//! tokens this facility issued, re-print their slips, revoke them and extend their expiry.
//! Japanese and English.
//!
//! Served beside the admin endpoint by `cloudpdi serve` when `web.listen` is set, with
//! the admin endpoint's state: a token goes through the one hand-off of `POST /tokens`
//! ([`crate::admin::handoff::hand_over`]), a retry through the one of
//! `POST /jobs/{id}/retry` ([`crate::admin::retry_job`]), a revoke or an extension through
//! the ones of `POST /jobs/{id}/revoke` and `/extend` ([`crate::admin::revoke_token`],
//! [`crate::admin::extend_token`], bounded by [`crate::admin::SLIP_ACTION_TIMEOUT`]).
//!
//! Every request passes [`guard`]: without a live session only the login page answers
//! (a GET goes to it, a POST is refused with 403); every POST must carry its session's
//! CSRF token (or, for the login form, the pre-session cookie's), else 403, before any
//! handler runs. Every response carries the security headers of [`security_headers`]:
//! no script, style or image from elsewhere (`default-src 'self'`), no framing, no
//! caching, no referrer. Pages are rendered on the server (maud escapes every value);
//! `app.js` only adds the live token check, the live progress (server-sent events) and
//! the camera QR reader.
//!
//! - `GET /login`, `POST /login`, `POST /logout`
//! - `GET /receive`, `POST /receive/check` (JSON), `POST /receive`, `GET /receive/{id}`,
//!   `GET /jobs/{id}/events` (server-sent events)
//! - `GET /jobs`, `POST /jobs/{id}/retry`
//! - `GET /sent`, `GET /sent/{id}/slip`, `GET`/`POST /sent/{id}/revoke`,
//!   `GET`/`POST /sent/{id}/extend`
//! - `GET /static/app.css`, `GET /static/app.js`

pub mod cli;
pub mod i18n;
mod jobs;
mod login;
mod receive;
mod sent;
pub mod session;
pub mod users;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::{DOCTYPE, Markup, html};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::AdminState;
use crate::config::WebConfig;
use crate::dicom::tls::{self as pem, DicomTlsError};
use crate::repository::listener::{self, Limits, PerAddress};
use crate::repository::tls::{Peer, TlsListener};
use i18n::{LANG_COOKIE, Lang, T};
use session::{CSRF_HEADER, LOGIN_COOKIE, SESSION_COOKIE, Session, Sessions};
use users::Users;

/// Connections the page serves at once (a few clerks' browsers, each with a live
/// progress stream); further ones wait in the kernel's accept queue.
pub const MAX_CONNECTIONS: usize = 64;

/// Connections one client address may hold (a browser opens about six, plus a progress
/// stream per open job page).
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 16;

/// Time a client has to send a request's headers (also between keep-alive requests).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Time a POST body has to arrive once its headers are accepted (a form is a few hundred
/// bytes: a browser sends it at once); a slower body is refused with 408.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest POST body read (a form, or the JSON of the live token check): a token is about
/// 100 characters.
pub const MAX_FORM_BYTES: usize = 16 * 1024;

/// Password checks (argon2, tens of milliseconds and 19 MiB each) run at once; further
/// logins wait, so a flood of logins cannot take every core and much memory.
pub const MAX_CONCURRENT_LOGINS: usize = 2;

const APP_CSS: &str = include_str!("assets/app.css");
const APP_JS: &str = include_str!("assets/app.js");

/// What the page's handlers share.
pub struct WebState {
    /// The admin endpoint's state: jobs of both pipelines, hand-off, retry.
    pub admin: Arc<AdminState>,
    /// The users file.
    pub users: Users,
    /// Sessions and lock-outs.
    pub sessions: Arc<Sessions>,
    /// Whether the page is HTTPS (the cookies are then `Secure`).
    pub https: bool,
    /// Whether `web.listen` is a loopback address: requests must then name a loopback
    /// host (a page of another site using DNS rebinding names its own).
    pub loopback: bool,
    /// `facility.time_zone`, for times shown.
    pub zone: jiff::tz::TimeZone,
    /// Password checks running at once ([`MAX_CONCURRENT_LOGINS`]).
    pub logins: tokio::sync::Semaphore,
    /// Cancelled when the daemon stops: progress streams end at once.
    pub stop: CancellationToken,
    /// Progress streams open, per session ID ([`receive::MAX_STREAMS`],
    /// [`receive::MAX_STREAMS_PER_SESSION`]).
    pub streams: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

impl WebState {
    /// The page's state for `[web]` (users file `users_file`) over the admin state.
    /// The progress streams end when `stop` is cancelled.
    pub fn new(
        admin: Arc<AdminState>,
        web: &WebConfig,
        users_file: std::path::PathBuf,
        stop: CancellationToken,
    ) -> Self {
        let zone = crate::clock::time_zone(&admin.time_zone).unwrap_or(jiff::tz::TimeZone::UTC);
        WebState {
            admin,
            users: Users::new(users_file),
            sessions: Sessions::new(session::Policy::of(web)),
            https: web.https(),
            loopback: web
                .listen
                .parse::<std::net::SocketAddr>()
                .is_ok_and(|a| a.ip().is_loopback()),
            zone,
            logins: tokio::sync::Semaphore::new(MAX_CONCURRENT_LOGINS),
            stop,
            streams: Arc::default(),
        }
    }
}

impl WebState {
    /// The session cookie's name: over HTTPS with the `__Host-` prefix, so that the
    /// browser accepts it only from this origin (another service on the host cannot
    /// plant one).
    pub fn session_cookie(&self) -> &'static str {
        if self.https {
            "__Host-cloudpdi_session"
        } else {
            SESSION_COOKIE
        }
    }

    /// The pre-session cookie's name (`__Host-` over HTTPS, as the session's).
    pub fn login_cookie(&self) -> &'static str {
        if self.https {
            "__Host-cloudpdi_login"
        } else {
            LOGIN_COOKIE
        }
    }
}

/// What [`guard`] learnt about a request, for its handler.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The page's language.
    pub lang: Lang,
    /// The session and its ID, when logged in.
    pub session: Option<(String, Session)>,
    /// The client's address (lock-outs, logs).
    pub peer: IpAddr,
    /// The request's path, for the language switch.
    pub path: String,
}

impl Ctx {
    /// The text `t` in the request's language.
    pub(crate) fn t(&self, t: T) -> &'static str {
        t.get(self.lang)
    }

    /// The logged-in user's name (empty before the login).
    pub fn user(&self) -> &str {
        self.session.as_ref().map_or("", |(_, s)| s.user.as_str())
    }

    /// The session's CSRF token, for forms (empty before the login).
    pub fn csrf(&self) -> &str {
        self.session.as_ref().map_or("", |(_, s)| s.csrf.as_str())
    }
}

/// The PEM certificate and key of `[web]` as a rustls configuration, loaded as DICOM TLS
/// and the repository load theirs (same checks and messages, the key zeroized).
///
/// # Errors
/// [`DicomTlsError`] naming `web.certificate` or `web.key` and the file.
pub fn tls_config(web: &WebConfig) -> Result<rustls::ServerConfig, DicomTlsError> {
    let certs = pem::certificates("web.certificate", &web.certificate)?;
    let key = pem::private_key("web.key", &web.key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| pem::key_error("web.key", &web.key, &web.certificate, &e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| pem::key_error("web.key", &web.key, &web.certificate, &e))
}

/// Serves the page on `listener` (HTTPS with `tls`) until `shutdown`.
///
/// # Errors
/// The listener's address cannot be read.
pub async fn serve(
    listener: TcpListener,
    state: Arc<WebState>,
    tls: Option<rustls::ServerConfig>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = router(state);
    let limits = Limits {
        max_connections: MAX_CONNECTIONS,
        header_timeout: HEADER_TIMEOUT,
    };
    let per_address = PerAddress::new(MAX_CONNECTIONS_PER_ADDRESS);
    let local = listener.local_addr()?;
    match tls {
        Some(tls) => {
            tracing::info!("web page: listening on https://{local}");
            let tls = TlsListener::new(listener, tls, MAX_CONNECTIONS, per_address.clone())?;
            listener::serve(tls, app, limits, per_address, shutdown.cancelled_owned()).await;
        }
        None => {
            tracing::info!("web page: listening on http://{local}");
            listener::serve(
                listener,
                app,
                limits,
                per_address,
                shutdown.cancelled_owned(),
            )
            .await;
        }
    }
    Ok(())
}

/// Every route, behind [`guard`] and [`security_headers`].
fn router(state: Arc<WebState>) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/receive") }))
        .route("/login", get(login::page).post(login::submit))
        .route("/logout", post(login::logout))
        .route("/receive", get(receive::page).post(receive::submit))
        .route("/receive/check", post(receive::check))
        .route("/receive/{id}", get(receive::job))
        .route("/jobs/{id}/events", get(receive::events))
        .route("/jobs", get(jobs::page))
        .route("/jobs/{id}/retry", post(jobs::retry))
        .route("/sent", get(sent::page))
        .route("/sent/{id}/slip", get(sent::slip))
        .route(
            "/sent/{id}/revoke",
            get(sent::confirm_revoke).post(sent::revoke),
        )
        .route(
            "/sent/{id}/extend",
            get(sent::extend_form).post(sent::extend),
        )
        .route(
            "/static/app.css",
            get(|| asset("text/css; charset=utf-8", APP_CSS)),
        )
        .route(
            "/static/app.js",
            get(|| asset("text/javascript; charset=utf-8", APP_JS)),
        )
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .layer(DefaultBodyLimit::max(MAX_FORM_BYTES))
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(state)
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn not_found(axum::Extension(ctx): axum::Extension<Ctx>) -> Response {
    message_page(&ctx, StatusCode::NOT_FOUND, ctx.t(T::NotFound))
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.to_owned())
}

/// A `Set-Cookie` value: `HttpOnly; SameSite=Strict; Path=/`, `Secure` over HTTPS,
/// `Max-Age` when given (0 deletes the cookie).
pub fn set_cookie(name: &str, value: &str, https: bool, max_age: Option<u64>) -> HeaderValue {
    let secure = if https { "; Secure" } else { "" };
    let age = max_age.map_or_else(String::new, |s| format!("; Max-Age={s}"));
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; HttpOnly; SameSite=Strict{secure}{age}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("invalid=; Max-Age=0"))
}

/// The `csrf` field of a form body.
#[derive(serde::Deserialize)]
struct CsrfField {
    #[serde(default)]
    csrf: String,
}

/// Pages that answer without a session (the browser asks for `/favicon.ico` by itself:
/// it gets a 404, not the login).
fn public(path: &str) -> bool {
    path == "/login" || path == "/favicon.ico" || path.starts_with("/static/")
}

/// Refuses, on a loopback listener, a request whose `Host` is not a loopback name (421),
/// then finds the request's session and language, sends a request without a session to the
/// login, and refuses a POST whose CSRF token is not its session's (or, for the login,
/// the pre-session cookie's) with 403, before any handler runs.
async fn guard(State(state): State<Arc<WebState>>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    if state.loopback && !host.is_some_and(crate::admin::is_loopback_host) {
        return (
            StatusCode::MISDIRECTED_REQUEST,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "このページは localhost、127.0.0.1、[::1] 宛ての要求にだけ答えます。\n\
             The page answers only requests addressed to localhost, 127.0.0.1 or [::1] \
             (the Host header named something else, as a web page using DNS rebinding \
             would): open http://127.0.0.1:<port>/ on this computer.\n",
        )
            .into_response();
    }
    let peer = parts
        .extensions
        .get::<ConnectInfo<Peer>>()
        .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.addr.ip());
    let chosen = parts.uri.query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("lang="))
            .and_then(Lang::parse)
    });
    let lang = Lang::of(&parts.headers, chosen);
    // One leading slash: `//host/...` would make the language link point off-site.
    let path = format!("/{}", parts.uri.path().trim_start_matches('/'));
    let now = crate::clock::now_ms();
    let had_cookie = cookie(&parts.headers, state.session_cookie());
    let stream = path.ends_with("/events");
    let mut session = had_cookie.as_deref().and_then(|id| {
        let found = if stream {
            state.sessions.peek(id, now)
        } else {
            state.sessions.touch(id, now)
        };
        found.map(|s| (id.to_owned(), s))
    });
    if let Some((id, s)) = &session {
        let (check, name) = (state.clone(), s.user.clone());
        let key = tokio::task::spawn_blocking(move || check.users.key(&name))
            .await
            .ok()
            .flatten();
        if key.is_none_or(|key| !session::same_secret(&key, &s.key)) {
            tracing::info!(user = %s.user, "web: session ended: the user is no longer in the users file, or their password changed");
            state.sessions.end(id);
            session = None;
        }
    }
    let ctx = Ctx {
        lang,
        session,
        peer,
        path: path.clone(),
    };
    let forbidden = || message_page(&ctx, StatusCode::FORBIDDEN, ctx.t(T::Forbidden));
    let request = if parts.method == Method::POST {
        // Who may send a body is decided before it is read: without a session (or, for
        // the login, a pre-session cookie) nothing is read, and a body must arrive
        // within BODY_TIMEOUT, so slow bodies cannot hold the connection slots.
        let expected = match (&ctx.session, path.as_str()) {
            (_, "/login") => cookie(&parts.headers, state.login_cookie())
                .filter(|t| state.sessions.issued_login_form(t)),
            (Some((_, s)), _) => Some(s.csrf.clone()),
            (None, _) => None,
        };
        let Some(expected) = expected.filter(|e| !e.is_empty()) else {
            return forbidden();
        };
        let bytes = match tokio::time::timeout(
            BODY_TIMEOUT,
            axum::body::to_bytes(body, MAX_FORM_BYTES),
        )
        .await
        {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(_)) => {
                return message_page(&ctx, StatusCode::PAYLOAD_TOO_LARGE, ctx.t(T::TooLarge));
            }
            Err(_) => {
                tracing::warn!(path = %path, address = %peer, "web: POST refused: its body did not arrive within {} s", BODY_TIMEOUT.as_secs());
                return message_page(&ctx, StatusCode::REQUEST_TIMEOUT, ctx.t(T::TooSlow));
            }
        };
        let given = match parts.headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok()) {
            Some(header) => header.to_owned(),
            None => form_csrf(&parts, &bytes).await,
        };
        if !session::same_secret(&given, &expected) {
            tracing::warn!(path = %path, address = %peer, user = %ctx.user(), "web: POST refused: no valid CSRF token");
            return forbidden();
        }
        Request::from_parts(parts, Body::from(bytes))
    } else {
        Request::from_parts(parts, body)
    };
    if ctx.session.is_none() && !public(&path) {
        if request.method() != Method::GET {
            return forbidden();
        }
        let to = if had_cookie.is_some() {
            "/login?ended=1"
        } else {
            "/login"
        };
        return Redirect::to(to).into_response();
    }
    let mut request = request;
    request.extensions_mut().insert(ctx);
    let mut response = next.run(request).await;
    if let Some(lang) = chosen {
        response.headers_mut().append(
            header::SET_COOKIE,
            set_cookie(LANG_COOKIE, lang.code(), state.https, Some(365 * 86_400)),
        );
    }
    response
}

/// The `csrf` field of a urlencoded form body (empty when there is none).
async fn form_csrf(parts: &axum::http::request::Parts, bytes: &Bytes) -> String {
    let mut probe = Request::builder()
        .method(Method::POST)
        .uri(parts.uri.clone())
        .body(Body::from(bytes.clone()))
        .unwrap_or_default();
    if let Some(content_type) = parts.headers.get(header::CONTENT_TYPE) {
        probe
            .headers_mut()
            .insert(header::CONTENT_TYPE, content_type.clone());
    }
    axum::Form::<CsrfField>::from_request(probe, &())
        .await
        .map(|f| f.0.csrf)
        .unwrap_or_default()
}

/// The page's policy on every response: scripts, styles and images only from the page
/// itself, no framing, nothing cached or sniffed, no referrer; the camera for the page
/// only. A response that set its own policy (the slip) keeps it.
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    if !headers.contains_key(header::CONTENT_SECURITY_POLICY) {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'self'; frame-ancestors 'none'; form-action 'self'; \
                 base-uri 'none'; object-src 'none'",
            ),
        );
    }
    for (name, value) in [
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::CACHE_CONTROL, "no-store"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    headers.insert(
        "permissions-policy",
        HeaderValue::from_static("camera=(self), microphone=(), geolocation=()"),
    );
    response
}

/// A whole page: header with the navigation and the language switch, then `body`.
pub fn layout(ctx: &Ctx, title: &str, body: Markup) -> Markup {
    let other = ctx.lang.other();
    let nav = [
        ("/receive", T::NavReceive),
        ("/jobs", T::NavJobs),
        ("/sent", T::NavSent),
    ];
    html! {
        (DOCTYPE)
        html lang=(ctx.lang.code()) {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " — " (ctx.t(T::App)) }
                link rel="stylesheet" href="/static/app.css";
                script src="/static/app.js" defer {}
            }
            body {
                a.skip href="#main" { (ctx.t(T::Skip)) }
                header.top {
                    span.app { (ctx.t(T::App)) }
                    @if ctx.session.is_some() {
                        nav aria-label=(ctx.t(T::App)) {
                            ul {
                                @for (href, label) in nav {
                                    li {
                                        @if ctx.path == href || (href != "/" && ctx.path.starts_with(&format!("{href}/"))) {
                                            a href=(href) aria-current="page" { (ctx.t(label)) }
                                        } @else {
                                            a href=(href) { (ctx.t(label)) }
                                        }
                                    }
                                }
                            }
                        }
                    }
                    div.who {
                        a lang=(other.code()) href={ (ctx.path) "?lang=" (other.code()) } { (T::Switch.get(ctx.lang)) }
                        @if ctx.session.is_some() {
                            span { (ctx.t(T::SignedInAs)) " " strong { (ctx.user()) } }
                            form method="post" action="/logout" {
                                input type="hidden" name="csrf" value=(ctx.csrf());
                                button type="submit" { (ctx.t(T::Logout)) }
                            }
                        }
                    }
                }
                main id="main" tabindex="-1" {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// A page holding one sentence, with `status`.
pub fn message_page(ctx: &Ctx, status: StatusCode, text: &str) -> Response {
    let body = html! { p.notice role="alert" { (text) } };
    (status, html_response(layout(ctx, ctx.t(T::App), body))).into_response()
}

/// `markup` as a UTF-8 HTML response.
pub fn html_response(markup: Markup) -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        markup.into_string(),
    )
        .into_response()
}

/// A study summary as a definition list (nothing when unknown).
pub fn study(ctx: &Ctx, study: Option<&crate::gateway::reception::batch::StudySummary>) -> Markup {
    let Some(study) = study else {
        return html! { span.muted { (ctx.t(T::NotKnown)) } };
    };
    html! { dl.study { (study_rows(ctx, study)) } }
}

/// The terms and values of [`study`]'s list, for a list that adds its own.
pub fn study_rows(ctx: &Ctx, study: &crate::gateway::reception::batch::StudySummary) -> Markup {
    let date = format_date(&study.study_date);
    html! {
        @if !study.patient_id.is_empty() { dt { (ctx.t(T::PatientId)) } dd { (study.patient_id) } }
        @if !study.accession.is_empty() { dt { (ctx.t(T::Accession)) } dd { (study.accession) } }
        @if !date.is_empty() { dt { (ctx.t(T::StudyDate)) } dd { (date) } }
        @if !study.modality.is_empty() { dt { (ctx.t(T::Modality)) } dd { (study.modality) } }
    }
}

/// `YYYYMMDD` as `YYYY-MM-DD` (anything else as it is).
pub(crate) fn format_date(date: &str) -> String {
    match (date.get(..4), date.get(4..6), date.get(6..8)) {
        (Some(y), Some(m), Some(d)) if date.len() == 8 => format!("{y}-{m}-{d}"),
        _ => date.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_by_name() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; cloudpdi_session=abc"),
        );
        headers.append(header::COOKIE, HeaderValue::from_static("b=2"));
        assert_eq!(cookie(&headers, "cloudpdi_session").as_deref(), Some("abc"));
        assert_eq!(cookie(&headers, "b").as_deref(), Some("2"));
        assert_eq!(cookie(&headers, "cloudpdi"), None);
        let set = set_cookie("s", "v", true, None);
        assert_eq!(set, "s=v; Path=/; HttpOnly; SameSite=Strict; Secure");
        let set = set_cookie("s", "", false, Some(0));
        assert_eq!(set, "s=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    }

    #[test]
    fn dates_read_as_dates() {
        assert_eq!(format_date("20261129"), "2026-11-29");
        assert_eq!(format_date("2026"), "2026");
    }
}
